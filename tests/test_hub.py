"""Hub checkpoints: fetched once into a cache by a local rule, read offline by the jobs.

No test reaches a hub: `fake_hub` stands in for huggingface_hub.snapshot_download
and lays tiny checkpoints saved here out in huggingface_hub's cache layout
(models--org--name/refs/main + snapshots/<commit>/...), the layout the real
download writes and diffusers' from_pretrained reads. Loading then runs with
every socket connection refused, so a test passes only if the loader reads the
cache alone.
"""

import fnmatch
import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

import repro.core.hub as hub
from repro.agd.methods import load_decoder
from repro.core.config import load_yaml, merge
from repro.core.errors import ReproInputError
from repro.core.modelio import build_dit

ROOT = Path(__file__).resolve().parents[1]
DIT_ID, VAE_ID = "org/tiny-dit", "org/tiny-vae"


def paper_config(**agd_overrides):
    cfg = merge(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "configs/paper.yaml"))
    return merge(cfg, {"agd": agd_overrides})


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_dit):
    """The 'hub': repository id -> directory of files, each with a pickled copy that must stay there."""
    root = tmp_path_factory.mktemp("remote")
    dit = tiny_dit(seed=0, in_channels=4, num_layers=1)
    dit.save_pretrained(root / "dit" / "transformer", safe_serialization=True)
    (root / "dit" / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (root / "dit" / "model_index.json").write_text("{}")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)
    (root / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    return {"repos": {DIT_ID: root / "dit", VAE_ID: root / "vae"}, "dit": dit, "vae": vae}


def fake_hub(repos, calls):
    """snapshot_download over local directories, writing huggingface_hub's cache layout."""

    def download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        if repo_id not in repos:
            raise FileNotFoundError(f"404: {repo_id}")
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        for f in sorted(repos[repo_id].rglob("*")):
            rel = f.relative_to(repos[repo_id]).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snapshot / rel)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return str(snapshot)

    return download


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection is an error: what an offline compute node does."""

    def refuse(self, *args, **kwargs):
        raise OSError("network access in a test that must read the cache only")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# ----------------------------------------------------------------------------- sources


def test_tiny_and_smoke_scale_name_no_hub_checkpoint():
    tiny = load_yaml(ROOT / "config.yaml")
    assert hub.hub_sources(tiny) == []
    assert hub.hub_sources(merge(tiny, load_yaml(ROOT / "configs/smoke.yaml"))) == []


def test_paper_scale_sources_are_a_function_of_the_config(tmp_path):
    sources = hub.hub_sources(paper_config())
    # The foundation models first (configs/paper.yaml names SD 2.1 base, CLIP and Wan2.1),
    # then each paper's: AGD's, HuMo's Whisper.
    assert [(s.key, s.repo_id, s.subfolder) for s in sources] == [
        ("foundation.t2i.pretrained", "stabilityai/stable-diffusion-2-1-base", None),
        ("foundation.clip.pretrained", "openai/clip-vit-base-patch16", None),
        ("foundation.t2v.pretrained", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None),
        ("agd.base.pretrained", "facebook/DiT-XL-2-256", "transformer"),
        ("agd.base.vae", "stabilityai/sd-vae-ft-ema", None),
        ("humo.audio.pretrained", "openai/whisper-large-v3", None),
    ]
    assert sources[3].allow_patterns() == ["transformer/*.json", "transformer/*.safetensors"]
    # A derived checkpoint on the hub is fetched too; the same (id, subfolder) only once.
    cfg = paper_config(transfer={"pretrained": "me/dit-finetuned"})
    assert "agd.transfer.pretrained" in [s.key for s in hub.hub_sources(cfg)]
    cfg = paper_config(transfer={"pretrained": "facebook/DiT-XL-2-256"})
    assert len(hub.hub_sources(cfg)) == 6
    # Local checkpoints are loaded where they are, never fetched.
    cfg = paper_config(base={"pretrained": str(tmp_path), "vae": "./vae"})
    assert [s.key for s in hub.hub_sources(cfg) if s.key.startswith("agd.")] == []


def test_sources_come_from_the_foundation_entries_then_the_papers_hub_keys(tmp_path):
    cfg = merge(
        paper_config(transfer={"pretrained": "facebook/DiT-XL-2-256"}),
        {
            "foundation": {
                "t2i": {"pretrained": "org/tiny-t2i", "subfolder": "unet"},
                "clip": {"pretrained": None},  # built by the pipeline: nothing to fetch
                "t2v": {"pretrained": str(tmp_path)},  # a local directory: nothing to fetch
            }
        },
    )
    keys = hub.hub_keys(cfg)
    assert keys[:3] == [
        ("foundation.t2i.pretrained", "foundation.t2i.subfolder"),
        ("foundation.clip.pretrained", "foundation.clip.subfolder"),
        ("foundation.t2v.pretrained", "foundation.t2v.subfolder"),
    ]
    # Each registered paper's keys follow (AGD's among them), never listed in core.
    assert ("agd.base.vae", None) in keys[3:]
    sources = hub.hub_sources(cfg)
    assert [(s.key, s.repo_id, s.subfolder) for s in sources][:2] == [
        ("foundation.t2i.pretrained", "org/tiny-t2i", "unet"),
        ("agd.base.pretrained", "facebook/DiT-XL-2-256", "transformer"),
    ]
    # The derived checkpoint is the base's: fetched once, yet its key is on the hub,
    # so the job that loads it still waits for the manifest and reads the cache.
    assert "agd.transfer.pretrained" not in {s.key for s in sources}
    assert hub.keys_on_hub(cfg) == {
        "foundation.t2i.pretrained",
        "agd.base.pretrained",
        "agd.base.vae",
        "agd.transfer.pretrained",
        "humo.audio.pretrained",
    }


def test_foundation_sources_fetch_the_tokenizer_merges_but_never_pickle(tmp_path):
    """A CLIP tokenizer is vocab.json + merges.txt: a foundation entry fetches *.txt too."""
    remote = tmp_path / "remote"
    for rel, text in {
        "model_index.json": "{}",
        "unet/config.json": "{}",
        "unet/diffusion_pytorch_model.safetensors": "weights",
        "unet/diffusion_pytorch_model.bin": "pickle",
        "tokenizer/vocab.json": "{}",
        "tokenizer/merges.txt": "#version: 0.2",
    }.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text(text)
    cfg = merge(load_yaml(ROOT / "config.yaml"), {"foundation": {"t2i": {"pretrained": "org/sd"}}})
    (source,) = [s for s in hub.hub_sources(cfg) if s.key.startswith("foundation.")]
    assert source.allow_patterns() == ["*.json", "*.safetensors", "*.txt"]
    # The papers' own checkpoints keep the default patterns.
    assert hub.hub_sources(paper_config())[-1].patterns == hub.DEFAULT_PATTERNS
    calls = []
    manifest = hub.fetch([source], tmp_path / "cache", download=fake_hub({"org/sd": remote}, calls))
    assert manifest["sources"][0]["files"] == [
        "model_index.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert calls[0]["allow_patterns"] == ["*.json", "*.safetensors", "*.txt"]


@pytest.mark.parametrize(
    "value,expected",
    [
        ("facebook/DiT-XL-2-256", True),
        ("gpt2", True),
        ("/abs/path", False),
        ("./rel", False),
        ("~/models/dit", False),
        ("a/b/c", False),
        ("", False),
        (None, False),
    ],
)
def test_is_hub_id(value, expected):
    assert hub.is_hub_id(value) is expected


# ----------------------------------------------------------------------------- fetch


def test_fetch_writes_a_manifest_of_what_is_in_the_cache(remote, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(remote["repos"], calls))
    cache, out = tmp_path / "cache", tmp_path / "models/hub/manifest.json"
    sources = [
        hub.HubSource("agd.base.pretrained", DIT_ID, "transformer").as_dict(),
        hub.HubSource("agd.base.vae", VAE_ID).as_dict(),
    ]
    params = json.dumps({"cache_dir": str(cache), "sources": sources})
    hub.main(["fetch", "--params", params, "--out", str(out)])

    manifest = json.loads(out.read_text())
    assert manifest["cache_dir"] == str(cache.resolve())
    dit, vae = manifest["sources"]
    assert (dit["key"], dit["repo_id"], dit["subfolder"]) == (
        "agd.base.pretrained",
        DIT_ID,
        "transformer",
    )
    assert dit["revision"] == hashlib.sha1(DIT_ID.encode()).hexdigest()
    assert Path(dit["path"]).is_relative_to(cache.resolve())
    assert dit["files"] == [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    assert vae["files"] == ["config.json", "diffusion_pytorch_model.safetensors"]
    # Only what the sources ask for: configs and safetensors, inside the subfolder.
    assert calls[0]["allow_patterns"] == ["transformer/*.json", "transformer/*.safetensors"]
    assert not list(cache.rglob("*.bin")) and not list(cache.rglob("model_index.json"))


def test_jobs_load_from_the_cache_without_the_network(remote, tmp_path, no_network):
    cache = tmp_path / "cache"
    hub.fetch(
        [hub.HubSource("agd.base.pretrained", DIT_ID, "transformer"), hub.HubSource("k", VAE_ID)],
        cache,
        download=fake_hub(remote["repos"], []),
    )
    # The options rules/hub.smk adds to the --params of agd_base / agd_eval.
    options = {"cache_dir": str(cache), "local_files_only": True}
    dit = build_dit({"pretrained": DIT_ID, "subfolder": "transformer", **options})
    for name, tensor in remote["dit"].state_dict().items():
        assert torch.equal(dit.state_dict()[name], tensor), name

    decode = load_decoder(VAE_ID, **options)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = remote["vae"].decode(latents / remote["vae"].config.scaling_factor).sample
    assert torch.equal(decode(latents), expected.clamp(-1, 1))

    # Not fetched: an error naming the checkpoint, and still no network.
    empty = {"cache_dir": str(tmp_path / "empty"), "local_files_only": True}
    with pytest.raises(ReproInputError, match="params.pretrained: org/missing/transformer"):
        build_dit({"pretrained": "org/missing", "subfolder": "transformer", **empty})
    with pytest.raises(ReproInputError, match="agd.base.vae"):
        load_decoder("org/missing", **empty)


def test_loader_options():
    assert hub.loader_options({}) == {"local_files_only": False}
    assert hub.loader_options({"cache_dir": "c", "local_files_only": True}) == {
        "cache_dir": "c",
        "local_files_only": True,
    }


def test_fetch_failures_name_the_config_key(remote, tmp_path):
    with pytest.raises(ReproInputError, match=r"agd.base.pretrained: org/nope.*404"):
        hub.fetch(
            [hub.HubSource("agd.base.pretrained", "org/nope")],
            tmp_path,
            download=fake_hub(remote["repos"], []),
        )
    pickled_only = tmp_path / "remote-bin"
    pickled_only.mkdir()
    (pickled_only / "config.json").write_text("{}")
    (pickled_only / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ReproInputError, match="agd.base.vae: org/old-vae: no safetensors"):
        hub.fetch(
            [hub.HubSource("agd.base.vae", "org/old-vae")],
            tmp_path / "cache",
            download=fake_hub({"org/old-vae": pickled_only}, []),
        )


def test_fetch_command_refuses_bad_params(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "repro.core.hub", "fetch", "--params", '{"sources": []}']
        + ["--out", str(tmp_path / "m.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "cache_dir" in proc.stderr
    assert not (tmp_path / "m.json").exists()


def test_list_command_prints_what_the_paper_scale_fetches():
    proc = subprocess.run(
        [sys.executable, "-m", "repro.core.hub", "list"]
        + [str(ROOT / "config.yaml"), str(ROOT / "configs/paper.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "foundation.t2i.pretrained: stabilityai/stable-diffusion-2-1-base",
        "foundation.clip.pretrained: openai/clip-vit-base-patch16",
        "foundation.t2v.pretrained: Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "agd.base.pretrained: facebook/DiT-XL-2-256 (subfolder transformer)",
        "agd.base.vae: stabilityai/sd-vae-ft-ema",
        "humo.audio.pretrained: openai/whisper-large-v3",
    ]


# ----------------------------------------------------------------------------- the workflow


def dry_run(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    cmd += ["-n", "-p", "--cores", "8", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def jobs_by_rule(plan):
    """{rule: [job block text]} from a dry run's plan."""
    jobs = {}
    for block in plan.split("\nrule ")[1:] + plan.split("\nlocalrule ")[1:]:
        name = block.split(":", 1)[0].strip()
        jobs.setdefault(name, []).append(block.split("\n\n")[0])
    return jobs


def test_paper_plan_fetches_first_and_loads_from_the_cache(tmp_path):
    plan = dry_run(
        tmp_path, "results/agd_fid.csv", "--configfile", str(ROOT / "configs/paper.yaml")
    )
    jobs = jobs_by_rule(plan)
    (fetch,) = jobs["hub_fetch"]
    assert "facebook/DiT-XL-2-256" in fetch and "stabilityai/sd-vae-ft-ema" in fetch
    manifest = "models/hub/manifest.json"
    for rule in ("agd_base", "agd_eval"):
        for job in jobs[rule]:
            inputs = next(line for line in job.splitlines() if "input:" in line)
            assert manifest in inputs, job
            assert '"cache_dir": "models/hub/cache"' in job and '"local_files_only": true' in job
    # Jobs that load only local files do not wait for the fetch.
    for rule in ("agd_trajectories", "agd_distill", "agd_gd", "agd_transfer", "digits"):
        assert all(manifest not in job and "cache_dir" not in job for job in jobs[rule]), rule


def test_a_checkpoint_named_twice_is_fetched_once_and_read_from_the_cache_by_both(tmp_path):
    overlay = tmp_path / "same.yaml"
    overlay.write_text('agd: {transfer: {pretrained: "facebook/DiT-XL-2-256"}}\n')
    plan = dry_run(
        tmp_path,
        "results/agd_fid.csv",
        "--configfile",
        str(ROOT / "configs/paper.yaml"),
        str(overlay),
    )
    jobs = jobs_by_rule(plan)
    (fetch,) = jobs["hub_fetch"]
    assert fetch.count("facebook/DiT-XL-2-256") == 1
    (transfer,) = jobs["agd_transfer"]
    inputs = next(line for line in transfer.splitlines() if "input:" in line)
    assert "models/hub/manifest.json" in inputs
    assert '"cache_dir": "models/hub/cache"' in transfer


def test_smoke_plan_fetches_nothing(tmp_path):
    plan = dry_run(
        tmp_path, "results/agd_fid.csv", "--configfile", str(ROOT / "configs/smoke.yaml")
    )
    assert "hub_fetch" not in plan and "models/hub" not in plan and "cache_dir" not in plan

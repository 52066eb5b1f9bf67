"""A bad config fails before any job runs, naming the key and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from repro.core.config import cross_checks, load_yaml, merge, schema_errors, validate_config
from repro.core.errors import ReproInputError

ROOT = Path(__file__).resolve().parents[1]


def tiny():
    return load_yaml(ROOT / "config.yaml")


@pytest.mark.parametrize("overlay", ["configs/smoke.yaml", "configs/paper.yaml"])
def test_shipped_configs_are_valid(overlay):
    for cfg in (tiny(), merge(tiny(), load_yaml(ROOT / overlay))):
        assert schema_errors(cfg) == []
        assert cross_checks(cfg) == []
        validate_config(cfg)


def set_key(cfg, dotted, value):
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


DELETE = object()

# (dotted key, bad value, words the message must contain)
BAD = [
    ("scale", "huge", ["scale", "'smoke'", "'tiny'", "'paper'"]),
    ("seeds", "0", ["seeds", "not of type 'array'"]),
    ("agd.base.steps", -5, ["agd.base.steps", "minimum"]),
    ("agd.distill.steps", 0, ["agd.distill.steps", "minimum"]),
    ("agd.distill.lr", "fast", ["agd.distill.lr", "not of type 'number'"]),
    ("agd.trajectories.w_min", 7.0, ["agd.trajectories.w_min", "w_max"]),
    ("agd.eval.methods", ["cfg", "magic"], ["agd.eval.methods.1", "'magic'", "'agd'"]),
    ("agd.sampler.kind", "euler", ["agd.sampler.kind", "'ddim'", "'ddpm'"]),
    ("agd", DELETE, ["(top level)", "'agd' is a required property"]),
    ("agd.eval", DELETE, ["agd", "'eval' is a required property"]),
    ("agd.distill.adapter_dims", 8, ["agd.distill", "adapter_dims"]),
    ("agd.eval.guidance_scales", [1.5, 9.0], ["agd.eval.guidance_scales", "9.0", "w_max"]),
    ("agd.base.model.patch_size", 3, ["agd.base.model.patch_size", "sample_size"]),
    ("agd.eval.feature_net", "clip", ["agd.eval.feature_net", "'digit_classifier'"]),
    ("data.digits.val_fraction", 0.9, ["data.digits.val_fraction", "maximum"]),
    ("agd.figures.grid_classes", [0, 12], ["agd.figures.grid_classes", "12"]),
    ("threads.default", 1.5, ["threads.default", "not of type 'integer'"]),
    ("agd.sampler.variance_type", "learned", ["agd.sampler.variance_type", "'learned_range'"]),
    ("sla.kernel_bench.block_q", 48, ["sla.kernel_bench.block_q", "64"]),
    ("sla.kernel_bench.sparsities", [0.95, 0.05], ["sla.kernel_bench", "0.05", "k_l"]),
    (
        "sla.kernel_bench.forms",
        [{"linear": "all", "k_l": 0.99}],
        ["sla.kernel_bench", "forms[0].k_l", "0.99"],
    ),
    ("sla.kernel_bench.forms", [{"linear": "hedgehog", "k_l": 0.0}], ["forms", "hedgehog"]),
    ("sla", DELETE, ["(top level)", "'sla' is a required property"]),
    # A section that no paper registers is refused (the paper parts are composed in).
    ("vidgen", {"steps": 1}, ["(top level)", "'vidgen' was unexpected"]),
    ("datadream.dataset", "cifar10", ["datadream.dataset", "neither 'digits'"]),
    (
        "data.imagefolders",
        {"eurosat": {"root": "/data/eurosat", "size": 64, "channels": 2, "seed": 0}},
        ["data.imagefolders.eurosat.channels", "is not one of"],
    ),
    (
        "data.imagefolders",
        {"digits": {"root": "/data/d", "size": 8, "channels": 1, "seed": 0}},
        ["data.imagefolders", "digits"],
    ),
    (
        "probex.trees",
        [{"name": "mlp", "arch": "mlp", "seed": 0, "layer": "fc"}],
        ["probex.trees.0.arch", "'mlp' is not one of"],
    ),
    ("probex.subset_size", 10, ["probex.subset_size", "between 1 and"]),
    ("probex.zoo.split", {"val": 0.5, "test": 0.5}, ["probex.zoo.split", "no model to train"]),
    ("probex.zoo.lr", [0.01, 0.001], ["probex.zoo.lr", "not a range"]),
    ("probex.zeroshot.heldout_classes", 9, ["probex.zeroshot.heldout_classes", "between 2"]),
    ("probex.zeroshot.prompt", "a glyph", ["probex.zeroshot.prompt", "does not match"]),
    (
        "probex.trees",
        [
            {"name": "a", "arch": "vit", "seed": 0, "layer": "x"},
            {"name": "a", "arch": "cnn", "seed": 0, "layer": "y"},
        ],
        ["probex.trees", "repeat"],
    ),
    ("fedre.partitions.dir.alpha", 0, ["fedre.partitions.dir.alpha", "must be > 0"]),
    ("fedre.partitions.dir.kind", "iid", ["fedre.partitions.dir.kind", "is not one of"]),
    ("fedre.clients", ["mlp_narrow"] * 9 + ["resnet50"], ["fedre.clients", "'resnet50'"]),
    ("fedre.num_clients", 9, ["fedre.clients", "one per client"]),
    ("fedre.algorithms", ["local", "fedavg"], ["fedre.algorithms", "fedavg"]),
    ("fedre.claims.partition", "iid", ["fedre.claims.partition", "not a partition"]),
    ("fedre.last_rounds", 41, ["fedre.last_rounds", "between 1 and fedre.rounds"]),
    ("fedre.tasks.glyphs.chars", "AAB", ["fedre.tasks.glyphs.chars", "distinct"]),
    ("agd.distill.processes", 0, ["agd.distill.processes", "minimum"]),
    ("agd.base.processes", 1.5, ["agd.base.processes", "not of type 'integer'"]),
    ("foundation", DELETE, ["(top level)", "'foundation' is a required property"]),
    ("foundation.t2i", {"subfolder": "unet"}, ["foundation.t2i", "'pretrained' is a required"]),
    (
        "foundation.t2i",
        {"pretrained": None, "revison": "main"},
        ["foundation.t2i", "'revison' was unexpected"],
    ),
    ("foundation.T2I", {"pretrained": None}, ["foundation", "'T2I' does not match"]),
    ("foundation.t2i", {"pretrained": ""}, ["foundation.t2i.pretrained", "non-empty"]),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(key, value, words):
    cfg = set_key(tiny(), key, value)
    with pytest.raises(ReproInputError) as err:
        validate_config(cfg)
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def snakemake(workdir, *args):
    """Run this repository's Snakefile with `workdir` as working directory."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_snakemake_refuses_bad_config_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("agd:\n  distill:\n    steps: -1\n")
    proc = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    assert "agd.distill.steps" in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists()


def test_config_cli(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "repro.core.config",
            str(ROOT / "config.yaml"),
            str(ROOT / "configs/smoke.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "scale smoke" in proc.stdout
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "repro.core.config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and str(missing) in proc.stderr


def test_snakemake_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_foundation_entries_are_accepted():
    cfg = tiny()
    cfg["foundation"] = {
        "t2i": {"pretrained": None},
        "clip": {"pretrained": "openai/clip-vit-base-patch16", "subfolder": None},
        "wan": {"pretrained": "/models/wan", "subfolder": "transformer"},
    }
    assert validate_config(cfg) is None  # raises ReproInputError on any problem


# The three glyph splits whose seeds must differ, and the key the message names.
GLYPH_PAIRS = [
    ("seed", "val.seed", "data.glyphs.val.seed"),
    ("seed", "test.seed", "data.glyphs.test.seed"),
    ("val.seed", "test.seed", "data.glyphs.test.seed"),
]


def glyph_seeds(cfg, seeds):
    for key, value in seeds.items():
        set_key(cfg, f"data.glyphs.{key}", value)
    return cfg


@pytest.mark.parametrize("a,b,key", GLYPH_PAIRS, ids=[f"{a}={b}" for a, b, _ in GLYPH_PAIRS])
def test_glyph_heldout_seeds_must_differ_from_each_other(a, b, key):
    """Just inside (two splits share a seed) is refused naming the key; just outside
    (the same seeds, one apart) is accepted: the check can be neither lost nor loosened."""
    (third,) = {"seed", "val.seed", "test.seed"} - {a, b}
    equal = glyph_seeds(tiny(), {a: 5, b: 5, third: 9})
    with pytest.raises(ReproInputError) as err:
        validate_config(equal)
    message = str(err.value)
    assert key in message and f"data.glyphs.{a}" in message, message
    assert "must differ" in message
    validate_config(glyph_seeds(tiny(), {a: 5, b: 6, third: 9}))
    validate_config(glyph_seeds(tiny(), {a: 6, b: 5, third: 9}))


def test_learned_variance_needs_ddpm():
    cfg = tiny()
    cfg["agd"]["sampler"].update(kind="ddim", variance_type="learned_range")
    with pytest.raises(ReproInputError, match=r"agd.sampler.variance_type.*needs kind 'ddpm'"):
        validate_config(cfg)

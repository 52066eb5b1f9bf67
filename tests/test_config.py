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


def test_paper_plan_asks_for_a_gpu_in_every_gpu_rule(tmp_path):
    """A dry run at paper scale: the model rules declare gpu=1."""
    proc = snakemake(
        tmp_path,
        "-n",
        "--cores",
        "8",
        "results/agd_fid.csv",
        "--configfile",
        str(ROOT / "configs/paper.yaml"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = out.split("\nrule ")[1:]
    gpu_rules = {
        "agd_base",
        "agd_trajectories",
        "agd_distill",
        "agd_gd",
        "agd_transfer",
        "agd_eval",
    }
    seen = set()
    for job in jobs:
        name = job.split(":", 1)[0].strip()
        if name in gpu_rules:
            seen.add(name)
            assert "gpu=1" in job, f"{name} does not ask for a GPU:\n{job}"
    assert seen == gpu_rules


def test_learned_variance_needs_ddpm():
    cfg = tiny()
    cfg["agd"]["sampler"].update(kind="ddim", variance_type="learned_range")
    with pytest.raises(ReproInputError, match=r"agd.sampler.variance_type.*needs kind 'ddpm'"):
        validate_config(cfg)

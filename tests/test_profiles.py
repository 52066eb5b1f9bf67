"""Conventions a user relies on: a scale picked by a profile, and `make clean`.

`--configfile` takes several values, so a target after it is read as one more
config file (`snakemake --configfile configs/smoke.yaml results/agd_fid.csv`
fails). profiles/smoke and profiles/paper carry the overlay instead: a profile
takes no positional values, composes with the others (`--profile profiles/slurm
--profile profiles/paper`), and leaves the targets alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCALES = {"smoke": "configs/smoke.yaml", "paper": "configs/paper.yaml"}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_scale_profile_sets_only_its_overlay(scale):
    profile = ROOT / "profiles" / scale
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    # Only configfile: any other key would override the same key of a profile given
    # before it (e.g. profiles/slurm's cores or jobs).
    assert list(settings) == ["configfile"]
    # One string, relative to the profile (Snakemake resolves a string value that
    # exists there against the profile's directory; a list it passes on as it is).
    assert isinstance(settings["configfile"], str)
    assert (profile / settings["configfile"]).resolve() == ROOT / SCALES[scale]


def dry_run(tmp_path, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
    cmd += ["-d", str(tmp_path / "work"), "-n", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def jobs(out: str) -> dict[str, int]:
    """The job counts of a dry run's table."""
    table = out[out.index("job ") : out.index("total")]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


@pytest.mark.slow
def test_smoke_profile_with_a_target(tmp_path):
    # With profiles/local (cores, printshellcmds), as `make smoke` and the README do.
    profiles = ["--profile", "profiles/local", "--profile", "profiles/smoke"]
    out = dry_run(tmp_path, *profiles, "results/agd_fid.csv")
    scales = set(re.findall(r"--scale (\w+)", out))
    assert scales == {"smoke"}, scales
    planned = jobs(out)
    # The target's jobs only (no figures, throughput or claims), at smoke's 2 seeds:
    # distill = 2 kinds x 2 seeds.
    assert planned["agd_table"] == 1 and planned["agd_distill"] == 8
    assert not {"agd_figures", "agd_throughput", "agd_claims", "all"} & set(planned)


@pytest.mark.slow
def test_paper_profile_composes_with_slurm(tmp_path):
    profiles = ["--profile", "profiles/slurm", "--profile", "profiles/paper"]
    out = dry_run(tmp_path, *profiles, "results/agd_fid.csv")
    assert set(re.findall(r"--scale (\w+)", out)) == {"paper"}
    assert "slurm_partition=" in out  # profiles/slurm's default-resources still apply
    assert "gpu=1" in out  # paper scale asks for GPUs
    assert jobs(out)["agd_table"] == 1


def test_docs_and_makefile_use_the_profiles():
    for name in ("README.md", "Makefile"):
        text = (ROOT / name).read_text()
        assert not re.search(r"--configfile\s+configs/", text), f"{name} still uses --configfile"
    assert "--profile profiles/smoke" in (ROOT / "Makefile").read_text()


# ---- make clean keeps the hub downloads; make clean-hub removes them ----

OUTPUTS = [
    "data/digits/train.safetensors",
    "models/agd/base/config.json",
    "models/core/digit_classifier.safetensors",
    "models/hub/manifest.json",
    "checkpoints/agd_base/step.safetensors",
    "logs/agd/base.log",
    "benchmarks/rules/agd/base.tsv",
    "results/agd_fid.csv",
    "results/figures/agd_speed.png",
    ".snakemake/metadata/x",
    ".snakemake/locks/0.input.lock",
    "mlflow.db",
    "mlartifacts/1/a",
    ".mlflow-spool/0001-abc/run.json",
]
HUB = [
    "models/hub/cache/models--facebook--DiT-XL-2-256/blobs/abc",
    "models/hub/inception_v3_fid.safetensors",
]
KEPT = [
    "results/README.md",
    ".snakemake/conda/abc123.yaml",
    "benchmarks/agd_throughput.py",
    "src/repro/__init__.py",
]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_keeps_the_hub_cache(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for rel in OUTPUTS + HUB + KEPT:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")

    def make(target):
        subprocess.run(["make", "-s", target], cwd=tmp_path, check=True, timeout=60)

    make("clean")
    assert [rel for rel in OUTPUTS if (tmp_path / rel).exists()] == []
    assert [rel for rel in HUB + KEPT if not (tmp_path / rel).exists()] == []
    make("clean")  # again, with most of it gone
    make("clean-hub")
    assert [rel for rel in HUB if (tmp_path / rel).exists()] == []
    assert [rel for rel in KEPT if not (tmp_path / rel).exists()] == []

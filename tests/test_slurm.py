"""The workflow on Slurm: the paper plan's GPU requests, and a real one-node cluster.

The cluster tests start munged, MariaDB, slurmdbd, slurmctld and slurmd on this
machine (scripts/slurm/cluster.sh, which installs the Debian packages if they
are missing) and run the workflow with `--profile profiles/slurm` layered with
profiles/slurm-ci. Job states come from `sacct` through slurmdbd, the plugin's
default on real clusters. They skip only where the packages are missing and apt
cannot get them. Every Snakemake run is under `timeout -k`: a Snakemake that
loses track of its jobs waits forever, and ignores SIGTERM.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from snakemake_executor_plugin_slurm.utils import set_gres_string
from workflow_facts import CPU_RULES, GPU_RULES, expected_gpus

from repro.core.config import load_yaml, merge

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"
PROFILES = ["--profile", str(ROOT / "profiles/slurm"), "--profile", str(ROOT / "profiles/slurm-ci")]
TABLE = "results/agd_fid.csv"
SMOKE = ["--configfile", str(ROOT / "configs/smoke.yaml")]
# The table compared locally and on Slurm: the smoke scale cut to one seed and one
# adapter type (tests/slurm_small.yaml), so that the two runs cost minutes, not many.
SMALL_SMOKE = [*SMOKE, str(ROOT / "tests/slurm_small.yaml")]
# The rules that run a model ask for GPUs at paper scale (one per process); the CPU rules never do.
# Timings: the only columns of the table that may differ between two runs.
TIMING_COLUMNS = ["images_per_s"]


def snakemake(workdir, *args, limit=None):
    """`python -m snakemake` on this repository's Snakefile in `workdir`, under a hard timeout."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    timeout = ["timeout", "-k", "30", str(limit)] if limit else []
    return [*timeout, *cmd, *args]


def plan_jobs(plan):
    """[(rule, {resource: value})] for every job of a dry run's plan, group members included."""
    jobs = []
    for block in re.split(r"\n\s*(?:local)?rule ", plan)[1:]:
        rule = block.split(":", 1)[0].strip()
        line = re.search(r"^\s*resources: (.*)$", block, re.MULTILINE).group(1)
        jobs.append((rule, dict(item.split("=", 1) for item in line.split(", "))))
    return jobs


class Resources(dict):
    """Job resources as the plugin reads them (resources.get(...) and resources.name)."""

    __getattr__ = dict.__getitem__


def dry_run(workdir, config, env=None):
    """The plan of `snakemake -n --profile profiles/slurm --configfile <config>`."""
    proc = subprocess.run(
        snakemake(workdir, "-n", "--profile", str(ROOT / "profiles/slurm"))
        + ["--configfile", str(ROOT / config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    plan = proc.stdout + proc.stderr
    assert proc.returncode == 0, plan[-4000:]
    return plan


def test_paper_plan_asks_for_a_gpu_in_every_gpu_rule_and_nowhere_else(tmp_path):
    env = {**os.environ, "SBATCH_PARTITION": "gpu-test", "SBATCH_ACCOUNT": "proj-test"}
    plan = dry_run(tmp_path, "configs/paper.yaml", env)
    config = merge(load_yaml(ROOT / "config.yaml"), load_yaml(ROOT / "configs/paper.yaml"))
    jobs = plan_jobs(plan)
    assert {rule for rule, _ in jobs} >= set(GPU_RULES) | CPU_RULES
    # The multi-GPU training rules (processes > 1 in configs/paper.yaml) ask for them all.
    assert max(expected_gpus(rule, config) for rule in GPU_RULES) > 1
    for rule, resources in jobs:
        gpus = int(resources.get("gpu", 0))
        if rule in GPU_RULES:
            assert gpus == expected_gpus(rule, config) >= 1, (rule, resources)
        if rule in CPU_RULES:
            assert gpus == 0, (rule, resources)
        # What sbatch gets from these resources, computed by the installed plugin.
        flags = set_gres_string(SimpleNamespace(resources=Resources(gpu=gpus)))
        assert flags == (f" --gpus={gpus}" if gpus else ""), (rule, resources)
        # Partition and account from sbatch's own variables, without editing the profile.
        assert resources["slurm_partition"] == "gpu-test", (rule, resources)
        assert resources["slurm_account"] == "proj-test", (rule, resources)
    # Tiny jobs share a Slurm job: the data rules run as one group job.
    assert "Group job data" in plan


def test_smoke_plan_asks_for_no_gpu(tmp_path):
    jobs = plan_jobs(dry_run(tmp_path, "configs/smoke.yaml"))
    assert {rule for rule, _ in jobs} >= set(GPU_RULES)
    assert all(int(resources.get("gpu", 0)) == 0 for _, resources in jobs), jobs


# ----------------------------------------------------------------------------- a real cluster


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cluster():
    """A running one-node cluster (8 CPUs on this machine's cores), stopped by pid afterwards."""
    state = Path(tempfile.mkdtemp(prefix="repro-slurm-"))
    env = {**os.environ, "REPRO_SLURM_CPUS": "8"}
    pids = {}
    try:
        start = subprocess.run(
            ["timeout", "-k", "10", "900", str(CLUSTER), "start", str(state)],
            capture_output=True,
            text=True,
            env=env,
        )
        pids = {f.stem: int(f.read_text()) for f in (state / "run").glob("*.pid")}
        if start.returncode == 3:
            pytest.skip(start.stderr.strip().splitlines()[-1])
        assert start.returncode == 0, start.stdout + start.stderr
        assert set(pids) == {"munged", "mariadb", "slurmdbd", "slurmctld", "slurmd"}
        yield {"state": state, "conf": state / "slurm.conf"}
    finally:
        stop = subprocess.run(
            ["timeout", "-k", "10", "180", str(CLUSTER), "stop", str(state)],
            capture_output=True,
            text=True,
        )
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        running = {name: pid for name, pid in pids.items() if alive(pid)}
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not running, f"daemons still running after stop: {running}"


@pytest.fixture
def slurm_env(cluster):
    env = {
        **os.environ,
        "SLURM_CONF": str(cluster["conf"]),
        "SBATCH_PARTITION": "debug",  # the test cluster's partition, through the profile
        "REPRO_MLFLOW": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SBATCH_ACCOUNT", None)  # accounts are left alone on the test cluster
    return env


def run(cmd, env, timeout):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return proc, proc.stdout + proc.stderr


def sacct(env, run_id):
    """{job id: {field: value}} of the Slurm jobs of one Snakemake run (its job name)."""
    fields = ["JobID", "State", "Partition", "ReqTRES", "User"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", run_id, "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    return {
        row.split("|")[0]: dict(zip(fields, row.split("|"), strict=True))
        for row in out.splitlines()
    }


@pytest.mark.slow
def test_smoke_table_on_slurm_equals_the_local_run(slurm_env, tmp_path):
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    # The local reference runs beside the cluster run: the CPU is idle while Snakemake polls.
    local = subprocess.Popen(
        snakemake(local_dir, "--cores", "2", TABLE, *SMALL_SMOKE, limit=600),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=slurm_env,
    )
    try:
        proc, out = run(
            snakemake(slurm_dir, *PROFILES, TABLE, *SMALL_SMOKE, limit=540), slurm_env, 600
        )
    finally:
        local_out = local.communicate(timeout=660)[0]
    assert local.returncode == 0, local_out[-4000:]
    assert proc.returncode == 0, out[-6000:]

    # Every job went through Slurm (the data rules as one group job), and sacct saw it end.
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    steps = int(re.search(r"(\d+) of \1 steps \(100%\) done", out).group(1))
    assert 0 < len(submitted) < steps
    jobs = sacct(slurm_env, re.search(r"SLURM run ID: (\S+)", out).group(1))
    assert sorted(jobs) == sorted(submitted)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    for job in jobs.values():
        assert job["State"] == "COMPLETED" and job["Partition"] == "debug", job
        assert job["User"] == user and "gpu" not in job["ReqTRES"], job  # no GPU at smoke scale

    local_table = pd.read_csv(local_dir / TABLE)
    slurm_table = pd.read_csv(slurm_dir / TABLE)
    assert len(slurm_table) == len(local_table) > 0
    pd.testing.assert_frame_equal(
        slurm_table.drop(columns=TIMING_COLUMNS),
        local_table.drop(columns=TIMING_COLUMNS),
        check_exact=True,
    )


@pytest.mark.slow
def test_failing_job_fails_the_run_naming_its_logs(slurm_env, tmp_path):
    # A job that fails beside one that succeeds (which also spares the run the
    # plugin's growing wait between status checks once nothing finishes).
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        textwrap.dedent(
            """
            rule broken:
                output: "never.txt"
                log: "logs/broken.log"
                resources: mem_mb=100, runtime=5
                shell: "echo 'deliberate failure' > {log}; exit 3"

            rule fine:
                output: "fine.txt"
                resources: mem_mb=100, runtime=5
                shell: "touch {output}"
            """
        )
    )
    work = tmp_path / "work"
    cmd = ["timeout", "-k", "30", "180", sys.executable, "-m", "snakemake", "-s", str(snakefile)]
    proc, out = run([*cmd, "-d", str(work), *PROFILES, "never.txt", "fine.txt"], slurm_env, 240)

    assert proc.returncode not in (0, 124, 137), out[-4000:]
    assert (work / "fine.txt").exists()
    assert "SLURM status is: 'FAILED'" in out, out[-4000:]  # the state, as sacct reports it
    slurm_log = Path(re.search(r"log: (\S+/slurm_logs/rule_broken/\d+\.log)", out).group(1))
    assert "Error in rule broken" in slurm_log.read_text()
    assert "logs/broken.log" in out
    assert (work / "logs/broken.log").read_text().strip() == "deliberate failure"
    assert not (work / "never.txt").exists()


@pytest.mark.slow
def test_hub_checkpoints_are_fetched_on_the_submitting_host(slurm_env, tmp_path):
    """hub_fetch runs beside Snakemake, not as a Slurm job, and fills the cache the jobs read.

    Offline here (HF_HUB_OFFLINE=1): the cache already holds the checkpoint, as
    huggingface_hub lays it out, so snapshot_download returns it without a hub.
    """
    cache, commit = tmp_path / "hub-cache", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny-vae"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "snapshots" / commit / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    overlay = tmp_path / "hub.yaml"
    overlay.write_text(
        json.dumps({"hub": {"cache_dir": str(cache)}, "agd": {"base": {"vae": "org/tiny-vae"}}})
    )
    work = tmp_path / "work"
    manifest = "models/hub/manifest.json"
    cmd = snakemake(work, *PROFILES, manifest, *SMOKE, str(overlay), limit=180)
    proc, out = run(cmd, slurm_env, 240)

    assert proc.returncode == 0, out[-4000:]
    assert "localrule hub_fetch:" in out and "SLURM jobid" not in out
    (source,) = json.loads((work / manifest).read_text())["sources"]
    assert (source["key"], source["repo_id"], source["revision"]) == (
        "agd.base.vae",
        "org/tiny-vae",
        commit,
    )
    assert source["files"] == ["config.json", "diffusion_pytorch_model.safetensors"]

"""repro.sla.kernel_device and scripts/sla_device_run.sh, at toy shapes on CPU under the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the run the GPU machine
does, minus the meaning of its times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from repro.kernels import sla_triton
from repro.sla import kernel_bench as bench
from repro.sla import kernel_device as kd

ROOT = Path(__file__).resolve().parents[1]
# One SLA point: 72 tokens, 5 key blocks of 16.
TOY_PARAMS = {
    "batch": 1, "heads": 2, "head_dim": 16, "seq_len": 72, "sparsity": 0.5, "k_l": 0.25,
    "block_q": 16, "block_kv": 16, "block_shapes": [[16, 16]], "forms": [],
    "dtypes": ["float32"], "seq_lens": [], "sparsities": [], "repeats": 1, "warmup": 0,
}  # fmt: skip
# 5 forms x 2 dtypes x 1 block shape x 2 lengths (40: a multiple of no block) = 20 cases.
TOY_CHECK = [
    "--check-shape", "1,1,16", "--check-lens", "40,48", "--check-blocks", "16x16",
    "--check-dtypes", "float32,bfloat16",
]  # fmt: skip


def _main(out_dir, *extra, params=TOY_PARAMS):
    argv = ["--out-dir", str(out_dir), *TOY_CHECK, *extra, "--device", "cpu"]
    if params is not None:
        argv += ["--params", json.dumps(params)]
    return kd.main(argv)


def _read(path):
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def test_the_device_run_checks_times_and_describes(tmp_path, capsys):
    assert _main(tmp_path) == 0
    printed = capsys.readouterr().out

    checks = _read(tmp_path / "correctness.csv")
    assert list(checks.columns) == kd.CHECK_COLUMNS
    assert checks.case.nunique() == 20 and len(checks) == 20 * len(kd.TENSORS)
    assert checks.ok.all(), checks[~checks.ok]
    assert (checks.max_abs_err <= checks.bound).all()
    for part in ("-kl0.1-softmax-marginal", "-kl0.0-softmax-marginal", "-all", "-none", "-fused"):
        assert checks.case.str.endswith(part).sum() == 4 * len(kd.TENSORS), part
    for part in ("L40D16", "L48D16", "bfloat16-", "float32-"):
        assert checks.case.str.contains(part, regex=False).sum() == 10 * len(kd.TENSORS), part

    table = _read(tmp_path / "sla_kernel.csv")
    assert list(table.columns) == bench.COLUMNS
    sla = table[table.kernel.isin(bench.SLA_KERNELS)]
    assert len(sla) == 4 and (sla.status == "ok").all(), sla.reason.tolist()

    info = json.loads((tmp_path / "device_info.json").read_text())
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert {"triton", "sm_count", "name"} <= set(info)

    lines = printed.strip().splitlines()
    assert any(line.startswith("correctness: 140/140 tensors within bounds") for line in lines)
    # The fixed-width table comes last: a header and one line per row.
    assert lines[-len(table) - 1].split() == [name for name, _ in kd.TABLE_COLUMNS]
    assert lines[-1].split()[:2] == ["classify", "forward"]


def test_a_failed_check_is_recorded_and_the_timing_still_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(kd.TOLERANCE, torch.bfloat16, (0.0, 0.0))  # nothing passes
    real = sla_triton.sla_triton

    def broken_for_none(*args, linear="marginal", **kw):
        if linear == "none":
            raise RuntimeError("a kernel bug\nwith a second line")
        return real(*args, linear=linear, **kw)

    monkeypatch.setattr(sla_triton, "sla_triton", broken_for_none)
    assert _main(tmp_path) == 1

    checks = _read(tmp_path / "correctness.csv")
    raised = checks[checks.tensor == "exception"]
    assert len(raised) == 4 and raised.case.str.endswith("-none").all()
    assert raised.max_abs_err.isna().all() and not raised.ok.any()
    other = checks[checks.tensor != "exception"]
    assert (other.ok == other.case.str.startswith("float32")).all()
    assert (_read(tmp_path / "sla_kernel.csv").status == "ok").all()


def test_a_spent_budget_skips_the_timing(tmp_path):
    assert _main(tmp_path, "--budget-s", "0") == 0
    table = _read(tmp_path / "sla_kernel.csv")
    assert len(table) == len(bench.skipped_rows(bench.resolve_params(TOY_PARAMS), ""))
    assert (table.status == "skipped").all() and (table.reason == bench.DEADLINE_REASON).all()


def test_on_a_cpu_without_the_interpreter_nothing_is_attempted(tmp_path, monkeypatch):
    """The kernels refuse CPU tensors at once and the paper-scale bench is not started."""
    monkeypatch.setattr(sla_triton, "INTERPRETED", False)
    assert _main(tmp_path, "--config", str(ROOT / "config.yaml"), params=None) == 1
    checks = _read(tmp_path / "correctness.csv")
    assert (checks.tensor == "exception").all() and len(checks) == 20
    table = _read(tmp_path / "sla_kernel.csv")
    assert (table.status == "skipped").all()
    assert (table.reason == "cpu: no CUDA device and TRITON_INTERPRET unset").all()
    assert table.seq_len.max() == 32760  # the config's paper point


def test_params_come_from_the_config_unless_given(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"sla": {"kernel_bench": {"seq_len": 512, "forms": []}}}))
    p = kd.load_params(None, str(config))
    assert p["seq_len"] == 512 and p["forms"] == [] and p["block_shapes"] == [[64, 64], [128, 64]]
    assert kd.load_params('{"seq_len": 256}', str(config))["seq_len"] == 256
    # The repository's own config is a valid set of params.
    with open(ROOT / "config.yaml") as f:
        section = yaml.safe_load(f)["sla"]["kernel_bench"]
    assert kd.load_params(None, str(ROOT / "config.yaml")) == bench.resolve_params(section)


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tee")
def test_the_script_runs_the_module_and_keeps_the_log(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "TRITON_INTERPRET": "1",
        "TRITON_PRINT_AUTOTUNING": "0",  # the script sets it to 1
    }
    script = ROOT / "scripts" / "sla_device_run.sh"
    cmd = ["bash", str(script), *TOY_CHECK, "--budget-s", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name for p in out.iterdir()} == {
        "autotune.log",
        "correctness.csv",
        "device_info.json",
        "sla_kernel.csv",
    }
    log = (out / "autotune.log").read_text()
    assert "correctness: 140/140 tensors within bounds" in log and log == proc.stdout
    info = json.loads((out / "device_info.json").read_text())
    assert info["env"]["TRITON_PRINT_AUTOTUNING"] == "1"
    # config.yaml's params, every point skipped for the spent budget.
    table = _read(out / "sla_kernel.csv")
    assert table.seq_len.max() == 32760 and (table.reason == bench.DEADLINE_REASON).all()

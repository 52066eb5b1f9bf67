"""benchmarks/sla_kernel.py on a machine without CUDA: the full table, every row skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro.core.errors import ReproInputError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sla_kernel.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("sla_kernel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _run(tmp_path, params):
    out = tmp_path / "sla_kernel.csv"
    threads = str(torch.get_num_threads())  # keep this session's torch threads as they are
    bench.main(["--out", str(out), "--params", json.dumps(params), "--threads", threads])
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


def test_cpu_run_writes_every_row_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = {"seq_len": 2048, "seq_lens": [1024, 2048], "sparsities": [0.9, 0.95]}
    df = _run(tmp_path, params)

    assert list(df.columns) == bench.COLUMNS
    # Points: (2048, 95 %), (1024, 95 %), (2048, 90 %); shapes: L 2048 and 1024.
    sla = df[df.kernel == "sla"]
    assert len(sla) == 3 * 2
    for kernel in ("sdpa_flash", "dense"):
        rows = df[df.kernel == kernel]
        assert sorted(rows.seq_len) == [1024, 1024, 2048, 2048]
    assert len(df) == 6 + 8
    assert set(df["pass"]) == {"forward", "backward"}
    assert (df.status == "skipped").all()
    assert (df.reason == "no CUDA device").all()
    assert df.time_ms.isna().all() and df.tflops_metric.isna().all()
    # 2048 / 64 = 32 key blocks; k_h = 5 % -> ceil(1.6) = 2 critical -> 1 - 2/32.
    paper = sla[(sla.seq_len == 2048) & (sla.k_h == 0.05)]
    assert paper.sparsity.tolist() == [0.9375, 0.9375]
    assert (sla.k_l == 0.1).all() and (sla.block_q == 64).all()


def test_unknown_params_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ReproInputError, match="seq_length"):
        _run(tmp_path, {"seq_length": 4})
    with pytest.raises(ReproInputError, match="dtypes"):
        _run(tmp_path, {"dtypes": ["float8"]})

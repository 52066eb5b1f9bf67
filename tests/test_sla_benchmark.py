"""repro.sla.kernel_bench on a machine without CUDA: the full table, every row skipped."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from repro.core.errors import ReproInputError
from repro.sla import kernel_bench as bench


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
    # Points: (2048, 95 %), (1024, 95 %), (2048, 90 %), and the paper's point in the
    # two default extra forms (main branch, sparse only); shapes: L 2048 and 1024.
    sla = df[df.kernel == "sla"]
    assert len(sla) == 5 * 2
    for kernel in ("sdpa_flash", "dense"):
        rows = df[df.kernel == kernel]
        assert sorted(rows.seq_len) == [1024, 1024, 2048, 2048]
    assert len(df) == 10 + 8
    assert set(df["pass"]) == {"forward", "backward"}
    assert (df.status == "skipped").all()
    assert (df.reason == "no CUDA device").all()
    assert df.time_ms.isna().all() and df.tflops_metric.isna().all()
    # 2048 / 64 = 32 key blocks; k_h = 5 % -> ceil(1.6) = 2 critical -> 1 - 2/32.
    paper = sla[(sla.seq_len == 2048) & (sla.k_h == 0.05)]
    assert paper.sparsity.tolist() == [0.9375] * 6  # the paper's form and the 2 others
    assert (sla.block_q == 64).all()
    forms = sla.groupby(["linear", "k_l"]).size().to_dict()
    assert forms == {("marginal", 0.1): 6, ("all", 0.0): 2, ("none", 0.0): 2}
    extra = sla[sla.linear != "marginal"]
    assert (extra.seq_len == 2048).all() and (extra.k_h == 0.05).all()


def test_forms_are_chosen_by_params(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = {"seq_len": 1024, "seq_lens": [], "sparsities": [], "forms": []}
    df = _run(tmp_path, params)
    assert set(df[df.kernel == "sla"].linear) == {"marginal"}
    params["forms"] = [{"linear": "marginal", "k_l": 0.0}]
    sla = _run(tmp_path, params).query("kernel == 'sla'")
    assert sorted(sla.k_l.unique()) == [0.0, 0.1]


def test_unknown_params_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ReproInputError, match="seq_length"):
        _run(tmp_path, {"seq_length": 4})
    with pytest.raises(ReproInputError, match="dtypes"):
        _run(tmp_path, {"dtypes": ["float8"]})
    with pytest.raises(ReproInputError, match=r"forms\[0\].linear"):
        _run(tmp_path, {"forms": [{"linear": "hedgehog", "k_l": 0.0}]})
    with pytest.raises(ReproInputError, match="k_l 0.99"):
        _run(tmp_path, {"forms": [{"linear": "all", "k_l": 0.99}]})


def test_timed_path_runs_every_form_on_cpu_under_the_interpreter():
    """The code a GPU run takes (timing, baselines, the error check), at a toy shape on
    CPU with the Triton interpreter; the times themselves mean nothing here."""
    p = bench.resolve_params(
        {
            "batch": 1, "heads": 2, "head_dim": 16, "seq_len": 72, "sparsity": 0.5,
            "k_l": 0.25, "block_q": 16, "block_kv": 16, "dtypes": ["float32"],
            "seq_lens": [], "sparsities": [], "repeats": 1, "warmup": 0,
        }
    )  # fmt: skip
    df = pd.DataFrame(bench.run_timed(p, "cpu"), columns=bench.COLUMNS)
    sla = df[df.kernel == "sla"]
    assert sorted(zip(sla.linear, sla["pass"], strict=True)) == sorted(
        (form, ps) for form in ("marginal", "all", "none") for ps in bench.PASSES
    )
    assert (sla.status == "ok").all(), sla.reason.tolist()
    assert (sla.time_ms > 0).all() and (sla.max_abs_err < 1e-4).all()
    # 72 tokens = 5 key blocks: k_h 50 % -> 3 critical, so 40 % sparsity in every form.
    assert (sla.sparsity == 0.4).all()
    dense = df[df.kernel == "dense"]
    assert len(dense) == 2 and (dense.status == "ok").all()
    assert len(df[df.kernel == "sdpa_flash"]) == 2  # timed, or skipped with the reason

"""repro.sla.kernel_bench: the full table on a machine without CUDA (every row skipped),
and the timed path under the Triton interpreter at toy shapes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro.core.config import load_yaml, validate_config
from repro.core.errors import ReproInputError
from repro.kernels import sla_triton as kernels
from repro.sla import kernel_bench as bench

ROOT = Path(__file__).resolve().parents[1]
# A toy point the interpreter runs in seconds: 72 tokens = 5 key blocks of 16.
TOY = {
    "batch": 1, "heads": 2, "head_dim": 16, "seq_len": 72, "sparsity": 0.5, "k_l": 0.25,
    "block_q": 16, "block_kv": 16, "block_shapes": [[16, 16], [32, 16]],
    "dtypes": ["float32"], "seq_lens": [], "sparsities": [], "repeats": 1, "warmup": 0,
}  # fmt: skip


def _run(tmp_path, params):
    out = tmp_path / "sla_kernel.csv"
    threads = str(torch.get_num_threads())  # keep this session's torch threads as they are
    bench.main(["--out", str(out), "--params", json.dumps(params), "--threads", threads])
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


def _table(rows):
    return pd.DataFrame(rows, columns=bench.COLUMNS)


def test_cpu_run_writes_every_row_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = {"seq_len": 2048, "seq_lens": [1024, 2048], "sparsities": [0.9, 0.95]}
    df = _run(tmp_path, params)

    assert list(df.columns) == bench.COLUMNS
    # Points: the paper's (2048, 95 %) in its form and the two default extra forms (main
    # branch, sparse only) at both default block shapes (64x64, 128x64): 6; then at the
    # sweeps' 64x64 (1024, 95 %) and (2048, 90 %); (2048, 95 %) is the paper's point again.
    sla = df[df.kernel == "sla"]
    assert len(sla) == 8 * 3 and len(df[df.kernel == "classify"]) == 8
    assert set(sla["pass"]) == {"forward", "backward", "inference"}
    # Baselines once per shape (L 2048 and 1024): SDPA flash in three passes, dense in two.
    assert sorted(df[df.kernel == "sdpa_flash"].seq_len) == [1024] * 3 + [2048] * 3
    assert sorted(df[df.kernel == "dense"].seq_len) == [1024] * 2 + [2048] * 2
    assert set(df[df.kernel == "dense"]["pass"]) == {"forward", "backward"}
    assert len(df) == 24 + 8 + 10
    assert (df[df.kernel == "classify"]["pass"] == "forward").all()
    assert (df.status == "skipped").all()
    assert (df.reason == "no CUDA device").all()
    assert df.time_ms.isna().all() and df.tflops_metric.isna().all()
    assert df.lin_mode.isna().all()  # "" (read as NaN): only a run knows the kernel's plan
    # 2048 / 64 = 32 key blocks; k_h = 5 % -> ceil(1.6) = 2 critical -> 1 - 2/32.
    paper = sla[(sla.seq_len == 2048) & (sla.k_h == 0.05)]
    assert paper.sparsity.unique().tolist() == [0.9375]
    blocks = paper.groupby(["linear", "block_q", "block_kv"]).size().to_dict()
    assert blocks == {(form, bq, 64): 3 for form in ("marginal", "all", "none") for bq in (64, 128)}
    sweeps = sla[(sla.seq_len == 1024) | (sla.k_h != 0.05)]
    assert (sweeps.block_q == 64).all() and (sweeps.block_kv == 64).all()
    forms = sla.groupby(["linear", "k_l"]).size().to_dict()
    assert forms == {("marginal", 0.1): 4 * 3, ("all", 0.0): 2 * 3, ("none", 0.0): 2 * 3}
    extra = sla[sla.linear != "marginal"]
    assert (extra.seq_len == 2048).all() and (extra.k_h == 0.05).all()
    baselines = df[df.kernel.isin(bench.BASELINES)]
    assert baselines.block_q.isna().all() and baselines.linear.isna().all()


def test_points_come_most_important_first():
    """A run that runs out of time keeps the paper's point in every form and block shape."""
    p = bench.resolve_params(
        {"seq_lens": [4096], "sparsities": [0.9], "dtypes": ["float32", "bfloat16"]}
    )
    order = [
        (pt["seq_len"], pt["sparsity"], pt["linear"], pt["block_q"], pt["dtype"])
        for pt in bench.points(p)
    ]
    forms = ("marginal", "all", "none")
    paper = [
        (32760, 0.95, form, bq, dtype)
        for form in forms
        for bq in (64, 128)
        for dtype in ("float32", "bfloat16")
    ]
    sweeps = [(4096, 0.95, "marginal", 64, d) for d in ("float32", "bfloat16")]
    sweeps += [(32760, 0.9, "marginal", 64, d) for d in ("float32", "bfloat16")]
    assert order == paper + sweeps


def test_forms_are_chosen_by_params(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = {"seq_len": 1024, "seq_lens": [], "sparsities": [], "forms": []}
    df = _run(tmp_path, params)
    assert set(df[df.kernel == "sla"].linear) == {"marginal"}
    params["forms"] = [{"linear": "marginal", "k_l": 0.0}]
    sla = _run(tmp_path, params).query("kernel == 'sla'")
    assert sorted(sla.k_l.unique()) == [0.0, 0.1]
    params["block_shapes"] = [[32, 32]]
    sla = _run(tmp_path, params).query("kernel == 'sla'")
    assert set(zip(sla.block_q, sla.block_kv, strict=True)) == {(32, 32)}


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
    with pytest.raises(ReproInputError, match=r"block_shapes\[1\]"):
        _run(tmp_path, {"block_shapes": [[64, 64], [96, 64]]})
    with pytest.raises(ReproInputError, match="block_q"):
        _run(tmp_path, {"block_q": 48})


def test_timed_path_runs_every_form_on_cpu_under_the_interpreter():
    """The code a GPU run takes (timing, baselines, the error check), at a toy shape on
    CPU with the Triton interpreter; the times themselves mean nothing here."""
    p = bench.resolve_params(TOY)
    df = _table(bench.run_timed(p, "cpu"))
    sla = df[df.kernel == "sla"]
    assert sorted(zip(sla.linear, sla.block_q, sla["pass"], strict=True)) == sorted(
        itertools.product(("marginal", "all", "none"), (16, 32), bench.PASSES)
    )
    assert (sla.status == "ok").all(), sla.reason.tolist()
    assert (sla.time_ms > 0).all() and (sla.max_abs_err < 1e-4).all()
    assert sla.tflops_metric.notna().all()
    # 72 tokens = 5 key blocks: k_h 50 % -> 3 critical, so 40 % sparsity in every form.
    assert (sla.sparsity == 0.4).all()
    classify = df[df.kernel == "classify"]
    assert len(classify) == 6 and (classify.status == "ok").all(), classify.reason.tolist()
    assert (classify.time_ms > 0).all()
    assert classify.tflops_metric.isna().all() and classify.speedup_vs_sdpa_flash.isna().all()
    # lin_mode comes from the kernel's plan_summary where it has one.
    modes = set(sla.lin_mode) | set(classify.lin_mode)
    assert modes <= {"", "none", "add", "subtract", "all"}
    if not hasattr(kernels, "plan_summary"):
        assert modes == {""}
    else:
        assert set(sla[sla.linear == "none"].lin_mode) == {"none"}
    dense = df[df.kernel == "dense"]
    assert len(dense) == 2 and (dense.status == "ok").all()
    sdpa = df[df.kernel == "sdpa_flash"]
    assert list(sdpa["pass"]) == list(bench.PASSES)  # timed, or skipped with the reason
    assert (df[df.kernel.isin(bench.BASELINES)].lin_mode == "").all()


def test_a_passed_deadline_skips_the_remaining_points(monkeypatch):
    """The first point runs; the clock then reads past the deadline, so every later
    point's rows (here the 32x16 block shape's) are written skipped, with the reason."""
    p = bench.resolve_params({**TOY, "forms": []})
    clock = itertools.chain([0.0], itertools.repeat(10.0))
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    df = _table(bench.run_timed(p, "cpu", deadline=5.0))

    ran = df[(df.block_q == 16) | df.kernel.isin(bench.BASELINES)]
    late = df[df.block_q == 32]
    assert len(ran) == 3 + 1 + 3 + 2 and len(late) == 3 + 1
    assert (ran.status == "ok").all(), ran.reason.tolist()
    assert (late.status == "skipped").all()
    assert (late.reason == bench.DEADLINE_REASON).all()
    assert (late.device == "cpu (not a timing)").all()


def test_a_deadline_before_the_start_writes_the_skipped_table():
    p = bench.resolve_params(TOY)
    rows = bench.run_timed(p, "cpu", deadline=0.0)
    expected = bench.skipped_rows(p, bench.DEADLINE_REASON, "cpu (not a timing)")
    pd.testing.assert_frame_equal(_table(rows), _table(expected))


def test_the_config_section_is_the_bench_params():
    """config.yaml's sla.kernel_bench resolves as is, and the schema refuses a bad
    block shape before any job runs."""
    cfg = load_yaml(ROOT / "config.yaml")
    p = bench.resolve_params(cfg["sla"]["kernel_bench"])
    assert p["block_shapes"] == [[64, 64], [128, 64]] and (p["block_q"], p["block_kv"]) == (64, 64)
    for bad in ([[96, 64]], [[64]], []):
        cfg["sla"]["kernel_bench"]["block_shapes"] = bad
        with pytest.raises(ReproInputError, match="sla.kernel_bench.block_shapes"):
            validate_config(cfg)

"""SLA kernel speed against torch SDPA (flash backend) and dense attention, written to CSV.

The paper's kernel benchmark (arXiv 2509.24006, Fig. 6): B 2, H 16, D 128, L 32760,
bf16, 95 % sparsity; metric = dense attention FLOPs / time, 4 B H L^2 D (x2.5 for the
backward: 2 for the gradients, 0.5 for recomputing P). Points, most important first
(a run with a deadline skips from the end): the paper's point in every form of the
linear branch (the paper's `linear`/`k_l`, then each of `forms`: by default the
official main branch's linear attention over all tokens, and sparse attention alone,
which bounds what the linear branch may cost) at every one of `block_shapes`; then the
sweeps over L and over sparsity at (`block_q`, `block_kv`).

Rows per point: "sla" forward (training: saves what the backward needs), backward
(alone) and inference (forward under torch.no_grad, inputs not requiring grad: the
kernels' inference-only path); "classify", the block mask's prediction
(`classify_blocks`, plus the kernel's `plan_summary` once it exists), left out of the
"sla" times as in the paper's benchmark; and once per shape the baselines: SDPA flash
(forward, backward, inference) and dense attention (forward, backward). Inference rows
count the forward's FLOPs. `lin_mode` is how the kernel aggregates the linear branch
("none", "add", "subtract", "all"; from `plan_summary`, "" where unknown). For every
SLA configuration, the max error of its outputs (forward, inference rows) or gradients
(backward rows) against `sla_blockwise` on one head, so a GPU run proves the kernels
right at scale too.

    python -m repro.sla.kernel_bench --out results/sla_kernel.csv --threads 4 \
        --params '{"seq_lens": [8192, 32760], "sparsities": [0.9, 0.95], "repeats": 10}'

Sparsity = 1 - the fraction of critical blocks actually selected (k_h = 1 - sparsity
requested, rounded up to whole blocks per row), at the paper's k_l = 10 % negligible;
the rest is marginal (linear attention). Timed: CUDA events, the median of `repeats`
after `warmup` calls, on the same inputs every time (GB-sized at the paper's point, so
no cache stays warm across calls). Lookup-table building is in the "sla" times.

Without CUDA every row is written with status "skipped" and the reason, so the
workflow completes on a CPU. Nothing here is asserted: the numbers are measurements.
The device machine runs this through `repro.sla.kernel_device` (no Snakemake, MLflow or
accelerate there): only `main` needs the stage machinery, so it imports it itself.
"""

from __future__ import annotations

import math
import statistics
import time

import pandas as pd
import torch
import torch.nn.functional as F

from repro.core.errors import ReproInputError
from repro.core.results import write_table
from repro.kernels.sla_reference import block_counts

COLUMNS = [
    "kernel",
    "pass",
    "batch",
    "heads",
    "seq_len",
    "head_dim",
    "dtype",
    "sparsity",
    "block_q",
    "block_kv",
    "time_ms",
    "tflops_metric",
    "speedup_vs_sdpa_flash",
    "status",
    "reason",
    "device",
    "max_abs_err",
    "k_h",
    "k_l",
    "phi",
    "linear",
    "lin_mode",
    "fuse_linear",
]
PASSES = ("forward", "backward", "inference")
# The passes of each kernel's rows, in table order. "classify" is the block mask's
# prediction (no gradient); dense attention's inference would only repeat its forward.
KERNEL_PASSES = {
    "sdpa_flash": PASSES,
    "dense": ("forward", "backward"),
    "sla": PASSES,
    "classify": ("forward",),
}
KERNELS = tuple(KERNEL_PASSES)
BASELINES = ("sdpa_flash", "dense")  # timed once per shape
SLA_KERNELS = ("sla", "classify")  # timed at every point; the rows carry its SLA settings
SHAPE_KEYS = ("batch", "heads", "seq_len", "head_dim", "dtype")  # what the baselines depend on
LINEAR_FORMS = ("marginal", "all", "none")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEADLINE_REASON = "device time budget (deadline)"
# The device type whose timings mean something (CUDA events, the compiled Triton kernels);
# elsewhere the same code runs under TRITON_INTERPRET=1 as a check, not a measurement.
TIMED_ON = "cuda"

# The paper's point; the sweeps vary one knob around it.
DEFAULTS = {
    "batch": 2,
    "heads": 16,
    "head_dim": 128,
    "seq_len": 32760,
    "sparsity": 0.95,
    "dtypes": ["bfloat16"],
    "seq_lens": [4096, 8192, 16384, 32760],
    "sparsities": [0.75, 0.9, 0.95, 0.975],
    "k_l": 0.10,
    "block_q": 64,  # the L and sparsity sweeps' block shape (the one measured on the H200)
    "block_kv": 64,
    "block_shapes": [[64, 64], [128, 64]],  # [block_q, block_kv], all timed at the paper's point
    "phi": "softmax",
    "linear": "marginal",
    # More forms timed at the paper's point only: (linear, k_l) pairs.
    "forms": [{"linear": "all", "k_l": 0.0}, {"linear": "none", "k_l": 0.0}],
    "repeats": 10,
    "warmup": 3,
    "check": True,
    "check_heads": 1,
    "dense_max_gb": 16.0,  # dense attention holds B H L^2 scores: skip it beyond this
    "seed": 0,
}


def resolve_params(params: dict) -> dict:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ReproInputError(f"params: unknown keys {unknown}; allowed: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    for name in p["dtypes"]:
        if name not in DTYPES:
            raise ReproInputError(f"params.dtypes: {name!r} is not one of {sorted(DTYPES)}")
    for key in ("repeats", "warmup", "check_heads"):
        if int(p[key]) < (1 if key != "warmup" else 0):
            raise ReproInputError(f"params.{key}={p[key]!r} is too small")
    _check_blocks(p)
    forms = p["forms"]
    for i, form in enumerate(forms):
        if (
            not isinstance(form, dict)
            or not {"linear", "k_l"} <= set(form) <= {"linear", "k_l", "fuse_linear"}
            or not isinstance(form.get("fuse_linear", False), bool)
        ):
            raise ReproInputError(
                f"params.forms[{i}]: {form!r} is not {{linear, k_l}} (+ optional boolean "
                "fuse_linear)"
            )
        if form["linear"] not in LINEAR_FORMS:
            raise ReproInputError(
                f"params.forms[{i}].linear: {form['linear']!r} is not one of {LINEAR_FORMS}"
            )
    splits = [(s, p["k_l"]) for s in [p["sparsity"], *p["sparsities"]]]
    splits += [(p["sparsity"], form["k_l"]) for form in forms]
    for s, k_l in splits:
        if not 0.0 <= s < 1.0 or not 0.0 <= k_l < 1.0 or (1.0 - s) + k_l > 1.0 + 1e-9:
            raise ReproInputError(
                f"params: sparsity {s} with k_l {k_l} is not a valid split of the blocks"
            )
    return p


def _check_blocks(p: dict) -> None:
    for key in ("block_q", "block_kv"):
        if p[key] not in BLOCK_SIZES or isinstance(p[key], bool):
            raise ReproInputError(f"params.{key}: {p[key]!r} is not one of {BLOCK_SIZES}")
    if not p["block_shapes"]:
        raise ReproInputError("params.block_shapes: give at least one [block_q, block_kv]")
    for i, shape in enumerate(p["block_shapes"]):
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 2
            or any(b not in BLOCK_SIZES or isinstance(b, bool) for b in shape)
        ):
            raise ReproInputError(
                f"params.block_shapes[{i}]: {shape!r} is not a [block_q, block_kv] pair "
                f"of {BLOCK_SIZES}"
            )


def points(p: dict) -> list[dict]:
    """The SLA configurations, most important first.

    The paper's point in every form (the paper's own, then `forms`) at every block
    shape; then the L sweep and the sparsity sweep at (block_q, block_kv); each in
    every dtype. Each carries its linear form, k_l, block shape and the sparsity
    actually obtained: classify_blocks takes ceil(k_h N) critical blocks of the N per
    row (`block_counts`).
    """
    keys = ("batch", "heads", "head_dim", "seq_len", "sparsity", "linear", "k_l")
    base = {**{k: p[k] for k in keys}, "fuse_linear": False}
    sweep_blocks = {"block_q": p["block_q"], "block_kv": p["block_kv"]}
    candidates = [
        {**base, **form, "block_q": bq, "block_kv": bkv}
        for form in [{"linear": p["linear"], "k_l": p["k_l"]}, *p["forms"]]
        for bq, bkv in p["block_shapes"]
    ]
    candidates += [{**base, **sweep_blocks, "seq_len": n} for n in p["seq_lens"]]
    candidates += [{**base, **sweep_blocks, "sparsity": s} for s in p["sparsities"]]
    out = []
    for c in candidates:
        n_blocks = -(-c["seq_len"] // c["block_kv"])
        n_critical, _ = block_counts(n_blocks, 1.0 - c["sparsity"], c["k_l"])
        for dtype in p["dtypes"]:
            point = {**c, "dtype": dtype, "actual_sparsity": round(1 - n_critical / n_blocks, 6)}
            if point not in out:
                out.append(point)
    return out


def _shape_key(point: dict) -> tuple:
    return tuple(point[k] for k in SHAPE_KEYS)


def describe(device: torch.device) -> str:
    """`device` as the table names it: cpu, or cuda:0 (NVIDIA H200) for a GPU.

    repro.core.stage.describe_device's format, kept here so that the device machine
    (no accelerate, hence no repro.core.stage) can run this module.
    """
    name = getattr(getattr(torch, device.type, None), "get_device_name", None)
    return f"{device} ({name(device)})" if name is not None else str(device)


# ---------------------------------------------------------------------------- timing


def _time_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn(): CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == TIMED_ON:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def _measure(forward, inputs, passes, repeats, warmup) -> list[float]:
    """The ms of each of `passes` of forward(*inputs) -> output(s), in the order given.

    forward: with the inputs requiring grad (what the backward needs is saved);
    backward: the backward alone; inference: under torch.no_grad, on detached inputs.
    """
    device = inputs[0].device
    times = {"forward": _time_ms(lambda: forward(*inputs), repeats, warmup, device)}
    if "inference" in passes:
        plain = [t.detach() for t in inputs]

        def inference():
            with torch.no_grad():
                forward(*plain)

        times["inference"] = _time_ms(inference, repeats, warmup, device)
    if "backward" in passes:
        outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.requires_grad]  # a constant output has no backward
        grads = [torch.randn_like(o) for o in outs]

        def backward():
            torch.autograd.grad(outs, inputs, grads, retain_graph=True)

        times["backward"] = _time_ms(backward, repeats, warmup, device)
    return [times[ps] for ps in passes]


def _dense_flops(batch, heads, seq_len, head_dim, pass_name) -> float:
    flops = 4.0 * batch * heads * seq_len**2 * head_dim
    return flops * (2.5 if pass_name == "backward" else 1.0)


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _dense(q, k, v):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def _max_err(got, ref) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref, strict=True))


def _check_against_blockwise(q, k, v, point: dict, p: dict) -> dict[str, float]:
    """Max |SLA - sla_blockwise| per pass on the first `check_heads` heads of batch 0:
    outputs (forward: the training path; inference: the no-grad path) and gradients."""
    from repro.kernels.sla_reference import classify_blocks, sla_blockwise
    from repro.kernels.sla_triton import sla_triton

    heads = slice(0, p["check_heads"])
    leaves = [t[:1, heads].detach().clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    # The mask is opaque (the kernel side may precompute fields in it): classify the
    # slice again rather than slicing the mask; the classes are per head, so the same.
    mask = classify_blocks(
        leaves[0].detach(), leaves[1].detach(), block_q=point["block_q"],
        block_kv=point["block_kv"], k_h=1.0 - point["sparsity"], k_l=point["k_l"],
    )  # fmt: skip
    kw = dict(phi=p["phi"], linear=point["linear"])
    fuse = dict(fuse_linear=point["fuse_linear"])
    outs = sla_triton(*leaves, mask, **kw, **fuse)
    with torch.no_grad():
        plain = sla_triton(*(t.detach() for t in leaves), mask, **kw, **fuse)
    refs = sla_blockwise(*ref_leaves, mask, **kw)
    # The same upstream gradients on both sides; an output outside the graph (the
    # reference's constant O_l under linear="none") contributes nothing.
    up = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, up)
    in_graph = [(r, u.float()) for r, u in zip(refs, up, strict=True) if r.requires_grad]
    ref_grads = torch.autograd.grad(
        [r for r, _ in in_graph], ref_leaves, [u for _, u in in_graph], allow_unused=True
    )
    ref_grads = [
        torch.zeros_like(x) if g is None else g for g, x in zip(ref_grads, ref_leaves, strict=True)
    ]
    return {
        "forward": _max_err(outs, refs),
        "backward": _max_err(grads, ref_grads),
        "inference": _max_err(plain, refs),
    }


# ---------------------------------------------------------------------------- rows


def _row(kernel, pass_name, point, p, **values):
    sla = kernel in SLA_KERNELS
    row = dict(
        kernel=kernel,
        batch=point["batch"],
        heads=point["heads"],
        seq_len=point["seq_len"],
        head_dim=point["head_dim"],
        dtype=point["dtype"],
        sparsity=point["actual_sparsity"] if sla else 0.0,
        block_q=point["block_q"] if sla else math.nan,
        block_kv=point["block_kv"] if sla else math.nan,
        time_ms=math.nan,
        tflops_metric=math.nan,
        speedup_vs_sdpa_flash=math.nan,
        status="skipped",
        reason="",
        device="",
        max_abs_err=math.nan,
        k_h=round(1.0 - point["sparsity"], 6) if sla else math.nan,
        k_l=point["k_l"] if sla else math.nan,
        phi=p["phi"] if sla else "",
        linear=point["linear"] if sla else "",
        fuse_linear=point["fuse_linear"] if sla else "",
        lin_mode="",
    )
    row["pass"] = pass_name
    row.update(values)
    return row


def _skipped(kernels, point, p, **values) -> list[dict]:
    """Every row of `kernels` at `point`, status skipped (with `values`: reason, device)."""
    return [_row(kn, ps, point, p, **values) for kn in kernels for ps in KERNEL_PASSES[kn]]


def _point_skipped(point, p, shapes: set, **values) -> list[dict]:
    """The rows `point` adds to the table (its shape's baselines the first time the shape
    comes up, recorded in `shapes`), every one skipped."""
    kernels = SLA_KERNELS
    if _shape_key(point) not in shapes:
        shapes.add(_shape_key(point))
        kernels = BASELINES + SLA_KERNELS
    return _skipped(kernels, point, p, **values)


def skipped_rows(p: dict, reason: str, device: str = "") -> list[dict]:
    """The table a CUDA run would write, every row marked skipped with `reason` on `device`."""
    rows, shapes = [], set()
    for point in points(p):
        rows += _point_skipped(point, p, shapes, reason=reason, device=device)
    return rows


def _timed_row(kernel, ps, point, p, ms, baseline, **values):
    flops = _dense_flops(point["batch"], point["heads"], point["seq_len"], point["head_dim"], ps)
    ref = baseline.get((_shape_key(point), ps), math.nan)
    return _row(
        kernel, ps, point, p,
        time_ms=ms, tflops_metric=flops / (ms * 1e-3) / 1e12, speedup_vs_sdpa_flash=ref / ms,
        status="ok", **values,
    )  # fmt: skip


def describe_failure(err: BaseException) -> str:
    """The exception as a row's reason: its type and first line."""
    first = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}"


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- the run


def run_timed(p: dict, device: str | torch.device, deadline: float | None = None) -> list[dict]:
    """Time every point on `device`: a CUDA device for the real table; the CPU runs the
    same code under TRITON_INTERPRET=1 at toy shapes, which is how the tests check this path.

    deadline: a time.monotonic() value; the points not started by then are written
    skipped, with reason DEADLINE_REASON (the points come most important first).
    """
    on = torch.device(device)
    label = describe(on) if on.type == TIMED_ON else f"{on.type} (not a timing)"
    rows, shapes, baseline = [], set(), {}  # baseline[(shape key, pass)] = sdpa flash ms
    for point in points(p):
        if deadline is not None and time.monotonic() > deadline:
            rows += _point_skipped(point, p, shapes, reason=DEADLINE_REASON, device=label)
            continue
        q, k, v = _inputs(point, p, on)
        if _shape_key(point) not in shapes:
            shapes.add(_shape_key(point))
            rows += _time_baselines(q, k, v, point, p, baseline, label)
        rows += _time_sla(q, k, v, point, p, baseline, label)
        del q, k, v
        _release_memory()
    return rows


def _inputs(point: dict, p: dict, device: torch.device):
    """q, k, v of `point`, standard normal from `seed`, requiring grad."""
    shape = (point["batch"], point["heads"], point["seq_len"], point["head_dim"])
    gen = torch.Generator(device=device).manual_seed(int(p["seed"]))
    dtype = DTYPES[point["dtype"]]
    return [
        torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    ]


def _time_baselines(q, k, v, point, p, baseline: dict, device: str) -> list[dict]:
    """SDPA flash's and dense attention's rows at the point's shape; SDPA's times go to
    `baseline` for the speed-ups."""
    rows = []
    b, h, n = point["batch"], point["heads"], point["seq_len"]
    for kernel, fn in (("sdpa_flash", _sdpa_flash), ("dense", _dense)):
        passes = KERNEL_PASSES[kernel]
        scores_gb = b * h * n * n * 4 / 2**30
        if kernel == "dense" and scores_gb > p["dense_max_gb"]:
            reason = f"the L x L scores need {scores_gb:.0f} GB > dense_max_gb"
            rows += _skipped([kernel], point, p, reason=reason, device=device)
            continue
        try:
            times = _measure(fn, (q, k, v), passes, int(p["repeats"]), int(p["warmup"]))
        except Exception as err:  # recorded in the row: one failure must not end the run
            rows += _skipped([kernel], point, p, reason=describe_failure(err), device=device)
            _release_memory()
            continue
        for ps, ms in zip(passes, times, strict=True):
            if kernel == "sdpa_flash":
                baseline[(_shape_key(point), ps)] = ms
            rows.append(_timed_row(kernel, ps, point, p, ms, baseline, device=device))
    return rows


def _time_sla(q, k, v, point, p, baseline: dict, device: str) -> list[dict]:
    """The "sla" rows (every pass, with its error against sla_blockwise) and the
    "classify" row of one point."""
    from repro.kernels import sla_triton as kernels
    from repro.kernels.sla_reference import classify_blocks

    plan_summary = getattr(kernels, "plan_summary", None)  # the kernel side's, once it exists
    reps, warm = int(p["repeats"]), int(p["warmup"])
    phi, linear, fuse_linear = p["phi"], point["linear"], point["fuse_linear"]
    qd, kd = q.detach(), k.detach()

    def classify():
        mask = classify_blocks(
            qd, kd, block_q=point["block_q"], block_kv=point["block_kv"],
            k_h=1.0 - point["sparsity"], k_l=point["k_l"],
        )  # fmt: skip
        summary = (
            plan_summary(qd, kd, mask, phi=phi, linear=linear, fuse_linear=fuse_linear)
            if plan_summary
            else {}
        )
        return mask, summary

    try:
        classify_ms = _time_ms(classify, reps, warm, q.device)
        mask, summary = classify()

        def sla(q, k, v):
            return kernels.sla_triton(
                q, k, v, mask, phi=phi, linear=linear, fuse_linear=fuse_linear
            )

        times = _measure(sla, (q, k, v), PASSES, reps, warm)
        errors = _check_against_blockwise(q, k, v, point, p) if p["check"] else {}
    except Exception as err:  # recorded in the rows: one failure must not end the run
        print(f"{_point_name(point)}: {describe_failure(err)}", flush=True)
        _release_memory()
        return _skipped(SLA_KERNELS, point, p, reason=describe_failure(err), device=device)

    lin_mode = str(summary.get("lin_mode", ""))
    values = dict(device=device, lin_mode=lin_mode)
    rows = [
        _timed_row(
            "sla", ps, point, p, ms, baseline, max_abs_err=errors.get(ps, math.nan), **values
        )
        for ps, ms in zip(PASSES, times, strict=True)
    ]
    classify_row = _row("classify", "forward", point, p, time_ms=classify_ms, status="ok", **values)
    _print_point(point, rows, classify_row, summary)
    return [*rows, classify_row]


def _point_name(point: dict) -> str:
    return (
        f"L={point['seq_len']} sparsity={point['actual_sparsity']:.3f} "
        f"linear={point['linear']}{' fused' if point['fuse_linear'] else ''} k_l={point['k_l']} "
        f"block={point['block_q']}x{point['block_kv']} {point['dtype']}"
    )


def _print_point(point, rows, classify_row, summary) -> None:
    parts = [
        f"{r['pass']} {r['time_ms']:.3f} ms (x{r['speedup_vs_sdpa_flash']:.2f}, "
        f"err {r['max_abs_err']:.1e})"
        for r in rows
    ]
    plan = ", ".join(f"{key} {value}" for key, value in summary.items())
    print(
        f"{_point_name(point)}: SLA {'; '.join(parts)}; "
        f"classify {classify_row['time_ms']:.3f} ms{'; plan ' + plan if plan else ''}",
        flush=True,
    )


def main(argv=None) -> None:
    from repro.core.stage import Stage

    stage = Stage(__doc__, paper="sla", out="CSV to write (atomically)")
    stage.start(argv)
    p = resolve_params(stage.params)
    if stage.device.type == TIMED_ON:
        rows = run_timed(p, stage.device)
    else:
        reason = (
            f"--device {stage.args.device}: the kernels are timed on CUDA only"
            if torch.cuda.is_available()
            else "no CUDA device"
        )
        rows = skipped_rows(p, reason, describe(stage.device))
        print(f"{reason}: writing {len(rows)} rows marked skipped")
    write_table(pd.DataFrame(rows, columns=COLUMNS), stage.args.out)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

"""SLA kernel speed against torch SDPA (flash backend) and dense attention, written to CSV.

The paper's kernel benchmark (arXiv 2509.24006, Fig. 6): B 2, H 16, D 128, L 32760,
bf16, 95 % sparsity; metric = dense attention FLOPs / time, 4 B H L^2 D (x2.5 for the
backward: 2 for the gradients, 0.5 for recomputing P). Here also sweeps over L and
sparsity; at the paper's point, the other forms of the linear branch (`forms`: by
default the official main branch's linear attention over all tokens, and sparse
attention alone, which bounds what the linear branch may cost); and for every SLA
configuration the max error of its outputs (forward rows) or
gradients (backward rows) against `sla_blockwise` on one head, so a GPU run proves the
kernels right at scale too.

    python -m repro.sla.kernel_bench --out results/sla_kernel.csv --threads 4 \
        --params '{"seq_lens": [8192, 32760], "sparsities": [0.9, 0.95], "repeats": 10}'

Sparsity = 1 - the fraction of critical blocks actually selected (k_h = 1 - sparsity
requested, rounded up to whole blocks per row), at the paper's k_l = 10 % negligible;
the rest is marginal (linear attention). Timed: `sla_triton` with a ready block mask
(the compressed-map prediction `classify_blocks` is left out, as in the paper's
benchmark; lookup-table building is in). Backward rows time the backward alone.

Without CUDA every row is written with status "skipped" and the reason, so the
workflow completes on a CPU. Nothing here is asserted: the numbers are measurements.
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
from repro.core.stage import Stage, describe_device, run
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
]
KERNELS = ("sla", "sdpa_flash", "dense")
SHAPE_KEYS = ("batch", "heads", "seq_len", "head_dim", "dtype")  # what the baselines depend on
PASSES = ("forward", "backward")
LINEAR_FORMS = ("marginal", "all", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
    "block_q": 64,
    "block_kv": 64,
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
    forms = p["forms"]
    for i, form in enumerate(forms):
        if not isinstance(form, dict) or set(form) != {"linear", "k_l"}:
            raise ReproInputError(f"params.forms[{i}]: {form!r} is not {{linear, k_l}}")
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


def points(p: dict) -> list[dict]:
    """The SLA configurations: the paper's point, the L sweep, the sparsity sweep, the forms.

    Each carries its linear form and k_l, and the sparsity actually obtained:
    classify_blocks takes ceil(k_h N) critical blocks of the N per row (`block_counts`).
    """
    keys = ("batch", "heads", "head_dim", "seq_len", "sparsity", "linear", "k_l")
    base = {k: p[k] for k in keys}
    out = []
    for dtype in p["dtypes"]:
        candidates = [base]
        candidates += [{**base, "seq_len": n} for n in p["seq_lens"]]
        candidates += [{**base, "sparsity": s} for s in p["sparsities"]]
        candidates += [{**base, **form} for form in p["forms"]]
        for c in candidates:
            n_blocks = -(-c["seq_len"] // p["block_kv"])
            n_critical, _ = block_counts(n_blocks, 1.0 - c["sparsity"], c["k_l"])
            point = {**c, "dtype": dtype, "actual_sparsity": round(1 - n_critical / n_blocks, 6)}
            if point not in out:
                out.append(point)
    return out


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


def _measure(forward, inputs, repeats, warmup):
    """(forward ms, backward ms) of forward(*inputs) -> tuple of outputs."""
    device = inputs[0].device
    fwd_ms = _time_ms(lambda: forward(*inputs), repeats, warmup, device)
    outs = forward(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs = [o for o in outs if o.requires_grad]  # a constant output has no backward
    grads = [torch.randn_like(o) for o in outs]

    def backward():
        torch.autograd.grad(outs, inputs, grads, retain_graph=True)

    bwd_ms = _time_ms(backward, repeats, warmup, device)
    return fwd_ms, bwd_ms


def _check_against_blockwise(q, k, v, mask, p, linear: str) -> tuple[float, float]:
    """Max |SLA - sla_blockwise| of the outputs and of the gradients, on a few heads."""
    from repro.kernels.sla_reference import BlockMask, sla_blockwise
    from repro.kernels.sla_triton import sla_triton

    heads = slice(0, p["check_heads"])
    sub = BlockMask(
        classes=mask.classes[:1, heads].contiguous(),
        critical=mask.critical[:1, heads].contiguous(),
        block_q=mask.block_q,
        block_kv=mask.block_kv,
    )
    leaves = [t[:1, heads].detach().clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    kw = dict(phi=p["phi"], linear=linear)
    outs = sla_triton(*leaves, sub, **kw)
    refs = sla_blockwise(*ref_leaves, sub, **kw)
    out_err = max((a.float() - b).abs().max().item() for a, b in zip(outs, refs, strict=True))
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
    grad_err = max(
        (a.float() - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)
    )
    return out_err, grad_err


def _row(kernel, pass_name, point, p, **values):
    sla = kernel == "sla"
    row = dict(
        kernel=kernel,
        batch=point["batch"],
        heads=point["heads"],
        seq_len=point["seq_len"],
        head_dim=point["head_dim"],
        dtype=point["dtype"],
        sparsity=point["actual_sparsity"] if sla else 0.0,
        block_q=p["block_q"] if sla else math.nan,
        block_kv=p["block_kv"] if sla else math.nan,
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
    )
    row["pass"] = pass_name
    row.update(values)
    return row


def skipped_rows(p: dict, reason: str, device: str = "") -> list[dict]:
    """The table a CUDA run would write, every row marked skipped with `reason` on `device`."""
    rows, shapes = [], []
    for point in points(p):
        shape = {k: point[k] for k in SHAPE_KEYS}
        kw = dict(reason=reason, device=device)
        if shape not in shapes:
            shapes.append(shape)
            for kernel in ("sdpa_flash", "dense"):
                rows += [_row(kernel, ps, point, p, **kw) for ps in PASSES]
        rows += [_row("sla", ps, point, p, **kw) for ps in PASSES]
    return rows


def run_timed(p: dict, device: str | torch.device) -> list[dict]:
    """Time every point on `device`: a CUDA device for the real table; the CPU runs the
    same code under TRITON_INTERPRET=1 at toy shapes, which is how the tests check this path."""
    from repro.kernels.sla_reference import classify_blocks
    from repro.kernels.sla_triton import sla_triton

    on = torch.device(device)
    device = describe_device(on) if on.type == TIMED_ON else f"{on.type} (not a timing)"
    reps, warm = int(p["repeats"]), int(p["warmup"])
    rows, baseline = [], {}  # baseline[(shape key, pass)] = sdpa flash ms
    for point in points(p):
        b, h, n, d = point["batch"], point["heads"], point["seq_len"], point["head_dim"]
        dtype = DTYPES[point["dtype"]]
        gen = torch.Generator(device=on).manual_seed(int(p["seed"]))
        q, k, v = (
            torch.randn(b, h, n, d, device=on, dtype=dtype, generator=gen).requires_grad_()
            for _ in range(3)
        )
        shape_key = (b, h, n, d, point["dtype"])

        if (shape_key, "forward") not in baseline:  # dense baselines once per shape
            for kernel, fn in (("sdpa_flash", _sdpa_flash), ("dense", _dense)):
                scores_gb = b * h * n * n * 4 / 2**30
                if kernel == "dense" and scores_gb > p["dense_max_gb"]:
                    reason = f"the L x L scores need {scores_gb:.0f} GB > dense_max_gb"
                    rows += [
                        _row(kernel, ps, point, p, reason=reason, device=device) for ps in PASSES
                    ]
                    continue
                try:
                    times = _measure(fn, (q, k, v), reps, warm)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    rows += [
                        _row(kernel, ps, point, p, reason=reason, device=device) for ps in PASSES
                    ]
                    torch.cuda.empty_cache()
                    continue
                for ps, ms in zip(PASSES, times, strict=True):
                    if kernel == "sdpa_flash":
                        baseline[(shape_key, ps)] = ms
                    rows.append(_timed_row(kernel, ps, point, p, ms, baseline, shape_key, device))

        mask = classify_blocks(
            q.detach(), k.detach(), block_q=p["block_q"], block_kv=p["block_kv"],
            k_h=1.0 - point["sparsity"], k_l=point["k_l"],
        )  # fmt: skip
        linear = point["linear"]

        def sla(q, k, v, mask=mask, linear=linear):
            return sla_triton(q, k, v, mask, phi=p["phi"], linear=linear)

        try:
            times = _measure(sla, (q, k, v), reps, warm)
            errors = (
                _check_against_blockwise(q, k, v, mask, p, linear)
                if p["check"]
                else (math.nan,) * 2
            )
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows += [_row("sla", ps, point, p, reason=reason, device=device) for ps in PASSES]
            torch.cuda.empty_cache()
            continue
        for ps, ms, err in zip(PASSES, times, errors, strict=True):
            row = _timed_row("sla", ps, point, p, ms, baseline, shape_key, device)
            rows.append({**row, "max_abs_err": err})
        print(
            f"L={n} sparsity={point['actual_sparsity']:.3f} linear={linear} "
            f"k_l={point['k_l']} {point['dtype']}: "
            f"SLA fwd {times[0]:.2f} ms, bwd {times[1]:.2f} ms; "
            f"SDPA flash fwd {baseline.get((shape_key, 'forward'), math.nan):.2f} ms, "
            f"bwd {baseline.get((shape_key, 'backward'), math.nan):.2f} ms; "
            f"max err out {errors[0]:.2e}, grad {errors[1]:.2e}",
            flush=True,
        )
    return rows


def _timed_row(kernel, ps, point, p, ms, baseline, shape_key, device):
    flops = _dense_flops(point["batch"], point["heads"], point["seq_len"], point["head_dim"], ps)
    ref = baseline.get((shape_key, ps), math.nan)
    return _row(
        kernel, ps, point, p,
        time_ms=ms, tflops_metric=flops / (ms * 1e-3) / 1e12, speedup_vs_sdpa_flash=ref / ms,
        status="ok", device=device,
    )  # fmt: skip


def main(argv=None) -> None:
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
        rows = skipped_rows(p, reason, describe_device(stage.device))
        print(f"{reason}: writing {len(rows)} rows marked skipped")
    write_table(pd.DataFrame(rows, columns=COLUMNS), stage.args.out)


if __name__ == "__main__":
    run(main)

"""One run on a GPU machine: the SLA kernels checked, then timed, within a time budget.

    PYTHONPATH=src python -m repro.sla.kernel_device --out-dir results [--budget-s 420] \
        [--params JSON | --config config.yaml]

(`bash scripts/sla_device_run.sh` runs exactly this, with the Triton autotuning log.)
Needs torch, triton, pandas, safetensors and yaml only: no Snakemake, MLflow or stage
machinery, which the device machine does not have. Writes into --out-dir:

  device_info.json  torch / triton / CUDA versions, the device's name and SM count.
  correctness.csv   (case, tensor, max_abs_err, bound, ok): `sla_triton` against
                    `sla_reference` in float64 at a small shape (O_s, O_l, the q/k/v
                    gradients, and O_s, O_l again on the inference-only path), for every
                    linear form (marginal k_l 0.1, marginal k_l 0, all, none) x dtype x
                    block shape x length (one a multiple of no block), phi softmax; bound =
                    atol + rtol max|ref| with tests/test_sla_triton.py's tolerances. A
                    failure is recorded (a case that raises: tensor "exception"), never fatal.
  sla_kernel.csv    `repro.sla.kernel_bench.run_timed` with the kernel_bench params (the
                    --params JSON, else config.yaml's sla.kernel_bench), the points not
                    started once the budget (counted from this module's start) is spent
                    written as skipped.

Prints a one-line correctness summary, the bench's line per point, and last a short
fixed-width table. Exit status 1 when a correctness check failed, else 0.

On a CPU with TRITON_INTERPRET=1 the same run works at toy shapes (tests pass small
params and --check-* options); its times mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from repro.core.io import write_json
from repro.core.results import write_table
from repro.sla import kernel_bench as bench

# tests/test_sla_triton.py's (atol, rtol) per dtype: max|x - ref| <= atol + rtol max|ref|.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (4e-2, 1e-2),
}
# (linear, k_l, fuse_linear): the paper's three classes (split, then fused as in the
# official kernel), SLA-1's two classes, the main branch's form, sparse alone.
CHECK_FORMS = (
    ("marginal", 0.1, False),
    ("marginal", 0.1, True),
    ("marginal", 0.0, False),
    ("all", 0.0, False),
    ("none", 0.0, False),
)
CHECK_COLUMNS = ["case", "tensor", "max_abs_err", "bound", "ok"]
TENSORS = ("o_s", "o_l", "dq", "dk", "dv", "o_s_nograd", "o_l_nograd")
TABLE_COLUMNS = (  # the printed summary: (header, width)
    ("kernel", 10),
    ("pass", 9),
    ("form", 13),
    ("block", 7),
    ("L", 6),
    ("sparsity", 8),
    ("ms", 10),
    ("speedup", 7),
)


@dataclass(frozen=True)
class CheckCase:
    """One correctness case: (batch, heads, head_dim), a length, a block shape, a form."""

    shape: tuple[int, int, int]
    seq_len: int
    block_q: int
    block_kv: int
    linear: str
    k_h: float
    k_l: float
    dtype: str
    phi: str = "softmax"
    fuse_linear: bool = False

    def __str__(self) -> str:
        b, h, d = self.shape
        return (
            f"{self.dtype}-B{b}H{h}L{self.seq_len}D{d}-blk{self.block_q}x{self.block_kv}"
            f"-kh{self.k_h}-kl{self.k_l}-{self.phi}-{self.linear}"
            f"{'-fused' if self.fuse_linear else ''}"
        )


def check_cases(
    shape: tuple[int, int, int],
    seq_lens: list[int],
    blocks: list[tuple[int, int]],
    dtypes: list[str],
    k_h: float,
) -> list[CheckCase]:
    """Every form x dtype x block shape x length, in that nesting."""
    return [
        CheckCase(shape, n, bq, bkv, linear, k_h, k_l, dtype, fuse_linear=fuse)
        for linear, k_l, fuse in CHECK_FORMS
        for dtype in dtypes
        for bq, bkv in blocks
        for n in seq_lens
    ]


def run_case(case: CheckCase, device: torch.device, seed: int = 0) -> list[dict]:
    """The correctness rows of one case: each tensor's max error and bound."""
    from repro.kernels.sla_reference import classify_blocks, sla_reference
    from repro.kernels.sla_triton import sla_triton

    b, h, d = case.shape
    dtype = bench.DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, case.seq_len, d, generator=gen).to(device) for _ in range(3))
    mask = classify_blocks(
        q, k, block_q=case.block_q, block_kv=case.block_kv, k_h=case.k_h, k_l=case.k_l
    )
    q, k, v = (t.to(dtype) for t in (q, k, v))
    up = [torch.randn(b, h, case.seq_len, d, generator=gen).to(device, dtype) for _ in range(2)]
    kw = dict(phi=case.phi, linear=case.linear, fuse_linear=case.fuse_linear)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    outs = sla_triton(*leaves, mask, **kw)  # first: a kernel that cannot run fails fast
    torch.autograd.backward(outs, up)
    with torch.no_grad():
        plain = sla_triton(q, k, v, mask, **kw)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    refs = sla_reference(*ref_leaves, mask, phi=case.phi, linear=case.linear)
    torch.autograd.backward(refs, [u.double() for u in up])

    got = [*outs, *(t.grad for t in leaves), *plain]
    want = [*refs, *(t.grad for t in ref_leaves), *refs]
    atol, rtol = TOLERANCE[dtype]
    rows = []
    for name, x, ref in zip(TENSORS, got, want, strict=True):
        ref = ref.detach()
        err = (x.detach().double() - ref).abs().max().item()
        bound = atol + rtol * ref.abs().max().item()
        rows.append(
            dict(case=str(case), tensor=name, max_abs_err=err, bound=bound, ok=err <= bound)
        )
    return rows


def correctness(cases: list[CheckCase], device: torch.device) -> pd.DataFrame:
    """Every case's rows; a case that raises is one row, tensor "exception", not ok."""
    rows = []
    for case in cases:
        try:
            rows += run_case(case, device)
        except Exception as err:  # recorded: the timing still runs after a failed check
            print(f"correctness {case}: {bench.describe_failure(err)}", flush=True)
            failed = dict(case=str(case), tensor="exception", max_abs_err=math.nan, bound=math.nan)
            rows.append({**failed, "ok": False})
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def correctness_summary(df: pd.DataFrame, seconds: float) -> str:
    """One line: how many tensors are within bounds, and the worst error / bound."""
    ratio = df.max_abs_err / df.bound
    line = (
        f"correctness: {int(df.ok.sum())}/{len(df)} tensors within bounds "
        f"over {df.case.nunique()} cases in {seconds:.0f} s"
    )
    if ratio.notna().any():
        worst = df.loc[ratio.idxmax()]
        line += (
            f"; worst {worst.tensor} of {worst.case}: "
            f"{worst.max_abs_err:.2e} (bound {worst.bound:.2e})"
        )
    failed = df[~df.ok.astype(bool)]
    if len(failed):
        line += f"; FAILED: {', '.join(sorted(set(failed.case + ':' + failed.tensor)))}"
    return line


def device_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import triton

    info = {
        "device": bench.describe(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "name": None,
        "sm_count": None,
        "capability": None,
        "env": {
            key: os.environ.get(key)
            for key in ("REPRO_SLA_AUTOTUNE", "TRITON_INTERPRET", "TRITON_PRINT_AUTOTUNING")
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


def timing_blocker(device: torch.device) -> str:
    """Why the bench cannot run on `device` ("" when it can): on a CPU only the Triton
    interpreter runs the kernels (and then only toy shapes finish in time)."""
    from repro.kernels import sla_triton

    if device.type == bench.TIMED_ON or sla_triton.INTERPRETED:
        return ""
    return f"{device}: no CUDA device and TRITON_INTERPRET unset"


def load_params(params: str | None, config: str) -> dict:
    """kernel_bench's resolved params: the --params JSON, else the config's sla.kernel_bench."""
    if params is not None:
        return bench.resolve_params(json.loads(params))
    import yaml

    with open(config) as f:
        return bench.resolve_params(yaml.safe_load(f)["sla"]["kernel_bench"])


def format_table(rows: list[dict]) -> str:
    """The timed table in fixed-width columns: ms (or the status) and speed-up per row."""
    lines = ["  ".join(f"{name:>{width}}" for name, width in TABLE_COLUMNS)]
    for r in rows:
        sla = r["kernel"] in bench.SLA_KERNELS
        cells = (
            r["kernel"],
            r["pass"],
            f"{r['linear']}/{r['k_l']:g}" if sla else "",
            f"{r['block_q']}x{r['block_kv']}" if sla else "",
            str(r["seq_len"]),
            f"{r['sparsity']:.4f}" if sla else "",
            f"{r['time_ms']:.3f}" if r["status"] == "ok" else r["status"],
            f"{r['speedup_vs_sdpa_flash']:.2f}"
            if math.isfinite(r["speedup_vs_sdpa_flash"])
            else "",
        )
        lines.append("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, TABLE_COLUMNS, strict=True)))
    return "\n".join(lines)


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(b) for b in pair.split("x")) for pair in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m repro.sla.kernel_device",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the outputs")
    parser.add_argument("--params", help="kernel_bench params as JSON (default: --config's)")
    parser.add_argument("--config", default="config.yaml", help="read sla.kernel_bench here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for it all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    check = parser.add_argument_group("correctness check")
    check.add_argument("--check-shape", type=_ints, default=[1, 2, 128], help="B,H,D")
    # 1000: the paper's L (32760) is no multiple of 64 either, so its padded last block.
    check.add_argument("--check-lens", type=_ints, default=[1000], help="L,...")
    check.add_argument("--check-blocks", type=_pairs, default=[(64, 64), (128, 64)])
    check.add_argument(
        # bf16 only by default: fp32 kernels (IEEE dots) at D = 128 took up to 133 s each
        # to compile on the H200 machine, and the interpreter tests cover fp32 on CPU.
        "--check-dtypes",
        type=lambda s: s.split(","),
        default=["bfloat16"],
    )
    check.add_argument("--check-k-h", type=float, default=0.25, help="critical fraction")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    params = load_params(args.params, args.config)  # bad params fail before any work
    device = torch.device(args.device)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "device_info.json", device_info(device))

    cases = check_cases(
        tuple(args.check_shape), args.check_lens, args.check_blocks, args.check_dtypes,
        args.check_k_h,
    )  # fmt: skip
    # One config per kernel for the checks (no autotuning): the compile time goes to the
    # timed table, whose shapes autotune afresh (their keys differ from these).
    from repro.kernels import sla_triton as kernels

    autotune, kernels.AUTOTUNE = kernels.AUTOTUNE, False
    checks = correctness(cases, device)
    kernels.AUTOTUNE = autotune
    write_table(checks, out / "correctness.csv")
    print(correctness_summary(checks, time.monotonic() - start), flush=True)

    blocker = timing_blocker(device)
    if blocker:
        rows = bench.skipped_rows(params, blocker, bench.describe(device))
        print(f"{blocker}: writing {len(rows)} rows marked skipped", flush=True)
    else:
        rows = bench.run_timed(params, device, deadline=start + args.budget_s)
    write_table(pd.DataFrame(rows, columns=bench.COLUMNS), out / "sla_kernel.csv")
    print(f"total {time.monotonic() - start:.0f} s; tables in {out}", flush=True)
    print(format_table(rows), flush=True)
    return 0 if checks.ok.all() else 1


if __name__ == "__main__":
    sys.exit(main())

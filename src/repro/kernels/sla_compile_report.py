"""Registers, spills and pipelined loads of the SLA kernels for sm_90, compiled on a CPU.

No GPU needed: Triton compiles for a named target (Hopper, compute capability 9.0) and the
cuobjdump that ships with Triton reads the cubin's resource usage. This is how the
kernels' layout was chosen without device time (the fused forward's D x D state spilled
in every configuration; the split layout's sparse kernel does not at 8 warps):

    python -m repro.kernels.sla_compile_report --kernels fwd,fwd_linear --block-q 64,128

One line per (kernel, block_q, num_warps, num_stages, variant): registers per thread
(255 is the cap), stack bytes (spills: > 0 means local memory), the number of loads the
software pipeliner made asynchronous, and the number of wgmma (Hopper tensor-core) dots.
Compiling takes seconds per line; the kernels are compiled exactly as `sla_triton` would
launch them for bf16 inputs (head_dim 128, 64-token key blocks by default).
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from repro.kernels import sla_triton as kernels

HOPPER = GPUTarget("cuda", 90, 32)
# Pointer arguments by name (bf16 inputs: bf16 tiles and states, fp32 statistics).
BF16_POINTERS = (
    "Q K V DOS DOL DQ DK DV OS OL H_STATE DH_STATE"
).split()  # fmt: skip
INT_POINTERS = "CRIT_LUT LIN_LUT CRIT_T_OFF CRIT_T_IDX LIN_T_OFF LIN_T_IDX".split()
FLOAT_SCALARS = ("sm_scale",)
BF16_DOTS = dict(DOT_DTYPE=tl.bfloat16, UPCAST=False, PREC="tf32")


def _variants(name: str, head_dim: int, block_q: int, block_kv: int) -> list[tuple[str, dict]]:
    """(label, constexprs) of each compiled form of one kernel."""
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    lin = dict(LIN_PREC="tf32", EPS=kernels.LINEAR_EPS)
    if name == "fwd":
        return [
            (f"{kernels.LIN_MODE_NAMES[mode]}{' fused' if mode else ''}",
             dict(**shape, BLOCK_M=block_q, BLOCK_N=block_kv, PHI_ID=0, LIN_MODE=mode,
                  SAVE=True, EVEN_K=False, **lin, **BF16_DOTS))
            for mode in (kernels.LIN_NONE, kernels.LIN_SUBTRACT, kernels.LIN_ALL)
        ]  # fmt: skip
    if name == "fwd_linear":
        return [
            (kernels.LIN_MODE_NAMES[mode],
             dict(**shape, BLOCK_M=block_q, SUB_M=min(block_q, kernels.SUB_TILE_ROWS),
                  PHI_ID=0, LIN_MODE=mode, SAVE=True, ROWS_ONLY=False, **lin))
            for mode in (kernels.LIN_SUBTRACT, kernels.LIN_ALL)
        ]  # fmt: skip
    if name == "kv_state":
        return [
            (label, dict(**shape, BLOCK_N=block_kv, CHUNK=kernels.STATE_CHUNK, PHI_ID=0,
                         LIN_PREC="tf32", STORE_BLOCKS=blocks, STORE_TOTAL=True))
            for label, blocks in (("blocks+total", True), ("total", False))
        ]  # fmt: skip
    if name == "dq":
        return [("sparse+linear", dict(**shape, BLOCK_M=block_q, BLOCK_N=block_kv, PHI_ID=0,
                                       HAS_DOS=True, HAS_DOL=True, ROW_STATE=True,
                                       EVEN_K=False, LIN_PREC="tf32", **BF16_DOTS))]  # fmt: skip
    if name == "dkdv":
        return [("sparse", dict(**shape, BLOCK_M=block_q, BLOCK_N=block_kv, **BF16_DOTS))]
    if name == "dkdv_linear":
        return [("subtract", dict(**shape, BLOCK_N=block_kv, PHI_ID=0,
                                  LIN_MODE=kernels.LIN_SUBTRACT, ACCUMULATE=True,
                                  LIN_PREC="tf32"))]  # fmt: skip
    raise ValueError(f"kernel {name!r}: one of {', '.join(KERNELS)}")


KERNELS = {
    "fwd": "_sla_fwd_kernel",
    "fwd_linear": "_sla_fwd_linear_kernel",
    "kv_state": "_sla_kv_state_kernel",
    "dq": "_sla_bwd_dq_kernel",
    "dkdv": "_sla_bwd_dkdv_kernel",
    "dkdv_linear": "_sla_bwd_dkdv_linear_kernel",
}


def _signature(fn, constexprs: dict) -> dict:
    def kind(arg):
        if arg in constexprs:
            return "constexpr"
        if arg in BF16_POINTERS:
            return "*bf16"
        if arg in INT_POINTERS:
            return "*i32"
        if arg.isupper():  # every other pointer holds fp32 (statistics, totals, row states)
            return "*fp32"
        return "fp32" if arg in FLOAT_SCALARS else "i32"

    return {arg: kind(arg) for arg in fn.arg_names}


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and static shared memory of a cubin, read by Triton's cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}


def compile_report(name: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile one kernel for sm_90 and describe it."""
    fn = getattr(kernels, KERNELS[name]).fn  # the autotuner's JITFunction
    source = triton.compiler.ASTSource(
        fn=fn,
        signature=_signature(fn, constexprs),
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=HOPPER, options=options)
    ttgir = compiled.asm["ttgir"]
    return {
        **resource_usage(compiled.asm["cubin"]),
        "async_loads": ttgir.count("async_copy_global_to_local"),
        "wgmma": ttgir.count("warp_group_dot"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--block-q", default="64,128")
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    print(f"{'kernel':12} {'variant':13} {'block':>7} {'warps':>5} {'stages':>6} "
          f"{'regs':>4} {'stack':>5} {'async':>5} {'wgmma':>5}")  # fmt: skip
    for name in args.kernels.split(","):
        for block_q, warps, stages in itertools.product(
            ints(args.block_q), ints(args.warps), ints(args.stages)
        ):
            for label, constexprs in _variants(name, args.head_dim, block_q, args.block_kv):
                r = compile_report(name, constexprs, warps, stages)
                print(f"{name:12} {label:13} {f'{block_q}x{args.block_kv}':>7} {warps:>5} "
                      f"{stages:>6} {r['registers']:>4} {r['stack_bytes']:>5} "
                      f"{r['async_loads']:>5} {r['wgmma']:>5}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

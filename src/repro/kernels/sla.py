"""One entry point for sparse-linear attention: classify blocks, then run a backend.

    o_s, o_l, mask = sla_attention(q, k, v, block_q=64, block_kv=64, k_h=0.05, k_l=0.10)

Backends: "triton" (the fused kernels, CUDA), "torch" (the blockwise PyTorch path,
what CPU training uses), "reference" (dense, for tests). "auto" picks Triton on
CUDA and the blockwise path elsewhere. Every argument is checked before any
kernel launches (`check_sla_args`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from repro.kernels.sla_reference import (
    BlockMask,
    check_sla_args,
    classify_blocks,
    sla_blockwise,
    sla_reference,
)

BACKENDS = ("auto", "triton", "torch", "reference")


class SLAOutput(NamedTuple):
    o_s: torch.Tensor  # sparse branch (exact attention over critical blocks)
    o_l: torch.Tensor  # linear branch (before the module's projection)
    mask: BlockMask


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    return backend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int = 64,
    block_kv: int = 64,
    k_h: float = 0.05,
    k_l: float = 0.10,
    phi: str = "softmax",
    linear: str = "marginal",
    backend: str = "auto",
    mask: BlockMask | None = None,
) -> SLAOutput:
    """Sparse-linear attention of (B, H, L, D) tensors; returns O_s, O_l and the block mask."""
    check_sla_args(
        q, k, v, block_q=block_q, block_kv=block_kv, k_h=k_h, k_l=k_l, phi=phi, linear=linear
    )
    backend = resolve_backend(backend, q.device)
    if mask is None:
        mask = classify_blocks(q, k, block_q=block_q, block_kv=block_kv, k_h=k_h, k_l=k_l)
    if backend == "triton":
        from repro.kernels.sla_triton import sla_triton

        o_s, o_l = sla_triton(q, k, v, mask, phi=phi, linear=linear)
    elif backend == "torch":
        o_s, o_l = sla_blockwise(q, k, v, mask, phi=phi, linear=linear)
    else:
        o_s, o_l = sla_reference(q, k, v, mask, phi=phi, linear=linear)
    return SLAOutput(o_s, o_l, mask)

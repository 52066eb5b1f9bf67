"""Attention FLOPs: one count shared by every table that reports attention sparsity.

Dense attention of (B, H, Lq, D) queries against Lk keys costs

    dense = 4 B H Lq Lk D          QK^T and PV, a multiply-add counted as 2 FLOPs

(the metric of the SLA paper's kernel benchmark). Sparse-linear attention (SLA) costs

    sparse = 4 D  x  #(query, key) token pairs inside critical blocks
             (the partial last block of each side counted at its true size)
    linear = per key token:   2 D^2 (h_j = phi(K_j)^T V_j) + D (z_j = colsum phi(K_j))
           + per (b, h):      Nk (D^2 + D)   the "pre-aggregation": H, Z summed once
           + per query block: (D^2 + D) per non-marginal key block subtracted from them
                              (only when the linear branch covers the marginal blocks)
           + per query:       2 D^2 (phi(Q) H) + 2 D (phi(Q) Z) + D (the division)

and negligible blocks cost nothing. Elementwise work (the feature map, the online
softmax's exponentials, the output projection of O_l) is not counted, as FLOPs
tables of attention do not count it either.

Two sparsities are reported:

* `sparsity` = 1 - (sparse + linear) / dense: the compute actually skipped;
* `block_sparsity` = the fraction of non-critical blocks: what the paper calls
  sparsity ("95 %" at k_h = 5 %).

`AttentionFlopsCounter` sums the counts of every attention call made while it is
active, so a table can report "attention FLOPs per generated sample". Attention
modules report themselves through `record_attention_flops` (the SLA module does);
this file never imports a paper package and takes block classes as plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repro.kernels.sla_reference import CRITICAL, MARGINAL

LINEAR_MODES = ("marginal", "all", "none")


@dataclass(frozen=True)
class AttentionFlops:
    """FLOPs of one or more attention calls; add instances to accumulate."""

    dense: float = 0.0  # what full attention would have cost
    sparse: float = 0.0  # exact attention over critical blocks
    linear: float = 0.0  # the linear-attention branch
    blocks: float = 0.0  # (b, h, query block, key block) entries classified
    critical_blocks: float = 0.0

    @property
    def total(self) -> float:
        return self.sparse + self.linear

    @property
    def sparsity(self) -> float:
        """Fraction of dense attention FLOPs not spent (0 for full attention)."""
        return 1.0 - self.total / self.dense if self.dense else 0.0

    @property
    def block_sparsity(self) -> float:
        """The paper's sparsity: the fraction of blocks that are not critical."""
        return 1.0 - self.critical_blocks / self.blocks if self.blocks else 0.0

    def __add__(self, other: AttentionFlops) -> AttentionFlops:
        if not isinstance(other, AttentionFlops):
            return NotImplemented
        return AttentionFlops(
            dense=self.dense + other.dense,
            sparse=self.sparse + other.sparse,
            linear=self.linear + other.linear,
            blocks=self.blocks + other.blocks,
            critical_blocks=self.critical_blocks + other.critical_blocks,
        )

    def as_dict(self) -> dict[str, float]:
        """Plain numbers for a results table or an MLflow metric."""
        return {
            "attention_flops": self.total,
            "dense_attention_flops": self.dense,
            "sparse_flops": self.sparse,
            "linear_flops": self.linear,
            "sparsity": self.sparsity,
            "block_sparsity": self.block_sparsity,
        }


def dense_attention_flops(batch: int, heads: int, len_q: int, len_k: int, head_dim: int) -> int:
    """4 B H Lq Lk D: the FLOPs of full attention (QK^T and PV)."""
    for name, value in (
        ("batch", batch),
        ("heads", heads),
        ("len_q", len_q),
        ("len_k", len_k),
        ("head_dim", head_dim),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    return 4 * batch * heads * len_q * len_k * head_dim


def full_attention_flops(batch: int, heads: int, len_q: int, len_k: int, head_dim: int):
    """Full attention as an AttentionFlops: every block critical, nothing skipped."""
    dense = float(dense_attention_flops(batch, heads, len_q, len_k, head_dim))
    return AttentionFlops(dense=dense, sparse=dense)


def _block_sizes(length: int, block: int, num_blocks: int, name: str) -> torch.Tensor:
    """Tokens in each block: `block`, except the last, partial one."""
    if num_blocks != -(-length // block):
        raise ValueError(
            f"{name}: {num_blocks} blocks of {block} tokens do not cover a length of {length}"
        )
    sizes = torch.full((num_blocks,), block, dtype=torch.int64)
    sizes[-1] = length - (num_blocks - 1) * block
    return sizes


def sla_attention_flops(
    classes: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    len_q: int,
    len_k: int,
    head_dim: int,
    linear: str = "marginal",
) -> AttentionFlops:
    """FLOPs of one sparse-linear attention call from its block classes.

    classes: (B, H, Nq, Nk) with CRITICAL = 1, MARGINAL = 0, NEGLIGIBLE = -1 per block
    (`BlockMask.classes`). linear: which key blocks feed the linear branch,
    "marginal" (the paper), "all" (every key block) or "none" (sparse only).
    """
    if classes.dim() != 4:
        raise ValueError(
            f"classes must have shape (batch, heads, q_blocks, kv_blocks); got {tuple(classes.shape)}"
        )
    if linear not in LINEAR_MODES:
        raise ValueError(f"linear={linear!r}; allowed: {', '.join(LINEAR_MODES)}")
    batch, heads, n_q, n_k = classes.shape
    d = head_dim
    dense = dense_attention_flops(batch, heads, len_q, len_k, d)
    rows = _block_sizes(len_q, block_q, n_q, "len_q").to(classes.device)
    cols = _block_sizes(len_k, block_kv, n_k, "len_k").to(classes.device)

    classes = classes.detach()
    critical = classes == CRITICAL
    # Token pairs in critical blocks: sum over rows i of rows_i * sum_{j critical} cols_j.
    critical_keys = (critical.to(torch.int64) * cols).sum(-1)  # (B, H, Nq)
    pairs = int((critical_keys * rows).sum())
    sparse = 4 * d * pairs

    if linear == "none":
        linear_flops = 0
    else:
        bh = batch * heads
        key_states = bh * len_k * (2 * d * d + d)
        pre_aggregation = bh * n_k * (d * d + d)
        if linear == "marginal":
            non_marginal = int((classes != MARGINAL).sum())
            pre_aggregation += non_marginal * (d * d + d)
        per_query = bh * len_q * (2 * d * d + 3 * d)
        linear_flops = key_states + pre_aggregation + per_query

    return AttentionFlops(
        dense=float(dense),
        sparse=float(sparse),
        linear=float(linear_flops),
        blocks=float(classes.numel()),
        critical_blocks=float(critical.sum()),
    )


# ----------------------------------------------------------------------------- counting


_ACTIVE: list[AttentionFlopsCounter] = []


def counting_attention_flops() -> bool:
    """True while some AttentionFlopsCounter is active (modules skip the count otherwise)."""
    return bool(_ACTIVE)


def record_attention_flops(flops: AttentionFlops) -> None:
    """Add one attention call's FLOPs to every active counter (a no-op when none is)."""
    for counter in _ACTIVE:
        counter.add(flops)


class AttentionFlopsCounter:
    """Sums the FLOPs of every attention call reported while the `with` block runs.

        with AttentionFlopsCounter() as counter:
            sample(model, ...)
        counter.flops.total / 1e12      # attention TFLOPs of the whole sampling run

    Counts forward calls only: with gradient checkpointing a training step's
    recomputed forward is counted again. Counters nest; each sees every call.
    """

    def __init__(self) -> None:
        self.flops = AttentionFlops()
        self.calls = 0

    def add(self, flops: AttentionFlops) -> None:
        self.flops = self.flops + flops
        self.calls += 1

    def __enter__(self) -> AttentionFlopsCounter:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

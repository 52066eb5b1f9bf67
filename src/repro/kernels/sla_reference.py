"""Sparse-linear attention (SLA) in plain PyTorch: the mathematics the Triton kernels must match.

SLA (arXiv 2509.24006) splits the attention map into blocks of b_q query rows by
b_kv key columns and treats each block by how much attention mass it is expected
to carry, judged from a compressed map of mean-pooled queries and keys:

    P_c = softmax(pool(Q) pool(K)^T / sqrt(d))          one entry per (query block, key block)

In every query-block row the top k_h % key blocks are *critical*, the bottom k_l %
are *negligible*, the rest are *marginal*:

    O_s = softmax(Q K_c^T / sqrt(d)) V_c                exact attention over critical blocks only
    O_l = phi(Q) H / (phi(Q) Z + eps)                   linear attention over marginal blocks
        H = sum_j phi(K_j)^T V_j,  Z = sum_j colsum(phi(K_j))   (j over the row's marginal blocks)

and negligible blocks cost nothing. The module adds the two: O = O_s + Proj(O_l).

Two implementations live here:

* `sla_reference` builds dense token-level masks and computes both branches
  densely. It is O(L^2) in memory, simple enough to trust, and it is what the
  Triton kernels and the blockwise path are tested against (gradcheck in float64).
* `sla_blockwise` computes the same numbers block by block: exact attention over
  gathered critical key blocks and per-block linear-attention states. Its memory
  is O(L * critical tokens), so CPU training at tiny scale can use it; autograd
  gives its backward.

`linear` selects which key blocks feed the linear branch: "marginal" (the paper's
three classes), "all" (the official main branch: linear attention over every
token, no negligible class) or "none" (sparse only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from repro.kernels.sla_blocks import block_counts  # noqa: F401 (re-exported)

PHI = ("softmax", "elu", "relu")
LINEAR = ("marginal", "all", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
MIN_BLOCK, MAX_BLOCK = 16, 256
# Keeps O_l finite where a row has no marginal block (its numerator is then 0 too).
LINEAR_EPS = 1e-6

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1


@dataclass
class BlockMask:
    """The block classification of one attention call.

    classes:  (B, H, Nq, Nk) int8, CRITICAL / MARGINAL / NEGLIGIBLE per block.
    critical: (B, H, Nq, n_critical) int32, the critical key-block indices of each
              query-block row in ascending order (the lookup table the sparse
              kernel walks). Every row has the same count.
    negligible: (B, H, Nq, n_negligible) int32, the negligible key blocks of each row
              in ascending order, when every row has the same count (`classify_blocks`
              always); None for a hand-built mask, whose lists the kernels then derive
              from `classes` (one device sync to check them).

    The Triton kernels cache their launch plan in `plans` (keyed by shapes, device and
    form), so a mask reused across calls is planned once: do not modify its tensors
    in place after a call.
    """

    classes: torch.Tensor
    critical: torch.Tensor
    block_q: int
    block_kv: int
    negligible: torch.Tensor | None = None
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_critical(self) -> int:
        return self.critical.shape[-1]

    @property
    def has_marginal(self) -> bool:
        """Whether any row has a marginal block (the linear branch's "marginal" input)."""
        n_negligible = 0 if self.negligible is None else self.negligible.shape[-1]
        return self.n_critical + n_negligible < self.num_blocks[1]

    @property
    def num_blocks(self) -> tuple[int, int]:
        return self.classes.shape[-2], self.classes.shape[-1]

    def fractions(self) -> dict[str, float]:
        """Fraction of blocks in each class (over all rows, heads and batch)."""
        total = self.classes.numel()
        return {
            name: float((self.classes == value).sum()) / total
            for name, value in (
                ("critical", CRITICAL),
                ("marginal", MARGINAL),
                ("negligible", NEGLIGIBLE),
            )
        }


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and (n & (n - 1)) == 0


def check_sla_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    k_h: float,
    k_l: float,
    phi: str = "softmax",
    linear: str = "marginal",
) -> None:
    """Raise ValueError naming the argument before any kernel is launched."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, heads, length, head_dim); got {tuple(t.shape)}"
            )
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: {', '.join(map(str, DTYPES))}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            "q, k, v must agree in (batch, heads); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length; got {k.shape[2]} and {v.shape[2]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(
            f"q, k, v must share head_dim; got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}"
        )
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"q and k need at least one token; got lengths {q.shape[2]}, {k.shape[2]}")
    check_sla_settings(
        head_dim=q.shape[3], block_q=block_q, block_kv=block_kv, k_h=k_h, k_l=k_l, phi=phi,
        linear=linear,
    )  # fmt: skip


def check_sla_settings(
    *,
    head_dim: int,
    block_q: int,
    block_kv: int,
    k_h: float,
    k_l: float,
    phi: str = "softmax",
    linear: str = "marginal",
) -> None:
    """The tensor-free part of check_sla_args: what a module can check at construction."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise ValueError(f"head_dim={head_dim!r} is not supported: it must be an integer")
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM) or head_dim % 8:
        raise ValueError(
            f"head_dim={head_dim} is not supported: head_dim {head_dim} must be a multiple "
            f"of 8 between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}"
        )
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not _is_power_of_two(block) or not (MIN_BLOCK <= block <= MAX_BLOCK):
            raise ValueError(
                f"{name}={block!r} must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
            )
    for name, frac in (("k_h", k_h), ("k_l", k_l)):
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise ValueError(f"{name}={frac!r} must be a fraction in [0, 1] (0.05 = 5 %)")
    if k_h + k_l > 1.0 + 1e-9:
        raise ValueError(f"k_h + k_l = {k_h} + {k_l} exceeds 100 % of the blocks")
    if phi not in PHI:
        raise ValueError(f"phi={phi!r} is not a feature map; allowed: {', '.join(PHI)}")
    if linear not in LINEAR:
        raise ValueError(f"linear={linear!r}; allowed: {', '.join(LINEAR)}")


def feature_map(x: torch.Tensor, phi: str) -> torch.Tensor:
    """phi of linear attention, applied over the head dimension (non-negative output)."""
    if phi == "softmax":
        return torch.softmax(x, dim=-1)
    if phi == "elu":
        return F.elu(x) + 1.0
    if phi == "relu":
        return F.relu(x)
    raise ValueError(f"phi={phi!r} is not a feature map; allowed: {', '.join(PHI)}")


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of `block` tokens (the last, partial block over its valid tokens)."""
    length = x.shape[-2]
    n_blocks = -(-length // block)
    padded = F.pad(x.float(), (0, 0, 0, n_blocks * block - length))
    sums = padded.unflatten(-2, (n_blocks, block)).sum(-2)
    counts = torch.full((n_blocks,), float(block), device=x.device)
    counts[-1] = length - (n_blocks - 1) * block
    return sums / counts[:, None]


@torch.no_grad()
def classify_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    k_h: float,
    k_l: float,
) -> BlockMask:
    """Critical / marginal / negligible key blocks per query-block row, from P_c.

    Ranking uses the pooled logits; the row softmax of P_c is monotone, so it
    would rank the same. Ties go to the lower block index (stable sort).
    """
    pooled_q = pool_blocks(q, block_q)
    pooled_k = pool_blocks(k, block_kv)
    logits = pooled_q @ pooled_k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    num_kv_blocks = logits.shape[-1]
    n_critical, n_negligible = block_counts(num_kv_blocks, k_h, k_l)

    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(num_kv_blocks, device=q.device).expand_as(order))
    classes = torch.full(logits.shape, MARGINAL, dtype=torch.int8, device=q.device)
    classes[rank < n_critical] = CRITICAL
    classes[rank >= num_kv_blocks - n_negligible] = NEGLIGIBLE
    critical = order[..., :n_critical].sort(dim=-1).values.to(torch.int32)
    negligible = order[..., num_kv_blocks - n_negligible :].sort(dim=-1).values.to(torch.int32)
    return BlockMask(
        classes=classes,
        critical=critical,
        block_q=block_q,
        block_kv=block_kv,
        negligible=negligible,
    )


def _token_masks(mask: BlockMask, len_q: int, len_k: int, linear: str):
    """Expand block classes to (B, H, Lq, Lk) boolean masks for each branch."""
    rows = torch.arange(len_q, device=mask.classes.device) // mask.block_q
    cols = torch.arange(len_k, device=mask.classes.device) // mask.block_kv
    classes = mask.classes[..., rows, :][..., cols]
    sparse = classes == CRITICAL
    if linear == "marginal":
        lin = classes == MARGINAL
    elif linear == "all":
        lin = torch.ones_like(sparse)
    else:
        lin = torch.zeros_like(sparse)
    return sparse, lin


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    phi: str = "softmax",
    linear: str = "marginal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O_s, O_l) computed densely with explicit token masks, in q's dtype.

    A row without critical blocks has O_s = 0; one without marginal blocks O_l = 0.
    """
    out_dtype, dtype = q.dtype, _compute_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sparse, lin = _token_masks(mask, q.shape[2], k.shape[2], linear)

    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~sparse, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)  # exactly 0 outside the critical blocks
    denom = weights.sum(-1, keepdim=True)
    o_s = (weights @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))

    phi_q, phi_k = feature_map(q, phi), feature_map(k, phi)
    scores = (phi_q @ phi_k.transpose(-1, -2)) * lin
    o_l = (scores @ v) / (scores.sum(-1, keepdim=True) + LINEAR_EPS)
    return o_s.to(out_dtype), o_l.to(out_dtype)


def sla_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    phi: str = "softmax",
    linear: str = "marginal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (O_s, O_l) block by block: memory O(L x critical tokens), not O(L^2)."""
    out_dtype, dtype = q.dtype, _compute_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    bq, bkv = mask.block_q, mask.block_kv
    n_q, n_k = mask.num_blocks
    q_blocks = F.pad(q, (0, 0, 0, n_q * bq - len_q)).unflatten(2, (n_q, bq))
    k_blocks = F.pad(k, (0, 0, 0, n_k * bkv - len_k)).unflatten(2, (n_k, bkv))
    v_blocks = F.pad(v, (0, 0, 0, n_k * bkv - len_k)).unflatten(2, (n_k, bkv))
    key_valid = (torch.arange(n_k * bkv, device=q.device) < len_k).view(n_k, bkv)

    # Sparse branch: gather each row's critical key blocks, exact softmax over them.
    if mask.n_critical:
        index = mask.critical.long()  # (B, H, Nq, C)
        flat = index.flatten(2)  # (B, H, Nq*C)

        def gather(blocks):
            picked = torch.gather(
                blocks, 2, flat[..., None, None].expand(-1, -1, -1, bkv, head_dim)
            )
            return picked.view(batch, heads, n_q, -1, head_dim)  # (B, H, Nq, C*bkv, D)

        k_sel, v_sel = gather(k_blocks), gather(v_blocks)
        valid = key_valid[index].flatten(-2)  # (B, H, Nq, C*bkv)
        logits = (q_blocks @ k_sel.transpose(-1, -2)) / math.sqrt(head_dim)
        logits = logits.masked_fill(~valid[..., None, :], float("-inf"))
        o_s = torch.softmax(logits, dim=-1) @ v_sel
    else:
        o_s = torch.zeros_like(q_blocks)

    # Linear branch: per-block states h_j = phi(K_j)^T V_j and z_j = colsum phi(K_j).
    if linear == "none":
        o_l = torch.zeros_like(q_blocks)
    else:
        phi_k = feature_map(k_blocks, phi) * key_valid[..., None]
        h = phi_k.transpose(-1, -2) @ v_blocks  # (B, H, Nk, D, D)
        z = phi_k.sum(-2)  # (B, H, Nk, D)
        if linear == "marginal":
            weight = (mask.classes == MARGINAL).to(dtype)  # (B, H, Nq, Nk)
            h_row = torch.einsum("bhij,bhjde->bhide", weight, h)
            z_row = torch.einsum("bhij,bhjd->bhid", weight, z)
        else:
            h_row = h.sum(2, keepdim=True).expand(-1, -1, n_q, -1, -1)
            z_row = z.sum(2, keepdim=True).expand(-1, -1, n_q, -1)
        phi_q = feature_map(q_blocks, phi)  # (B, H, Nq, bq, D)
        numerator = phi_q @ h_row
        denominator = (phi_q * z_row[..., None, :]).sum(-1, keepdim=True) + LINEAR_EPS
        o_l = numerator / denominator

    def unblock(x):
        return x.flatten(2, 3)[:, :, :len_q].to(out_dtype)

    return unblock(o_s), unblock(o_l)

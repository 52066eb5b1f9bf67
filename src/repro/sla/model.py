"""SparseLinearAttention: the SLA kernels plus the learnable projection of the linear branch.

    O = O_s + Proj(O_l)

O_s is exact attention over each query block's critical key blocks, O_l linear
attention phi(Q) H / phi(Q) Z over its marginal blocks (see
repro.kernels.sla_reference). Proj is a d -> d linear layer shared by all heads (as
the official code's `proj_l`), zero-initialised: a freshly installed SLA outputs
O_s alone, and at k_h = 100 % exactly full attention, so fine-tuning starts from the
pretrained model's behaviour. Proj is SLA's only parameter.

Variants (the paper's ablations, and the official code's later main branch):

| variant       | critical     | linear branch over | negligible | O                    |
|---------------|--------------|--------------------|------------|----------------------|
| "paper"       | top k_h      | marginal blocks    | bottom k_l | O_s + Proj(O_l)      |
| "main"        | top k_h      | all key blocks     | none       | O_s + Proj(O_l)      |
| "sparse_only" | top k_h      | none               | the rest   | O_s                  |
| "linear_only" | none         | all key blocks     | none       | Proj(O_l)            |
| "full"        | every block  | none               | none       | softmax(QK^T/√d) V   |

k_l is ignored by every variant but "paper". "linear_only" has no exact branch at
all: with the zero-initialised Proj it outputs zeros until trained (the paper's
"Linear only" row). "full" is the baseline: it calls torch's scaled_dot_product_attention
(the FlashAttention of the paper's comparison; identical to the kernel at
k_h = 100 %, and what the stock diffusers processors compute). Variants without a
linear branch have no Proj, hence no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.kernels.attention_flops import (
    counting_attention_flops,
    record_attention_flops,
    sla_attention_flops,
)
from repro.kernels.sla import BACKENDS, sla_attention
from repro.kernels.sla_reference import (
    BlockMask,
    check_sla_args,
    check_sla_settings,
    classify_blocks,
)

VARIANTS = ("paper", "main", "sparse_only", "linear_only", "full")


def _kernel_args(variant: str, k_h: float, k_l: float) -> tuple[float, float, str]:
    """(k_h, k_l, linear) that the kernel receives for a variant."""
    if variant == "paper":
        return k_h, k_l, "marginal"
    if variant == "main":
        return k_h, 0.0, "all"
    if variant == "sparse_only":
        return k_h, 0.0, "none"
    if variant == "linear_only":
        return 0.0, 0.0, "all"
    return 1.0, 0.0, "none"  # full


def check_sla_config(
    head_dim: int,
    *,
    variant: str,
    k_h: float,
    k_l: float,
    block_q: int,
    block_kv: int,
    phi: str,
    backend: str,
) -> None:
    """Raise ValueError naming the argument for a configuration the kernels cannot run."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; allowed: {', '.join(VARIANTS)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    check_sla_settings(
        head_dim=head_dim, block_q=block_q, block_kv=block_kv, k_h=k_h, k_l=k_l, phi=phi
    )


class SparseLinearAttention(nn.Module):
    """SLA over (batch, heads, length, head_dim) queries, keys and values.

    Configuration is constructor arguments (diffusers' habit); every argument is
    checked here, and tensor shapes are checked by the kernel before it launches.
    After each forward, `last_mask` holds that call's BlockMask (computed without grad) for
    statistics, and an active repro.kernels.attention_flops.AttentionFlopsCounter
    receives the call's FLOPs.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        variant: str = "paper",
        k_h: float = 0.05,
        k_l: float = 0.10,
        block_q: int = 64,
        block_kv: int = 64,
        phi: str = "softmax",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_sla_config(
            head_dim,
            variant=variant,
            k_h=k_h,
            k_l=k_l,
            block_q=block_q,
            block_kv=block_kv,
            phi=phi,
            backend=backend,
        )
        self.head_dim = head_dim
        self.variant = variant
        self.k_h, self.k_l = k_h, k_l
        self.block_q, self.block_kv = block_q, block_kv
        self.phi = phi
        self.backend = backend
        self.kernel_k_h, self.kernel_k_l, self.linear = _kernel_args(variant, k_h, k_l)
        # SLA's only parameter; absent when there is no linear branch to project.
        self.proj = nn.Linear(head_dim, head_dim) if self.linear != "none" else None
        self.reset_parameters()
        self.last_mask: BlockMask | None = None

    def reset_parameters(self) -> None:
        """Zero Proj: O_l contributes nothing until fine-tuning moves it."""
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def config(self) -> dict[str, object]:
        """The constructor arguments, for logging and for rebuilding the module."""
        return {
            "head_dim": self.head_dim,
            "variant": self.variant,
            "k_h": self.k_h,
            "k_l": self.k_l,
            "block_q": self.block_q,
            "block_kv": self.block_kv,
            "phi": self.phi,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """O for (B, H, Lq, D) queries and (B, H, Lk, D) keys/values, in q's dtype."""
        check_sla_args(
            q,
            k,
            v,
            block_q=self.block_q,
            block_kv=self.block_kv,
            k_h=self.kernel_k_h,
            k_l=self.kernel_k_l,
            phi=self.phi,
            linear=self.linear,
        )
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q has head_dim {q.shape[-1]}, but this SparseLinearAttention was built "
                f"for head_dim={self.head_dim}"
            )
        if self.variant == "full":
            out = F.scaled_dot_product_attention(q, k, v)
            mask = classify_blocks(
                q, k, block_q=self.block_q, block_kv=self.block_kv, k_h=1.0, k_l=0.0
            )
        else:
            o_s, o_l, mask = sla_attention(
                q,
                k,
                v,
                block_q=self.block_q,
                block_kv=self.block_kv,
                k_h=self.kernel_k_h,
                k_l=self.kernel_k_l,
                phi=self.phi,
                linear=self.linear,
                backend=self.backend,
            )
            out = o_s
            # No marginal block (k_h + k_l = 100 %) means no linear branch at all, so no
            # Proj term either: its bias alone would shift the output, and SLA at
            # k_h = 100 % would drift from full attention once fine-tuning moves it.
            if self.proj is not None and (self.linear == "all" or mask.has_marginal):
                o_l = self.proj(o_l.to(self.proj.weight.dtype))
                out = o_s.to(o_l.dtype) + o_l
        self.last_mask = mask  # classify_blocks runs without grad: nothing to detach
        if counting_attention_flops():
            record_attention_flops(
                sla_attention_flops(
                    mask.classes,
                    block_q=mask.block_q,
                    block_kv=mask.block_kv,
                    len_q=q.shape[2],
                    len_k=k.shape[2],
                    head_dim=self.head_dim,
                    linear=self.linear,
                )
            )
        return out.to(q.dtype)

"""The AGD model: a frozen class-conditional DiT plus guidance-scale-conditioned offset adapters.

Adapter guidance distillation (arXiv 2503.07274) trains small adapters so that one
forward pass of base+adapters at guidance scale w predicts the classifier-free
guided eps_u + w (eps_c - eps_u). For DiT the adapters are "offset" adapters: per
transformer block, an MLP of a shared conditioning c(w, t, y) gives one vector per
sample that is added to the self-attention output, before the adaLN-zero gate.
Their last layer is zero-initialised, so at init the adapted model IS the base.
Only adapter weights are saved; they load onto any checkpoint of the same base
architecture.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors

ADAPTER_KIND = "agd_adapters"

# ----------------------------------------------------------------------------- adapters


ADAPTER_TYPES = ("offset", "cross_attention")


class GuidanceEmbedding(nn.Module):
    """Embed the guidance scale: random Fourier features, then MLP (h -> 4h -> h), LayerNorm.

    The frequencies f ~ N(0,1) and phases phi ~ U(0,1) are fixed buffers drawn
    from `seed`; w is multiplied by `w_scale` first. The paper and the official
    training script (agd/dit/train.py, --cfg-mult, default 1000) use x1000; only
    its untrained-adapter helper defaults to 1. The tiny scale uses 1, this
    project's choice: the features then vary smoothly over w in [1, 6] and the MLP
    can interpolate between the scales it saw, while x1000 gives nearby scales
    unrelated features, and at tiny scale that taught the adapters one average
    guidance, whatever w was asked for. configs/paper.yaml uses the official 1000.
    """

    def __init__(
        self, dim: int, num_fourier: int | None = None, w_scale: float = 1.0, seed: int = 0
    ):
        super().__init__()
        num_fourier = num_fourier or dim
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(num_fourier, generator=gen))
        self.register_buffer("phases", torch.rand(num_fourier, generator=gen))
        self.w_scale = float(w_scale)
        self.mlp = nn.Sequential(
            nn.Linear(num_fourier, 4 * dim),
            nn.ReLU(),
            nn.LayerNorm(4 * dim),
            nn.Linear(4 * dim, dim),
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        phase = self.frequencies * (w.float() * self.w_scale)[:, None] + self.phases
        return self.norm(self.mlp(torch.cos(2 * torch.pi * phase)))


class CrossAttentionAdapter(nn.Module):
    """The paper's cross-attention adapter: tokens attend to the conditioning tokens.

    Queries come from the block's tokens (D -> h), keys and values from the
    [w, t, class] tokens plus fixed sinusoidal positions; one head; the output
    projection (h -> D) is zero-initialised. Unlike the offset adapter, its
    contribution depends on the image tokens, not only on (w, t, class).
    """

    def __init__(self, hidden_dim: int, adapter_dim: int, num_cond_tokens: int = 3):
        super().__init__()
        self.query = nn.Linear(hidden_dim, adapter_dim)
        self.key_value = nn.Linear(adapter_dim, 2 * adapter_dim)
        self.out = nn.Linear(adapter_dim, hidden_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        positions = torch.arange(num_cond_tokens)
        self.register_buffer(
            "positions", get_timestep_embedding(positions, adapter_dim, flip_sin_to_cos=True)
        )

    def forward(self, tokens: torch.Tensor, cond_tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D], cond_tokens [B, 3, h] -> [B, N, D]."""
        key, value = self.key_value(cond_tokens + self.positions).chunk(2, dim=-1)
        query = self.query(tokens.to(self.query.weight.dtype))
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[:, None], key[:, None], value[:, None]
        )[:, 0]
        return self.out(attended)


class AGDAdapters(nn.Module):
    """A shared conditioning c(w, t, y) and one zero-initialised offset MLP per block.

    hidden_dim is the DiT width D, adapter_dim the adapter width h. The whole init
    (Fourier buffers and weights) is drawn from `seed`, independent of global RNG.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_blocks: int,
        adapter_dim: int,
        num_classes: int,
        num_fourier: int | None = None,
        w_scale: float = 1.0,
        seed: int = 0,
        timestep_features: int = 256,
        kind: str = "offset",
    ):
        super().__init__()
        if kind not in ADAPTER_TYPES:
            raise ReproInputError(f"adapter_type: {kind!r} is not one of {ADAPTER_TYPES}")
        self._config = {
            "hidden_dim": int(hidden_dim),
            "num_blocks": int(num_blocks),
            "adapter_dim": int(adapter_dim),
            "num_classes": int(num_classes),
            "num_fourier": int(num_fourier or adapter_dim),
            "w_scale": float(w_scale),
            "seed": int(seed),
            "timestep_features": int(timestep_features),
            "kind": kind,
        }
        self.source: str | None = None  # the file it was loaded from, for error messages
        h = adapter_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.guidance_embed = GuidanceEmbedding(h, num_fourier, w_scale, seed)
            self.timestep_proj = nn.Linear(timestep_features, h)
            # num_classes + 1 rows: the last one is the null class, as in the base DiT.
            self.class_embed = nn.Embedding(num_classes + 1, h)
            if kind == "offset":
                self.offsets = nn.ModuleList(
                    nn.Sequential(
                        nn.Linear(h, h), nn.ReLU(), nn.LayerNorm(h), nn.Linear(h, hidden_dim)
                    )
                    for _ in range(num_blocks)
                )
                for mlp in self.offsets:
                    nn.init.zeros_(mlp[-1].weight)
                    nn.init.zeros_(mlp[-1].bias)
            else:
                self.cross = nn.ModuleList(
                    CrossAttentionAdapter(hidden_dim, h) for _ in range(num_blocks)
                )

    @property
    def config(self) -> dict:
        return dict(self._config)

    def condition_tokens(self, w: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        """[emb(w), proj(sinusoid(t)), class_emb(y)] as tokens: [B, 3, h]."""
        t_feat = get_timestep_embedding(
            t, self._config["timestep_features"], flip_sin_to_cos=True, downscale_freq_shift=1
        )
        t_emb = self.timestep_proj(t_feat.to(self.timestep_proj.weight.dtype))
        return torch.stack([self.guidance_embed(w), t_emb, self.class_embed(labels)], dim=1)

    def condition(self, w: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The conditioning of one forward: c = emb(w) + proj(t) + emb(y), [B, h], for
        offset adapters; the three tokens [B, 3, h] for cross-attention adapters."""
        tokens = self.condition_tokens(w, t, labels)
        return tokens.sum(dim=1) if self._config["kind"] == "offset" else tokens

    def delta(self, block_index: int, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What block `block_index` adds to its attention output: [B, 1 or N, D]."""
        if self._config["kind"] == "offset":
            return self.offsets[block_index](cond)[:, None, :]
        return self.cross[block_index](tokens, cond)

    def offset(self, block_index: int, c: torch.Tensor) -> torch.Tensor:
        """The per-sample vector [B, D] added to block `block_index`'s attention output."""
        return self.offsets[block_index](c)


class AdaptedDiT(nn.Module):
    """Base DiT + AGD adapters as one denoiser: forward(x, t, labels, w) -> eps.

    The base is frozen unless train_base (the Meng et al. baseline: same w
    conditioning, the whole model trained). w=None runs the base alone (the
    adapters are skipped), so the same module also serves CFG sampling.
    The base is always kept in eval mode: its only train-mode behaviour is label
    dropout, which a distilled (class- and w-conditioned) model must not see.
    """

    def __init__(
        self, base: DiTTransformer2DModel, adapters: AGDAdapters, train_base: bool = False
    ):
        super().__init__()
        _check_compatible(base, adapters)
        if getattr(base, "_agd_attached", False):
            raise ValueError("AdaptedDiT: this base already has adapters; detach() them first")
        self.base = base
        self.adapters = adapters
        self.train_base = train_base
        self._base_requires_grad = [p.requires_grad for p in base.parameters()]
        base.requires_grad_(train_base)
        base.eval()
        # Forward hooks get only (module, args, output), so the conditioning of the
        # current forward is held here while the base runs, and cleared after.
        self._cond: torch.Tensor | None = None
        self._handles = [
            block.attn1.register_forward_hook(partial(self._add_offset, i))
            for i, block in enumerate(base.transformer_blocks)
        ]
        base._agd_attached = True

    def _add_offset(self, index: int, module, args, output):
        if self._cond is None:
            return None  # adapters off: leave attn1's output unchanged
        # attn1's output is multiplied by the adaLN-zero gate after this hook returns.
        tokens = args[0]  # attn1's input: the block's normalised image tokens
        return output + self.adapters.delta(index, self._cond, tokens).to(output.dtype)

    def forward(self, x, t, labels, w=None):
        if not self._handles:
            raise RuntimeError("AdaptedDiT: adapters were detached")
        if self.base.gradient_checkpointing:
            # Recomputation in backward would run the hooks after _cond is cleared.
            raise RuntimeError("AdaptedDiT: gradient checkpointing of the base is not supported")
        if w is not None:
            w = torch.as_tensor(w, dtype=torch.float32, device=x.device)
            w = w.expand(x.shape[0]) if w.ndim == 0 else w
        self._cond = None if w is None else self.adapters.condition(w, t, labels)
        try:
            out = self.base(x, timestep=t, class_labels=labels).sample
        finally:
            self._cond = None
        return out  # eps (and the learned variance, for DiT-XL/2): see eps_of

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    def detach(self) -> DiTTransformer2DModel:
        """Remove the hooks and restore requires_grad; return the base for reuse."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, flag in zip(self.base.parameters(), self._base_requires_grad, strict=True):
            p.requires_grad_(flag)
        self.base._agd_attached = False
        return self.base

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        base = sum(p.numel() for p in self.base.parameters())
        adapter = sum(p.numel() for p in self.adapters.parameters())
        return {
            "trainable": trainable,
            "base": base,
            "adapter": adapter,
            "fraction": trainable / base,
        }


def _check_compatible(base: DiTTransformer2DModel, adapters: AGDAdapters) -> None:
    cfg = adapters.config
    where = adapters.source or "adapters"
    expected = {
        "hidden_dim": base.inner_dim,
        "num_blocks": len(base.transformer_blocks),
        "num_classes": base.config.num_embeds_ada_norm,
    }
    for key, value in expected.items():
        if cfg[key] != value:
            raise ReproInputError(
                f"{where}: adapter config {key}={cfg[key]} does not match the base DiT ({value})"
            )


def save_adapters(
    path: str | os.PathLike, adapters: AGDAdapters, extra_meta: dict | None = None
) -> None:
    """Adapter weights and Fourier buffers only, with the constructor config in the metadata."""
    meta = {**(extra_meta or {}), "config": adapters.config}
    save_tensors(path, adapters.state_dict(), kind=ADAPTER_KIND, metadata=meta)


def load_adapters(path: str | os.PathLike) -> AGDAdapters:
    """AGDAdapters from save_adapters' file; ReproInputError naming `path` if it is not one."""
    tensors, meta = load_tensors(path, kind=ADAPTER_KIND)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ReproInputError(f"{path}: no adapter config in the metadata")
    try:
        adapters = AGDAdapters(**config)
        adapters.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ReproInputError(f"{path}: adapter weights do not match their config ({err})") from err
    adapters.source = str(path)
    return adapters

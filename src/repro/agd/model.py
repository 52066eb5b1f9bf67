"""The AGD model: a frozen class-conditional DiT plus guidance-scale-conditioned adapters.

Adapter guidance distillation (arXiv 2503.07274) trains small adapters so that one
forward pass of base+adapters at guidance scale w predicts the classifier-free
guided eps_u + w (eps_c - eps_u). Every transformer block gets one adapter, and, as
in the official code (cristianpjensen/agd, where each wrapped block's adapter owns
its guidance-scale embedder), every block's adapter has its own conditioning
embedders: a BlockConditioning of (w, t, class). Four kinds (ADAPTER_TYPES):

- "offset" (the paper's DiT choice): an MLP of c(w, t, y) gives one vector per
  sample, added to the block's self-attention output (before the adaLN-zero gate).
- "mlp_gate" (the official token-dependent adapter, agd/models/mlp_gate.py): a
  sigmoid-gated MLP of [projected attention input, c] per token, added to the
  self-attention output.
- "cross_attention": the attention input's tokens attend to the [w, t, class]
  tokens; added to the self-attention output.
- "adaln" (this project's adapter, not the paper's): an MLP of c gives one vector
  per sample, added to the block's adaLN conditioning embedding (norm1.emb), so it
  moves the block's shift/scale/gate.

Each adapter's last layer is zero-initialised, so at init the adapted model IS the
base. Only adapter weights are saved; they load onto any checkpoint of the same
base architecture.
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


# offset, mlp_gate and cross_attention add to each block's attn1 output; adaln to its
# norm1.emb output (the adaLN conditioning embedding).
ADAPTER_TYPES = ("offset", "mlp_gate", "cross_attention", "adaln")
# Block i of adapters seeded s draws its Fourier buffers from s * stride + i (blocks < stride).
FOURIER_SEED_STRIDE = 10_007


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


class BlockConditioning(nn.Module):
    """One block's own embedders of (w, t, class), each to the adapter width h.

    emb(w): a GuidanceEmbedding (its Fourier buffers drawn from `fourier_seed`);
    proj(t): sinusoidal features of t (`timestep_features` of them, as the base's
    own timestep embedding) then a Linear to h; emb(y): a table of num_classes + 1
    rows, the last one the null class, as in the base DiT. forward gives their sum
    c [B, h] (offset, mlp_gate and adaln adapters); tokens gives the three as
    tokens [B, 3, h] (cross-attention adapters).
    """

    def __init__(
        self,
        adapter_dim: int,
        num_classes: int,
        num_fourier: int | None = None,
        w_scale: float = 1.0,
        fourier_seed: int = 0,
        timestep_features: int = 64,
    ):
        super().__init__()
        h = adapter_dim
        self.timestep_features = int(timestep_features)
        self.guidance_embed = GuidanceEmbedding(h, num_fourier, w_scale, fourier_seed)
        self.timestep_proj = nn.Linear(timestep_features, h)
        self.class_embed = nn.Embedding(num_classes + 1, h)

    def tokens(self, w: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[emb(w), proj(sinusoid(t)), emb(y)] as tokens: [B, 3, h]."""
        t_feat = get_timestep_embedding(
            t, self.timestep_features, flip_sin_to_cos=True, downscale_freq_shift=1
        )
        t_emb = self.timestep_proj(t_feat.to(self.timestep_proj.weight.dtype))
        return torch.stack([self.guidance_embed(w), t_emb, self.class_embed(labels)], dim=1)

    def forward(self, w: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """c = emb(w) + proj(t) + emb(y): [B, h]."""
        return self.tokens(w, t, labels).sum(dim=1)


def _conditioning_mlp(adapter_dim: int, hidden_dim: int) -> nn.Sequential:
    """c -> h -> D (ReLU, LayerNorm), the last layer zero-initialised."""
    h = adapter_dim
    mlp = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.LayerNorm(h), nn.Linear(h, hidden_dim))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class OffsetAdapter(nn.Module):
    """The paper's DiT adapter: one vector per sample, the same for every token.

    An MLP of the block's c (h -> h -> D, ReLU, LayerNorm; last layer zero-init)
    whose output is added to the block's self-attention output, before the
    adaLN-zero gate multiplies it.
    """

    def __init__(self, hidden_dim: int, adapter_dim: int):
        super().__init__()
        self.mlp = _conditioning_mlp(adapter_dim, hidden_dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, h] -> [B, 1, D] (broadcast over the tokens)."""
        return self.mlp(cond)[:, None, :]


class MLPGateAdapter(nn.Module):
    """The official token-dependent adapter (cristianpjensen/agd, agd/models/mlp_gate.py).

    x = in_proj(tokens) (D -> h), with tokens the self-attention's input (the
    block's normalised image tokens); z = [x, c] (2h, c broadcast over the tokens);
    out = sigmoid(gate(z)) * out_proj(MLP(z)), with gate 2h -> 1 (weight and bias
    zero-initialised, so the gate starts at 0.5), MLP 2h -> 2h -> h (ReLU) and
    out_proj h -> D. Added to the self-attention output, before the adaLN-zero gate.

    DEVIATION from the official code: there out_proj keeps its default init, so
    the adapted model starts off the base (gate 0.5 times a random projection);
    here out_proj is zero-initialised, so at init the adapted model IS the base,
    as with the other kinds.
    """

    def __init__(self, hidden_dim: int, adapter_dim: int):
        super().__init__()
        h = adapter_dim
        self.in_proj = nn.Linear(hidden_dim, h)
        self.gate = nn.Linear(2 * h, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, h))
        self.out_proj = nn.Linear(h, hidden_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D], cond [B, h] -> [B, N, D]."""
        x = self.in_proj(tokens.to(self.in_proj.weight.dtype))
        z = torch.cat([x, cond[:, None, :].expand_as(x)], dim=-1)
        return torch.sigmoid(self.gate(z)) * self.out_proj(self.mlp(z))


class CrossAttentionAdapter(nn.Module):
    """The paper's cross-attention adapter: tokens attend to the conditioning tokens.

    Queries come from the block's tokens (D -> h), keys and values from the
    block's own [w, t, class] tokens plus fixed sinusoidal positions; one head;
    the output projection (h -> D) is zero-initialised. Unlike the offset
    adapter, its contribution depends on the image tokens, not only on (w, t, class).
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


class AdaLNAdapter(nn.Module):
    """This project's adapter (not the paper's): a correction to the block's adaLN input.

    An MLP of the block's c (h -> h -> D, ReLU, LayerNorm; last layer zero-init)
    gives one vector per sample that is ADDED to the output of the block's adaLN
    conditioning embedding `block.norm1.emb` (diffusers' CombinedTimestepLabelEmbeddings,
    timestep + class embedding); AdaLayerNormZero then applies SiLU + Linear to get
    the block's shift/scale/gate. The class enters a DiT only through adaLN, so
    this is where a guidance correction is cheapest.

    diffusers' DiT reuses `transformer_blocks[0].norm1.emb` for the final layer's
    conditioning (dit_transformer_2d.py: `conditioning =
    self.transformer_blocks[0].norm1.emb(...)`), so block 0's delta also shifts the
    final layer's shift/scale. That is intended; the hook adds the same delta on
    both calls of one forward.
    """

    def __init__(self, hidden_dim: int, adapter_dim: int):
        super().__init__()
        self.mlp = _conditioning_mlp(adapter_dim, hidden_dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, h] -> [B, D]."""
        return self.mlp(cond)


_ADAPTER_CLASSES = {
    "offset": OffsetAdapter,
    "mlp_gate": MLPGateAdapter,
    "cross_attention": CrossAttentionAdapter,
    "adaln": AdaLNAdapter,
}


class AGDAdapters(nn.Module):
    """Per block: its own conditioning embedders and one zero-initialised adapter of `kind`.

    hidden_dim is the DiT width D, adapter_dim the adapter width h; kind is one of
    ADAPTER_TYPES. `conditioning[i]` is block i's BlockConditioning (its own w, t
    and class embedders), `blocks[i]` its adapter. The whole init (Fourier buffers
    and weights) is drawn from `seed`, independent of global RNG; block i's
    Fourier buffers come from seed * FOURIER_SEED_STRIDE + i, so every block embeds
    w differently and no two (seed, block) pairs share buffers.
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
        timestep_features: int = 64,
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            conditioning, blocks = [], []
            for index in range(num_blocks):
                conditioning.append(
                    BlockConditioning(
                        adapter_dim,
                        num_classes,
                        num_fourier,
                        w_scale,
                        fourier_seed=seed * FOURIER_SEED_STRIDE + index,
                        timestep_features=timestep_features,
                    )
                )
                blocks.append(_ADAPTER_CLASSES[kind](hidden_dim, adapter_dim))
            self.conditioning = nn.ModuleList(conditioning)
            self.blocks = nn.ModuleList(blocks)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def kind(self) -> str:
        return self._config["kind"]

    def block_condition(
        self, block_index: int, w: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Block `block_index`'s conditioning: c [B, h], or the three tokens [B, 3, h]
        for cross-attention adapters."""
        embed = self.conditioning[block_index]
        return embed.tokens(w, t, labels) if self.kind == "cross_attention" else embed(w, t, labels)

    def condition(
        self, w: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
    ) -> list[torch.Tensor]:
        """Every block's conditioning of one forward (see block_condition)."""
        return [self.block_condition(i, w, t, labels) for i in range(len(self.blocks))]

    def delta(
        self, block_index: int, cond: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What block `block_index` adds, given its conditioning `cond`.

        offset: [B, 1, D]; mlp_gate and cross_attention: [B, N, D], from the
        tokens [B, N, D] (attn1's input); all three go onto attn1's output.
        adaln: [B, D], onto norm1.emb's output.
        """
        adapter = self.blocks[block_index]
        if self.kind in ("mlp_gate", "cross_attention"):
            if tokens is None:
                raise ValueError(f"AGDAdapters.delta: {self.kind} adapters need the tokens")
            return adapter(tokens, cond)
        return adapter(cond)


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
        # Forward hooks get only (module, args, output), so every block's conditioning
        # of the current forward is held here while the base runs, and cleared after.
        self._cond: list[torch.Tensor] | None = None
        if adapters.kind == "adaln":
            self._handles = [
                block.norm1.emb.register_forward_hook(partial(self._add_to_adaln, i))
                for i, block in enumerate(base.transformer_blocks)
            ]
        else:
            self._handles = [
                block.attn1.register_forward_hook(partial(self._add_to_attention, i))
                for i, block in enumerate(base.transformer_blocks)
            ]
        base._agd_attached = True

    def _add_to_attention(self, index: int, module, args, output):
        if self._cond is None:
            return None  # adapters off: leave attn1's output unchanged
        # attn1's output is multiplied by the adaLN-zero gate after this hook returns.
        tokens = args[0]  # attn1's input: the block's normalised image tokens
        return output + self.adapters.delta(index, self._cond[index], tokens).to(output.dtype)

    def _add_to_adaln(self, index: int, module, args, output):
        if self._cond is None:
            return None  # adapters off: leave the adaLN embedding unchanged
        # Block 0's norm1.emb runs twice per forward (its block, then the final layer):
        # the delta depends only on this forward's conditioning, so both calls get it.
        return output + self.adapters.delta(index, self._cond[index]).to(output.dtype)

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
    if cfg["kind"] == "adaln" and any(
        getattr(block.norm1, "emb", None) is None for block in base.transformer_blocks
    ):
        raise ReproInputError(
            f"{where}: adaln adapters need each block's adaLN embedding (norm1.emb); "
            "the base DiT has none"
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

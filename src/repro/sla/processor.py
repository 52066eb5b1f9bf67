"""Swap SLA into a diffusers transformer's self-attention with one call.

    sla_modules = install_sla(model, variant="paper", k_h=0.05, k_l=0.10)
    ...fine-tune, sample...
    uninstall_sla(model)

`install_sla` gives every self-attention module of the model (`attn1` of
WanTransformer3DModel's and DiTTransformer2DModel's blocks) a SparseLinearAttention
submodule named `sla` and an SLA processor. The processors mirror diffusers' stock
ones line for line (WanAttnProcessor; AttnProcessor2_0 for the `Attention` class
that DiT uses), keeping each model's own projections, QK norms and rotary
embeddings; only the attention call itself is replaced. Cross-attention keeps its
stock processor: SLA sparsifies the long video/image token sequence, not the text
context.

Because `sla` is a registered submodule, Proj's weights are part of
`model.state_dict()` and are written by `save_pretrained` / safetensors like every
other weight. `from_pretrained` builds the stock model and drops those keys, so a
fine-tuned SLA model is loaded as: from_pretrained, install_sla (same arguments),
then `load_sla_weights(model, directory_or_file)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_wan import WanAttention
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from repro.core.errors import ReproInputError
from repro.sla.model import SparseLinearAttention

SLA_ATTRIBUTE = "sla"
_STOCK_PROCESSOR = "_sla_stock_processor"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _sla_of(attn: nn.Module) -> SparseLinearAttention:
    sla = getattr(attn, SLA_ATTRIBUTE, None)
    if not isinstance(sla, SparseLinearAttention):
        raise ValueError(
            f"{type(attn).__name__} has no SparseLinearAttention submodule "
            f"'{SLA_ATTRIBUTE}': install SLA processors with install_sla(model, ...)"
        )
    return sla


def _self_attention_only(encoder_hidden_states, attention_mask) -> None:
    if encoder_hidden_states is not None:
        raise ValueError(
            "SLA processors replace self-attention only; got encoder_hidden_states "
            "(cross-attention keeps the stock processor)"
        )
    if attention_mask is not None:
        raise ValueError("attention_mask is not supported by sparse-linear attention")


def apply_wan_rotary_emb(
    hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    """Wan's rotary embedding on (B, L, H, D) as diffusers' WanAttnProcessor applies it."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class SLAWanAttnProcessor:
    """diffusers' WanAttnProcessor for self-attention, with SLA as the attention call."""

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        _self_attention_only(encoder_hidden_states, attention_mask)
        sla = _sla_of(attn)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        query = attn.norm_q(query)  # RMSNorm over all heads together
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))  # (B, L, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = apply_wan_rotary_emb(query, *rotary_emb)
            key = apply_wan_rotary_emb(key, *rotary_emb)

        # SLA works on (B, H, L, D); the stock dispatch_attention_fn on (B, L, H, D).
        hidden_states = sla(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class SLAAttnProcessor:
    """diffusers' AttnProcessor2_0 for self-attention, with SLA as the attention call."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _self_attention_only(encoder_hidden_states, attention_mask)
        sla = _sla_of(attn)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = sla(query, key, value)  # (B, H, L, D), like SDPA's output

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _processor_for(module: nn.Module):
    """The SLA processor for a self-attention module, or None to leave it alone."""
    if isinstance(module, WanAttention):
        if module.is_cross_attention or module.add_k_proj is not None:
            return None
        return SLAWanAttnProcessor()
    if isinstance(module, Attention):
        if module.is_cross_attention or module.added_kv_proj_dim is not None:
            return None
        return SLAAttnProcessor()
    return None


def _head_dim(module: nn.Module) -> int:
    return module.inner_dim // module.heads


def install_sla(model: nn.Module, **sla_kwargs) -> dict[str, SparseLinearAttention]:
    """Give every self-attention module of `model` an SLA submodule and processor.

    `sla_kwargs` are SparseLinearAttention's keyword arguments (variant, k_h, k_l,
    block_q, block_kv, phi, backend); they are checked before the model is touched.
    Returns {qualified name of the attention module: its SparseLinearAttention}.
    """
    targets = [
        (name, module, processor)
        for name, module in model.named_modules()
        if (processor := _processor_for(module)) is not None
    ]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no self-attention module that SLA supports "
            "(diffusers' Attention or WanAttention without cross-attention)"
        )
    installed = [name for name, module, _ in targets if hasattr(module, _STOCK_PROCESSOR)]
    if installed:
        raise ValueError(
            f"SLA is already installed in {installed[0]}; call uninstall_sla(model) first"
        )
    # Build every module first, so that a bad argument leaves the model untouched.
    built = {
        name: SparseLinearAttention(_head_dim(module), **sla_kwargs) for name, module, _ in targets
    }
    for name, module, processor in targets:
        weight = module.to_q.weight
        sla = built[name].to(device=weight.device, dtype=weight.dtype)
        setattr(module, _STOCK_PROCESSOR, module.processor)
        module.add_module(SLA_ATTRIBUTE, sla)
        module.set_processor(processor)
    return built


def uninstall_sla(model: nn.Module) -> dict[str, SparseLinearAttention]:
    """Restore the stock processors and remove the SLA submodules; returns them."""
    removed = {}
    targets = [(n, m) for n, m in model.named_modules() if hasattr(m, _STOCK_PROCESSOR)]
    for name, module in targets:
        module.set_processor(getattr(module, _STOCK_PROCESSOR))
        delattr(module, _STOCK_PROCESSOR)
        removed[name] = getattr(module, SLA_ATTRIBUTE)
        delattr(module, SLA_ATTRIBUTE)
    return removed


def sla_modules(model: nn.Module) -> dict[str, SparseLinearAttention]:
    """The installed SparseLinearAttention modules, by attention-module name."""
    return {
        name: sla
        for name, module in model.named_modules()
        if isinstance(sla := getattr(module, SLA_ATTRIBUTE, None), SparseLinearAttention)
    }


def sla_state_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the installed SLA modules (Proj weights and biases)."""
    return [
        f"{name}.{SLA_ATTRIBUTE}.{key}"
        for name, sla in sla_modules(model).items()
        for key in sla.state_dict()
    ]


def load_sla_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the installed SLA modules' weights from a safetensors file or a save_pretrained dir.

    Every SLA key of the model must be in the file, and every SLA key of the file
    must belong to an installed module (same layers, same variant); otherwise a
    ReproInputError names the file and the keys. Other keys of the file (the
    transformer's own weights) are ignored: from_pretrained loads those. Returns
    the keys loaded.
    """
    path = Path(path)
    file = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise ReproInputError(f"{file}: no such safetensors file (SLA weights)")
    if not sla_modules(model):
        raise ValueError("the model has no SLA installed: call install_sla(model, ...) first")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ReproInputError(f"{file}: truncated or corrupt safetensors file ({err})") from err
    expected = set(sla_state_keys(model))
    in_file = {key for key in tensors if f".{SLA_ATTRIBUTE}." in f".{key}"}
    missing, unexpected = sorted(expected - in_file), sorted(in_file - expected)
    if missing or unexpected:
        raise ReproInputError(
            f"{file}: SLA weights do not match the installed modules; "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    try:
        model.load_state_dict({key: tensors[key] for key in expected}, strict=False)
    except RuntimeError as err:  # a shape mismatch: weights of another head_dim
        raise ReproInputError(
            f"{file}: SLA weights do not fit the installed modules ({err})"
        ) from err
    return sorted(expected)

"""HuMo's model: a Wan2.1 text-to-video transformer that also sees a reference image and audio.

HuMo (arXiv 2509.08519) keeps diffusers' WanTransformer3DModel and adds, without forking it:

- image injection: the clean reference latent is one more latent frame at the END of the
  time axis (`inject_reference`, mode "append", the paper and the 17B code), or written
  over the last latent frame of the sampler's state (mode "overwrite_last", the 1.7B
  code). Stage 1 trains the self-attention weights only (`trainable_parameters`);
- audio: per video frame features [T, G, D] (Whisper layer groups at paper scale, a
  log-mel at tiny scale) are cut into one window per latent frame (`audio_windows`),
  projected to a few tokens per latent frame (`AudioProjector`) and read by a
  FRAME-LOCAL audio cross-attention in every block (`FrameLocalAudioAttention`), placed
  after the text cross-attention (`install_audio`, `HuMoWanBlock`);
- focus-by-predicting: the audio attention outputs of the last blocks predict the face
  mask (`MaskPredictor`, `mask_loss`), so the audio attention learns where the face is.

    humo = HuMo(t2v.transformer, audio_window=5, audio_groups=1, audio_feature_dim=16)
    v = humo.velocity(x_t, sigma, text, reference=ref, audio=windows)      # sampling
    v, mask_logits = humo.forward_train(x_t, sigma, text, reference=ref, audio=windows)
    save_humo(humo, "models/humo/full_s0", {"variant": "full"})
    humo = load_humo("models/humo/full_s0", load_t2v(...).transformer)

Conventions. Tensors follow diffusers' layout [B, C, F, h, w]; `sigma` is the flow's noise
level in [0, 1] (x_s = (1 - s) x0 + s noise) and the transformer's timestep is
sigma * 1000. The sampler's state is always the VIDEO latent frames alone, in both
injection modes: the reference frame is added inside `velocity` / `forward_train` and
their outputs are the video frames' again. "No audio" (audio=None, or a row whose
`audio_on` flag is False) means the audio attention adds nothing: the block's output
is then exactly the stock WanTransformerBlock's. The reference frame itself gets ZERO
audio tokens (the official code gives it zero audio features).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import Tensor, nn

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, read_json, save_tensors, write_json

NUM_TRAIN_TIMESTEPS = 1000  # the transformer's timestep is sigma * 1000 (Wan's scheduler)
INJECTIONS = ("append", "overwrite_last")
STAGES = ("1", "2")
FINETUNES = ("minimal", "full_finetune")
WEIGHTS_FILE = "humo.safetensors"
CONFIG_FILE = "humo_config.json"
KIND = "humo_weights"


# ----------------------------------------------------------------------------- audio windows


def window_indices(num_frames: int, temporal_ratio: int, shift: int = 2, frame0: int = 0) -> Tensor:
    """Audio frame indices [F_lat, W] of each latent frame's window; -1 marks a zero frame.

    W = r + 2 * shift with r = temporal_ratio (video frames per latent frame after the
    first), F_lat = 1 + (num_frames - 1) // r. The official get_audio_emb_window, with
    its 4 generalised to r:
    - latent frame 0 (it holds video frame frame0 alone): r - 1 zero frames, then audio
      frames frame0 - shift .. frame0 + shift;
    - latent frame k >= 1 (video frames frame0 + 1 + r(k-1) .. frame0 + r k): audio frames
      frame0 + 1 + r(k-1) - shift .. frame0 + r k + shift.
    r = 4, shift = 2: 3 zeros + 5 frames, then 8 frames each; r = 1: 5 frames centred on
    each video frame.
    """
    r, s = int(temporal_ratio), int(shift)
    if r < 1 or s < 0 or num_frames < 1 or frame0 < 0:
        raise ValueError(
            f"audio windows: need num_frames >= 1, temporal_ratio >= 1, shift >= 0, "
            f"frame0 >= 0 (got {num_frames}, {temporal_ratio}, {shift}, {frame0})"
        )
    latent_frames = 1 + (num_frames - 1) // r
    rows = [[-1] * (r - 1) + list(range(frame0 - s, frame0 + s + 1))]
    for k in range(1, latent_frames):
        first = frame0 + 1 + r * (k - 1) - s
        rows.append(list(range(first, first + r + 2 * s)))
    return torch.tensor(rows, dtype=torch.long)


def audio_windows(
    features: Tensor, num_frames: int, temporal_ratio: int, shift: int = 2, frame0: int = 0
) -> Tensor:
    """Per video frame audio features [..., T, G, D] -> windows [..., F_lat, W, G, D].

    The window of each latent frame is `window_indices(...)`; indices outside [0, T)
    (and latent frame 0's r - 1 leading frames) are zero features. The clip is video
    frames frame0 .. frame0 + num_frames - 1 of the audio, so T must reach its end;
    shorter features raise ReproInputError ("audio shorter than the clip"). Leading
    dimensions (clips) are kept.
    """
    if features.ndim < 3:
        raise ValueError(f"audio windows: features {tuple(features.shape)}, expected [T, G, D]")
    index = window_indices(num_frames, temporal_ratio, shift, frame0)
    length = features.shape[-3]
    if length < frame0 + num_frames:
        raise ReproInputError(
            f"audio shorter than the clip: {length} audio frames for a {num_frames}-frame "
            f"clip starting at frame {frame0}"
        )
    valid = (index >= 0) & (index < length)
    gathered = features[..., index.clamp(0, length - 1).to(features.device), :, :]
    keep = valid.to(features.device)[:, :, None, None]
    return torch.where(keep, gathered, torch.zeros((), dtype=features.dtype))


class AudioProjector(nn.Module):
    """One latent frame's audio window [W, G, D] -> `tokens` audio tokens of width `dim`.

    The official AudioProjModel: flatten -> Linear(W*G*D, hidden) -> ReLU ->
    Linear(hidden, hidden) -> ReLU -> Linear(hidden, tokens*dim) -> LayerNorm(dim) per
    token; Xavier-uniform weights, zero biases. [B, F_lat, W, G, D] -> [B, F_lat, tokens, dim].
    """

    def __init__(
        self, window: int, groups: int, feature_dim: int, hidden: int, tokens: int, dim: int
    ):
        super().__init__()
        self.window, self.groups, self.feature_dim = int(window), int(groups), int(feature_dim)
        self.tokens, self.dim = int(tokens), int(dim)
        self.proj1 = nn.Linear(self.window * self.groups * self.feature_dim, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, self.tokens * self.dim)
        self.norm = nn.LayerNorm(self.dim)
        for layer in (self.proj1, self.proj2, self.proj3):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, windows: Tensor) -> Tensor:
        expected = (self.window, self.groups, self.feature_dim)
        if windows.ndim != 5 or tuple(windows.shape[2:]) != expected:
            raise ValueError(
                f"AudioProjector: windows {tuple(windows.shape)}, expected [B, F_lat, "
                f"{', '.join(map(str, expected))}]"
            )
        x = windows.flatten(2)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        x = self.proj3(x).unflatten(-1, (self.tokens, self.dim))
        return self.norm(x)


# ----------------------------------------------------------------------------- audio attention


class FrameLocalAudioAttention(nn.Module):
    """HuMo's audio cross-attention: each latent frame's video tokens read that frame's
    audio tokens only.

    Pre-LayerNorm (affine) on the video tokens, q from them and k / v from the audio
    tokens, RMS qk-norm across heads (as Wan's attention), no rotary embedding, no gate.
    Frame-local by a reshape: Wan's video tokens are frame-major (frames, h/p, w/p) after
    patchify, so queries [B, F*n, dim] become [B*F, n, dim] and keys [B, F, K, dim]
    become [B*F, K, dim]. The output projection is ZERO-initialised: a freshly installed
    audio attention adds exactly nothing, so stage 2 starts from stage 1's model.
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6, audio_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"FrameLocalAudioAttention: dim {dim} is not divisible by {heads}")
        audio_dim = dim if audio_dim is None else int(audio_dim)
        self.heads = int(heads)
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(audio_dim, dim)
        self.to_v = nn.Linear(audio_dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden_states: Tensor, audio: Tensor) -> Tensor:
        """hidden_states [B, F*n, dim] (frame-major), audio tokens [B, F, K, audio_dim]
        -> [B, F*n, dim]."""
        batch, length, dim = hidden_states.shape
        frames, tokens = audio.shape[1], audio.shape[2]
        if audio.shape[0] != batch or length % frames:
            raise ValueError(
                f"audio attention: {length} video tokens of batch {batch} do not split into "
                f"the {frames} frames of audio tokens {tuple(audio.shape)}"
            )
        per_frame, head_dim = length // frames, dim // self.heads
        x = self.norm(hidden_states.float()).type_as(hidden_states)
        q = self.norm_q(self.to_q(x))
        audio = audio.to(hidden_states.dtype)
        k = self.norm_k(self.to_k(audio))
        v = self.to_v(audio)
        q = q.reshape(batch * frames, per_frame, self.heads, head_dim).transpose(1, 2)
        k = k.reshape(batch * frames, tokens, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch * frames, tokens, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*F, heads, n, head_dim]
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.to_out(out)


@dataclass
class _AudioState:
    """What one block reads during a forward inside `audio_condition`."""

    tokens: Tensor  # [B, F, K, dim]
    audio_on: Tensor | None  # [B] bool: rows whose audio attention counts
    recorded: list | None  # append the audio attention output here (the last n blocks)


class HuMoWanBlock(WanTransformerBlock):
    """diffusers' WanTransformerBlock with HuMo's audio cross-attention after the text
    cross-attention. `install_audio` switches existing blocks to this class, so the
    stock weights keep their modules and state-dict keys; `audio_attn` is the one new
    submodule. `forward` is WanTransformerBlock.forward (diffusers 0.42) line for line
    plus step 2b; without audio (no `audio_condition`, or tokens None) it computes
    exactly what the stock block computes.
    """

    audio_attn: FrameLocalAudioAttention

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: torch.Tensor,
    ) -> torch.Tensor:
        if temb.ndim == 4:
            # temb: batch_size, seq_len, 6, inner_dim (wan2.2 ti2v)
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                self.scale_shift_table.unsqueeze(0) + temb.float()
            ).chunk(6, dim=2)
            # batch_size, seq_len, 1, inner_dim
            shift_msa = shift_msa.squeeze(2)
            scale_msa = scale_msa.squeeze(2)
            gate_msa = gate_msa.squeeze(2)
            c_shift_msa = c_shift_msa.squeeze(2)
            c_scale_msa = c_scale_msa.squeeze(2)
            c_gate_msa = c_gate_msa.squeeze(2)
        else:
            # temb: batch_size, 6, inner_dim (wan2.1/wan2.2 14B)
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                self.scale_shift_table + temb.float()
            ).chunk(6, dim=1)

        # 1. Self-attention
        norm_hidden_states = (
            self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa
        ).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Cross-attention
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

        # 2b. HuMo: frame-local audio cross-attention (pre-norm inside, residual, no gate)
        state = getattr(self, "_humo_audio", None)
        if state is not None:
            audio_output = self.audio_attn(hidden_states, state.tokens)
            if state.audio_on is not None:
                on = state.audio_on.to(device=audio_output.device, dtype=audio_output.dtype)
                audio_output = audio_output * on.view(-1, 1, 1)
            if state.recorded is not None:
                state.recorded.append(audio_output)
            hidden_states = hidden_states + audio_output

        # 3. Feed-forward
        norm_hidden_states = (
            self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa
        ).type_as(hidden_states)
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(
            hidden_states
        )

        return hidden_states


def install_audio(transformer: nn.Module, audio_dim: int | None = None) -> nn.Module:
    """Give every block of a WanTransformer3DModel a zero-initialised `audio_attn` and
    HuMo's forward (in place; returns the transformer). Blocks already installed are left
    as they are. Until an `audio_condition` passes tokens, the model computes exactly
    what it computed before."""
    config = transformer.config
    dim = int(config.num_attention_heads) * int(config.attention_head_dim)
    for block in transformer.blocks:
        if isinstance(block, HuMoWanBlock):
            continue
        if type(block) is not WanTransformerBlock:
            raise TypeError(
                f"install_audio: expected WanTransformerBlock, got {type(block).__name__}"
            )
        weight = block.attn2.to_q.weight
        attn = FrameLocalAudioAttention(
            dim, int(config.num_attention_heads), float(config.eps), audio_dim
        )
        block.__class__ = HuMoWanBlock
        block.audio_attn = attn.to(device=weight.device, dtype=weight.dtype)
    return transformer


def _humo_blocks(transformer: nn.Module) -> list[HuMoWanBlock]:
    blocks = list(transformer.blocks)
    if not all(isinstance(b, HuMoWanBlock) for b in blocks):
        raise ValueError(
            "audio_condition: the transformer has no audio attention (install_audio first)"
        )
    return blocks


@contextlib.contextmanager
def audio_condition(
    transformer: nn.Module,
    tokens: Tensor | None,
    record_last: int = 0,
    audio_on: Tensor | None = None,
) -> Iterator[list[Tensor]]:
    """Let the transformer's forwards inside the block hear audio tokens [B, F, K, dim].

    F counts every latent frame of the model's input, reference frames included. None:
    no audio, every block is the stock block. `audio_on` [B] (bool) switches the audio
    off per row (its audio attention output is multiplied by 0), so rows with and
    without audio share one batch. Yields a list that receives, in block order, the
    audio attention outputs [B, L, dim] of the last `record_last` blocks (for the mask
    predictor). On exit the blocks are as before, also after an exception.

    With gradient checkpointing on, the recomputation of a block in backward runs after
    this context has closed; the context therefore wraps the transformer's
    checkpointing function so that each recomputation hears the same tokens.
    """
    blocks = _humo_blocks(transformer)
    recorded: list[Tensor] = []
    count = len(blocks)
    if not 0 <= record_last <= count:
        raise ValueError(f"audio_condition: record_last {record_last} of {count} blocks")
    states: list[_AudioState | None] = [None] * count
    if tokens is not None:
        states = [
            _AudioState(tokens, audio_on, recorded if i >= count - record_last else None)
            for i in range(count)
        ]
    previous = [getattr(b, "_humo_audio", None) for b in blocks]
    checkpoint_fn = getattr(transformer, "_gradient_checkpointing_func", None)
    try:
        for block, state in zip(blocks, states, strict=True):
            block._humo_audio = state
        if tokens is not None and checkpoint_fn is not None:
            transformer._gradient_checkpointing_func = _replaying(checkpoint_fn)
        yield recorded
    finally:
        for block, state in zip(blocks, previous, strict=True):
            block._humo_audio = state
        if checkpoint_fn is not None:
            transformer._gradient_checkpointing_func = checkpoint_fn


def _replaying(checkpoint_fn):
    """The checkpointing function, with each block's audio state carried into its
    recomputation (which records nothing: the forward's record is the one in use)."""

    def checkpointed(block, *args):
        state = getattr(block, "_humo_audio", None)
        replay = None if state is None else replace(state, recorded=None)
        calls = [0]

        def run(*inner):
            saved = block._humo_audio
            block._humo_audio = state if calls[0] == 0 else replay
            calls[0] += 1
            try:
                return block(*inner)
            finally:
                block._humo_audio = saved

        return checkpoint_fn(run, *args)

    return checkpointed


# ----------------------------------------------------------------------------- focus-by-predicting


class MaskPredictor(nn.Module):
    """Focus-by-predicting's head: the audio attention outputs of the last blocks,
    averaged, -> Linear(dim, p_t*p_h*p_w) per token -> unpatchified face-mask logits.

    Input: a sequence of [B, L, dim] (L = frames * height * width tokens, frame-major) and
    the token grid (frames, height, width); output [B, frames*p_t, height*p_h, width*p_w],
    the latent grid (one mask channel, the face). Not in the released code: built from
    the paper's description.
    """

    def __init__(self, dim: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.proj = nn.Linear(dim, math.prod(self.patch_size))

    def forward(self, recorded: Sequence[Tensor], grid: tuple[int, int, int]) -> Tensor:
        if len(recorded) == 0:
            raise ValueError("MaskPredictor: no recorded audio attention outputs")
        x = torch.stack(list(recorded)).mean(0)
        logits = self.proj(x)
        frames, height, width = grid
        p_t, p_h, p_w = self.patch_size
        batch = logits.shape[0]
        logits = logits.reshape(batch, frames, height, width, p_t, p_h, p_w)
        logits = logits.permute(0, 1, 4, 2, 5, 3, 6)
        return logits.reshape(batch, frames * p_t, height * p_h, width * p_w)


def mask_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Focus-by-predicting's loss: BCE against the face mask with the size-aware weight.

    For logits l and mask M (0/1 or soft) of shape [B, F, h, w], per frame (b, f):

        w_bf  = h * w / max(sum_xy M_bf, 1)                    (the size-aware weight)
        L_bf  = w_bf * mean_xy BCE(l_bf, M_bf)  =  sum_xy BCE(l_bf, M_bf) / max(sum_xy M_bf, 1)
        loss  = mean over (b, f) of L_bf

    with BCE(l, m) = -(m log sigmoid(l) + (1 - m) log(1 - sigmoid(l))). A small face gets
    a large weight, so the prediction cannot ignore it; the clamp keeps a frame without
    a face finite. Shapes must match (ReproInputError otherwise).
    """
    if logits.shape != mask.shape or logits.ndim != 4:
        raise ReproInputError(
            f"humo face mask: mask {tuple(mask.shape)} does not match the mask prediction "
            f"{tuple(logits.shape)} (both [B, F_lat, h, w] on the latent grid)"
        )
    target = mask.to(torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    area = target.sum(dim=(-2, -1)).clamp(min=1.0)
    return (bce.sum(dim=(-2, -1)) / area).mean()


# ----------------------------------------------------------------------------- image injection


def _check_mode(mode: str) -> str:
    if mode not in INJECTIONS:
        raise ReproInputError(f"humo.injection: unknown mode {mode!r} (allowed {INJECTIONS})")
    return mode


def inject_reference(latents: Tensor, reference: Tensor, mode: str) -> Tensor:
    """The reference latent [B, C, R, h, w] (R = 1: one image) into latents [B, C, F, h, w].

    "append": concatenated at the end of the time axis -> [B, C, F + R, h, w] (the paper).
    "overwrite_last": written over the last R frames -> [B, C, F, h, w] (the 1.7B code,
    whose sampler state carries R slot frames after the video for this).
    """
    _check_mode(mode)
    if (
        reference.ndim != 5
        or reference.shape[:2] != latents.shape[:2]
        or (reference.shape[3:] != latents.shape[3:])
    ):
        raise ValueError(
            f"inject_reference: reference {tuple(reference.shape)} does not fit latents "
            f"{tuple(latents.shape)} (expected [B, C, R, h, w])"
        )
    reference = reference.to(latents.dtype)
    if mode == "append":
        return torch.cat([latents, reference], dim=2)
    slots = reference.shape[2]
    if latents.shape[2] <= slots:
        raise ValueError(f"inject_reference: {latents.shape[2]} frames leave no video frame")
    return torch.cat([latents[:, :, :-slots], reference], dim=2)


def video_frames(x: Tensor, num_frames: int, mode: str) -> Tensor:
    """The video part of a model input or output: its first `num_frames` latent frames
    (the reference frames follow the video in both modes)."""
    _check_mode(mode)
    if x.shape[2] < num_frames:
        raise ValueError(f"video_frames: {x.shape[2]} frames, expected at least {num_frames}")
    return x[:, :, :num_frames]


# ----------------------------------------------------------------------------- HuMo


class HuMo(nn.Module):
    """The foundation's WanTransformer3DModel with audio installed, the audio projector
    and the mask predictor. The constructor's keywords are the saved config.

    audio_window, audio_groups, audio_feature_dim: the shape (W, G, D) of one latent
    frame's audio window (`audio_windows`: W = r + 2 * shift). audio_hidden and
    audio_tokens: the projector's width and tokens per latent frame (code: 512, 16).
    mask_blocks: focus-by-predicting reads the audio attention of the last n blocks
    (paper: 4). injection: how the reference joins the video ("append" | "overwrite_last").
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        audio_window: int,
        audio_groups: int,
        audio_feature_dim: int,
        audio_hidden: int = 512,
        audio_tokens: int = 16,
        mask_blocks: int = 4,
        injection: str = "append",
    ):
        super().__init__()
        _check_mode(injection)
        layers = len(transformer.blocks)
        if not 1 <= int(mask_blocks) <= layers:
            raise ReproInputError(
                f"humo.model.mask_blocks: {mask_blocks} is not in 1..{layers} (the blocks)"
            )
        config = transformer.config
        dim = int(config.num_attention_heads) * int(config.attention_head_dim)
        self.transformer = install_audio(transformer)
        self.audio_projector = AudioProjector(
            audio_window, audio_groups, audio_feature_dim, audio_hidden, audio_tokens, dim
        )
        self.mask_predictor = MaskPredictor(dim, config.patch_size)
        weight = transformer.proj_out.weight
        self.audio_projector.to(device=weight.device, dtype=weight.dtype)
        self.mask_predictor.to(device=weight.device, dtype=weight.dtype)
        self.injection = injection
        self.mask_blocks = int(mask_blocks)
        self.config = {
            "audio_window": int(audio_window),
            "audio_groups": int(audio_groups),
            "audio_feature_dim": int(audio_feature_dim),
            "audio_hidden": int(audio_hidden),
            "audio_tokens": int(audio_tokens),
            "mask_blocks": int(mask_blocks),
            "injection": injection,
        }
        self.saved_config: dict = {}  # load_humo: the `config` given to save_humo

    def latent_shape(self, t2v, num_frames: int, size: Sequence[int]) -> tuple[int, ...]:
        """One clip's sampler state (C, F_lat, h, w) for `num_frames` video frames of `size`
        (H, W) pixels under the foundation `t2v`: the video latent frames alone."""
        height, width = (int(s) for s in size)
        ratio = int(t2v.spatial_ratio)
        if height % ratio or width % ratio:
            raise ReproInputError(f"size: {height}x{width} is not a multiple of the VAE's {ratio}")
        channels = int(self.transformer.config.in_channels)
        return (channels, t2v.latent_frames(int(num_frames)), height // ratio, width // ratio)

    def velocity(
        self,
        x_t: Tensor,
        sigma: Tensor | float,
        text_embeds: Tensor,
        reference: Tensor | None = None,
        audio: Tensor | None = None,
        mode: str | None = None,
        audio_on: Tensor | None = None,
    ) -> Tensor:
        """The velocity [B, C, F, h, w] of the video frames x_t at noise level `sigma`.

        text_embeds [B, L, D]: the prompts (the empty / negative prompt for "no text").
        reference [B, C, 1, h, w] in model space, or None. audio: windows [B, F, W, G, D]
        (one per video latent frame), or None; `audio_on` [B] bool switches it off per row.
        mode: the injection (default: the model's). Rows of one batch must agree on
        whether there is a reference frame in mode "append" (it changes the length); in
        mode "overwrite_last" an all-zero reference IS "no reference".
        """
        v, _ = self._run(x_t, sigma, text_embeds, reference, audio, mode, audio_on, record=False)
        return v

    def forward_train(
        self,
        x_t: Tensor,
        sigma: Tensor | float,
        text_embeds: Tensor,
        reference: Tensor | None = None,
        audio: Tensor | None = None,
        mode: str | None = None,
        audio_on: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`velocity` plus the face-mask logits [B, F, h, w] of the video frames (None
        without audio: the predictor reads the audio attention)."""
        return self._run(x_t, sigma, text_embeds, reference, audio, mode, audio_on, record=True)

    def forward(self, *args, **kwargs):
        return self.forward_train(*args, **kwargs)

    def _run(self, x_t, sigma, text_embeds, reference, audio, mode, audio_on, *, record):
        mode = _check_mode(self.injection if mode is None else mode)
        if x_t.ndim != 5:
            raise ValueError(f"HuMo: x_t {tuple(x_t.shape)}, expected [B, C, F, h, w]")
        batch, channels, frames, height, width = x_t.shape
        if text_embeds.shape[0] != batch:
            raise ValueError(f"HuMo: {text_embeds.shape[0]} prompts for a batch of {batch}")
        model_in = self._with_reference(x_t, reference, mode)
        total = model_in.shape[2]

        tokens = None
        if audio is not None:
            if audio.ndim != 5 or audio.shape[:2] != (batch, frames):
                raise ValueError(
                    f"HuMo: audio windows {tuple(audio.shape)}, expected [{batch}, {frames}, W, G, D]"
                )
            tokens = self.audio_projector(audio.to(device=x_t.device, dtype=x_t.dtype))
            if total > frames:  # the reference frames hear zero audio tokens
                zeros = tokens.new_zeros(batch, total - frames, *tokens.shape[2:])
                tokens = torch.cat([tokens, zeros], dim=1)
            if audio_on is not None:
                audio_on = audio_on.to(device=x_t.device, dtype=torch.bool).reshape(batch)

        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_t.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"HuMo: sigma {tuple(sigma.shape)}, expected a number or [{batch}]")
        timestep = sigma * NUM_TRAIN_TIMESTEPS

        record_last = self.mask_blocks if record and tokens is not None else 0
        with audio_condition(self.transformer, tokens, record_last, audio_on) as recorded:
            out = self.transformer(
                model_in, timestep, encoder_hidden_states=text_embeds, return_dict=False
            )[0]
        v = video_frames(out, frames, mode)
        if not record_last:
            return v, None
        p_t, p_h, p_w = self.mask_predictor.patch_size
        grid = (total // p_t, height // p_h, width // p_w)
        return v, self.mask_predictor(recorded, grid)[:, :frames]

    @staticmethod
    def _with_reference(x_t: Tensor, reference: Tensor | None, mode: str) -> Tensor:
        if mode == "append":
            return x_t if reference is None else inject_reference(x_t, reference, mode)
        # "overwrite_last": the 1.7B code carries a slot frame after the video and writes
        # the reference (zeros without one) over it before every call; the slot's own
        # content never reaches the model, so the slot is built here instead.
        batch, channels, _, height, width = x_t.shape
        slot = x_t.new_zeros(batch, channels, 1, height, width)
        return inject_reference(
            torch.cat([x_t, slot], dim=2), slot if reference is None else reference, mode
        )


# ----------------------------------------------------------------------------- training sets, files


def trainable_parameters(humo: HuMo, stage: str | int, variant: str) -> list[nn.Parameter]:
    """The parameters a training stage updates (it does not touch requires_grad).

    stage "1": variant "minimal" = the self-attention (attn1) weights of every block, the
    paper's minimal-invasive image injection; "full_finetune" = every transformer weight
    (the ablation). stage "2": stage 1's set plus the audio modules (the projector, every
    block's audio_attn, the mask predictor).
    """
    stage = str(stage)
    if stage not in STAGES:
        raise ReproInputError(f"humo stage: {stage!r} is not one of {STAGES}")
    if variant not in FINETUNES:
        raise ReproInputError(f"humo.variants: fine-tuning {variant!r} is not one of {FINETUNES}")
    chosen = []
    for name, param in humo.named_parameters():
        if ".audio_attn." in name or name.startswith(("audio_projector.", "mask_predictor.")):
            take = stage == "2"
        elif variant == "full_finetune":
            take = name.startswith("transformer.")
        else:
            take = name.startswith("transformer.") and ".attn1." in name
        if take:
            chosen.append(param)
    return chosen


def save_humo(humo: HuMo, out_dir, config: dict) -> None:
    """Write `out_dir`/humo.safetensors (every HuMo weight, the transformer's included;
    kind humo_weights) and `out_dir`/humo_config.json ({"model": the constructor's
    keywords, "config": `config`}), the config last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS_FILE, humo.state_dict(), KIND, {"model": humo.config})
    write_json(out / CONFIG_FILE, {"model": humo.config, "config": dict(config)})


def load_humo(out_dir, transformer: nn.Module) -> HuMo:
    """A saved HuMo, rebuilt around `transformer` (the foundation's WanTransformer3DModel,
    loaded by the caller: it gets audio installed and the saved weights). The `config`
    given to save_humo is `humo.saved_config`. Errors name the file."""
    out = Path(out_dir)
    config_path, weights_path = out / CONFIG_FILE, out / WEIGHTS_FILE
    meta = read_json(config_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ReproInputError(f"{config_path}: no 'model' section (not a HuMo config)")
    try:
        humo = HuMo(transformer, **meta["model"])
    except TypeError as err:
        raise ReproInputError(f"{config_path}: bad 'model' section ({err})") from err
    tensors, _ = load_tensors(weights_path, kind=KIND)
    own = humo.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ReproInputError(
            f"{weights_path}: does not fit this transformer: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise ReproInputError(
                f"{weights_path}: {key} is {tuple(value.shape)}, this transformer's is "
                f"{tuple(own[key].shape)} (another foundation model?)"
            )
    humo.load_state_dict(tensors, strict=True)
    humo.saved_config = dict(meta.get("config") or {})
    return humo

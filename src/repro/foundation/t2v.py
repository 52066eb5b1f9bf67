"""The text-to-video foundation model: Wan2.1-T2V's layout, tiny or from the hub.

Paper scale (HuMo-1.7B) starts from Wan2.1-T2V-1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers):
a WanTransformer3DModel (a DiT with 3D RoPE) denoising the latents of a causal video
VAE (AutoencoderKLWan: 4x in time, 8x in space), conditioned on the last hidden states
of a UMT5 encoder, trained and sampled with flow matching; each component in its own
subfolder (transformer/, text_encoder/, tokenizer/, scheduler/, vae/). The tiny stand-in
has the same layout and classes except the VAE: it denoises the 3x9x16x16 pixels of
the talking-faces clips directly (temporal ratio 1), and its tokenizer is the repo's
CLIP BPE trained on the clip captions (loaded, like the hub's UMT5 tokenizer, with
transformers' AutoTokenizer). The pipeline pre-trains it on the training clips with
text only (rule foundation_t2v):

    python -m repro.foundation.t2v --faces data/faces/train.safetensors \
        --out models/foundation/t2v --metrics results/foundation/t2v.json \
        --checkpoint-dir checkpoints/foundation/t2v --params '{...foundation.t2v...}'

Flow matching as Wan (rectified flow) has it: a clean latent x0 and noise n give
x_s = (1 - s) x0 + s n for s in [0, 1], the transformer predicts the velocity
dx_s/ds = n - x0 from (x_s, timestep 1000 s, text), and sampling integrates that
velocity from s = 1 (noise) to s = 0 with Euler steps on Wan's shifted grid. Captions
are dropped to "" for a fraction of the training clips so that classifier-free
guidance has an unconditional prediction. Every later stage (HuMo) loads the model
with `load_t2v`, the same code at every scale.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproInputError
from repro.foundation import store
from repro.foundation.corpus import check_build_params, config_section
from repro.foundation.t2i import knn_predict
from repro.foundation.tokenizer import build_tokenizer, vocab_files

log = logging.getLogger(__name__)

NAME = "t2v"
KIND = store.kind(NAME)
MODEL_INDEX = "model_index.json"
FACES_KIND = "talking_faces"
# WanPipeline's max_sequence_length: the text length when the tokenizer names none.
WAN_TEXT_LENGTH = 512
SIGMA_KINDS = ("logit_normal", "uniform")

# The tiny model's knobs in the config section (foundation.t2v) that build_t2v reads.
TRANSFORMER_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "rope_max_seq_len",
)
TEXT_KEYS = ("d_model", "d_ff", "d_kv", "num_layers", "num_heads", "max_length")
PIXEL_CHANNELS = 3  # RGB: the tiny model denoises pixels


@dataclass
class TextToVideo:
    """Wan2.1-T2V's components: what HuMo extends and samples from."""

    transformer: object  # diffusers WanTransformer3DModel
    text_encoder: object  # transformers UMT5EncoderModel
    tokenizer: object  # transformers tokenizer (tiny: CLIPTokenizer; hub: UMT5's T5 tokenizer)
    scheduler: object  # diffusers FlowMatchEulerDiscreteScheduler: holds the sampling shift
    vae: object | None = None  # diffusers AutoencoderKLWan (paper scale); None: pixel space

    def to(self, device) -> TextToVideo:
        for module in (self.transformer, self.text_encoder, self.vae):
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame after the first: the VAE's (4 for Wan's), 1 in pixels."""
        return 1 if self.vae is None else int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent along a side: the VAE's (8 for Wan's), 1 in pixels."""
        return 1 if self.vae is None else int(self.vae.config.scale_factor_spatial)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def shift(self) -> float:
        """The sampling shift the model ships with (its scheduler's)."""
        return float(self.scheduler.config.shift)

    @property
    def text_length(self) -> int:
        """Tokens every prompt is padded to: the tokenizer's length (Wan: 512)."""
        length = int(self.tokenizer.model_max_length)
        return length if length <= 100_000 else WAN_TEXT_LENGTH

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a `frames`-frame video: 1 + (frames - 1) / temporal_ratio."""
        r = self.temporal_ratio
        if frames < 1 or (frames - 1) % r:
            raise ReproInputError(f"frames: {frames} is not 1 + a multiple of {r} (the VAE's)")
        return 1 + (frames - 1) // r

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """The text encoder's last hidden states [B, text_length, D], Wan's convention:
        each prompt encoded with its attention mask, the positions past its length
        zeroed. Gradients flow to the text encoder (the tiny model pre-trains it)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    def velocity(self, x: Tensor, sigma: Tensor | float, text_embeds: Tensor) -> Tensor:
        """The transformer's velocity prediction at noise level `sigma` (a number or one
        per sample): its timestep argument is sigma * num_train_timesteps (1000)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        timestep = (sigma * self.scheduler.config.num_train_timesteps).expand(x.shape[0])
        return self.transformer(x, timestep, encoder_hidden_states=text_embeds).sample

    def to_model_space(self, video: Tensor) -> Tensor:
        """Videos [B, 3, F, H, W] in [-1, 1] -> what the transformer denoises.

        Without a VAE the pixels themselves; with one the latent mean (deterministic),
        normalised per channel as diffusers' WanPipeline does: (z - latents_mean) /
        latents_std, [B, z_dim, 1 + (F - 1) / 4, H / 8, W / 8].
        """
        x = video.to(self.device, torch.float32)
        if x.ndim != 5 or x.shape[1] != PIXEL_CHANNELS:
            raise ValueError(f"to_model_space: expected [B, 3, F, H, W], got {tuple(x.shape)}")
        if self.vae is None:
            return x
        self.latent_frames(x.shape[2])
        latents = self.vae.encode(x).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    def to_video_space(self, latents: Tensor) -> Tensor:
        """The inverse of to_model_space, clamped to [-1, 1]."""
        if self.vae is not None:
            mean, std = self._latent_stats(latents)
            latents = self.vae.decode(latents * std + mean).sample
        return latents.clamp(-1.0, 1.0)

    def image_to_model_space(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] as one-frame videos in model space, [B, C, 1, h, w]
        (Wan's VAE encodes a lone first frame into one latent frame)."""
        if images.ndim != 4:
            raise ValueError(f"image_to_model_space: expected [B, 3, H, W], got {images.shape}")
        return self.to_model_space(images.unsqueeze(2))

    def _latent_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1, 1)
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, dtype=latents.dtype, device=latents.device)
        std = torch.tensor(config.latents_std, dtype=latents.dtype, device=latents.device)
        return mean.view(shape), std.view(shape)

    def save_pretrained(self, out_dir: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Wan's directory layout: one subfolder per component and model_index.json.

        store.save_foundation calls this inside its temporary directory (atomic)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": "TextToVideo", "_repro": "repro.foundation.t2v"}
        for name in ("transformer", "text_encoder", "vae"):
            module = getattr(self, name)
            if module is not None:
                module.save_pretrained(out_dir / name, safe_serialization=safe_serialization)
            index[name] = _library_entry(module)
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        if type(self.tokenizer).__name__ == "CLIPTokenizer":
            for file, text in vocab_files(self.tokenizer).items():
                (out_dir / "tokenizer" / file).write_text(text, encoding="utf-8")
        self.scheduler.save_pretrained(out_dir / "scheduler")
        index["tokenizer"] = _library_entry(self.tokenizer)
        index["scheduler"] = _library_entry(self.scheduler)
        (out_dir / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def parameters(self):
        """The trainable modules' parameters (transformer, then text encoder; never the VAE)."""
        yield from self.transformer.parameters()
        yield from self.text_encoder.parameters()


def _library_entry(obj) -> list:
    return store.library_entry(obj)


# ----------------------------------------------------------------------------- build


def make_scheduler(shift: float, num_train_timesteps: int = 1000):
    """The flow-matching scheduler config the model ships: its sampling shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not float(shift) > 0:
        raise ReproInputError(f"foundation.{NAME}.shift: {shift!r} must be > 0")
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(num_train_timesteps), shift=float(shift)
    )


def build_t2v(params: dict, captions: list[str]) -> TextToVideo:
    """The tiny text-to-video model of config section foundation.t2v, randomly
    initialised from params["seed"]: a CLIP BPE tokenizer trained on `captions`
    (vocab_size, padded to text_encoder.max_length), a UMT5EncoderModel (text_encoder:
    d_model, d_ff, d_kv, num_layers, num_heads; gated-GELU as UMT5-XXL, no dropout), a
    pixel-space WanTransformer3DModel (transformer: 3 channels in and out, text_dim =
    d_model) and the scheduler holding params["shift"]. Eval mode."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    text = config_section(NAME, params, "text_encoder", TEXT_KEYS)
    transformer = config_section(NAME, params, "transformer", TRANSFORMER_KEYS)
    if "vocab_size" not in params:
        raise ReproInputError(f"foundation.{NAME}.vocab_size: missing")
    max_length = int(text.pop("max_length", 16))
    for key in ("in_channels", "out_channels"):
        if transformer.setdefault(key, PIXEL_CHANNELS) != PIXEL_CHANNELS:
            raise ReproInputError(
                f"foundation.{NAME}.transformer.{key}: {transformer[key]}, but the tiny model "
                f"denoises RGB pixels ({PIXEL_CHANNELS} channels)"
            )
    text.setdefault("d_model", 32)
    if transformer.setdefault("text_dim", text["d_model"]) != text["d_model"]:
        raise ReproInputError(
            f"foundation.{NAME}.transformer.text_dim: {transformer['text_dim']} differs from "
            f"foundation.{NAME}.text_encoder.d_model ({text['d_model']})"
        )
    tokenizer = build_tokenizer(captions, int(params["vocab_size"]), model_max_length=max_length)
    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        **text,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        text_encoder = UMT5EncoderModel(text_config)
        model = WanTransformer3DModel(**transformer)
    return TextToVideo(
        transformer=model.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=make_scheduler(params.get("shift", 1.0)),
    )


def save_t2v(t2v: TextToVideo, out_dir: str | os.PathLike) -> None:
    """Write `t2v` in Wan's layout, atomically, tagged foundation.t2v."""
    store.save_foundation(t2v, NAME, out_dir)


# ----------------------------------------------------------------------------- load


def _where(params: dict, component: str | None = None) -> str:
    return store.where(params, component, NAME)


def _has_vae(params: dict) -> bool:
    """Whether the model has a VAE: its model_index.json lists one (Wan's and ours)."""
    return store.has_vae(params, "text-to-video")


def load_text_tokenizer(params: dict):
    """The model's tokenizer (tokenizer/) through transformers' AutoTokenizer: the tiny
    CLIPTokenizer and the hub's UMT5 tokenizer alike. Errors name foundation.<name>."""
    from transformers import AutoTokenizer, PreTrainedConfig

    from repro.core.hub import loader_options

    subfolder = "/".join(p.strip("/") for p in (params.get("subfolder"), "tokenizer") if p)
    where = _where(params, "tokenizer")
    try:
        # An empty model config: AutoTokenizer (transformers 5) otherwise looks for a
        # config.json beside the tokenizer, which a tokenizer/ folder lacks, and offline
        # that is an error in the hub cache (a local directory tolerates it). The class
        # then comes from tokenizer_config.json's tokenizer_class, as it does locally.
        tokenizer = AutoTokenizer.from_pretrained(
            str(params["pretrained"]),
            subfolder=subfolder,
            config=PreTrainedConfig(),
            **loader_options(params),
        )
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise ReproInputError(f"{where}: cannot load a tokenizer ({err})") from err
    if tokenizer.pad_token_id is None:
        raise ReproInputError(f"{where}: the tokenizer has no padding token")
    return tokenizer


def load_scheduler(params: dict):
    """The sampling shift of the model (scheduler/) in a FlowMatchEulerDiscreteScheduler.

    Ours ships that class with `shift`; Wan2.1's hub checkpoint ships a
    UniPCMultistepScheduler with `flow_shift` (3.0 for the 1.3B model): the same
    number, read either way."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from repro.core.hub import loader_options

    subfolder = "/".join(p.strip("/") for p in (params.get("subfolder"), "scheduler") if p)
    try:
        config = FlowMatchEulerDiscreteScheduler.load_config(
            str(params["pretrained"]), subfolder=subfolder, **loader_options(params)
        )
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ReproInputError(f"{_where(params, 'scheduler')}: cannot load it ({err})") from err
    shift = config["shift"] if "shift" in config else config.get("flow_shift", 1.0)
    return make_scheduler(shift, config.get("num_train_timesteps", 1000))


def load_t2v(params: dict) -> TextToVideo:
    """The text-to-video model of store.model_params(config, "t2v"): built here (tiny),
    a local directory or a hub checkpoint in the cache (Wan2.1-T2V-1.3B-Diffusers),
    the same code.

    Models come through store.load_foundation (kind check, float32, eval mode, errors
    naming foundation.t2v); the tokenizer and the scheduler through their own loaders
    with the same options. Everything lands on the CPU; call .to(device)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    source = params.get("pretrained")
    if source and Path(str(source)).is_dir():
        from repro.core.modelio import check_kind

        check_kind(source, KIND, _where(params))  # before anything else is read
    vae = store.load_foundation(AutoencoderKLWan, params, "vae") if _has_vae(params) else None
    return TextToVideo(
        transformer=store.load_foundation(WanTransformer3DModel, params, "transformer"),
        text_encoder=store.load_foundation(UMT5EncoderModel, params, "text_encoder"),
        tokenizer=load_text_tokenizer(params),
        scheduler=load_scheduler(params),
        vae=vae,
    )


# ----------------------------------------------------------------------------- flow matching


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Training noise levels s in (0, 1), [batch], on the generator's device.

    logit_normal (SD3, HuMo): s = sigmoid(mean + std * z), z ~ N(0, 1), which puts
    most of the training on middle noise levels; uniform: s ~ U[0, 1)."""
    device = generator.device
    if kind == "logit_normal":
        z = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(float(mean) + float(std) * z)
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    raise ReproInputError(f"foundation.{NAME}.timesteps.kind: {kind!r}, allowed {SIGMA_KINDS}")


def add_noise(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_s = (1 - s) x0 + s noise, one s per sample (rectified flow's straight path)."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """dx_s/ds along the straight path: noise - x0 (what the transformer predicts)."""
    return noise - x0


def flow_matching_loss(
    t2v: TextToVideo,
    video: Tensor,
    prompts: list[str],
    generator: torch.Generator,
    *,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Wan's pre-training loss: MSE between the transformer's velocity on noised videos
    and noise - x0. From `generator` (on its device), in this order: the noise levels
    (sample_sigmas(kind, mean, std)), then the noise; so the loss is a function of
    the seed."""
    x0 = t2v.to_model_space(video)
    sigmas = sample_sigmas(x0.shape[0], generator, kind, mean, std).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    pred = t2v.velocity(add_noise(x0, noise, sigmas), sigmas, t2v.encode_prompts(prompts))
    return F.mse_loss(pred, velocity_target(x0, noise))


def shifted_sigmas(steps: int, shift: float) -> Tensor:
    """The sampling grid [steps + 1] from 1 (noise) to 0 (clean), Wan's
    get_sampling_sigmas: s_i = 1 - i / steps, shifted to shift * s / (1 + (shift - 1) s)
    (shift > 1 spends more of the steps at high noise), float64."""
    if int(steps) < 1:
        raise ReproInputError(f"steps: {steps!r} must be >= 1")
    if not float(shift) > 0:
        raise ReproInputError(f"shift: {shift!r} must be > 0")
    s = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def euler_sample(
    velocity_fn: Callable[[Tensor, float], Tensor],
    noise: Tensor,
    sigmas: Tensor,
    *,
    progress: bool = False,
) -> Tensor:
    """Integrate dx/ds = velocity_fn(x, s) from sigmas[0] to sigmas[-1] with Euler steps:
    x <- x + (s_next - s) * velocity_fn(x, s). `velocity_fn` is where a caller puts its
    guidance (text CFG here, HuMo's multi-condition forms there)."""
    from tqdm.auto import tqdm

    x = noise
    levels = [float(s) for s in sigmas]
    for s, s_next in tqdm(
        list(zip(levels, levels[1:], strict=False)),
        desc="euler",
        disable=None if progress else True,
    ):
        x = x + (s_next - s) * velocity_fn(x, s)
    return x


@torch.no_grad()
def generate(
    t2v: TextToVideo,
    prompts: list[str],
    *,
    steps: int,
    shift: float,
    guidance: float,
    generator: torch.Generator,
    frames: int,
    size: int | tuple[int, int],
    negative_prompt: str = "",
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """One video per prompt, [N, 3, frames, H, W] in [-1, 1] on the CPU: Euler on
    shifted_sigmas(steps, shift) with classifier-free guidance on the text,
    v = v_u + guidance * (v_c - v_u), v_u conditioned on `negative_prompt` (Wan's
    negative prompt; "" is the dropped caption of pre-training).

    `size` is the video's (height, width) in pixels (an int: square). Every initial
    noise is drawn from `generator` first, so the videos depend on the generator
    alone, not on batch_size. guidance == 1 is the conditional model alone."""
    height, width = (size, size) if isinstance(size, int) else size
    ratio = t2v.spatial_ratio
    if height % ratio or width % ratio:
        raise ReproInputError(f"size: {height}x{width} is not a multiple of the VAE's {ratio}")
    prompts = list(prompts)
    shape = (t2v.latent_channels, t2v.latent_frames(int(frames)), height // ratio, width // ratio)
    noise = torch.randn((len(prompts), *shape), generator=generator, device=generator.device)
    sigmas = shifted_sigmas(steps, shift)
    guided = float(guidance) != 1.0
    uncond = t2v.encode_prompts([negative_prompt]) if guided else None
    out = []
    for start in range(0, len(prompts), int(batch_size)):
        batch = prompts[start : start + int(batch_size)]
        cond = t2v.encode_prompts(batch)
        if guided:
            both = torch.cat([uncond.expand(len(batch), -1, -1), cond])

            def velocity(x, s, both=both):
                v_u, v_c = t2v.velocity(torch.cat([x, x]), s, both).chunk(2)
                return v_u + float(guidance) * (v_c - v_u)
        else:

            def velocity(x, s, cond=cond):
                return t2v.velocity(x, s, cond)

        x = noise[start : start + len(batch)].to(t2v.device)
        x = euler_sample(velocity, x, sigmas, progress=progress)
        out.append(t2v.to_video_space(x).cpu())
    if not out:
        return torch.empty(0, PIXEL_CHANNELS, int(frames), height, width)
    return torch.cat(out)


# ----------------------------------------------------------------------------- the data


@dataclass
class Clips:
    """The training clips of a talking-faces file, cut into training and held-out parts."""

    video: Tensor  # float32 [N, 3, F, H, W] in [-1, 1]
    captions: list[str]
    heldout_video: Tensor
    heldout_captions: list[str]

    def all_texts(self) -> list[str]:
        return sorted(set(self.captions) | set(self.heldout_captions))


def load_clips(path: str | os.PathLike, heldout: int) -> Clips:
    """The videos and captions of a talking-faces file (kind "talking_faces"), the last
    `heldout` clips held out of training. Errors name the file or the key."""
    from repro.core.io import load_tensors

    tensors, meta = load_tensors(path, kind=FACES_KIND, required=("video",))
    video, captions = tensors["video"], meta.get("captions")
    if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
        raise ReproInputError(
            f"{path}: video must be uint8 [N, 3, F, H, W], got {video.dtype} {tuple(video.shape)}"
        )
    if not isinstance(captions, list) or len(captions) != len(video):
        got = len(captions) if isinstance(captions, list) else "none"
        raise ReproInputError(f"{path}: {got} captions for {len(video)} clips")
    n = len(video)
    if not 0 < int(heldout) < n:
        raise ReproInputError(f"foundation.{NAME}.heldout: {heldout} must be in (0, {n})")
    x = video.float() / 127.5 - 1.0
    cut = n - int(heldout)
    return Clips(
        x[:cut], [str(c) for c in captions[:cut]], x[cut:], [str(c) for c in captions[cut:]]
    )


def drop_captions(captions: list[str], generator: torch.Generator, dropout: float) -> list[str]:
    """Each caption replaced by "" with probability `dropout` (one draw per caption)."""
    keep = torch.rand(len(captions), generator=generator) >= float(dropout)
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


# ----------------------------------------------------------------------------- the stage


def _timesteps(params: dict) -> dict:
    spec = dict(params.get("timesteps") or {"kind": "logit_normal"})
    unknown = sorted(set(spec) - {"kind", "mean", "std"})
    if unknown:
        raise ReproInputError(f"foundation.{NAME}.timesteps: unknown keys {unknown}")
    if spec.setdefault("kind", "logit_normal") not in SIGMA_KINDS:
        raise ReproInputError(
            f"foundation.{NAME}.timesteps.kind: {spec['kind']!r}, allowed {SIGMA_KINDS}"
        )
    return spec


def pretrain(
    t2v: TextToVideo, clips: Clips, params: dict, checkpoint_dir, desc: str = "foundation_t2v"
) -> dict:
    """Pre-train every weight of `t2v` on the training clips with their captions, each
    dropped to "" with probability caption_dropout (repro.core.training.fit: AdamW,
    warm-up + cosine, checkpoints); batches are a function of (seed, step)."""
    from repro.core.distributed import local_batch_size, step_generator
    from repro.core.training import fit, optimiser_settings

    seed, batch_size = int(params["seed"]), local_batch_size(int(params["batch_size"]))
    dropout, timesteps = float(params["caption_dropout"]), _timesteps(params)
    device = t2v.device
    t2v.transformer.train()
    t2v.text_encoder.train()

    def loss_fn(step: int) -> Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(clips.captions), (batch_size,), generator=gen)
        prompts = drop_captions([clips.captions[i] for i in idx.tolist()], gen, dropout)
        return flow_matching_loss(t2v, clips.video[idx].to(device), prompts, gen, **timesteps)

    summary = fit(
        modules={"transformer": t2v.transformer, "text_encoder": t2v.text_encoder},
        parameters=list(t2v.parameters()),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        grad_clip=params.get("grad_clip"),
        desc=desc,
        **optimiser_settings(params),
    )
    t2v.transformer.eval()
    t2v.text_encoder.eval()
    return summary


def _eval_clips(params: dict, clips: Clips) -> int:
    """eval.clips, checked against the held-out clips there are."""
    evaluation = params["eval"]
    for key in ("clips", "steps", "guidance"):
        if key not in evaluation:
            raise ReproInputError(f"foundation.{NAME}.eval.{key}: missing")
    n_eval = int(evaluation["clips"])
    if not 0 < n_eval <= len(clips.heldout_captions):
        raise ReproInputError(
            f"foundation.{NAME}.eval.clips: {n_eval} must be in "
            f"(0, heldout = {len(clips.heldout_captions)}]"
        )
    return n_eval


def frame_change(video: Tensor) -> float:
    """Mean absolute change between consecutive frames of [N, 3, F, H, W] videos."""
    return (video[:, :, 1:] - video[:, :, :-1]).abs().mean().item()


@torch.no_grad()
def evaluate(t2v: TextToVideo, clips: Clips, params: dict) -> dict:
    """How good the model is, cheaply and honestly (HuMo's judges come later):

    - heldout_loss: the flow-matching loss on the held-out clips with their captions
      (fixed noise), beside the training loss;
    - sample_caption_accuracy_w<g>: of videos drawn from the first `eval.clips`
      held-out captions at guidance g (eval.guidance: a number or a list), `eval.steps`
      Euler steps at the model's shift, the fraction whose caption a 5-NN classifier
      in pixel space over the training clips reads back (captions as classes);
    - knn_heldout_caption_accuracy: that classifier on the same held-out real clips,
      the ceiling the samples are read against;
    - frame_change_w<g> beside frame_change_real: how much consecutive frames
      differ, whether the samples move as much as real clips do.
    """
    evaluation, timesteps = params["eval"], _timesteps(params)
    n_eval = _eval_clips(params, clips)
    gen = torch.Generator().manual_seed(int(params["seed"]) + 1)
    total, n = 0.0, len(clips.heldout_captions)
    for start in range(0, n, 64):
        stop = min(start + 64, n)
        video, prompts = clips.heldout_video[start:stop], clips.heldout_captions[start:stop]
        total += flow_matching_loss(t2v, video, prompts, gen, **timesteps).item() * (stop - start)
    metrics = {"heldout_loss": total / n}

    names = sorted(set(clips.captions))
    index = {c: i for i, c in enumerate(names)}
    labels = torch.tensor([index[c] for c in clips.captions])
    prompts = clips.heldout_captions[:n_eval]
    targets = torch.tensor([index.get(c, -1) for c in prompts])
    real = clips.heldout_video[:n_eval]
    knn_real = knn_predict(clips.video, labels, real)
    metrics["knn_heldout_caption_accuracy"] = (knn_real == targets).float().mean().item()
    metrics["frame_change_real"] = frame_change(real)
    frames, height, width = clips.video.shape[2:]
    guidances = evaluation["guidance"]
    for guidance in guidances if isinstance(guidances, list | tuple) else [guidances]:
        video = generate(
            t2v,
            prompts,
            steps=int(evaluation["steps"]),
            shift=t2v.shift,
            guidance=float(guidance),
            generator=torch.Generator().manual_seed(int(params["seed"]) + 2),
            frames=frames,
            size=(height, width),
            batch_size=int(evaluation.get("batch_size", 64)),
        )
        predicted = knn_predict(clips.video, labels, video)
        metrics[f"sample_caption_accuracy_w{guidance:g}"] = (
            (predicted == targets).float().mean().item()
        )
        metrics[f"frame_change_w{guidance:g}"] = frame_change(video)
    return metrics


def main(argv=None) -> None:
    from repro.core.stage import Stage

    stage = Stage(
        __doc__,
        paper="foundation",
        out="the model directory (Wan layout)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--faces", required=True, help="talking-faces clips (safetensors)")
    args = stage.start(argv)
    params = stage.params
    check_build_params(
        NAME, params, ("heldout", "eval", "caption_dropout", "seed", "shift", "batch_size")
    )
    if not 0 <= float(params["caption_dropout"]) < 1:
        raise ReproInputError(
            f"foundation.{NAME}.caption_dropout: {params['caption_dropout']} must be in [0, 1)"
        )
    _timesteps(params)
    clips = load_clips(args.faces, params["heldout"])
    _eval_clips(params, clips)
    t2v = build_t2v(params, clips.all_texts()).to(stage.device)
    summary = pretrain(t2v, clips, params, stage.checkpoints(args.faces))
    metrics = evaluate(t2v, clips, params) if stage.is_main else {}
    if stage.is_main:
        save_t2v(t2v, args.out)
    stage.finish(
        stage.summary(
            summary,
            transformer_parameters=sum(p.numel() for p in t2v.transformer.parameters()),
            text_encoder_parameters=sum(p.numel() for p in t2v.text_encoder.parameters()),
            vocab_size=len(t2v.tokenizer),
            train_clips=len(clips.captions),
            heldout_clips=len(clips.heldout_captions),
            **metrics,
        )
    )


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

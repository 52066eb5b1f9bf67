"""The text-to-image foundation model: Stable Diffusion's layout, tiny or from the hub.

Paper scale (DataDream) starts from Stable Diffusion 2.1 base: a UNet2DConditionModel
denoising VAE latents, conditioned on a CLIPTextModel's last hidden states, with a
CLIPTokenizer and a noise schedule, each in its own subfolder (unet/, text_encoder/,
tokenizer/, scheduler/, vae/). The tiny stand-in has the same layout and classes
except the VAE: it denoises 8x8x1 pixels directly (a VAE would cost more than the
UNet at this size and add nothing the papers test). The pipeline pre-trains it on the
glyph corpus (rule foundation_t2i):

    python -m repro.foundation.t2i --corpus data/glyphs/corpus.safetensors \
        --out models/foundation/t2i --metrics results/foundation/t2i.json \
        --checkpoint-dir checkpoints/foundation/t2i --params '{...foundation.t2i...}'

Captions are dropped to "" for a fraction of the examples (classifier-free guidance
needs the unconditional prediction) and replaced by the generic "a glyph of <char>"
for another fraction, so that DataDream's prompt "a glyph of the digit seven" is a
caption the model has seen. Every later stage loads the model with `load_t2i`, the
same code at every scale.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproInputError
from repro.foundation import store
from repro.foundation.corpus import (
    Corpus,
    check_build_params,
    config_section,
    load_corpus,
    mixed_captions,
)
from repro.foundation.tokenizer import build_tokenizer, load_tokenizer, vocab_files

log = logging.getLogger(__name__)

NAME = "t2i"
KIND = store.kind(NAME)
MODEL_INDEX = "model_index.json"

# The tiny model's knobs in the config section (foundation.t2i) that build_t2i reads.
UNET_KEYS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "attention_head_dim",
    "norm_num_groups",
    "transformer_layers_per_block",
)
TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
)


@dataclass
class TextToImage:
    """Stable Diffusion's components: what DataDream adapts and samples from."""

    unet: object  # diffusers UNet2DConditionModel
    text_encoder: object  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    scheduler: object  # diffusers DDPMScheduler: the training noise schedule
    vae: object | None = None  # diffusers AutoencoderKL (paper scale); None: pixel space

    def to(self, device) -> TextToImage:
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side (8 for SD's VAE, 1 without a VAE)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The side of the images the model draws (and trains on), in pixels."""
        return int(self.unet.config.sample_size) * self.vae_factor

    @property
    def image_channels(self) -> int:
        """Channels of the images the model draws: the VAE's, or the UNet's in pixel space."""
        if self.vae is None:
            return int(self.unet.config.in_channels)
        return int(self.vae.config.in_channels)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids [B, L], padded to the tokenizer's length (SD's convention: no mask)."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """The text encoder's last hidden states [B, L, D] (what SD's UNet attends to);
        gradients flow to the text encoder (DataDream adapts it)."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def to_model_space(self, images: Tensor) -> Tensor:
        """Images [N, C, H, W] in [-1, 1] -> what the UNet denoises.

        Resized to image_size (area for shrinking, bilinear for growing), grey
        repeated to the model's channels, then VAE-encoded (the latent mean, so
        deterministic) times the VAE's scaling factor; without a VAE the pixels.
        """
        x = images.to(self.device, torch.float32)
        size = self.image_size
        if x.shape[-2:] != (size, size):
            mode = "area" if x.shape[-1] > size else "bilinear"
            x = F.interpolate(x, size=(size, size), mode=mode, **_align(mode))
        channels = self.image_channels
        if x.shape[1] != channels:
            if x.shape[1] != 1:
                raise ValueError(f"to_model_space: {x.shape[1]} channels, the model has {channels}")
            x = x.expand(-1, channels, -1, -1)
        if self.vae is None:
            return x
        latents = self.vae.encode(x).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def to_image_space(self, x: Tensor) -> Tensor:
        """The inverse of to_model_space: decoded (with a VAE), clamped to [-1, 1]; the
        model's channels and image_size."""
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return x.clamp(-1.0, 1.0)

    def save_pretrained(self, out_dir: str | os.PathLike, safe_serialization: bool = True) -> None:
        """SD's directory layout: one subfolder per component and model_index.json.

        store.save_foundation calls this inside its temporary directory (atomic)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": "TextToImage", "_repro": "repro.foundation.t2i"}
        for name in ("unet", "text_encoder", "vae"):
            module = getattr(self, name)
            if module is not None:
                module.save_pretrained(out_dir / name, safe_serialization=safe_serialization)
            index[name] = _library_entry(module)
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        # The hub's CLIP tokenizers ship as vocab.json + merges.txt: written too, so the
        # tiny directory has the files of the paper-scale one.
        for file, text in vocab_files(self.tokenizer).items():
            (out_dir / "tokenizer" / file).write_text(text, encoding="utf-8")
        self.scheduler.save_pretrained(out_dir / "scheduler")
        index["tokenizer"] = _library_entry(self.tokenizer)
        index["scheduler"] = _library_entry(self.scheduler)
        (out_dir / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def parameters(self):
        """The trainable modules' parameters (UNet, then text encoder; never the VAE)."""
        yield from self.unet.parameters()
        yield from self.text_encoder.parameters()


def _align(mode: str) -> dict:
    return {"align_corners": False} if mode == "bilinear" else {}


def _library_entry(obj) -> list:
    return store.library_entry(obj)


# ----------------------------------------------------------------------------- build


def make_noise_scheduler(params: dict):
    """The training noise schedule (a DDPMScheduler, as SD ships it): no sample clipping."""
    from diffusers import DDPMScheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}
    config.update(config_section(NAME, params, "scheduler", SCHEDULER_KEYS))
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ReproInputError(
            f"foundation.{NAME}.scheduler.prediction_type: {config['prediction_type']!r}, "
            "allowed epsilon | v_prediction"
        )
    return DDPMScheduler(**config)


def build_t2i(params: dict, captions: list[str]) -> TextToImage:
    """The tiny text-to-image model of config section foundation.t2i, randomly initialised
    from params["seed"]: a CLIPTokenizer trained on `captions` (vocab_size), a
    CLIPTextModel (text_encoder), a pixel-space UNet2DConditionModel (unet) attending to
    it, and a DDPMScheduler (scheduler). Train mode off (eval)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = config_section(NAME, params, "text_encoder", TEXT_KEYS)
    unet = config_section(NAME, params, "unet", UNET_KEYS)
    if "vocab_size" not in params:
        raise ReproInputError(f"foundation.{NAME}.vocab_size: missing")
    tokenizer = build_tokenizer(
        captions,
        int(params["vocab_size"]),
        model_max_length=int(text.get("max_position_embeddings", 16)),
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **text,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        text_encoder = CLIPTextModel(text_config)
        unet_model = UNet2DConditionModel(
            **unet, cross_attention_dim=text_config.hidden_size, act_fn="silu"
        )
    return TextToImage(
        unet=unet_model.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=make_noise_scheduler(params),
    )


def save_t2i(t2i: TextToImage, out_dir: str | os.PathLike) -> None:
    """Write `t2i` in SD's layout, atomically, tagged foundation.t2i."""
    store.save_foundation(t2i, NAME, out_dir)


# ----------------------------------------------------------------------------- load


def _where(params: dict, component: str | None = None) -> str:
    return store.where(params, component, NAME)


root_file = store.root_file  # (repro.foundation.clip reads its preprocessor config with it)


def _has_vae(params: dict) -> bool:
    """Whether the model has a VAE: its model_index.json lists one (SD's and ours)."""
    return store.has_vae(params, "text-to-image")


def load_scheduler(params: dict):
    """The training noise schedule of the model (scheduler/), as a DDPMScheduler (SD 2.1
    ships a PNDMScheduler config: same betas, read as DDPM's)."""
    from diffusers import DDPMScheduler

    from repro.core.hub import loader_options

    subfolder = "/".join(p.strip("/") for p in (params.get("subfolder"), "scheduler") if p)
    try:
        config = DDPMScheduler.load_config(
            str(params["pretrained"]), subfolder=subfolder, **loader_options(params)
        )
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ReproInputError(f"{_where(params, 'scheduler')}: cannot load it ({err})") from err
    return DDPMScheduler.from_config(config)


def load_t2i(params: dict) -> TextToImage:
    """The text-to-image model of store.model_params(config, "t2i"): built here (tiny),
    a local directory or a hub checkpoint in the cache (SD 2.1 base), the same code.

    Models come through store.load_foundation (kind check, float32, eval mode, errors
    naming foundation.t2i); the tokenizer and the scheduler through their own loaders
    with the same options. Everything lands on the CPU; call .to(device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    source = params.get("pretrained")
    if source and Path(str(source)).is_dir():
        from repro.core.modelio import check_kind

        check_kind(source, KIND, _where(params))  # before anything else is read
    vae = store.load_foundation(AutoencoderKL, params, "vae") if _has_vae(params) else None
    return TextToImage(
        unet=store.load_foundation(UNet2DConditionModel, params, "unet"),
        text_encoder=store.load_foundation(CLIPTextModel, params, "text_encoder"),
        tokenizer=load_tokenizer(params, "tokenizer"),
        scheduler=load_scheduler(params),
        vae=vae,
    )


# ----------------------------------------------------------------------------- train, sample


def denoising_loss(
    t2i: TextToImage, images: Tensor, prompts: list[str], generator: torch.Generator
) -> Tensor:
    """SD's training loss: MSE between the UNet's prediction on noised images and the
    noise (epsilon) or the velocity (v_prediction), t ~ U{0..T-1}. t and the noise are
    drawn from `generator` (on its device), so the loss is a function of the seed."""
    x0 = t2i.to_model_space(images)
    scheduler = t2i.scheduler
    b = x0.shape[0]
    t = torch.randint(
        0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=generator.device
    ).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    pred = t2i.unet(x_t, t, encoder_hidden_states=t2i.encode_prompts(prompts)).sample
    return F.mse_loss(pred, target)


def sampling_scheduler(t2i: TextToImage):
    """DDIM on the model's noise schedule (set_alpha_to_one False unless its config says)."""
    from diffusers import DDIMScheduler

    config = dict(t2i.scheduler.config)
    config.setdefault("set_alpha_to_one", False)
    return DDIMScheduler.from_config(config)


@torch.no_grad()
def generate(
    t2i: TextToImage,
    prompts: list[str],
    *,
    guidance: float,
    steps: int,
    generator: torch.Generator,
    batch_size: int = 64,
    negative_prompt: str = "",
    progress: bool = True,
) -> Tensor:
    """One image per prompt: DDIM (eta 0) for `steps` steps with classifier-free guidance
    eps_u + guidance * (eps_c - eps_u), eps_u conditioned on `negative_prompt`.

    Images [N, C, H, W] in [-1, 1] on the CPU. Every initial noise is drawn from
    `generator` first, so the images depend on the generator alone, not on batch_size.
    guidance == 1 is the conditional model alone (one network evaluation per step).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    n = len(prompts)
    channels = int(t2i.unet.config.in_channels)
    side = int(t2i.unet.config.sample_size)
    noise = torch.randn((n, channels, side, side), generator=generator, device=generator.device)
    scheduler = sampling_scheduler(t2i)
    scheduler.set_timesteps(int(steps))
    device = t2i.device
    guided = float(guidance) != 1.0
    uncond = t2i.encode_prompts([negative_prompt]) if guided else None
    out = []
    starts = range(0, n, int(batch_size))
    for start in tqdm(starts, desc="generate", disable=None if progress else True):
        batch = prompts[start : start + int(batch_size)]
        cond = t2i.encode_prompts(batch)
        x = noise[start : start + len(batch)].to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            if guided:
                hidden = torch.cat([uncond.expand(len(batch), -1, -1), cond])
                eps_u, eps_c = t2i.unet(torch.cat([x_in, x_in]), t, hidden).sample.chunk(2)
                eps = eps_u + float(guidance) * (eps_c - eps_u)
            else:
                eps = t2i.unet(x_in, t, cond).sample
            x = scheduler.step(eps, t, x).prev_sample
        out.append(t2i.to_image_space(x).cpu())
    if not out:
        return torch.empty(0, t2i.image_channels, t2i.image_size, t2i.image_size)
    return torch.cat(out)


# ----------------------------------------------------------------------------- the judge


@torch.no_grad()
def knn_predict(reference: Tensor, labels: Tensor, queries: Tensor, k: int = 5) -> Tensor:
    """k-nearest-neighbour labels in pixel space (Euclidean; majority vote, ties to the
    nearest): the cheap, independent judge of what a generated glyph depicts."""
    ref = reference.flatten(1).float()
    out = []
    for start in range(0, len(queries), 1024):
        q = queries[start : start + 1024].flatten(1).float()
        nearest = torch.cdist(q, ref).topk(k, largest=False).indices  # [B, k], nearest first
        votes = labels[nearest]
        counts = F.one_hot(votes, int(labels.max()) + 1).sum(1).float()
        # Ties go to the nearer neighbour's label: a small bonus decreasing with rank.
        counts.scatter_add_(1, votes, torch.linspace(0.5, 0.1, k).expand(len(q), -1))
        out.append(counts.argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


# ----------------------------------------------------------------------------- the stage


def pretrain(t2i: TextToImage, corpus: Corpus, params: dict, checkpoint_dir) -> dict:
    """Pre-train every weight of `t2i` on the corpus (repro.core.training.fit: AdamW,
    warm-up + cosine, checkpoints); batches are a function of (seed, step)."""
    from repro.core.distributed import local_batch_size, step_generator
    from repro.core.training import fit, optimiser_settings

    seed, batch_size = int(params["seed"]), local_batch_size(int(params["batch_size"]))
    dropout, generic = float(params["caption_dropout"]), float(params["generic_fraction"])
    device = t2i.device
    t2i.unet.train()
    t2i.text_encoder.train()

    def loss_fn(step: int) -> Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(corpus.labels), (batch_size,), generator=gen)
        prompts = mixed_captions(corpus, idx, gen, dropout, generic)
        return denoising_loss(t2i, corpus.images[idx].to(device), prompts, gen)

    summary = fit(
        modules={"unet": t2i.unet, "text_encoder": t2i.text_encoder},
        parameters=list(t2i.parameters()),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        grad_clip=params.get("grad_clip"),
        desc="foundation_t2i",
        **optimiser_settings(params),
    )
    t2i.unet.eval()
    t2i.text_encoder.eval()
    return summary


@torch.no_grad()
def evaluate(t2i: TextToImage, corpus: Corpus, params: dict) -> dict:
    """How good the model is, cheaply and honestly:

    - heldout_loss: the denoising loss on the held-out glyphs with their captions
      (fixed noise), beside the training loss;
    - sample_accuracy_w<g>: of `eval.per_class` images per char drawn from the generic
      prompt at guidance g, the fraction that a 5-NN classifier in pixel space over the
      training glyphs labels as the prompted char;
    - knn_heldout_accuracy: that classifier's accuracy on held-out real glyphs, the
      ceiling the samples are read against.
    """
    evaluation = params["eval"]
    gen = torch.Generator().manual_seed(int(params["seed"]) + 1)
    losses = []
    for start in range(0, len(corpus.heldout_labels), 256):
        stop = min(start + 256, len(corpus.heldout_labels))
        prompts = corpus.heldout_captions[start:stop]
        losses.append(
            denoising_loss(t2i, corpus.heldout_images[start:stop], prompts, gen).item()
            * (stop - start)
        )
    metrics = {"heldout_loss": sum(losses) / len(corpus.heldout_labels)}
    knn_real = knn_predict(corpus.images, corpus.labels, corpus.heldout_images)
    metrics["knn_heldout_accuracy"] = (knn_real == corpus.heldout_labels).float().mean().item()
    per_class = int(evaluation["per_class"])
    targets = torch.arange(len(corpus.chars)).repeat_interleave(per_class)
    prompts = [corpus.generic[int(c)] for c in targets]
    for guidance in evaluation["guidance"]:
        images = generate(
            t2i,
            prompts,
            guidance=float(guidance),
            steps=int(evaluation["steps"]),
            generator=torch.Generator().manual_seed(int(params["seed"]) + 2),
            batch_size=int(evaluation.get("batch_size", 256)),
        )
        predicted = knn_predict(corpus.images, corpus.labels, images)
        correct = (predicted == targets).float()
        metrics[f"sample_accuracy_w{guidance:g}"] = correct.mean().item()
        digits = torch.tensor([ch.isdigit() for ch in corpus.chars])[targets]
        if digits.any() and not digits.all():
            metrics[f"sample_accuracy_digits_w{guidance:g}"] = correct[digits].mean().item()
    return metrics


def main(argv=None) -> None:
    from repro.core.stage import Stage

    stage = Stage(
        __doc__,
        paper="foundation",
        out="the model directory (SD layout)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--corpus", required=True, help="glyph corpus (safetensors)")
    args = stage.start(argv)
    params = stage.params
    check_build_params(
        NAME, params, ("heldout", "eval", "caption_dropout", "generic_fraction", "seed")
    )
    if params["caption_dropout"] + params["generic_fraction"] > 1:
        raise ReproInputError(
            f"foundation.{NAME}.caption_dropout + foundation.{NAME}.generic_fraction: "
            f"{params['caption_dropout']} + {params['generic_fraction']} exceeds 1"
        )
    corpus = load_corpus(args.corpus, params["heldout"])
    t2i = build_t2i(params, corpus.all_texts()).to(stage.device)
    summary = pretrain(t2i, corpus, params, stage.checkpoints(args.corpus))
    metrics = evaluate(t2i, corpus, params) if stage.is_main else {}
    if stage.is_main:
        save_t2i(t2i, args.out)
    stage.finish(
        stage.summary(
            summary,
            unet_parameters=sum(p.numel() for p in t2i.unet.parameters()),
            text_encoder_parameters=sum(p.numel() for p in t2i.text_encoder.parameters()),
            vocab_size=len(t2i.tokenizer),
            train_images=len(corpus.labels),
            **metrics,
        )
    )


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

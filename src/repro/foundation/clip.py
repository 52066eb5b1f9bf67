"""The CLIP foundation model: transformers' CLIPModel, tiny or from the hub.

Paper scale (DataDream's classifier, ProbeX's text side) starts from
openai/clip-vit-base-patch16: one directory holding the CLIPModel (config.json +
model.safetensors), its CLIPTokenizer (vocab.json + merges.txt) and its image
processor's preprocessor_config.json (image_mean / image_std). The tiny stand-in is
the same class and layout: a ViT on 8x8x1 images in 2x2 patches (16 patches + the
class token) and a 2-layer text transformer, pre-trained contrastively on the glyph
corpus by the pipeline (rule foundation_clip):

    python -m repro.foundation.clip --corpus data/glyphs/corpus.safetensors \
        --out models/foundation/clip --metrics results/foundation/clip.json \
        --checkpoint-dir checkpoints/foundation/clip --params '{...foundation.clip...}'

The contrastive loss is CLIP's symmetric cross-entropy with one change: the corpus
repeats captions (a few hundred distinct ones), so a batch often holds two images of
the same caption, and CLIP's one-hot target would push apart a matching pair. The
target of each row is uniform over the columns with the same caption instead
(class-aware; identical to CLIP's when the captions in a batch are distinct).
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
from repro.foundation.corpus import check_build_params, config_section, load_corpus, mixed_captions
from repro.foundation.tokenizer import build_tokenizer, load_tokenizer, vocab_files

log = logging.getLogger(__name__)

NAME = "clip"
KIND = store.kind(NAME)
PREPROCESSOR = "preprocessor_config.json"

TOWER_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
VISION_KEYS = (*TOWER_KEYS, "image_size", "patch_size", "num_channels")
TEXT_KEYS = (*TOWER_KEYS, "max_position_embeddings")


@dataclass
class Clip:
    """A CLIPModel with its tokenizer and its image normalisation."""

    model: object  # transformers CLIPModel
    tokenizer: object  # transformers CLIPTokenizer
    image_mean: tuple
    image_std: tuple

    def to(self, device) -> Clip:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def num_channels(self) -> int:
        return int(self.model.config.vision_config.num_channels)

    @property
    def logit_scale(self) -> Tensor:
        """The learned temperature, exponentiated (a tensor; grads flow when it trains)."""
        return self.model.logit_scale.exp()

    def pixel_values(self, images: Tensor) -> Tensor:
        """Images [N, C, H, W] in [-1, 1] -> the vision tower's input: resized to its
        image_size (area shrinking, bicubic growing, as CLIP's processor does),
        grey repeated to its channels, [0, 1], then (x - mean) / std per channel."""
        x = images.to(self.device, torch.float32)
        size = self.image_size
        if x.shape[-2:] != (size, size):
            if x.shape[-1] > size:
                x = F.interpolate(x, size=(size, size), mode="area")
            else:
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        channels = self.num_channels
        if x.shape[1] != channels:
            if x.shape[1] != 1:
                raise ValueError(f"pixel_values: {x.shape[1]} channels, the model has {channels}")
            x = x.expand(-1, channels, -1, -1)
        x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings [N, P] (gradients flow)."""
        out = self.model.vision_model(pixel_values=self.pixel_values(images))
        return F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def tokenize(self, prompts: list[str]) -> dict:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=min(
                int(self.tokenizer.model_max_length),
                int(self.model.config.text_config.max_position_embeddings),
            ),
            truncation=True,
            return_tensors="pt",
        )
        return {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def encode_text(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings [N, P] (gradients flow)."""
        out = self.model.text_model(**self.tokenize(prompts))
        return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    def save_pretrained(self, out_dir: str | os.PathLike, safe_serialization: bool = True) -> None:
        """The hub's CLIP layout in one directory: model, tokenizer (with vocab.json and
        merges.txt) and preprocessor_config.json. store.save_foundation calls this
        inside its temporary directory (atomic)."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(out_dir)
        for file, text in vocab_files(self.tokenizer).items():
            (out_dir / file).write_text(text, encoding="utf-8")
        (out_dir / PREPROCESSOR).write_text(
            json.dumps(preprocessor_config(self), indent=2, sort_keys=True) + "\n"
        )


def preprocessor_config(clip: Clip) -> dict:
    """CLIPImageProcessor's config for `clip` (what the hub's CLIP directories hold)."""
    size = clip.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(clip.image_mean),
        "image_std": list(clip.image_std),
        "do_convert_rgb": clip.num_channels == 3,
        "resample": 3,
    }


# ----------------------------------------------------------------------------- build, save, load


def build_clip(params: dict, captions: list[str]) -> Clip:
    """The tiny CLIP of config section foundation.clip, randomly initialised from
    params["seed"]: a CLIPTokenizer trained on `captions` (vocab_size), a CLIPModel of
    `vision` and `text` towers projected to `projection_dim`; images normalised with
    image_mean / image_std (default 0.5: [-1, 1] again). Eval mode."""
    from transformers import CLIPConfig, CLIPModel

    vision = config_section(NAME, params, "vision", VISION_KEYS)
    text = config_section(NAME, params, "text", TEXT_KEYS)
    if "vocab_size" not in params:
        raise ReproInputError(f"foundation.{NAME}.vocab_size: missing")
    tokenizer = build_tokenizer(
        captions,
        int(params["vocab_size"]),
        model_max_length=int(text.get("max_position_embeddings", 16)),
    )
    channels = int(vision.get("num_channels", 1))
    mean = tuple(float(v) for v in params.get("image_mean", [0.5] * channels))
    std = tuple(float(v) for v in params.get("image_std", [0.5] * channels))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ReproInputError(
            f"foundation.{NAME}.image_mean / image_std: {channels} values each "
            f"(std > 0), got {list(mean)} / {list(std)}"
        )
    config = CLIPConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision,
        projection_dim=int(params.get("projection_dim", 32)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params.get("seed", 0)))
        model = CLIPModel(config)
    return Clip(model=model.eval(), tokenizer=tokenizer, image_mean=mean, image_std=std)


def save_clip(clip: Clip, out_dir: str | os.PathLike) -> None:
    """Write `clip` in the hub's CLIP layout, atomically, tagged foundation.clip."""
    store.save_foundation(clip, NAME, out_dir)


def _where(params: dict) -> str:
    subfolder = params.get("subfolder")
    return f"foundation.{params.get('name') or NAME}: {params.get('pretrained')}" + (
        f" (subfolder {subfolder})" if subfolder else ""
    )


def load_clip(params: dict) -> Clip:
    """The CLIP of store.model_params(config, "clip"): built here (tiny), a local
    directory or a hub checkpoint in the cache (openai/clip-vit-base-patch16), the same
    code. The model comes through store.load_foundation (kind check, float32, eval,
    errors naming foundation.clip), the tokenizer and preprocessor_config.json with the
    same options. On the CPU; call .to(device)."""
    from transformers import CLIPModel

    from repro.foundation.t2i import root_file

    source = params.get("pretrained")
    if source and Path(str(source)).is_dir():
        from repro.core.modelio import check_kind

        check_kind(source, KIND, _where(params))
    model = store.load_foundation(CLIPModel, params)
    tokenizer = load_tokenizer(params)
    file = root_file(params, PREPROCESSOR)
    if file is None:
        raise ReproInputError(f"{_where(params)}: no {PREPROCESSOR} (image_mean / image_std)")
    try:
        processor = json.loads(file.read_text())
        mean = tuple(float(v) for v in processor["image_mean"])
        std = tuple(float(v) for v in processor["image_std"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ReproInputError(f"{_where(params)}: {PREPROCESSOR} unreadable ({err})") from err
    channels = int(model.config.vision_config.num_channels)
    if len(mean) != channels or len(std) != channels:
        raise ReproInputError(
            f"{_where(params)}: {PREPROCESSOR} has {len(mean)} means / {len(std)} stds "
            f"for a {channels}-channel model"
        )
    return Clip(model=model, tokenizer=tokenizer, image_mean=mean, image_std=std)


# ----------------------------------------------------------------------------- train, use


def contrastive_loss(clip: Clip, images: Tensor, captions: list[str]) -> Tensor:
    """CLIP's symmetric cross-entropy over the batch's image-caption similarities
    (times logit_scale), with the class-aware target: each row's target is uniform
    over the columns whose caption equals its own (see the module docstring)."""
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"contrastive_loss: {len(images)} images, {len(captions)} captions")
    image_emb = clip.encode_images(images)
    text_emb = clip.encode_text(captions)
    logits = clip.logit_scale * image_emb @ text_emb.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    group = torch.tensor([ids[c] for c in captions], device=logits.device)
    same = (group[:, None] == group[None, :]).to(logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    # `same` is symmetric, so the text -> image target is the same matrix.
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def class_prompts(template: str, classnames: list[str]) -> list[str]:
    """One prompt per class: template.format(classname=c)."""
    try:
        return [template.format(classname=c) for c in classnames]
    except (KeyError, IndexError) as err:
        raise ReproInputError(
            f"prompt template {template!r}: only {{classname}} may be filled ({err})"
        ) from err


@torch.no_grad()
def zero_shot_predict(
    clip: Clip, images: Tensor, prompts: list[str], batch_size: int = 512
) -> Tensor:
    """The index of the most similar prompt for each image (CLIP's zero-shot classifier)."""
    text = clip.encode_text(prompts)
    preds = []
    for start in range(0, len(images), batch_size):
        image = clip.encode_images(images[start : start + batch_size])
        preds.append((image @ text.T).argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


# ----------------------------------------------------------------------------- the stage


def pretrain(clip: Clip, corpus, params: dict, checkpoint_dir) -> dict:
    """Train every weight of `clip` contrastively on the corpus (repro.core.training.fit);
    a `generic_fraction` of the captions is the generic one, so the zero-shot prompt
    "a glyph of the digit seven" is a caption CLIP has seen. Batches: f(seed, step)."""
    from repro.core.distributed import local_batch_size, step_generator
    from repro.core.training import fit, optimiser_settings

    seed, batch_size = int(params["seed"]), local_batch_size(int(params["batch_size"]))
    generic = float(params["generic_fraction"])
    clip.model.train()

    def loss_fn(step: int) -> Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(corpus.labels), (batch_size,), generator=gen)
        captions = mixed_captions(corpus, idx, gen, 0.0, generic)
        return contrastive_loss(clip, corpus.images[idx].to(clip.device), captions)

    summary = fit(
        modules={"model": clip.model},
        parameters=list(clip.model.parameters()),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        grad_clip=params.get("grad_clip"),
        desc="foundation_clip",
        **optimiser_settings(params),
    )
    clip.model.eval()
    return summary


@torch.no_grad()
def evaluate(clip: Clip, corpus, digits_path=None) -> dict:
    """Zero-shot accuracy with the generic prompts ("a glyph of the digit seven"):
    on the corpus's held-out glyphs (every char of the corpus a class), and on the
    real handwritten digits of `digits_path` (never trained on; classes the ten
    digits), plus the held-out contrastive loss (their own captions)."""
    from repro.core.data import DIGIT_NAMES, load_image_dataset

    prompts = corpus.generic
    predicted = zero_shot_predict(clip, corpus.heldout_images, prompts)
    metrics = {
        "zero_shot_heldout_accuracy": (predicted == corpus.heldout_labels).float().mean().item()
    }
    losses = []
    for start in range(0, len(corpus.heldout_labels), 256):
        stop = min(start + 256, len(corpus.heldout_labels))
        loss = contrastive_loss(
            clip, corpus.heldout_images[start:stop], corpus.heldout_captions[start:stop]
        )
        losses.append(loss.item() * (stop - start))
    metrics["heldout_loss"] = sum(losses) / len(corpus.heldout_labels)
    if digits_path is not None:
        digits = load_image_dataset(digits_path, kind="digits")
        prompts = class_prompts("a glyph of the digit {classname}", list(DIGIT_NAMES))
        predicted = zero_shot_predict(clip, digits.images, prompts)
        metrics["zero_shot_digits_accuracy"] = (predicted == digits.labels).float().mean().item()
    return metrics


def main(argv=None) -> None:
    from repro.core.stage import Stage

    stage = Stage(
        __doc__,
        paper="foundation",
        out="the model directory (the hub's CLIP layout)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--corpus", required=True, help="glyph corpus (safetensors)")
    stage.parser.add_argument(
        "--digits", help="real digits (safetensors) for a zero-shot score; never trained on"
    )
    args = stage.start(argv)
    params = stage.params
    check_build_params(NAME, params, ("heldout", "generic_fraction", "seed"))
    corpus = load_corpus(args.corpus, params["heldout"])
    if args.digits is not None:
        from repro.core.data import load_image_dataset

        load_image_dataset(args.digits, kind="digits")  # a bad file fails before training
    clip = build_clip(params, corpus.all_texts()).to(stage.device)
    summary = pretrain(clip, corpus, params, stage.checkpoints(args.corpus))
    metrics = evaluate(clip, corpus, args.digits) if stage.is_main else {}
    if stage.is_main:
        save_clip(clip, args.out)
    stage.finish(
        stage.summary(
            summary,
            parameters=sum(p.numel() for p in clip.model.parameters()),
            vocab_size=len(clip.tokenizer),
            train_images=len(corpus.labels),
            logit_scale=float(clip.logit_scale),
            **metrics,
        )
    )


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

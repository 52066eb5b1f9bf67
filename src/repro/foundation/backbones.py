"""Stage foundation_backbones: the base model of one ProbeX model tree, a tiny ViT or CNN
pre-trained to classify the glyph corpus's digits (the stand-in of a hub checkpoint
that the public fine-tunes of a Model Tree share).

    python -m repro.foundation.backbones --corpus data/glyphs/corpus.safetensors \
        --digits data/digits/val.safetensors \
        --out models/foundation/backbones/vit_a.safetensors \
        --metrics results/foundation/backbones/vit_a.json \
        --checkpoint-dir checkpoints/foundation/backbones \
        --params '{"arch": "vit", "seed": 0, "backbone": {"width": 32, ...},
                   "pretrain": {"steps": 300, "batch_size": 128, "lr": 0.003, "heldout": 500}}'

Both archs are written with plain tensor ops (attention as matmuls and softmax, no
BatchNorm, no data-dependent control flow) so that `torch.func.functional_call` under
`vmap` trains many copies at once (repro.probex.finetune). Each is a feature extractor
and a `head` (Linear width -> num_classes); the head is what a fine-tune replaces.

The file (kind "backbone") holds the weights; its metadata `arch` and `config` rebuild
the module (`load_backbone`). Metrics: the held-out glyph accuracy and, with --digits,
the head's accuracy on real handwritten digits (the glyphs' classes are the digits
0..9, so the head reads them directly; never trained on).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.core.errors import ReproInputError

log = logging.getLogger(__name__)

KIND = "backbone"
HEAD = "head"
ARCHS = ("vit", "cnn")
CONFIG_KEYS = ("width", "depth", "heads", "patch", "mlp_ratio")
SECTION = "probex.backbone"


# ----------------------------------------------------------------------------- layers


def layer_matrix(weight: Tensor) -> Tensor:
    """A weight as the 2-D matrix a probe reads: out x in (a conv's out x in*kh*kw)."""
    if weight.dim() < 2:
        raise ValueError(f"layer_matrix: a weight of at least 2 dims, got {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def eligible_layers(
    state_dict: Mapping[str, Tensor], exclude: tuple[str, ...] = (HEAD,)
) -> dict[str, tuple[int, int]]:
    """{layer name: (out, in)} of every weight of >= 2 dims except the `exclude` modules'.

    A layer is named by its module (`blocks.1.attn.proj`); its tensor is `<name>.weight`
    (so position embeddings and class tokens, which are not module weights, are not
    layers). Sorted by name.
    """
    layers = {}
    for key in sorted(state_dict):
        if not key.endswith(".weight") or state_dict[key].dim() < 2:
            continue
        name = key[: -len(".weight")]
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        shape = state_dict[key].shape
        layers[name] = (int(shape[0]), int(shape[1:].numel()))
    return layers


# ----------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ReproInputError(f"{SECTION}.heads: {heads} does not divide width {width}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, d]
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        mixed = scores.softmax(dim=-1) @ v
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * mlp_ratio)
        self.fc2 = nn.Linear(width * mlp_ratio, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A pre-norm ViT with a class token: patches -> Linear -> blocks -> LayerNorm -> head."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        patch: int,
        mlp_ratio: int,
        num_classes: int = 10,
        image_size: int = 8,
        in_channels: int = 1,
    ):
        super().__init__()
        if image_size % patch:
            raise ReproInputError(f"{SECTION}.patch: {patch} does not divide {image_size}")
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(in_channels * patch * patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def features(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        p = self.patch
        patches = images.reshape(batch, channels, height // p, p, width // p, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * p * p)
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


# ----------------------------------------------------------------------------- CNN


class ConvBlock(nn.Module):
    """x + pointwise(gelu(conv3x3(x))); `pointwise`, a 1x1 conv, is a width x width layer."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.pointwise = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pointwise(F.gelu(self.conv(x)))


class TinyCNN(nn.Module):
    """A residual CNN without BatchNorm (no running statistics, so vmap-able):
    stem conv3x3 stride 2 -> blocks at half resolution -> global mean pool -> LayerNorm
    -> head.

    Of the shared backbone config it uses width and depth (heads, patch and mlp_ratio
    are the ViT's). The stride-2 stem keeps its cost near the ViT's at the same width
    (measured, 150 models at batch 32 on 2 cores: a full-resolution 8x8 CNN of 32-64
    channels took 0.65-3 s per step, vmapped or looped; this one 0.15 s vmapped). Each block's 1x1 conv
    `pointwise` (width x width x 1 x 1, read as width x width) has the shape of the
    ViT's attention projection, so one ProbeX reads every tree.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int = 1,
        patch: int = 1,
        mlp_ratio: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        in_channels: int = 1,
    ):
        super().__init__()
        del heads, patch, mlp_ratio, image_size  # shared config keys of the ViT
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def features(self, images: Tensor) -> Tensor:
        x = F.gelu(self.stem(images))
        for block in self.blocks:
            x = block(x)
        return self.norm(x.mean(dim=(2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def build_backbone(arch: str, **config) -> nn.Module:
    """A TinyViT ("vit") or TinyCNN ("cnn") from the backbone config (+ num_classes,
    image_size, in_channels)."""
    classes = {"vit": TinyViT, "cnn": TinyCNN}
    if arch not in classes:
        raise ReproInputError(f"probex.trees.arch: {arch!r} is not one of {list(ARCHS)}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ReproInputError(f"{SECTION}: missing {missing} (got keys {sorted(config)})")
    unknown = sorted(set(config) - set(CONFIG_KEYS) - {"num_classes", "image_size", "in_channels"})
    if unknown:
        raise ReproInputError(f"{SECTION}: unknown keys {unknown}")
    for key in CONFIG_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReproInputError(f"{SECTION}.{key}: must be an integer >= 1, got {value!r}")
    return classes[arch](**config)


# ----------------------------------------------------------------------------- files


def save_backbone(
    model: nn.Module, path: str | os.PathLike, arch: str, config: dict, **meta
) -> None:
    """The weights (kind "backbone") with the arch and config that rebuild the module."""
    from repro.core.io import save_tensors

    save_tensors(path, model.state_dict(), KIND, {"arch": arch, "config": config, **meta})


def load_backbone(path: str | os.PathLike) -> nn.Module:
    """The module of a file written by `save_backbone`, rebuilt from the file alone (eval mode)."""
    from repro.core.io import load_tensors

    tensors, meta = load_tensors(path, kind=KIND)
    arch, config = meta.get("arch"), meta.get("config")
    if not isinstance(config, dict) or arch not in ARCHS:
        raise ReproInputError(f"{path}: metadata lacks a valid arch / config ({arch!r})")
    model = build_backbone(arch, **config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise ReproInputError(f"{path}: weights do not fit a {arch} of {config} ({err})") from err
    return model.eval()


def backbone_meta(path: str | os.PathLike) -> tuple[str, dict]:
    """(arch, config) of a backbone file, without building it."""
    from repro.core.io import read_metadata

    meta = read_metadata(path)
    if meta.get("repro_kind") != KIND:
        raise ReproInputError(f"{path}: expected a '{KIND}' file, found {meta.get('repro_kind')!r}")
    return meta["arch"], meta["config"]


# ----------------------------------------------------------------------------- the stage

PRETRAIN_DEFAULTS = {"weight_decay": 0.0, "warmup_fraction": 0.1, "checkpoint_every": 100}


def pretrain(
    model: nn.Module, images: Tensor, labels: Tensor, params: dict, seed: int, checkpoint_dir
) -> dict:
    """Supervised classification of the glyphs (repro.core.training.fit; batches f(seed, step))."""
    from repro.core.distributed import local_batch_size, step_generator
    from repro.core.training import fit

    settings = {**PRETRAIN_DEFAULTS, **params}
    for key in ("steps", "batch_size", "lr"):
        if key not in settings:
            raise ReproInputError(f"probex.pretrain.{key}: missing (got keys {sorted(params)})")
    batch_size = local_batch_size(int(settings["batch_size"]))
    device = next(model.parameters()).device
    model.train()

    def loss_fn(step: int) -> Tensor:
        idx = torch.randint(len(labels), (batch_size,), generator=step_generator(seed, step))
        return F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))

    summary = fit(
        modules={"model": model},
        parameters=list(model.parameters()),
        loss_fn=loss_fn,
        steps=int(settings["steps"]),
        lr=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]),
        warmup_fraction=float(settings["warmup_fraction"]),
        checkpoint_every=int(settings["checkpoint_every"]),
        checkpoint_dir=checkpoint_dir,
        desc="foundation_backbones",
    )
    model.eval()
    return summary


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(1, len(labels))


def main(argv=None) -> None:
    from repro.core.cli import require
    from repro.core.stage import Stage
    from repro.foundation.corpus import load_corpus

    stage = Stage(
        __doc__,
        paper="foundation",
        out="the base model (.safetensors)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--corpus", required=True, help="glyph corpus (safetensors)")
    stage.parser.add_argument(
        "--digits", help="real digits (safetensors) the head is scored on; never trained on"
    )
    args = stage.start(argv)
    params = stage.params
    arch, seed = (
        require(params, "arch", "probex.trees"),
        int(require(params, "seed", "probex.trees")),
    )
    config = dict(require(params, "backbone", "probex"))
    pretrain_params = dict(require(params, "pretrain", "probex"))
    corpus = load_corpus(args.corpus, require(pretrain_params, "heldout", "probex.pretrain"))
    if len(corpus.chars) and not corpus.chars.isdigit():
        raise ReproInputError(
            f"{args.corpus}: chars {corpus.chars!r}: the backbones need digits only"
        )
    digits = None
    if args.digits is not None:
        from repro.core.data import load_image_dataset

        digits = load_image_dataset(args.digits, kind="digits")  # a bad file fails before training
    config.setdefault("num_classes", len(corpus.chars))
    config.setdefault("image_size", int(corpus.images.shape[-1]))
    config.setdefault("in_channels", int(corpus.images.shape[1]))
    torch.manual_seed(seed)
    model = build_backbone(arch, **config).to(stage.device)
    # Glyph labels index corpus.chars; with chars "0123456789" they are the digits.
    labels = torch.tensor([int(corpus.chars[c]) for c in corpus.labels.tolist()])
    heldout_labels = torch.tensor([int(corpus.chars[c]) for c in corpus.heldout_labels.tolist()])
    summary = pretrain(
        model, corpus.images, labels, pretrain_params, seed, stage.checkpoints(args.corpus)
    )
    metrics = {"heldout_accuracy": accuracy(model, corpus.heldout_images, heldout_labels)}
    if digits is not None:
        metrics["digits_accuracy"] = accuracy(model, digits.images, digits.labels)
    if stage.is_main:
        save_backbone(model.cpu(), args.out, arch, config, seed=seed)
    stage.finish(
        stage.summary(
            summary,
            arch=arch,
            parameters=sum(p.numel() for p in model.parameters()),
            **metrics,
        )
    )


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

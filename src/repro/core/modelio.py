"""Building, saving and loading diffusers / transformers models, shared by every paper.

Every model directory the pipeline writes is `save_pretrained` output (a config
JSON and safetensors weights), written atomically, plus `repro_model.json`: the
model's kind tag (e.g. "dit", "adapted_dit"), so a directory of the wrong kind is
refused with a message naming it. The same loaders read a hub checkpoint (hub id,
optional subfolder, the cache options of repro.core.hub.loader_options) at paper
scale; a checkpoint with missing or mismatched weights is an error, not a warning.

The class-conditional DiT (diffusers DiTTransformer2DModel) helpers live here too:
its null (unconditional) label and its in-model label dropout, which every
classifier-free-guidance trainer needs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from safetensors import SafetensorError
from torch import nn

from repro.core.cli import require
from repro.core.errors import ReproInputError
from repro.core.hub import loader_options

KIND_FILE = "repro_model.json"
DIT_KIND = "dit"

# ----------------------------------------------------------------------------- any model


def save_model(model, out_dir: str | os.PathLike, kind: str) -> None:
    """model.save_pretrained (safetensors) into a temp dir beside `out_dir`, tagged with
    `kind`, then renamed into place: a killed job never leaves a half-written model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / KIND_FILE).write_text(
            json.dumps({"kind": kind, "class": type(model).__name__}, sort_keys=True)
        )
        if out_dir.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
            )
            os.replace(out_dir, old / "dir")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def model_kind(path: str | os.PathLike) -> str | None:
    """The kind tag of a directory written by save_model (None for an untagged one)."""
    file = Path(path) / KIND_FILE
    if not file.is_file():
        return None
    try:
        return str(json.loads(file.read_text())["kind"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReproInputError(f"{file}: not a valid model kind tag ({err})") from err


def check_kind(path: str | os.PathLike, kind: str, where: str | None = None) -> None:
    """Refuse a directory that save_model tagged with another kind (untagged passes:
    a checkpoint written by someone else's save_pretrained carries no tag)."""
    found = model_kind(path)
    if found is not None and found != kind:
        raise ReproInputError(f"{where or path}: holds a {found!r} model, expected {kind!r}")


def load_model(cls, path: str | os.PathLike, kind: str, weights: str):
    """A model of class `cls` saved by save_model, in float32 and eval mode.

    `weights` is the weights file save_pretrained writes for `cls` (diffusers:
    diffusion_pytorch_model.safetensors, transformers: model.safetensors). A
    missing file or a directory tagged with another kind fails naming `path`.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ReproInputError(f"{path}: not a saved {cls.__name__} (no config.json)")
    if not (path / weights).is_file():
        raise ReproInputError(f"{path}: not a saved {cls.__name__} (no {weights})")
    check_kind(path, kind)
    return from_pretrained(cls, path, str(path), local_files_only=True)


def from_pretrained(cls, source, where: str, **kw):
    """cls.from_pretrained in float32 and eval mode; missing weights are an error, not a warning."""
    try:
        model, info = cls.from_pretrained(
            source, torch_dtype=torch.float32, output_loading_info=True, **kw
        )
    except (OSError, ValueError, RuntimeError, SafetensorError, json.JSONDecodeError) as err:
        raise ReproInputError(f"{where}: cannot load a {cls.__name__} ({err})") from err
    bad = {k: v for k in ("missing_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        raise ReproInputError(f"{where}: checkpoint does not match its config ({bad})")
    return model.eval()


def pretrained_source(params: dict) -> tuple[str, dict, str]:
    """(source, from_pretrained options, description) of params["pretrained"] (+ subfolder)."""
    source, subfolder = params["pretrained"], params.get("subfolder")
    where = f"{source}/{subfolder}" if subfolder else str(source)
    return source, {"subfolder": subfolder, **loader_options(params)}, f"params.pretrained: {where}"


# ----------------------------------------------------------------------------- the DiT


ARCH_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "num_embeds_ada_norm",
)

# ----------------------------------------------------------------------------- base DiT


def build_dit(params: dict) -> DiTTransformer2DModel:
    """A DiT from `params`: loaded from params["pretrained"] or built from ARCH_KEYS.

    Pretrained: a local directory or hub id, optional "subfolder", and the cache
    options of repro.core.hub.loader_options: "cache_dir" (a hub cache, filled by
    the hub_fetch rule) and "local_files_only" (default False; True reads the
    cache only, never the network). Built: no learned sigma (out_channels =
    in_channels); an optional "seed" makes the random init reproducible.
    Returned in eval mode (call .train() to get the model's label dropout).
    """
    if "pretrained" in params:
        source, options, where = pretrained_source(params)
        return from_pretrained(DiTTransformer2DModel, source, where, **options)

    arch = {key: require(params, key) for key in ARCH_KEYS}
    for key, value in arch.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReproInputError(f"params.{key}: expected a positive integer, got {value!r}")
    if arch["sample_size"] % arch["patch_size"]:
        raise ReproInputError(
            f"params.patch_size: {arch['patch_size']} does not divide sample_size {arch['sample_size']}"
        )
    with torch.random.fork_rng(devices=[]):
        if params.get("seed") is not None:
            torch.manual_seed(int(params["seed"]))
        model = DiTTransformer2DModel(
            **arch, out_channels=arch["in_channels"], norm_type="ada_norm_zero"
        )
    return model.eval()


def _label_embedders(model: DiTTransformer2DModel) -> list[nn.Module]:
    # Every adaLN-zero block owns a separate LabelEmbedding (and draws its own dropout mask).
    return [block.norm1.emb.class_embedder for block in model.transformer_blocks]


def null_label(model: DiTTransformer2DModel) -> int:
    """The unconditional class index: diffusers' LabelEmbedding keeps row num_classes for it."""
    emb = _label_embedders(model)[0]
    if emb.embedding_table.num_embeddings != emb.num_classes + 1:
        raise ValueError("null_label: this DiT has no null-class embedding (no CFG training)")
    return emb.num_classes


def set_label_dropout(model: DiTTransformer2DModel, prob: float) -> None:
    """Set the in-model label dropout used in train mode (diffusers default 0.1).

    diffusers drops labels independently in every block (own torch.rand, global
    RNG); a trainer that wants one seeded mask per sample sets 0 here and passes
    p_uncond to repro.core.diffusion.epsilon_loss instead.
    """
    for emb in _label_embedders(model):
        emb.dropout_prob = float(prob)


def save_dit(model: DiTTransformer2DModel, out_dir: str | os.PathLike) -> None:
    """Save a DiT atomically, tagged "dit" (load it with load_dit)."""
    save_model(model, out_dir, DIT_KIND)


def load_dit(path: str | os.PathLike) -> DiTTransformer2DModel:
    """A DiT saved by save_dit (eval mode); ReproInputError naming `path` if it is not one."""
    return load_model(
        DiTTransformer2DModel, path, DIT_KIND, weights="diffusion_pytorch_model.safetensors"
    )

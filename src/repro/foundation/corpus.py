"""What the foundation models are pre-trained on, and the checks their build stages share.

The glyph corpus (rule glyph_corpus: captioned digit glyphs, the tiny stand-in of
web-scale image-text pairs) cut into a training part and a held-out tail, the
generic caption "a glyph of the digit seven" (the prompt DataDream and zero-shot
CLIP use) and the caption mixing of a training batch. Both the text-to-image model
(repro.foundation.t2i) and the CLIP (repro.foundation.clip) train on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from repro.core.errors import ReproInputError


def config_section(name: str, params: dict, key: str, allowed: tuple[str, ...]) -> dict:
    """Sub-mapping foundation.<name>.<key> of a build stage's params, its keys checked
    against `allowed`; lists become tuples (the form diffusers' configs keep)."""
    section = params.get(key) or {}
    if not isinstance(section, dict):
        raise ReproInputError(f"foundation.{name}.{key}: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ReproInputError(
            f"foundation.{name}.{key}: unknown keys {unknown}, allowed {sorted(allowed)}"
        )
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()}


def check_build_params(name: str, params: dict, required: Iterable[str]) -> None:
    """A build stage builds the tiny model only (pretrained: null) and needs `required`."""
    if params.get("pretrained"):
        raise ReproInputError(
            f"foundation.{name}.pretrained: {params['pretrained']!r} is loaded, not built; "
            "this stage builds the tiny model (pretrained: null)"
        )
    for key in required:
        if key not in params:
            raise ReproInputError(f"foundation.{name}.{key}: missing from --params")


GENERIC_TEMPLATE = "a glyph of {name}"


def generic_caption(ch: str) -> str:
    """The caption without font words: "a glyph of the digit seven" (DataDream's prompt)."""
    from repro.core.data import char_name

    return GENERIC_TEMPLATE.format(name=char_name(ch))


@dataclass
class Corpus:
    """The glyph corpus, cut into the part the models train on and the held-out tail."""

    images: Tensor  # training images [N, 1, H, W]
    labels: Tensor  # char index [N]
    captions: list[str]
    heldout_images: Tensor
    heldout_labels: Tensor
    heldout_captions: list[str]
    chars: str

    @property
    def generic(self) -> list[str]:
        """One generic caption per char (index = label)."""
        return [generic_caption(ch) for ch in self.chars]

    def all_texts(self) -> list[str]:
        """Every text the tokenizer must know: the captions and the generic prompts."""
        return sorted(set(self.captions) | set(self.generic))


def load_corpus(path: str | os.PathLike, heldout: int) -> Corpus:
    """The corpus file of rule glyph_corpus (kind "glyphs", with captions): its last
    `heldout` images are held out (render_glyphs shuffles, so they are a random part)."""
    from repro.core.data import load_image_dataset

    data = load_image_dataset(path, kind="glyphs")
    chars = data.meta.get("chars")
    if not data.captions or not isinstance(chars, str):
        raise ReproInputError(f"{path}: a glyph corpus needs captions and meta.chars")
    heldout = int(heldout)
    if not 0 < heldout < len(data.labels):
        raise ReproInputError(
            f"data.corpus.heldout: {heldout} must be in (0, {len(data.labels)}) for {path}"
        )
    cut = len(data.labels) - heldout
    return Corpus(
        images=data.images[:cut],
        labels=data.labels[:cut],
        captions=list(data.captions[:cut]),
        heldout_images=data.images[cut:],
        heldout_labels=data.labels[cut:],
        heldout_captions=list(data.captions[cut:]),
        chars=chars,
    )


def mixed_captions(
    corpus: Corpus,
    idx: Tensor,
    generator: torch.Generator,
    dropout: float,
    generic_fraction: float,
) -> list[str]:
    """The captions of training batch `idx`: "" with probability `dropout` (for CFG),
    the generic caption with probability `generic_fraction`, else the corpus caption."""
    u = torch.rand(len(idx), generator=generator, device=generator.device).tolist()
    generic = corpus.generic
    out = []
    for i, r in zip(idx.tolist(), u, strict=True):
        if r < dropout:
            out.append("")
        elif r < dropout + generic_fraction:
            out.append(generic[int(corpus.labels[i])])
        else:
            out.append(corpus.captions[i])
    return out

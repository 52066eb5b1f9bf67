"""The tiny-scale image data: scikit-learn's bundled 8x8 digits and rendered font glyphs.

Nothing here downloads anything. The digits are the 1,797 real images shipped inside
scikit-learn; the glyphs are drawn from the DejaVu fonts shipped inside matplotlib and
jittered so that they look like the digits (centred, filling the frame, smooth greyscale).
Images are float32 [N, 1, H, W] in [-1, 1] with the ink bright (+1), labels int64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors, sha256_file, write_json

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- digits


def load_digit_splits(
    seed: int, val_fraction: float, test_fraction: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits, split stratified and seeded into train / val / test.

    Images are float32 [N, 1, 8, 8] scaled from 0..16 to [-1, 1]; labels int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ReproInputError(f"params.{key}: must be in (0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ReproInputError(
            f"params.val_fraction + params.test_fraction: must be < 1, got "
            f"{val_fraction} + {test_fraction}"
        )

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))

    # Two stratified cuts: test off the whole set, then val off the rest (as a fraction of the
    # whole set, hence the rescaling).
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=labels[rest],
        random_state=seed,
    )
    out = {}
    for name, idx in zip(SPLITS, (train, val, test), strict=True):
        idx = np.sort(idx)  # a stable order that does not depend on the splitter's internals
        out[name] = (
            torch.from_numpy(images[idx]).unsqueeze(1).contiguous(),
            torch.from_numpy(labels[idx]),
        )
    return out


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of the first `shots` examples of every class after a seeded shuffle.

    The result is in shuffled order (classes interleaved). Raises if a class has fewer
    than `shots` examples.
    """
    labels = torch.as_tensor(labels).long()
    if shots < 1:
        raise ReproInputError(f"params.shots: must be >= 1, got {shots}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    classes, counts = torch.unique(labels, return_counts=True)
    short = classes[counts < shots].tolist()
    if short:
        raise ReproInputError(f"params.shots: {shots} exceeds the examples of classes {short}")
    # Rank of every example within its class, in shuffled order: keep rank < shots.
    shuffled = labels[order]
    onehot = F.one_hot(shuffled, int(labels.max()) + 1)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    return order[rank < shots]


# --------------------------------------------------------------------------- glyphs

# (file stem in matplotlib's mpl-data/fonts/ttf, family word, style word for captions)
FONTS = (
    ("DejaVuSans", "sans-serif", "regular"),
    ("DejaVuSans-Bold", "sans-serif", "bold"),
    ("DejaVuSans-Oblique", "sans-serif", "oblique"),
    ("DejaVuSans-BoldOblique", "sans-serif", "bold oblique"),
    ("DejaVuSerif", "serif", "regular"),
    ("DejaVuSerif-Bold", "serif", "bold"),
    ("DejaVuSerif-Italic", "serif", "italic"),
    ("DejaVuSerif-BoldItalic", "serif", "bold italic"),
    ("DejaVuSansMono", "monospace", "regular"),
    ("DejaVuSansMono-Bold", "monospace", "bold"),
    ("DejaVuSansMono-Oblique", "monospace", "oblique"),
    ("DejaVuSansMono-BoldOblique", "monospace", "bold oblique"),
)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Defaults tuned by eye and by mean ink against the bundled digits (which fill the full
# height and ~6 of 8 columns). rotation/shear in degrees, translate as a fraction of the frame,
# thickness = threshold on the blurred high-res glyph (lower = thicker strokes),
# levels = grey levels after downsampling (the digits have 16: counts of a 4x4 block).
DEFAULT_JITTER = {
    "rotation": 8.0,
    "shear": 8.0,
    "scale": (0.85, 1.0),
    "aspect": (0.7, 1.0),
    "translate": 0.06,
    "thickness": (0.22, 0.5),
    "blur": 0.04,
    "levels": 16,
}

_HIRES = 64  # side of the high-resolution canvas every glyph is rendered on


@dataclass
class GlyphSet:
    images: torch.Tensor  # float32 [n, 1, size, size] in [-1, 1], ink bright
    labels: torch.Tensor  # int64 [n], index of the char in `chars`
    captions: list[str] = field(default_factory=list)
    fonts: list[str] = field(default_factory=list)


def font_dir() -> Path:
    """matplotlib's bundled TTF directory (always present with matplotlib)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def char_name(ch: str) -> str:
    """'the digit seven', 'the letter q', 'the capital letter Q' or 'the character +'."""
    if ch.isdigit() and len(ch) == 1:
        return f"the digit {DIGIT_NAMES[int(ch)]}"
    if ch.isalpha():
        return f"the capital letter {ch}" if ch.isupper() else f"the letter {ch}"
    return f"the character {ch}"


def glyph_caption(ch: str, font_index: int) -> str:
    _, family, style = FONTS[font_index]
    words = family if style == "regular" else f"{style} {family}"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} glyph of {char_name(ch)}"


@lru_cache(maxsize=256)
def _render_hires(font_index: int, ch: str) -> torch.Tensor:
    """One glyph as ink in [0, 1] on a _HIRES^2 canvas, its bounding box centred and scaled
    so that the larger side spans the frame (the digits are size-normalised the same way)."""
    from PIL import Image, ImageDraw, ImageFont

    path = font_dir() / f"{FONTS[font_index][0]}.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: matplotlib's bundled font is missing")
    big = 4 * _HIRES
    font = ImageFont.truetype(str(path), size=big)
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(canvas).text((big // 2, big // 2), ch, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        raise ReproInputError(f"params.chars: {ch!r} renders empty in {path.name}")
    glyph = canvas.crop(box)
    w, h = glyph.size
    scale = _HIRES / max(w, h)
    glyph = glyph.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )
    out = Image.new("L", (_HIRES, _HIRES), 0)
    out.paste(glyph, ((_HIRES - glyph.size[0]) // 2, (_HIRES - glyph.size[1]) // 2))
    return torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with zero padding."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0)), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius)), k.view(1, 1, -1, 1))


def _jitter_batch(base: torch.Tensor, gen: torch.Generator, jit: dict, size: int) -> torch.Tensor:
    """Random affine + stroke thickness on high-res ink [B, 1, S, S] -> [B, 1, size, size] in [0, 1]."""
    b = base.shape[0]
    rot = torch.deg2rad(_uniform(gen, b, -jit["rotation"], jit["rotation"]))
    shear = torch.tan(torch.deg2rad(_uniform(gen, b, -jit["shear"], jit["shear"])))
    scale = _uniform(gen, b, *jit["scale"])
    aspect = _uniform(gen, b, *jit["aspect"])
    # translate is a fraction of the frame; affine_grid coordinates span 2 per frame.
    shift = _uniform(gen, 2 * b, -jit["translate"], jit["translate"]).view(b, 2) * 2.0
    thresh = _uniform(gen, b, *jit["thickness"])

    # Forward map output <- input: A = R @ Sh @ diag(s*a, s/a). affine_grid wants the inverse
    # (it maps output coordinates to input sampling positions).
    cos, sin = torch.cos(rot), torch.sin(rot)
    fwd = torch.zeros(b, 2, 2)
    sx, sy = scale * aspect, scale / aspect
    # R @ [[1, shear], [0, 1]] @ diag(sx, sy)
    fwd[:, 0, 0] = cos * sx
    fwd[:, 0, 1] = (cos * shear - sin) * sy
    fwd[:, 1, 0] = sin * sx
    fwd[:, 1, 1] = (sin * shear + cos) * sy
    inv = torch.linalg.inv(fwd)
    theta = torch.cat([inv, -(inv @ shift.unsqueeze(-1))], dim=2)
    grid = F.affine_grid(theta, list(base.shape), align_corners=False)
    x = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Stroke thickness: blur, then a soft threshold. A low threshold grows the strokes.
    sigma = max(0.5, jit["blur"] * base.shape[-1])
    x = _gaussian_blur(x, sigma)
    x = torch.sigmoid((x - thresh.view(b, 1, 1, 1)) * 12.0)
    x = (x - torch.sigmoid(-thresh.view(b, 1, 1, 1) * 12.0)).clamp_min(0)  # background to 0
    x = x / x.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)

    # Area downsampling = the digits' own construction (ink counts in blocks).
    x = F.interpolate(x, size=(size, size), mode="area")
    x = x / x.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    if jit.get("levels"):
        x = torch.round(x * jit["levels"]) / jit["levels"]
    return x


def render_glyphs(
    n: int,
    seed: int,
    size: int = 8,
    chars: str = "0123456789",
    jitter: dict | None = None,
) -> GlyphSet:
    """`n` jittered glyphs of `chars` in matplotlib's DejaVu fonts, deterministic for `seed`.

    Classes are balanced (n // len(chars), the rest spread over the first chars) and
    shuffled; fonts are drawn uniformly. `jitter` overrides keys of DEFAULT_JITTER.
    """
    if n < 1:
        raise ReproInputError(f"params.n: must be >= 1, got {n}")
    if not chars or len(set(chars)) != len(chars):
        raise ReproInputError(f"params.chars: must be non-empty and unique, got {chars!r}")
    unknown = sorted(set(jitter or {}) - set(DEFAULT_JITTER))
    if unknown:
        raise ReproInputError(
            f"params.jitter: unknown keys {unknown}, allowed {sorted(DEFAULT_JITTER)}"
        )
    jit = {**DEFAULT_JITTER, **(jitter or {})}
    for key in ("scale", "aspect", "thickness"):
        value = jit[key]
        if not (isinstance(value, list | tuple) and len(value) == 2 and value[0] <= value[1]):
            raise ReproInputError(f"params.jitter.{key}: must be a [low, high] pair, got {value!r}")

    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(chars)
    labels = labels[torch.randperm(n, generator=gen)]
    font_ids = torch.randint(len(FONTS), (n,), generator=gen)

    images = torch.empty(n, 1, size, size)
    chunk = 1024  # bounds the [chunk, 1, 64, 64] work tensors
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        base = torch.stack(
            [
                _render_hires(int(f), chars[int(c)])
                for f, c in zip(font_ids[start:stop], labels[start:stop], strict=True)
            ]
        ).unsqueeze(1)
        images[start:stop] = _jitter_batch(base, gen, jit, size)

    captions = [glyph_caption(chars[int(c)], int(f)) for c, f in zip(labels, font_ids, strict=True)]
    fonts = [FONTS[int(f)][0] for f in font_ids]
    return GlyphSet(images * 2.0 - 1.0, labels.long(), captions, fonts)


# --------------------------------------------------------------------------- files


@dataclass
class ImageDataset:
    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str] | None
    meta: dict


def manifest_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def write_image_dataset(
    path: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    meta: dict | None = None,
    captions: list[str] | None = None,
) -> dict:
    """Write images/labels as safetensors (kind-tagged) plus a JSON manifest beside it.

    Returns the manifest (counts, per-class counts, meta and the file's sha256).
    """
    path = Path(path)
    labels = torch.as_tensor(labels).long()
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: images {tuple(images.shape)} do not match labels {tuple(labels.shape)}"
        )
    if captions is not None and len(captions) != len(labels):
        raise ValueError(f"{path}: {len(captions)} captions for {len(labels)} images")
    meta = dict(meta or {})
    meta.setdefault("num_classes", int(labels.max()) + 1 if len(labels) else 0)
    metadata: dict[str, object] = {"meta": meta}
    if captions is not None:
        metadata["captions"] = list(captions)
    save_tensors(path, {"images": images.float(), "labels": labels}, kind, metadata)

    counts = torch.bincount(labels, minlength=meta["num_classes"]).tolist()
    manifest = {
        "file": path.name,
        "kind": kind,
        "sha256": sha256_file(path),
        "count": len(labels),
        "image_shape": list(images.shape[1:]),
        "num_classes": meta["num_classes"],
        "class_counts": {str(c): n for c, n in enumerate(counts)},
        "has_captions": captions is not None,
        "meta": meta,
    }
    write_json(manifest_path(path), manifest)
    return manifest


def load_image_dataset(path: str | os.PathLike, kind: str | None = None) -> ImageDataset:
    """Read and validate a file written by write_image_dataset (errors name the file)."""
    path = Path(path)
    tensors, raw = load_tensors(path, kind=kind, required=("images", "labels"))
    images, labels = tensors["images"], tensors["labels"]
    meta = raw.get("meta") or {}
    if not isinstance(meta, dict):
        raise ReproInputError(f"{path}: metadata 'meta' is not a JSON object")
    if images.dim() != 4 or not images.is_floating_point():
        raise ReproInputError(
            f"{path}: images must be float [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
        raise ReproInputError(
            f"{path}: labels must be int64 [{len(images)}], got {labels.dtype} {tuple(labels.shape)}"
        )
    num_classes = int(meta.get("num_classes", int(labels.max()) + 1 if len(labels) else 0))
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ReproInputError(
            f"{path}: labels outside [0, {num_classes}): min {int(labels.min())}, max {int(labels.max())}"
        )
    if not torch.isfinite(images).all():
        raise ReproInputError(f"{path}: images contain NaN or inf")
    captions = raw.get("captions")
    if captions is not None and (not isinstance(captions, list) or len(captions) != len(labels)):
        raise ReproInputError(f"{path}: captions must be a list of {len(labels)} strings")
    return ImageDataset(images, labels, captions, meta)


# --------------------------------------------------------------------------- CLI


def _write_digits(out_dir: Path, params: dict) -> None:
    from repro.core.cli import require

    seed = int(require(params, "seed"))
    val_fraction = float(require(params, "val_fraction"))
    test_fraction = float(require(params, "test_fraction"))
    splits = load_digit_splits(seed, val_fraction, test_fraction)
    manifests = {}
    for name, (images, labels) in splits.items():
        meta = {
            "source": "sklearn.datasets.load_digits",
            "split": name,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "num_classes": 10,
        }
        manifests[name] = write_image_dataset(
            out_dir / f"{name}.safetensors", images, labels, "digits", meta
        )
    write_json(out_dir / "manifest.json", {"kind": "digits", "splits": manifests})


def _write_glyphs(out: Path, params: dict) -> None:
    from repro.core.cli import require

    n = int(require(params, "n"))
    seed = int(require(params, "seed"))
    size = int(params.get("size", 8))
    chars = str(params.get("chars", "0123456789"))
    jitter = params.get("jitter")
    glyphs = render_glyphs(n, seed, size=size, chars=chars, jitter=jitter)
    meta = {
        "source": "matplotlib DejaVu fonts",
        "n": n,
        "seed": seed,
        "size": size,
        "chars": chars,
        "jitter": {**DEFAULT_JITTER, **(jitter or {})},
        "num_classes": len(chars),
        "fonts": [f[0] for f in FONTS],
    }
    write_image_dataset(out, glyphs.images, glyphs.labels, "glyphs", meta, glyphs.captions)


def main(argv: list[str] | None = None) -> None:
    from repro.core.stage import Stage

    stage = Stage("Write the tiny-scale image datasets (digits splits or glyphs).", paper="core")
    parser = stage.parser
    parser.prog = "repro.core.data"
    parser.add_argument("dataset", choices=("digits", "glyphs"))
    parser.add_argument("--out-dir", type=Path, help="digits: directory for the three splits")
    parser.add_argument("--out", type=Path, help="glyphs: the .safetensors file to write")
    args = stage.start(argv)
    if args.dataset == "digits":
        if args.out_dir is None:
            parser.error("digits needs --out-dir")
        _write_digits(args.out_dir, stage.params)
    else:
        if args.out is None:
            parser.error("glyphs needs --out")
        _write_glyphs(args.out, stage.params)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

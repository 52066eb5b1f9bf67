"""The image data sets: scikit-learn's bundled 8x8 digits and rendered font glyphs (tiny
scale), and ImageFolder trees read from disk (the papers' data sets at paper scale).

Nothing here downloads anything. The digits are the 1,797 real images shipped inside
scikit-learn; the glyphs are drawn from the DejaVu fonts shipped inside matplotlib and
jittered so that they look like the digits (centred, filling the frame, smooth greyscale).
Images are float32 [N, C, H, W] in [-1, 1] (digits and glyphs: C = 1, the ink bright
(+1)), labels int64. An ImageFolder tree `root/<class>/<image>` (or `root/train/<class>/...`
and `root/test/<class>/...`) becomes the same three split files as the digits.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, read_metadata, save_tensors, sha256_file, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The kinds of labelled train / val / test splits a classification stage may read: the
# bundled digits (tiny scale) and ImageFolder trees (paper scale), both with meta num_classes.
CLASSIFICATION_KINDS = ("digits", "imagefolder")


def _check_fractions(val_fraction: float | None, test_fraction: float | None) -> None:
    """Each given fraction in (0, 1), and their sum below 1 (None: not used)."""
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if frac is not None and not 0.0 < frac < 1.0:
            raise ReproInputError(f"params.{key}: must be in (0, 1), got {frac}")
    if (
        val_fraction is not None
        and test_fraction is not None
        and val_fraction + test_fraction >= 1.0
    ):
        raise ReproInputError(
            f"params.val_fraction + params.test_fraction: must be < 1, got "
            f"{val_fraction} + {test_fraction}"
        )


def stratified_split(
    labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, val, test) indices of `labels`, two seeded stratified cuts: test off
    the whole set, then val off the rest (both fractions of the whole set)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=labels[rest],
        random_state=seed,
    )
    # A stable order that does not depend on the splitter's internals.
    return np.sort(train), np.sort(val), np.sort(test)


# --------------------------------------------------------------------------- digits


def load_digit_splits(
    seed: int, val_fraction: float, test_fraction: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits, split stratified and seeded into train / val / test.

    Images are float32 [N, 1, 8, 8] scaled from 0..16 to [-1, 1]; labels int64.
    """
    from sklearn.datasets import load_digits

    _check_fractions(val_fraction, test_fraction)
    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    labels = digits.target.astype(np.int64)
    out = {}
    for name, idx in zip(
        SPLITS, stratified_split(labels, seed, val_fraction, test_fraction), strict=True
    ):
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


def load_image_dataset(
    path: str | os.PathLike, kind: str | tuple[str, ...] | None = None
) -> ImageDataset:
    """Read and validate a file written by write_image_dataset (errors name the file).

    `kind`: the one kind the file must be, or a tuple of the kinds allowed (such as
    CLASSIFICATION_KINDS); None accepts any kind.
    """
    path = Path(path)
    if isinstance(kind, tuple | list | frozenset | set):
        allowed = tuple(kind)
        found = read_metadata(path).get("repro_kind", "no repro kind")
        if found not in allowed:
            raise ReproInputError(
                f"{path}: expected a file of kind {' or '.join(repr(k) for k in allowed)}, "
                f"found {found!r}"
            )
        kind = found
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


# --------------------------------------------------------------------------- ImageFolder trees

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
# The keys of `python -m repro.core.data imagefolder --params` (root, size, channels, seed
# required; the fractions as the layout needs them; classnames, max_per_class optional).
IMAGEFOLDER_PARAMS = (
    "root",
    "size",
    "channels",
    "seed",
    "val_fraction",
    "test_fraction",
    "classnames",
    "max_per_class",
)
_GIVEN = ("train", "test")  # root/train and root/test: the data set's own split (root/val optional)
# Where the splits came from (meta split_origin).
ORIGIN_TREE = "one tree: test, then val cut off (stratified, seeded)"
ORIGIN_TRAIN_TEST = "given: train/ and test/; val cut from train/ (stratified, seeded)"
ORIGIN_TRAIN_VAL_TEST = "given: train/, val/ and test/"


def _visible(path: Path, under: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(under).parts)


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise ReproInputError(f"params.root: {root} is not a directory")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ReproInputError(
            f"params.root: {root} holds no class folders (expected root/<class>/<image> or "
            "root/train/<class>/<image> and root/test/<class>/<image>)"
        )
    return names


def list_image_folder(
    root: str | os.PathLike, classnames: list[str] | None = None, key: str = "params.classnames"
) -> tuple[list[str], list[Path], np.ndarray]:
    """(classnames, image files, labels) of an ImageFolder tree root/<class>/<image>.

    Classes are the sorted names of root's sub-folders, or `classnames` in that order,
    which must name exactly those folders (else an error naming `key`). A class folder's
    images are its files (any depth, hidden ones skipped) with an extension of
    IMAGE_EXTENSIONS, sorted; other files are ignored, but a class folder without an
    image is an error naming it. Nothing is decoded here.
    """
    root = Path(root)
    found = _class_folders(root)
    if classnames is None:
        names = found
    else:
        if (
            not isinstance(classnames, list)
            or not all(isinstance(c, str) and c for c in classnames)
            or len(set(classnames)) != len(classnames)
        ):
            raise ReproInputError(
                f"{key}: must be null or a list of unique folder names, got {classnames!r}"
            )
        missing = sorted(set(classnames) - set(found))
        extra = sorted(set(found) - set(classnames))
        if missing or extra:
            raise ReproInputError(
                f"{key}: the class folders of {root} do not match: no folder for {missing}, "
                f"folders not listed {extra}"
            )
        names = list(classnames)
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        folder = root / name
        entries = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, folder))
        images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            if entries:
                others = sorted({p.suffix.lower() or p.name for p in entries})[:10]
                raise ReproInputError(
                    f"{folder}: no image file in this class folder (extensions "
                    f"{', '.join(IMAGE_EXTENSIONS)}), only {others}"
                )
            raise ReproInputError(f"{folder}: empty class folder")
        if len(images) < len(entries):
            log.warning(
                "%s: %d files without an image extension ignored",
                folder,
                len(entries) - len(images),
            )
        files += images
        labels += [label] * len(images)
    return names, files, np.asarray(labels, dtype=np.int64)


def read_image(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """One image file as float32 [channels, size, size] in [-1, 1]: converted to L (1) or
    RGB (3), centre-cropped to a square, resized with PIL's antialiased bicubic filter."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            # Crop first: resize(box=...) would let the filter read pixels beyond the box.
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ReproInputError(f"{path}: not a readable image ({err})") from err
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return pixels / 127.5 - 1.0


def read_images(files: list[Path], size: int, channels: int, desc: str = "images") -> torch.Tensor:
    """The files as one float32 [N, channels, size, size] tensor, filled in place (no copy
    of the whole set is ever held twice, no image at its original size beyond one)."""
    from tqdm.auto import tqdm

    out = torch.empty(len(files), channels, size, size, dtype=torch.float32)
    for i, path in enumerate(tqdm(files, desc=desc, unit="img", disable=None)):
        out[i] = torch.from_numpy(read_image(path, size, channels))
    return out


def _cap_per_class(
    idx: np.ndarray, labels: np.ndarray, cap: int | None, seed: list[int]
) -> np.ndarray:
    """At most `cap` indices of each class (a seeded draw), sorted; all when cap is None."""
    if cap is None:
        return np.sort(idx)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        keep.append(members if len(members) <= cap else rng.choice(members, cap, replace=False))
    return np.sort(np.concatenate(keep))


def _split_error(err: ValueError, where: Path, keys: str) -> ReproInputError:
    return ReproInputError(f"{keys}: cannot cut a stratified split of {where} ({err})")


def image_folder_splits(
    root: str | os.PathLike,
    seed: int,
    val_fraction: float | None,
    test_fraction: float | None,
    classnames: list[str] | None = None,
    max_per_class: int | None = None,
) -> tuple[list[str], dict[str, tuple[list[Path], np.ndarray]], str]:
    """(classnames, {split: (files, labels)}, split origin) of an ImageFolder data set.

    With root/train and root/test, those are the train and test splits (and root/val the
    validation split if it exists, else val_fraction of train/ is cut off, stratified and
    seeded); otherwise root is one tree, cut into test (test_fraction) and val
    (val_fraction) stratified and seeded, as the digits are. Every split holds the same
    classes. `max_per_class` keeps at most that many images of a class in each split (a
    seeded draw; for trees too large to hold in memory). Nothing is decoded here.
    """
    root = Path(root)
    if max_per_class is not None and (
        isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1
    ):
        raise ReproInputError(
            f"params.max_per_class: must be null or an integer >= 1, got {max_per_class!r}"
        )
    given = [name for name in _GIVEN if (root / name).is_dir()]
    if given and len(given) < len(_GIVEN):
        missing = [name for name in _GIVEN if name not in given]
        raise ReproInputError(
            f"params.root: {root} holds {given[0]}/ but no {missing[0]}/ (a data set with its "
            "own split needs train/ and test/; a single tree has no folder of those names)"
        )
    # split -> (files, labels, indices into them)
    splits: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = {}
    if given:
        names, train_files, train_labels = list_image_folder(root / "train", classnames)
        same = f"the classes of {root / 'train'}"
        if (root / "val").is_dir():
            _, val_files, val_labels = list_image_folder(root / "val", names, same)
            train = np.arange(len(train_labels))
            val = None
            origin = ORIGIN_TRAIN_VAL_TEST
        else:
            _check_fractions(require_fraction(val_fraction, "val_fraction"), None)
            from sklearn.model_selection import train_test_split

            try:
                train, val = train_test_split(
                    np.arange(len(train_labels)),
                    test_size=val_fraction,
                    stratify=train_labels,
                    random_state=seed,
                )
            except ValueError as err:
                raise _split_error(err, root / "train", "params.val_fraction") from err
            origin = ORIGIN_TRAIN_TEST
        _, test_files, test_labels = list_image_folder(root / "test", names, same)
        splits["train"] = (train_files, train_labels, train)
        if val is None:
            splits["val"] = (val_files, val_labels, np.arange(len(val_labels)))
        else:
            splits["val"] = (train_files, train_labels, val)
        splits["test"] = (test_files, test_labels, np.arange(len(test_labels)))
    else:
        _check_fractions(
            require_fraction(val_fraction, "val_fraction"),
            require_fraction(test_fraction, "test_fraction"),
        )
        names, files, labels = list_image_folder(root, classnames)
        try:
            parts = stratified_split(labels, seed, val_fraction, test_fraction)
        except ValueError as err:
            raise _split_error(err, root, "params.val_fraction / params.test_fraction") from err
        origin = ORIGIN_TREE
        for name, idx in zip(SPLITS, parts, strict=True):
            splits[name] = (files, labels, idx)
    out = {}
    for i, name in enumerate(SPLITS):
        files, labels, idx = splits[name]
        idx = _cap_per_class(np.asarray(idx), labels, max_per_class, [seed, i])
        out[name] = ([files[j] for j in idx], labels[idx])
    return names, out, origin


def require_fraction(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReproInputError(f"params.{key}: must be a number in (0, 1), got {value!r}")
    return float(value)


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


def _write_imagefolder(out_dir: Path, params: dict) -> None:
    """The three splits of an ImageFolder tree, checked whole before anything is decoded,
    decoded one split at a time, moved into out_dir only once all three are written."""
    from repro.core.cli import require

    unknown = sorted(set(params) - set(IMAGEFOLDER_PARAMS))
    if unknown:
        raise ReproInputError(f"params: unknown keys {unknown}, allowed {list(IMAGEFOLDER_PARAMS)}")
    root = Path(str(require(params, "root")))
    size, channels, seed = (require(params, k) for k in ("size", "channels", "seed"))
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ReproInputError(f"params.size: must be an integer >= 1, got {size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ReproInputError(
            f"params.channels: must be 1 (greyscale) or 3 (RGB), got {channels!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReproInputError(f"params.seed: must be an integer, got {seed!r}")
    val_fraction = params.get("val_fraction")
    test_fraction = params.get("test_fraction")
    max_per_class = params.get("max_per_class")
    classnames, splits, origin = image_folder_splits(
        root, seed, val_fraction, test_fraction, params.get("classnames"), max_per_class
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".imagefolder.", dir=out_dir))
    try:
        manifests = {}
        for name, (files, labels) in splits.items():
            images = read_images(files, size, channels, desc=f"{root} {name}")
            meta = {
                "source": "imagefolder",
                "root": str(root),
                "split": name,
                "split_origin": origin,
                "classnames": classnames,
                "num_classes": len(classnames),
                "size": size,
                "channels": channels,
                "seed": seed,
                # The fractions the split used (None: the data set gave that split).
                "val_fraction": None if origin == ORIGIN_TRAIN_VAL_TEST else val_fraction,
                "test_fraction": test_fraction if origin == ORIGIN_TREE else None,
                "max_per_class": max_per_class,
            }
            manifests[name] = write_image_dataset(
                staging / f"{name}.safetensors",
                images,
                torch.from_numpy(labels),
                "imagefolder",
                meta,
            )
            del images
            log.info("%s: %d images of %d classes", name, len(labels), len(classnames))
        for name in splits:
            for suffix in (".safetensors", ".json"):
                os.replace(staging / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(
        out_dir / "manifest.json",
        {"kind": "imagefolder", "root": str(root), "classnames": classnames, "splits": manifests},
    )


def main(argv: list[str] | None = None) -> None:
    from repro.core.stage import Stage

    stage = Stage(
        "Write the image datasets: digits splits, glyphs, or the splits of an ImageFolder tree.",
        paper="core",
    )
    parser = stage.parser
    parser.prog = "repro.core.data"
    parser.add_argument("dataset", choices=("digits", "glyphs", "imagefolder"))
    parser.add_argument(
        "--out-dir", type=Path, help="digits, imagefolder: directory for the three splits"
    )
    parser.add_argument("--out", type=Path, help="glyphs: the .safetensors file to write")
    args = stage.start(argv)
    if args.dataset in ("digits", "imagefolder"):
        if args.out_dir is None:
            parser.error(f"{args.dataset} needs --out-dir")
        write = _write_digits if args.dataset == "digits" else _write_imagefolder
        write(args.out_dir, stage.params)
    else:
        if args.out is None:
            parser.error("glyphs needs --out")
        _write_glyphs(args.out, stage.params)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

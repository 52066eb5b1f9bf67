"""Real talking-head clips on disk -> the talking-faces splits (rule faces, `data.faces.root`).

At paper scale HuMo (and SLA's quality experiment) can read real clips instead of drawing
procedural ones: with `data.faces.root` set to a directory, the `faces` stage reads it and
writes the same data/faces/{train,val,test}.safetensors + manifest.json as the generator
(`repro.foundation.faces.write_faces`), so every later stage runs unchanged. `frames`,
`size`, `fps` and `sample_rate` still say what to produce; `seed`, `identities` and
`clips_per_identity` are not used (the clips and their identities are the tree's).

Layout (frames and audio extracted beforehand, as HuMo's own data preparation does, e.g.
`ffmpeg -i clip.mp4 frames/%04d.png` and `ffmpeg -i clip.mp4 -ac 1 -c:a pcm_s16le
audio.wav`; nothing here decodes video):

    ROOT/{train,val,test}/<clip>/frames/*.png    the video frames in name order (zero-pad the
                                                 numbers; .jpg / .jpeg too), any size, all of
                                                 one size: centre-cropped to a square, resized
                                                 to `size` (bilinear, antialiased)
    ROOT/{train,val,test}/<clip>/audio.wav       PCM WAV (stdlib `wave`: plain PCM, not
                                                 WAVE_FORMAT_EXTENSIBLE), mono or several
                                                 channels (averaged), 8 / 16 / 24 / 32-bit
                                                 integers, any rate (resampled)
    ROOT/{train,val,test}/<clip>/reference.png   the reference portrait (cropped and resized
                                                 like a frame)
    ROOT/{train,val,test}/<clip>/masks/*.png     one per source frame (same count, same size
                                                 as the frames), nonzero = face; binarised,
                                                 cropped like the frames, resized nearest
    ROOT/{train,val,test}/<clip>/clip.json       {"caption": str, "identity": str, "fps": number,
                                                  optional "motion": str, "background": str,
                                                  optional "mouth_open": [one per source
                                                  frame, 0..1]}

- Time: output frame k is source frame round(k * src_fps / fps) (halves rounded up, computed
  exactly from the fps as written); a clip without that many frames is an error naming the
  clip and both counts. The audio is the first frames / fps seconds of audio.wav, resampled
  to `sample_rate` (`repro.foundation.faces.resample`, the FFT resampler Whisper's input
  also goes through) and cut to exactly frames * sample_rate / fps samples.
- envelope: `frame_envelope` of that audio, the quantity the generator's mouth follows and
  the sync judge reads. mouth_open: clip.json's annotation sampled like the frames, else
  `mouth_from_envelope(envelope)` (logged as a warning: that mapping assumes speech at the
  generator's level, VOICE_LEVEL RMS at full loudness); the manifest says which
  (`mouth_open_source`: "annotation" | "envelope" | "mixed", per split).
- identity: the strings become int64 ids split by split (train's sorted names first, then
  val's, then test's), so each split holds one contiguous range as the generator's do; an
  identity in two splits is an error naming a clip of each (HuMo tests on unseen people).
- motion / background: the classes are the sorted labels over all splits (`Faces.motions` /
  `backgrounds` carry the names; the HuMo judges learn these); a clip without a label has
  class "unknown", then one of the classes.
- Every split needs at least one clip; hidden entries (".name") are skipped. The whole tree
  is checked (listing, clip.json, frame / mask counts, WAV headers) before any pixel is
  decoded; every missing, unreadable or inconsistent file is a ReproInputError naming it.
  The three files are written into a staging folder and moved into place together.

SLA's clips (rule sla_faces: data.faces with sla.quality.faces on top) read the same root,
at SLA's own size and frame count. A relative root is read from the directory the stage runs
in (Snakemake's working directory). Like rule imagefolder's tree, the root is no input of
the rule: a new root re-runs it (its params change), edits inside the tree do not.

    python -m repro.foundation.faces --out-dir data/faces --params '{"root": "/data/talking",
        "frames": 33, "size": 256, "fps": 25, "sample_rate": 16000}'
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproInputError
from repro.core.io import write_json
from repro.foundation.faces import (
    KIND,
    SPLITS,
    Faces,
    frame_envelope,
    mouth_from_envelope,
    resample,
    write_faces,
)

log = logging.getLogger(__name__)

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
MASK_EXTENSIONS = (".png",)
UNKNOWN = "unknown"  # the class of a clip without a motion / background label
CLIP_KEYS = ("caption", "identity", "fps")  # required in clip.json
OPTIONAL_KEYS = ("motion", "background", "mouth_open")
SAMPLE_WIDTHS = (1, 2, 3, 4)  # bytes per WAV sample: 8-bit unsigned, 16/24/32-bit signed


# --------------------------------------------------------------------------- files


@dataclass
class WavInfo:
    channels: int
    sample_width: int
    rate: int
    samples: int  # per channel, as the header says


def wav_info(path: str | os.PathLike) -> WavInfo:
    """The header of a PCM WAV file; an unreadable or non-PCM file is an error naming it."""
    try:
        with wave.open(str(path), "rb") as w:
            info = WavInfo(w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
    except FileNotFoundError as err:
        raise ReproInputError(f"{path}: file not found") from err
    except (wave.Error, EOFError, OSError) as err:
        raise ReproInputError(
            f"{path}: not a readable PCM WAV file ({err}); convert it with e.g. "
            "`ffmpeg -i clip.mp4 -ac 1 -c:a pcm_s16le audio.wav`"
        ) from err
    if info.sample_width not in SAMPLE_WIDTHS:
        raise ReproInputError(
            f"{path}: {8 * info.sample_width}-bit samples, expected 8, 16, 24 or 32-bit PCM"
        )
    if info.channels < 1 or info.rate < 1:
        raise ReproInputError(f"{path}: {info.channels} channels at {info.rate} Hz")
    return info


def read_wav(path: str | os.PathLike, samples: int | None = None) -> tuple[Tensor, int]:
    """(mono float32 [S], rate) of a PCM WAV file: its first `samples` samples (all: None),
    channels averaged, integers scaled to [-1, 1) (8-bit: (x - 128) / 128, n-bit signed:
    x / 2^(n-1)). A file shorter than its header says (truncated) is an error naming it."""
    info = wav_info(path)
    want = info.samples if samples is None else int(samples)
    if want > info.samples:
        raise ReproInputError(f"{path}: {info.samples} samples, {want} needed")
    try:
        with wave.open(str(path), "rb") as w:
            raw = w.readframes(want)
    except (wave.Error, EOFError, OSError) as err:
        raise ReproInputError(f"{path}: cannot read the samples ({err})") from err
    width, channels = info.sample_width, info.channels
    if len(raw) < want * width * channels:
        raise ReproInputError(
            f"{path}: truncated, {len(raw) // (width * channels)} samples where the header "
            f"says {info.samples}"
        )
    if width == 1:
        values = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        values = ints.astype(np.float64) / float(1 << 23)
    else:
        dtype = {2: "<i2", 4: "<i4"}[width]
        values = np.frombuffer(raw, dtype=dtype).astype(np.float64) / float(1 << (8 * width - 1))
    mono = values.reshape(want, channels).mean(axis=1)
    return torch.from_numpy(mono.astype(np.float32)), info.rate


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except FileNotFoundError as err:
        raise ReproInputError(f"{path}: file not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ReproInputError(f"{path}: not a readable image ({err})") from err


def _square(pixels: np.ndarray) -> np.ndarray:
    """The centred square of an [H, W, ...] array (the larger side's excess split, the
    smaller half before)."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return pixels[top : top + side, left : left + side]


def read_frame(path: str | os.PathLike, size: int) -> tuple[Tensor, tuple[int, int]]:
    """(uint8 [3, size, size], (width, height) of the file) of an image: RGB, centre-cropped
    to a square, resized bilinearly with antialiasing (an area-like average when shrinking),
    rounded."""
    img = _open_rgb(Path(path))
    pixels = _square(np.asarray(img, dtype=np.float32))
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x[0].clamp(0, 255).round().to(torch.uint8), img.size


def read_mask(path: str | os.PathLike, size: int) -> tuple[Tensor, tuple[int, int]]:
    """(uint8 0/1 [size, size], (width, height) of the file) of a mask image: nonzero in
    any colour channel (alpha ignored) = 1, centre-cropped like a frame, resized with the
    nearest pixel (pixel centres, "nearest-exact")."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("1", "L", "I", "I;16", "F"):
                values = np.asarray(img)
            else:
                values = np.asarray(img.convert("RGB"))
            file_size = img.size
    except FileNotFoundError as err:
        raise ReproInputError(f"{path}: file not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ReproInputError(f"{path}: not a readable image ({err})") from err
    binary = values != 0
    if binary.ndim == 3:
        binary = binary.any(axis=2)
    binary = _square(binary)
    x = torch.from_numpy(np.ascontiguousarray(binary)).float()[None, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="nearest-exact")
    return (x[0, 0] > 0.5).to(torch.uint8), file_size


def frame_indices(frames: int, src_fps: Fraction | float, fps: int) -> list[int]:
    """The source frame of each output frame k: round(k * src_fps / fps), halves up, exact."""
    ratio = Fraction(src_fps) / int(fps)
    return [math.floor(k * ratio + Fraction(1, 2)) for k in range(int(frames))]


def audio_samples_needed(frames: int, fps: int, rate: int) -> int:
    """Samples at `rate` that cover `frames` frames at `fps` (rounded up)."""
    return -(-int(frames) * int(rate) // int(fps))


def _check_audio_length(path, info: WavInfo, frames: int, fps: int) -> int:
    """The samples at the file's rate that `frames` frames at `fps` need; fewer: an error."""
    need = audio_samples_needed(frames, fps, info.rate)
    if info.samples < need:
        raise ReproInputError(
            f"{path}: {info.samples} samples at {info.rate} Hz ({info.samples / info.rate:.3f} s), "
            f"shorter than the {frames} frames at {fps} fps ({frames / fps:.3f} s, {need} samples)"
        )
    return need


def read_audio(path: str | os.PathLike, frames: int, fps: int, sample_rate: int) -> Tensor:
    """The first frames / fps seconds of a WAV file at `sample_rate`: float32
    [frames * sample_rate // fps]; a file too short is an error naming it."""
    need = _check_audio_length(path, wav_info(path), frames, fps)
    audio, rate = read_wav(path, need)
    target = int(frames) * (int(sample_rate) // int(fps))
    out = resample(audio.unsqueeze(0), rate, int(sample_rate))[0]
    return out[:target].contiguous()


# --------------------------------------------------------------------------- the tree


@dataclass
class Clip:
    """One clip directory, checked but not decoded."""

    dir: Path
    split: str
    caption: str
    identity: str
    fps: Fraction
    motion: str | None
    background: str | None
    mouth_open: list[float] | None  # per source frame
    frames: list[Path]
    masks: list[Path]
    indices: list[int]  # the source frame of each output frame

    @property
    def name(self) -> str:
        return f"{self.split}/{self.dir.name}"


@dataclass
class Tree:
    """A checked clip tree: the clips of each split, and the labels' class lists."""

    root: Path
    clips: dict[str, list[Clip]]
    identities: dict[str, int]  # identity name -> id
    motions: tuple[str, ...]
    backgrounds: tuple[str, ...]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        raise ReproInputError(f"{folder}: missing (a folder of {'/'.join(extensions)} files)")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and _visible(p) and p.suffix.lower() in extensions
    )
    if not files:
        raise ReproInputError(f"{folder}: no {'/'.join(extensions)} file in it")
    return files


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_clip_json(path: Path) -> dict:
    """clip.json, checked: caption, identity (non-empty strings), fps (> 0) required;
    motion / background strings or null; mouth_open a list of numbers in [0, 1] or null."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ReproInputError(f"{path}: file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ReproInputError(f"{path}: cannot read ({err})") from err
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReproInputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ReproInputError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    for key in CLIP_KEYS:
        if key not in meta:
            raise ReproInputError(f"{path}: missing key {key!r} (required: {list(CLIP_KEYS)})")
    for key in ("caption", "identity"):
        if not isinstance(meta[key], str) or not meta[key].strip():
            raise ReproInputError(f"{path}: {key!r} must be a non-empty string, got {meta[key]!r}")
    if not _number(meta["fps"]) or meta["fps"] <= 0:
        raise ReproInputError(f"{path}: 'fps' must be a number > 0, got {meta['fps']!r}")
    for key in ("motion", "background"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ReproInputError(
                f"{path}: {key!r} must be a non-empty string or null, got {value!r}"
            )
    mouth = meta.get("mouth_open")
    if mouth is not None and (
        not isinstance(mouth, list) or not all(_number(v) and 0 <= v <= 1 for v in mouth)
    ):
        raise ReproInputError(
            f"{path}: 'mouth_open' must be a list of numbers in [0, 1] (one per source frame)"
        )
    return meta


def _exact_fps(value) -> Fraction:
    # The decimal as written ("29.97" -> 2997/100), not the float's binary expansion.
    return Fraction(value) if isinstance(value, int) else Fraction(repr(float(value)))


def _scan_clip(folder: Path, split: str, frames: int, fps: int) -> tuple[Clip, list[str]]:
    meta = read_clip_json(folder / "clip.json")
    unknown = sorted(set(meta) - set(CLIP_KEYS) - set(OPTIONAL_KEYS))
    src = _images(folder / "frames", FRAME_EXTENSIONS)
    masks = _images(folder / "masks", MASK_EXTENSIONS)
    if len(masks) != len(src):
        raise ReproInputError(
            f"{folder / 'masks'}: {len(masks)} masks for the {len(src)} frames of "
            f"{folder / 'frames'} (one mask per source frame)"
        )
    src_fps = _exact_fps(meta["fps"])
    indices = frame_indices(frames, src_fps, fps)
    if indices[-1] >= len(src):
        raise ReproInputError(
            f"{folder}: {len(src)} frames at {float(src_fps):g} fps, but {frames} frames at "
            f"{fps} fps need {indices[-1] + 1} (source frame {indices[-1]})"
        )
    mouth = meta.get("mouth_open")
    if mouth is not None and len(mouth) != len(src):
        raise ReproInputError(
            f"{folder / 'clip.json'}: 'mouth_open' has {len(mouth)} values for the "
            f"{len(src)} frames of {folder / 'frames'}"
        )
    for name in ("reference.png", "audio.wav"):
        if not (folder / name).is_file():
            raise ReproInputError(f"{folder / name}: file not found")
    _check_audio_length(folder / "audio.wav", wav_info(folder / "audio.wav"), frames, fps)
    clip = Clip(
        dir=folder,
        split=split,
        caption=meta["caption"].strip(),
        identity=meta["identity"].strip(),
        fps=src_fps,
        motion=(meta.get("motion") or "").strip() or None,
        background=(meta.get("background") or "").strip() or None,
        mouth_open=[float(v) for v in mouth] if mouth is not None else None,
        frames=src,
        masks=masks,
        indices=indices,
    )
    return clip, unknown


def _classes(labels: Sequence[str | None]) -> tuple[str, ...]:
    names = {label if label is not None else UNKNOWN for label in labels}
    return tuple(sorted(names))


def scan_tree(root: str | os.PathLike, *, frames: int, fps: int) -> Tree:
    """Check a clip tree whole, decoding nothing: every split's clips (sorted by folder
    name), their clip.json, frame / mask counts, audio length; the identity ids (split by
    split, sorted names) and the motion / background classes."""
    root = Path(root)
    if not root.is_dir():
        raise ReproInputError(f"params.root: {root} is not a directory")
    clips: dict[str, list[Clip]] = {}
    unknown_keys: dict[str, int] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise ReproInputError(
                f"{folder}: missing (expected ROOT/{{train,val,test}}/<clip>/ folders)"
            )
        dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))
        if not dirs:
            raise ReproInputError(f"{folder}: empty split, no clip folder in it")
        others = [p for p in folder.iterdir() if not p.is_dir() and _visible(p)]
        if others:
            log.warning("%s: %d files beside the clip folders ignored", folder, len(others))
        clips[split] = []
        for d in dirs:
            clip, unknown = _scan_clip(d, split, frames, fps)
            clips[split].append(clip)
            for key in unknown:
                unknown_keys[key] = unknown_keys.get(key, 0) + 1
    if unknown_keys:
        log.warning("clip.json keys not used (clips): %s", unknown_keys)

    seen: dict[str, Clip] = {}  # identity -> its first clip
    for split in SPLITS:
        for clip in clips[split]:
            first = seen.setdefault(clip.identity, clip)
            if first.split != split:
                raise ReproInputError(
                    f"identity {clip.identity!r} is in two splits: {first.dir / 'clip.json'} "
                    f"({first.split}) and {clip.dir / 'clip.json'} ({split}); the splits must "
                    "hold disjoint identities"
                )
    identities: dict[str, int] = {}
    for split in SPLITS:
        for name in sorted({clip.identity for clip in clips[split]}):
            identities[name] = len(identities)
    everything = [clip for split in SPLITS for clip in clips[split]]
    return Tree(
        root=root,
        clips=clips,
        identities=identities,
        motions=_classes([c.motion for c in everything]),
        backgrounds=_classes([c.background for c in everything]),
    )


def read_split(
    tree: Tree,
    split: str,
    *,
    frames: int,
    size: int,
    fps: int,
    sample_rate: int,
    seed: int = 0,
) -> tuple[Faces, int]:
    """(Faces, clips whose mouth_open is annotated) of one split of a scanned tree, filled
    clip by clip into preallocated tensors."""
    from tqdm.auto import tqdm

    clips = tree.clips[split]
    n, spf = len(clips), sample_rate // fps
    video = torch.empty(n, 3, frames, size, size, dtype=torch.uint8)
    reference = torch.empty(n, 3, size, size, dtype=torch.uint8)
    mask = torch.empty(n, frames, size, size, dtype=torch.uint8)
    audio = torch.empty(n, frames * spf, dtype=torch.float32)
    annotated = torch.zeros(n, dtype=torch.bool)
    mouth_open = torch.zeros(n, frames, dtype=torch.float32)
    for i, clip in enumerate(tqdm(clips, desc=f"{tree.root} {split}", unit="clip", disable=None)):
        frame_size = None
        for k, j in enumerate(clip.indices):
            video[i, :, k], got = read_frame(clip.frames[j], size)
            frame_size = frame_size or got
            if got != frame_size:
                raise ReproInputError(
                    f"{clip.frames[j]}: {got[0]}x{got[1]} pixels, the clip's frame "
                    f"{clip.frames[clip.indices[0]].name} is {frame_size[0]}x{frame_size[1]}"
                )
            mask[i, k], got = read_mask(clip.masks[j], size)
            if got != frame_size:
                raise ReproInputError(
                    f"{clip.masks[j]}: {got[0]}x{got[1]} pixels, its frame {clip.frames[j]} is "
                    f"{frame_size[0]}x{frame_size[1]}"
                )
        reference[i], _ = read_frame(clip.dir / "reference.png", size)
        audio[i] = read_audio(clip.dir / "audio.wav", frames, fps, sample_rate)
        if clip.mouth_open is not None:
            mouth_open[i] = torch.tensor([clip.mouth_open[j] for j in clip.indices])
            annotated[i] = True
    envelope = frame_envelope(audio, spf)
    derived = ~annotated
    if derived.any():
        mouth_open[derived] = mouth_from_envelope(envelope[derived]).float()
        names = [clips[i].name for i in torch.nonzero(derived).view(-1)[:3].tolist()]
        log.warning(
            "%s: mouth_open of %d of %d clips derived from the audio envelope (no annotation "
            "in clip.json), e.g. %s",
            split,
            int(derived.sum()),
            n,
            ", ".join(names),
        )

    def labels(values: Sequence[str | None], classes: tuple[str, ...]) -> Tensor:
        return torch.tensor([classes.index(v or UNKNOWN) for v in values], dtype=torch.long)

    faces = Faces(
        video=video,
        reference=reference,
        mask=mask,
        mouth_open=mouth_open,
        envelope=envelope.float(),
        audio=audio,
        identity=torch.tensor([tree.identities[c.identity] for c in clips], dtype=torch.long),
        motion=labels([c.motion for c in clips], tree.motions),
        background=labels([c.background for c in clips], tree.backgrounds),
        captions=[c.caption for c in clips],
        motions=tree.motions,
        backgrounds=tree.backgrounds,
        fps=fps,
        sample_rate=sample_rate,
        split=split,
        seed=seed,
    )
    return faces, int(annotated.sum())


def mouth_source(annotated: int, clips: int) -> str:
    """Where a split's mouth_open came from: "annotation" (every clip's clip.json),
    "envelope" (none) or "mixed"."""
    if annotated == clips:
        return "annotation"
    return "envelope" if annotated == 0 else "mixed"


def write_clip_splits(out_dir: str | os.PathLike, params: Mapping) -> dict:
    """Read the clip tree `params["root"]` and write the three splits and manifest.json
    into `out_dir` (params checked by repro.foundation.faces.check_params). The tree is
    checked whole first; the splits are decoded one at a time into a staging folder and
    moved into `out_dir` together, the manifest last."""
    frames, size = int(params["frames"]), int(params["size"])
    fps, sample_rate = int(params["fps"]), int(params["sample_rate"])
    seed = params.get("seed", 0)
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    tree = scan_tree(params["root"], frames=frames, fps=fps)
    counts = {split: len(tree.clips[split]) for split in SPLITS}
    log.info(
        "%s: %s clips, %d identities, motions %s, backgrounds %s",
        tree.root,
        counts,
        len(tree.identities),
        list(tree.motions),
        list(tree.backgrounds),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".faces.", dir=out_dir))
    source = {
        "kind": "clips",
        "root": str(tree.root),
        "clips": counts,
        "identities": len(tree.identities),
        "mouth_open_source": {},
        "mouth_open_annotated": {},
    }
    manifest = {"kind": KIND, "params": dict(params), "source": source, "splits": {}}
    try:
        for split in SPLITS:
            faces, annotated = read_split(
                tree, split, frames=frames, size=size, fps=fps, sample_rate=sample_rate, seed=seed
            )
            manifest["splits"][split] = write_faces(staging / f"{split}.safetensors", faces)
            source["mouth_open_source"][split] = mouth_source(annotated, len(faces))
            source["mouth_open_annotated"][split] = annotated
            log.info("%s: %d clips read", split, len(faces))
            del faces
        for split in SPLITS:
            os.replace(staging / f"{split}.safetensors", out_dir / f"{split}.safetensors")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(out_dir / "manifest.json", manifest)
    return manifest

"""The talking-faces substrate: procedural talking heads whose mouth follows speech-like audio.

HuMo (and SLA) need video of people: an identity to preserve from a reference portrait,
a mouth to synchronise with audio, a motion and a background to follow from the caption.
At tiny scale these come from a seeded generator instead of a download:

- An identity is a face shape (ellipse radii), skin, hair colour and style, eye colour and
  spacing, a voice pitch and a mouth width, drawn from the seed and the identity's index alone
  (`identity_traits`). The splits use disjoint identity ranges: 0..n_train-1 train, the next
  n_val val, the next n_test test, several clips each.
- A clip is `frames` video frames at `fps` with its audio at `sample_rate`. The audio is a
  run of syllables (0.125-0.375 s: 1-3 frames at 8 fps, random loudness, random pauses),
  voiced harmonics of the identity's pitch times the syllable envelope, plus noise. Its
  loudness per video frame (`frame_envelope`) drives the mouth opening (`mouth_from_envelope`:
  a zero-phase smoothing and a clamp, so the mouth has NO lag behind the sound).
- The head moves by a small per-frame offset (MOTIONS: still, nod, shake, sway, 1-2 pixels at
  16x16) in front of a background (BACKGROUNDS), and the caption names both: "a person
  nodding in front of a green wall" (`caption`). Lighting (gain and a left-right gradient)
  varies by clip.
- A reference portrait per clip: the same identity before a neutral studio backdrop, in
  another pose and lighting, the mouth (nearly) closed.
- A face mask per frame: 1 inside the face ellipse (the mouth included), 0 elsewhere.

Frames are drawn at `supersample` times the size with hard edges, then area-downsampled,
so every edge (a 16x16 mouth opening in particular) is graded rather than jumping a pixel.

Audio features per VIDEO frame come from ONE function, `audio_features(waveforms, params)`
-> [N, T, G, D]: a log-mel spectrogram pooled to the frame rate at tiny scale (G = 1), or
Whisper encoder hidden states grouped by layer ranges and interpolated from 50 Hz to the
video frame rate, as HuMo's code does, at paper scale.

The pipeline writes the three splits (rule faces):

    python -m repro.foundation.faces --out-dir data/faces --params '{"seed": 0, "frames": 9,
        "size": 16, "fps": 8, "sample_rate": 4000,
        "identities": {"train": 48, "val": 8, "test": 16},
        "clips_per_identity": {"train": 24, "val": 6, "test": 6}}'

and every later stage reads a split with `load_faces`. With `"root": "<dir>"` in the params
(config data.faces.root, paper scale) the same stage reads real talking-head clips from that
directory instead (repro.foundation.faces_reader, which documents the layout) and writes the
same three files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors, sha256_file, write_json

log = logging.getLogger(__name__)

KIND = "talking_faces"
SPLITS = ("train", "val", "test")
# The stage's params, every one required to generate (the config passes them all), plus
# the optional `root`: a directory of real clips to read instead (repro.foundation.
# faces_reader), which needs only READ_PARAMS (the others are then not used).
PARAMS = ("seed", "frames", "size", "fps", "sample_rate", "identities", "clips_per_identity")
READ_PARAMS = ("root", "frames", "size", "fps", "sample_rate")

MOTIONS = ("still", "nod", "shake", "sway")
BACKGROUNDS = ("green wall", "blue wall", "purple wall", "striped wall")
HAIR_STYLES = ("short", "long", "bun")
_MOTION_PHRASES = {
    "still": "keeping still",
    "nod": "nodding",
    "shake": "shaking their head",
    "sway": "swaying",
}

# --------------------------------------------------------------------------- look

# Two colours per background (a solid wall repeats one); the last row is the neutral studio
# backdrop of the reference portraits, never a clip's background.
_BACKGROUND_RGB = torch.tensor(
    [
        [[0.22, 0.58, 0.28], [0.22, 0.58, 0.28]],  # green wall
        [[0.20, 0.34, 0.78], [0.20, 0.34, 0.78]],  # blue wall
        [[0.50, 0.28, 0.60], [0.50, 0.28, 0.60]],  # purple wall
        [[0.92, 0.85, 0.42], [0.26, 0.28, 0.36]],  # striped wall: yellow / slate
        [[0.80, 0.80, 0.82], [0.80, 0.80, 0.82]],  # portrait backdrop
    ]
)
PORTRAIT = len(BACKGROUNDS)  # the background index of the reference portraits
_STRIPES = 8  # vertical stripes across the frame (2 pixels each at 16x16)

# Skin runs between these two tones; hair and eyes come from palettes.
_SKIN_LIGHT = (0.95, 0.80, 0.68)
_SKIN_DARK = (0.52, 0.34, 0.22)
_HAIR_RGB = (
    (0.10, 0.08, 0.07),  # black
    (0.32, 0.19, 0.10),  # dark brown
    (0.62, 0.26, 0.12),  # auburn
    (0.92, 0.80, 0.45),  # blonde
    (0.72, 0.72, 0.74),  # grey
)
_EYE_RGB = (
    (0.22, 0.13, 0.07),  # brown
    (0.18, 0.38, 0.80),  # blue
    (0.22, 0.52, 0.28),  # green
    (0.06, 0.06, 0.08),  # black
)
_MOUTH_RGB = (0.16, 0.03, 0.05)  # the dark inside of an open mouth
_LUMA = (0.299, 0.587, 0.114)
_MIN_HAIR_CONTRAST = 0.25  # luminance gap between hair and skin, else the hair is swapped

# Geometry in frame units (the frame spans [0, 1] both ways, y down).
_FACE_Y = 0.53  # face centre height at rest (x: 0.5)
_EYE_Y = -0.12  # eye height below the face centre, in face radii (ry)
_EYE_RADIUS = 0.045
_MOUTH_Y = 0.5  # mouth centre below the face centre, in ry
_MOUTH_CLOSED = 0.02  # half-height of a closed mouth (a thin dark line)
_MOUTH_RANGE = 0.07  # extra half-height of a fully open mouth

# --------------------------------------------------------------------------- sound

VOICE_LEVEL = 0.25  # RMS of a voiced sound at full loudness; frame_envelope's unit
_NOISE = 0.01  # background noise (std)
_BREATH = 0.02  # breath noise per unit of envelope (std)
_HARMONICS = 12
_SYLLABLE_S = (0.125, 0.375)  # syllable length in seconds: 1-3 frames at 8 fps
_PAUSE_S = (0.06, 0.25)
_PAUSE_P = 0.35  # chance of a pause after a syllable
_LEAD_P = 0.4  # chance that a clip starts in silence
_LOUDNESS = (0.35, 1.0)
_PITCH_HZ = (95.0, 230.0)  # an identity's voice pitch
_MOUTH_FLOOR, _MOUTH_FULL = 0.1, 0.75  # envelope at which the mouth starts / is fully open
# Zero-phase smoothing of the envelope for the mouth: the jaw does not follow every flicker
# of loudness, but it never lags the sound either (a symmetric kernel has no delay).
MOUTH_SMOOTHING = (0.15, 0.7, 0.15)

# --------------------------------------------------------------------------- motion, light

# Periods in seconds (frames = seconds * fps): nods and shakes are quick, a sway is slow.
_PERIOD_S = {"nod": (0.5, 0.75), "shake": (0.375, 0.625), "sway": (1.0, 1.5)}
_AMPLITUDE = (1.0 / 16, 2.0 / 16)  # head motion amplitude in frame units (1-2 px at 16)
_BASE_OFFSET = 0.5 / 16  # a clip's resting position varies by up to half a pixel at 16
_REFERENCE_OFFSET = 1.0 / 16
_GAIN = (0.75, 1.0)  # lighting gain; <= 1 so that the face centre never clips
_GRADIENT = 0.08  # left-right lighting slope, +- this
_REFERENCE_MOUTH = 0.2  # a reference's mouth opening is at most this

# Random streams: numpy SeedSequence entropy [seed, stream, identity].
_IDENTITY_STREAM, _CLIP_STREAM = 1, 2


def caption(motion: str | int, background: str | int) -> str:
    """The caption of a clip: "a person nodding in front of a green wall".

    `motion` / `background`: a name of MOTIONS / BACKGROUNDS or its index.
    """
    motion = MOTIONS[motion] if isinstance(motion, int | np.integer) else motion
    background = BACKGROUNDS[background] if isinstance(background, int | np.integer) else background
    if motion not in _MOTION_PHRASES:
        raise ReproInputError(f"motion: unknown motion {motion!r}, expected one of {MOTIONS}")
    if background not in BACKGROUNDS:
        raise ReproInputError(
            f"background: unknown background {background!r}, expected one of {BACKGROUNDS}"
        )
    return f"a person {_MOTION_PHRASES[motion]} in front of a {background}"


# --------------------------------------------------------------------------- identities


def identity_traits(identities: Sequence[int], seed: int) -> dict[str, Tensor]:
    """What identifies each of `identities`, drawn from (seed, identity) alone.

    So an identity looks the same whatever the split sizes. Returns float32 tensors with
    one row per identity: rx, ry (face radii, frame units), skin / hair / eye [K, 3] (RGB in
    [0, 1]), hair_style (index of HAIR_STYLES, int64), hair_volume, fringe (depth of the
    fringe, in ry), eye_spacing (eye offset from the centre, in rx), mouth_width (half
    width, in rx), pitch (Hz).
    """
    rows = []
    light, dark = np.array(_SKIN_LIGHT), np.array(_SKIN_DARK)
    luma = np.array(_LUMA)
    for identity in identities:
        rng = np.random.default_rng([seed, _IDENTITY_STREAM, int(identity)])
        skin = light + rng.uniform(0, 1) * (dark - light) + rng.normal(0, 0.02, 3)
        skin = np.clip(skin, 0.0, 1.0)
        hair = np.array(_HAIR_RGB[rng.integers(len(_HAIR_RGB))])
        if abs(hair @ luma - skin @ luma) < _MIN_HAIR_CONTRAST:
            # Hair as bright as the skin would not read as hair at 16x16: black on light
            # skin, blonde on dark.
            hair = np.array(_HAIR_RGB[0] if skin @ luma > 0.5 else _HAIR_RGB[3])
        rows.append(
            {
                "rx": rng.uniform(0.24, 0.31),
                "ry": rng.uniform(0.29, 0.35),
                "skin": skin,
                "hair": hair,
                "hair_style": rng.integers(len(HAIR_STYLES)),
                "hair_volume": rng.uniform(0.1, 0.3),
                "fringe": rng.uniform(0.2, 0.45),
                "eye": np.array(_EYE_RGB[rng.integers(len(_EYE_RGB))]),
                "eye_spacing": rng.uniform(0.35, 0.55),
                "mouth_width": rng.uniform(0.32, 0.45),
                "pitch": rng.uniform(*_PITCH_HZ),
            }
        )
    out = {}
    for key in rows[0] if rows else ():
        values = np.stack([np.asarray(r[key]) for r in rows])
        dtype = torch.int64 if key == "hair_style" else torch.float32
        out[key] = torch.as_tensor(values, dtype=dtype)
    return out


def _rows(traits: Mapping[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {key: value[index] for key, value in traits.items()}


# --------------------------------------------------------------------------- drawing


def render_faces(
    traits: Mapping[str, Tensor],
    offset: Tensor,
    mouth_open: Tensor,
    background: Tensor,
    gain: Tensor,
    gradient: Tensor,
    *,
    size: int = 16,
    supersample: int = 4,
) -> tuple[Tensor, Tensor]:
    """Draw M faces: (images float32 [M, 3, size, size] in [0, 1], face coverage [M, size, size]).

    `traits` hold one row per image (identity_traits' keys); `offset` [M, 2] is the head's
    (dx, dy) from its rest position in frame units; `mouth_open` [M] in [0, 1]; `background`
    [M] an index of BACKGROUNDS or PORTRAIT; `gain`, `gradient` [M] the lighting (pixel *=
    gain * (1 + gradient * (2x - 1)), x the column in [0, 1]).

    Every shape is tested at `supersample` x the size with hard edges, and its coverage is
    the area average down to `size`; the layers are then composited back to front
    (background, hair, face, fringe, eyes, mouth). The face coverage is the face ellipse's
    (mouth included), the mask's source.
    """
    m = offset.shape[0]
    hi = size * supersample
    grid = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi
    u, v = grid.view(1, 1, hi), grid.view(1, hi, 1)  # x across, y down

    def col(t: Tensor) -> Tensor:
        return t.float().view(m, 1, 1)

    def ellipse(x0: Tensor, y0: Tensor, ax: Tensor, ay: Tensor) -> Tensor:
        # [M, 1, hi] + [M, hi, 1]: one broadcast add per shape.
        return ((u - x0) / ax) ** 2 + ((v - y0) / ay) ** 2 <= 1.0

    cx, cy = col(0.5 + offset[:, 0]), col(_FACE_Y + offset[:, 1])
    rx, ry = col(traits["rx"]), col(traits["ry"])
    vol, style = col(traits["hair_volume"]), traits["hair_style"].view(m, 1, 1)

    face = ellipse(cx, cy, rx, ry)
    # Hair: a cap behind the head (its upper half), long hair falling beside the face to the
    # jaw, or a bun on top; a fringe over the forehead.
    hair_rx = rx * (1.08 + 0.5 * vol)
    cap = ellipse(cx, cy - 0.25 * ry, hair_rx, ry * (0.8 + vol)) & (v < cy)
    sides = ((u - cx).abs() <= hair_rx) & (v >= cy - 0.25 * ry) & (v <= cy + ry)
    bun = ellipse(cx, cy - ry * (1.05 + vol), 0.4 * rx, 0.4 * rx)
    hair = cap | ((style == 1) & sides) | ((style == 2) & bun)
    fringe = face & (v < cy - ry + col(traits["fringe"]) * ry)
    eye_x = col(traits["eye_spacing"]) * rx
    eye_y = cy + _EYE_Y * ry
    eye_r = torch.full_like(cx, _EYE_RADIUS)
    eyes = ellipse(cx - eye_x, eye_y, eye_r, eye_r) | ellipse(cx + eye_x, eye_y, eye_r, eye_r)
    mouth = ellipse(
        cx,
        cy + _MOUTH_Y * ry,
        col(traits["mouth_width"]) * rx,
        _MOUTH_CLOSED + _MOUTH_RANGE * col(mouth_open.clamp(0, 1)),
    )
    layers = torch.stack([hair, face, fringe, eyes, mouth], dim=1).float()
    cover = F.avg_pool2d(layers, supersample)  # [M, 5, size, size], graded edges
    a_hair, a_face, a_fringe, a_eyes, a_mouth = cover.unbind(1)

    # Background at the output size (stripes area-averaged the same way).
    x_hi = (torch.floor(grid * _STRIPES) % 2).view(1, 1, 1, hi).expand(1, 1, supersample, hi)
    stripe = F.avg_pool2d(x_hi, supersample).view(1, 1, 1, size)  # [1, 1, 1, size]
    pair = _BACKGROUND_RGB[background.long()]  # [M, 2, 3]
    c0, c1 = pair[:, 0].view(m, 3, 1, 1), pair[:, 1].view(m, 3, 1, 1)
    image = (c0 + stripe * (c1 - c0)).expand(m, 3, size, size)

    def over(image: Tensor, alpha: Tensor, rgb: Tensor) -> Tensor:
        return image + alpha.unsqueeze(1) * (rgb.view(-1, 3, 1, 1) - image)

    image = over(image, a_hair, traits["hair"])
    image = over(image, a_face, traits["skin"])
    image = over(image, a_fringe, traits["hair"])
    image = over(image, a_eyes, traits["eye"])
    image = over(image, a_mouth, torch.tensor(_MOUTH_RGB))
    x = ((torch.arange(size, dtype=torch.float32) + 0.5) / size).view(1, 1, 1, size)
    light = col(gain).unsqueeze(1) * (1 + col(gradient).unsqueeze(1) * (2 * x - 1))
    return (image * light).clamp(0, 1), a_face


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 0..255 (rounded)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- motion


def motion_offsets(
    motion: Tensor,
    amplitude: Tensor,
    period: Tensor,
    phase: Tensor,
    frames: int,
) -> Tensor:
    """Head offsets [N, frames, 2] (dx, dy, frame units) of each clip's motion class.

    still: none; nod: dy = A sin(2 pi t / P + phi); shake: the same on dx; sway: a slow
    ellipse, dx = A cos(.), dy = 0.6 A sin(.). `period` in frames.
    """
    t = torch.arange(frames, dtype=torch.float32).view(1, frames)
    angle = 2 * math.pi * t / period.float().view(-1, 1) + phase.float().view(-1, 1)
    a = amplitude.float().view(-1, 1)
    kind = motion.long().view(-1, 1)
    dx = torch.where(kind == MOTIONS.index("shake"), a * torch.sin(angle), 0.0)
    dy = torch.where(kind == MOTIONS.index("nod"), a * torch.sin(angle), 0.0)
    sway = kind == MOTIONS.index("sway")
    dx = torch.where(sway, a * torch.cos(angle), dx)
    dy = torch.where(sway, 0.6 * a * torch.sin(angle), dy)
    return torch.stack([dx, dy], dim=-1)


# --------------------------------------------------------------------------- sound


def frame_envelope(waveforms: Tensor, samples_per_frame: int, level: float = VOICE_LEVEL) -> Tensor:
    """Loudness per video frame: the RMS of each frame's samples / `level`, [N, S // spf].

    With the default level, 1 is a voiced sound at full loudness. Trailing samples that do
    not fill a frame are dropped.
    """
    waveforms = torch.as_tensor(waveforms, dtype=torch.float32)
    if waveforms.dim() != 2:
        raise ReproInputError(f"waveforms: expected [N, S], got {tuple(waveforms.shape)}")
    n, s = waveforms.shape
    frames = s // samples_per_frame
    chunks = waveforms[:, : frames * samples_per_frame].reshape(n, frames, samples_per_frame)
    return chunks.pow(2).mean(-1).sqrt() / level


def mouth_from_envelope(
    envelope: Tensor, floor: float = _MOUTH_FLOOR, full: float = _MOUTH_FULL
) -> Tensor:
    """Mouth opening [N, F] in [0, 1] from the loudness per frame [N, F].

    The envelope is smoothed by the symmetric kernel MOUTH_SMOOTHING (previous, this,
    next frame; edge frames repeated), so the mouth never lags or leads the sound, then
    mapped linearly from `floor` (closed) to `full` (fully open) and clamped.
    """
    before, here, after = MOUTH_SMOOTHING
    padded = F.pad(envelope.float().unsqueeze(1), (1, 1), mode="replicate").squeeze(1)
    smooth = before * padded[:, :-2] + here * padded[:, 1:-1] + after * padded[:, 2:]
    return ((smooth - floor) / (full - floor)).clamp(0.0, 1.0)


def _syllable_tracks(
    rng: np.random.Generator, samples: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip's speech plan per sample: envelope (a sin^2 bump per syllable, its
    loudness random), pitch factor and spectral tilt (both constant within a syllable)."""
    env = np.zeros(samples)
    pitch = np.ones(samples)
    tilt = np.full(samples, 1.2)
    pos = rng.uniform(*_PAUSE_S) * sample_rate if rng.random() < _LEAD_P else 0.0
    while pos < samples:
        length = rng.uniform(*_SYLLABLE_S) * sample_rate
        loud = rng.uniform(*_LOUDNESS)
        start, stop = int(math.ceil(pos)), min(samples, int(math.ceil(pos + length)))
        t = (np.arange(start, stop) - pos) / length
        env[start:stop] = loud * np.sin(np.pi * t) ** 2
        pitch[start:stop] = rng.uniform(0.9, 1.12)  # intonation
        tilt[start:stop] = rng.uniform(0.8, 1.8)  # vowel colour: how fast harmonics fall
        pos += length
        if rng.random() < _PAUSE_P:
            pos += rng.uniform(*_PAUSE_S) * sample_rate
    return env, pitch, tilt


def _voice(
    envelope: Tensor, pitch_hz: Tensor, tilt: Tensor, noise: Tensor, sample_rate: int
) -> Tensor:
    """Waveforms [N, S]: harmonics k = 1.. of the pitch track with amplitudes k^-tilt
    (those below 0.45 x the sample rate), scaled to unit RMS, times VOICE_LEVEL x the
    envelope, plus background and breath noise (`noise`: standard normal [N, S])."""
    phase = 2 * math.pi * torch.cumsum(pitch_hz.double() / sample_rate, dim=1)
    voice = torch.zeros_like(envelope, dtype=torch.float32)
    power = torch.zeros_like(voice)
    for k in range(1, _HARMONICS + 1):
        amp = (k ** (-tilt)) * (k * pitch_hz < 0.45 * sample_rate)
        voice += amp * torch.sin(torch.remainder(k * phase, 2 * math.pi)).float()
        power += amp**2 / 2
    voice = voice / power.sqrt()
    return VOICE_LEVEL * envelope * voice + (_NOISE + _BREATH * envelope) * noise


# --------------------------------------------------------------------------- clips


@dataclass
class Faces:
    """A split of talking-face clips (the tensors of the file, plus its metadata).

    video uint8 [N, 3, F, H, W]; reference uint8 [N, 3, H, W]; mask uint8 [N, F, H, W]
    (0/1); mouth_open float32 [N, F] in [0, 1]; envelope float32 [N, F] (loudness per
    frame, what the mouth follows); audio float32 [N, S]; identity, motion, background
    int64 [N]; captions N strings; motions / backgrounds the class names.
    """

    video: Tensor
    reference: Tensor
    mask: Tensor
    mouth_open: Tensor
    envelope: Tensor
    audio: Tensor
    identity: Tensor
    motion: Tensor
    background: Tensor
    captions: list[str]
    motions: tuple[str, ...] = MOTIONS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    fps: int = 8
    sample_rate: int = 4000
    split: str = ""
    seed: int = 0

    TENSORS = (
        "video",
        "reference",
        "mask",
        "mouth_open",
        "envelope",
        "audio",
        "identity",
        "motion",
        "background",
    )

    def __len__(self) -> int:
        return self.video.shape[0]

    @property
    def frames(self) -> int:
        return self.video.shape[2]

    @property
    def size(self) -> int:
        return self.video.shape[-1]

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    def video_float(self, idx=slice(None)) -> Tensor:
        """Clips `idx` as float32 [n, 3, F, H, W] in [-1, 1]."""
        return self.video[idx].float() / 127.5 - 1.0

    def reference_float(self, idx=slice(None)) -> Tensor:
        """References `idx` as float32 [n, 3, H, W] in [-1, 1]."""
        return self.reference[idx].float() / 127.5 - 1.0

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.TENSORS}

    def select(self, index) -> Faces:
        """The clips `index` (a list or index tensor of rows) as a new Faces."""
        index = torch.as_tensor(index, dtype=torch.long).view(-1)
        picked = {name: getattr(self, name)[index] for name in self.TENSORS}
        others = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in picked}
        others["captions"] = [self.captions[i] for i in index.tolist()]
        return Faces(**picked, **others)


def _clip_plan(
    seed: int, identity: int, pitch: float, clips: int, samples: int, fps: int, sample_rate: int
) -> dict[str, np.ndarray]:
    """Every random choice of one identity's clips, from (seed, identity) alone: motion and
    background classes (balanced: the classes in turn, from a start that rotates with the
    identity, shuffled), head motion, lighting, the reference's pose / lighting / mouth,
    and the speech (per-sample envelope, pitch and tilt tracks, noise)."""
    rng = np.random.default_rng([seed, _CLIP_STREAM, identity])
    motion = rng.permutation((np.arange(clips) + identity) % len(MOTIONS))
    plan = {
        "motion": motion,
        "background": rng.permutation((np.arange(clips) + 3 * identity + 1) % len(BACKGROUNDS)),
        "amplitude": rng.uniform(*_AMPLITUDE, clips),
    }
    period = np.ones(clips)  # in frames; "still" has none
    for name, span in _PERIOD_S.items():
        seconds = rng.uniform(*span, clips)
        period = np.where(motion == MOTIONS.index(name), seconds * fps, period)
    plan["period"] = period
    plan["phase"] = rng.uniform(0, 2 * math.pi, clips)
    plan["base"] = rng.uniform(-_BASE_OFFSET, _BASE_OFFSET, (clips, 2))
    plan["gain"] = rng.uniform(*_GAIN, clips)
    plan["gradient"] = rng.uniform(-_GRADIENT, _GRADIENT, clips)
    plan["ref_offset"] = rng.uniform(-_REFERENCE_OFFSET, _REFERENCE_OFFSET, (clips, 2))
    plan["ref_gain"] = rng.uniform(*_GAIN, clips)
    plan["ref_gradient"] = rng.uniform(-_GRADIENT, _GRADIENT, clips)
    plan["ref_mouth"] = rng.uniform(0, _REFERENCE_MOUTH, clips)
    voice = pitch * rng.uniform(0.95, 1.05, clips)  # a clip's voice: the identity's pitch
    tracks = [_syllable_tracks(rng, samples, sample_rate) for _ in range(clips)]
    plan["env"] = np.stack([t[0] for t in tracks])
    plan["pitch"] = voice[:, None] * np.stack([t[1] for t in tracks])
    plan["tilt"] = np.stack([t[2] for t in tracks])
    plan["noise"] = rng.standard_normal((clips, samples))
    return plan


def generate_faces(
    identities: Sequence[int],
    clips_per_identity: int,
    seed: int,
    *,
    frames: int = 9,
    size: int = 16,
    fps: int = 8,
    sample_rate: int = 4000,
    supersample: int = 4,
    split: str = "",
    chunk: int = 2048,
) -> Faces:
    """`clips_per_identity` clips of every identity (in order), deterministic for `seed`.

    A clip's draws come from (seed, identity) alone (`_clip_plan`), so a split does not
    depend on the others. `chunk` bounds the images drawn at once (memory only: the result
    does not depend on it).
    """
    _check_generation(frames, size, fps, sample_rate, supersample, clips_per_identity)
    identities = [int(i) for i in identities]
    if not identities:
        raise ReproInputError("params.identities: no identity to draw clips of")
    spf = sample_rate // fps
    samples = frames * spf
    traits = identity_traits(identities, seed)
    k = len(identities)
    n = k * clips_per_identity

    plans = [
        _clip_plan(
            seed,
            identity,
            float(traits["pitch"][row]),
            clips_per_identity,
            samples,
            fps,
            sample_rate,
        )
        for row, identity in enumerate(identities)
    ]

    def cat(key: str, dtype=torch.float32) -> Tensor:
        return torch.as_tensor(np.concatenate([plan[key] for plan in plans]), dtype=dtype)

    identity = torch.tensor(identities, dtype=torch.long).repeat_interleave(clips_per_identity)
    row = torch.arange(k).repeat_interleave(clips_per_identity)  # row of `traits`
    motion, background = cat("motion", torch.long), cat("background", torch.long)

    audio = _voice(cat("env"), cat("pitch"), cat("tilt"), cat("noise"), sample_rate)
    envelope = frame_envelope(audio, spf)
    mouth_open = mouth_from_envelope(envelope)

    offsets = motion_offsets(motion, cat("amplitude"), cat("period"), cat("phase"), frames)
    offsets = offsets + cat("base").view(n, 1, 2)

    # Every clip frame, then every reference, drawn `chunk` images at a time.
    frame_row = row.repeat_interleave(frames)
    images = {
        "row": torch.cat([frame_row, row]),
        "offset": torch.cat([offsets.reshape(n * frames, 2), cat("ref_offset")]),
        "mouth": torch.cat([mouth_open.reshape(-1), cat("ref_mouth")]),
        "background": torch.cat([background.repeat_interleave(frames), torch.full((n,), PORTRAIT)]),
        "gain": torch.cat([cat("gain").repeat_interleave(frames), cat("ref_gain")]),
        "gradient": torch.cat([cat("gradient").repeat_interleave(frames), cat("ref_gradient")]),
    }
    total = n * (frames + 1)
    pixels = torch.empty(total, 3, size, size, dtype=torch.uint8)
    masks = torch.empty(total, size, size, dtype=torch.uint8)
    for start in range(0, total, chunk):
        sl = slice(start, min(total, start + chunk))
        image, cover = render_faces(
            _rows(traits, images["row"][sl]),
            images["offset"][sl],
            images["mouth"][sl],
            images["background"][sl],
            images["gain"][sl],
            images["gradient"][sl],
            size=size,
            supersample=supersample,
        )
        pixels[sl] = to_uint8(image)
        masks[sl] = (cover >= 0.5).to(torch.uint8)

    video = pixels[: n * frames].view(n, frames, 3, size, size).permute(0, 2, 1, 3, 4)
    return Faces(
        video=video.contiguous(),
        reference=pixels[n * frames :].contiguous(),
        mask=masks[: n * frames].view(n, frames, size, size).contiguous(),
        mouth_open=mouth_open.float(),
        envelope=envelope.float(),
        audio=audio.float(),
        identity=identity,
        motion=motion,
        background=background,
        captions=[caption(int(a), int(b)) for a, b in zip(motion, background, strict=True)],
        fps=fps,
        sample_rate=sample_rate,
        split=split,
        seed=seed,
    )


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ReproInputError(f"{key}: must be an integer >= {low}, got {value!r}")


def _check_generation(frames, size, fps, sample_rate, supersample=4, clips=1) -> None:
    """Sizes a clip can be drawn at: a face needs >= 8 pixels, the voice's pitch
    (<= 230 Hz x 1.18, 12 harmonics below 0.45 x the rate) >= 1000 Hz, a frame a whole
    number of samples."""
    _check_int("params.frames", frames, 1)
    _check_int("params.size", size, 8)
    _check_int("params.fps", fps, 1)
    _check_int("params.sample_rate", sample_rate, 1000)
    _check_int("params.supersample", supersample, 1)
    _check_int("params.clips_per_identity", clips, 1)
    if sample_rate % fps:
        raise ReproInputError(
            f"params.sample_rate: {sample_rate} Hz is not a whole number of samples per frame "
            f"at params.fps {fps}"
        )


# --------------------------------------------------------------------------- files


def write_faces(path: str | os.PathLike, faces: Faces) -> dict:
    """Write a split (kind talking_faces); returns its manifest entry (counts, sha256)."""
    path = Path(path)
    metadata = {
        "captions": faces.captions,
        "motions": list(faces.motions),
        "backgrounds": list(faces.backgrounds),
        "fps": faces.fps,
        "sample_rate": faces.sample_rate,
        "frames": faces.frames,
        "size": faces.size,
        "split": faces.split,
        "seed": faces.seed,
    }
    save_tensors(path, faces.tensors(), KIND, metadata)
    ids = faces.identity.unique()
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "clips": len(faces),
        "identities": [int(ids.min()), int(ids.max()) + 1] if len(ids) else [0, 0],
        "video_shape": list(faces.video.shape[1:]),
        "audio_samples": int(faces.audio.shape[1]),
        "motion_counts": torch.bincount(faces.motion, minlength=len(faces.motions)).tolist(),
        "background_counts": torch.bincount(
            faces.background, minlength=len(faces.backgrounds)
        ).tolist(),
    }


def load_faces(path: str | os.PathLike) -> Faces:
    """Read and check a split written by write_faces; every error names the file."""
    path = Path(path)
    tensors, meta = load_tensors(path, kind=KIND, required=Faces.TENSORS)
    video, reference, mask = tensors["video"], tensors["reference"], tensors["mask"]

    def bad(message: str) -> ReproInputError:
        return ReproInputError(f"{path}: {message}")

    if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[1] != 3:
        raise bad(f"video must be uint8 [N, 3, F, H, W], got {video.dtype} {tuple(video.shape)}")
    n, _, frames, h, w = video.shape
    if reference.dtype != torch.uint8 or tuple(reference.shape) != (n, 3, h, w):
        raise bad(
            f"reference must be uint8 [{n}, 3, {h}, {w}] like the video's frames, got "
            f"{reference.dtype} {tuple(reference.shape)}"
        )
    if mask.dim() != 4 or mask.shape[1] != frames:
        raise bad(
            f"mask has {mask.shape[1] if mask.dim() == 4 else '?'} frames for {frames} video "
            f"frames (shape {tuple(mask.shape)})"
        )
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (n, frames, h, w) or mask.max() > 1:
        raise bad(
            f"mask must be uint8 0/1 [{n}, {frames}, {h}, {w}], got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    for name in ("mouth_open", "envelope"):
        t = tensors[name]
        if t.dtype != torch.float32 or tuple(t.shape) != (n, frames):
            raise bad(f"{name} must be float32 [{n}, {frames}], got {t.dtype} {tuple(t.shape)}")
    audio = tensors["audio"]
    if audio.dtype != torch.float32 or audio.dim() != 2 or audio.shape[0] != n:
        raise bad(f"audio must be float32 [{n}, S], got {audio.dtype} {tuple(audio.shape)}")
    motions = tuple(meta.get("motions") or ())
    backgrounds = tuple(meta.get("backgrounds") or ())
    for name, classes in (("identity", None), ("motion", motions), ("background", backgrounds)):
        t = tensors[name]
        if t.dtype != torch.int64 or tuple(t.shape) != (n,):
            raise bad(f"{name} must be int64 [{n}], got {t.dtype} {tuple(t.shape)}")
        if classes is not None and n and (t.min() < 0 or t.max() >= len(classes)):
            raise bad(f"{name} outside the {len(classes)} classes of its metadata")
    captions = meta.get("captions")
    if not isinstance(captions, list) or len(captions) != n:
        raise bad(f"metadata captions must be a list of {n} strings")
    fps, sample_rate = meta.get("fps"), meta.get("sample_rate")
    if not isinstance(fps, int) or not isinstance(sample_rate, int) or fps < 1:
        raise bad(f"metadata fps / sample_rate missing or not integers ({fps!r}, {sample_rate!r})")
    if audio.shape[1] < frames * (sample_rate // fps):
        raise bad(
            f"audio has {audio.shape[1]} samples, fewer than {frames} frames at {fps} fps "
            f"and {sample_rate} Hz"
        )
    return Faces(
        **{name: tensors[name] for name in Faces.TENSORS},
        captions=[str(c) for c in captions],
        motions=motions,
        backgrounds=backgrounds,
        fps=fps,
        sample_rate=sample_rate,
        split=str(meta.get("split", "")),
        seed=int(meta.get("seed", 0)),
    )


def split_identities(identities: Mapping[str, int]) -> dict[str, range]:
    """Disjoint identity ranges: train 0..n_train-1, then val, then test."""
    out, start = {}, 0
    for name in SPLITS:
        count = identities.get(name) if isinstance(identities, Mapping) else None
        _check_int(f"params.identities.{name}", count, 1)
        out[name] = range(start, start + count)
        start += count
    return out


def check_params(params: Mapping) -> None:
    """The stage's params: PARAMS (and `root` null or absent) to generate, each per split
    where it must be; with `root` a path, READ_PARAMS (the generator's keys may be present
    and are not used)."""
    allowed = [*PARAMS, "root"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ReproInputError(f"params: unknown keys {unknown}, allowed {allowed}")
    root = params.get("root")
    if root is not None:
        if not isinstance(root, str) or not root:
            raise ReproInputError(
                f"params.root: must be null (generate) or a directory of clips, got {root!r}"
            )
        missing = [k for k in READ_PARAMS if k not in params]
        if missing:
            raise ReproInputError(f"params: missing keys {missing} (got {sorted(params)})")
        _check_generation(params["frames"], params["size"], params["fps"], params["sample_rate"])
        return
    missing = [k for k in PARAMS if k not in params]
    if missing:
        raise ReproInputError(f"params: missing keys {missing} (got {sorted(params)})")
    for key in ("identities", "clips_per_identity"):
        value = params[key]
        if not isinstance(value, Mapping) or set(value) != set(SPLITS):
            raise ReproInputError(f"params.{key}: must map each of {list(SPLITS)} to a count")
    _check_int("params.seed", params["seed"], 0)
    split_identities(params["identities"])
    for name in SPLITS:
        _check_int(f"params.clips_per_identity.{name}", params["clips_per_identity"][name], 1)
    _check_generation(params["frames"], params["size"], params["fps"], params["sample_rate"])


def write_splits(out_dir: str | os.PathLike, params: Mapping) -> dict:
    """Generate and write the three splits and manifest.json into `out_dir`; with
    params.root set, read them from that clip tree instead (repro.foundation.faces_reader)."""
    check_params(params)
    if params.get("root") is not None:
        from repro.foundation.faces_reader import write_clip_splits

        return write_clip_splits(out_dir, params)
    out_dir = Path(out_dir)
    ranges = split_identities(params["identities"])
    manifest = {"kind": KIND, "params": dict(params), "splits": {}}
    for name in SPLITS:
        faces = generate_faces(
            ranges[name],
            params["clips_per_identity"][name],
            params["seed"],
            frames=params["frames"],
            size=params["size"],
            fps=params["fps"],
            sample_rate=params["sample_rate"],
            split=name,
        )
        manifest["splits"][name] = write_faces(out_dir / f"{name}.safetensors", faces)
        log.info(
            "%s: %d clips of identities %d..%d",
            name,
            len(faces),
            ranges[name].start,
            ranges[name].stop - 1,
        )
    write_json(out_dir / "manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------- audio features

AUDIO_ENCODERS = ("logmel", "whisper")
LOGMEL_KEYS = ("sample_rate", "fps", "n_fft", "hops_per_frame", "n_mels", "f_min", "f_max")
WHISPER_KEYS = (
    "sample_rate",
    "fps",
    "pretrained",
    "groups",
    "batch_size",
    "local_files_only",
    "cache_dir",
)
# HuMo's grouping of Whisper-large-v3's 33 hidden states (embeddings + 32 layers).
WHISPER_GROUPS = ((0, 8), (8, 16), (16, 24), (24, 32), (32, 33))


def mel_filter_bank(
    n_freqs: int,
    n_mels: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> Tensor:
    """Triangular HTK-mel filters [n_freqs, n_mels] (float32, no area normalisation).

    Filter m rises from the (m)th to the (m+1)th and falls to the (m+2)th of n_mels + 2
    points equally spaced in mel (2595 log10(1 + f / 700)) from f_min to f_max (default:
    the Nyquist frequency), evaluated at the STFT bin frequencies k * sample_rate / n_fft;
    between the first and the last centre the filters sum to 1.
    """
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    f_max = sample_rate / 2 if f_max is None else f_max
    bank = hf_mel_filter_bank(
        num_frequency_bins=n_freqs,
        num_mel_filters=n_mels,
        min_frequency=f_min,
        max_frequency=f_max,
        sampling_rate=sample_rate,
        norm=None,
        mel_scale="htk",
    )
    return torch.as_tensor(bank, dtype=torch.float32)


def logmel_features(
    waveforms: Tensor,
    *,
    sample_rate: int = 4000,
    fps: int = 8,
    n_fft: int = 256,
    hops_per_frame: int = 10,
    n_mels: int = 16,
    f_min: float = 50.0,
    f_max: float | None = None,
    section: str = "params",
) -> Tensor:
    """Log-mel features per video frame, [N, T, 1, n_mels], T = S // (sample_rate / fps).

    A Hann-window STFT with hop = samples per frame / hops_per_frame, its STFT frames centred
    at the middle of each hop (so video frame t owns exactly the hops_per_frame hops inside
    it), power through `mel_filter_bank`, log(. + 1e-6), averaged over a video frame's hops.
    """
    waveforms = torch.as_tensor(waveforms, dtype=torch.float32)
    if waveforms.dim() != 2:
        raise ReproInputError(f"waveforms: expected [N, S], got {tuple(waveforms.shape)}")
    spf = _samples_per_frame(sample_rate, fps, section)
    if not isinstance(hops_per_frame, int) or hops_per_frame < 1 or spf % hops_per_frame:
        raise ReproInputError(
            f"{section}.hops_per_frame: must divide the {spf} samples of a frame, "
            f"got {hops_per_frame!r}"
        )
    if not isinstance(n_fft, int) or n_fft < 2:
        raise ReproInputError(f"{section}.n_fft: must be an integer >= 2, got {n_fft!r}")
    hop = spf // hops_per_frame
    n, s = waveforms.shape
    frames = s // spf
    if frames < 1:
        raise ReproInputError(f"waveforms: {s} samples, shorter than one frame ({spf})")
    # Pad so that STFT frame j (no centring) is centred at sample j * hop + hop / 2.
    left = n_fft // 2 - hop // 2
    right = n_fft
    padded = F.pad(waveforms.unsqueeze(1), (left, right), mode="reflect").squeeze(1)
    spec = torch.stft(
        padded,
        n_fft=n_fft,
        hop_length=hop,
        window=torch.hann_window(n_fft, device=waveforms.device),
        center=False,
        return_complex=True,
    )  # [N, n_fft // 2 + 1, J]
    power = spec.abs().pow(2)[:, :, : frames * hops_per_frame]
    bank = mel_filter_bank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max).to(power.device)
    mel = torch.einsum("nfj,fm->njm", power, bank)
    logmel = torch.log(mel + 1e-6).view(n, frames, hops_per_frame, n_mels).mean(2)
    return logmel.unsqueeze(2)


def whisper_features(
    waveforms: Tensor,
    *,
    sample_rate: int = 16000,
    fps: int = 25,
    pretrained: str | None = None,
    groups: Sequence[Sequence[int]] = WHISPER_GROUPS,
    batch_size: int = 8,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    section: str = "params",
    device: torch.device | str | None = None,
) -> Tensor:
    """Whisper encoder features per video frame, [N, T, G, D], as HuMo computes them.

    The waveform is resampled to the feature extractor's rate (16 kHz), cut into the
    extractor's windows (30 s for the hub models), each window's log-mel input run through
    `WhisperModel`'s encoder with every hidden state kept (embeddings + one per layer, the
    last after the final LayerNorm); the 50 Hz states covering the clip (2 per 25 fps frame)
    are averaged over each half-open layer range of `groups` and linearly interpolated
    (align_corners) to T = S // (sample_rate / fps) video frames.
    """
    from repro.core.hub import loader_options
    from repro.core.modelio import from_pretrained

    waveforms = torch.as_tensor(waveforms, dtype=torch.float32)
    if waveforms.dim() != 2:
        raise ReproInputError(f"waveforms: expected [N, S], got {tuple(waveforms.shape)}")
    if not pretrained:
        raise ReproInputError(f"{section}.pretrained: the Whisper checkpoint is required")
    spf = _samples_per_frame(sample_rate, fps, section)
    frames = waveforms.shape[1] // spf
    if frames < 1:
        raise ReproInputError(f"waveforms: {waveforms.shape[1]} samples, shorter than a frame")
    from transformers import WhisperFeatureExtractor, WhisperModel

    options = loader_options({"local_files_only": local_files_only, "cache_dir": cache_dir})
    where = f"{section}.pretrained: {pretrained}"
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(str(pretrained), **options)
    except (OSError, ValueError) as err:
        raise ReproInputError(f"{where}: cannot load a WhisperFeatureExtractor ({err})") from err
    encoder = from_pretrained(WhisperModel, str(pretrained), where, **options).get_encoder()
    device = torch.device("cpu") if device is None else torch.device(device)
    encoder = encoder.to(device)
    layers = len(encoder.layers) + 1
    ranges = _check_groups(groups, layers, section)

    rate = extractor.sampling_rate
    audio = resample(waveforms, sample_rate, rate)
    window = extractor.n_samples  # samples per encoder window (chunk_length seconds)
    states_per_window = extractor.nb_max_frames // 2  # the encoder's conv halves the mel rate
    state_rate = rate / extractor.hop_length / 2  # 50 Hz for every Whisper
    needed = int(round(frames / fps * state_rate))  # states covering the clip
    out = []
    for start in range(0, len(audio), batch_size):
        batch = audio[start : start + batch_size]
        windows = []
        for w0 in range(0, max(1, math.ceil(needed / states_per_window)) * window, window):
            piece = [x[w0 : w0 + window].numpy() for x in batch]
            mel = extractor(piece, sampling_rate=rate, return_tensors="pt").input_features
            with torch.no_grad():
                hidden = encoder(mel.to(device), output_hidden_states=True).hidden_states
            windows.append(torch.stack(hidden, dim=2).float().cpu())  # [b, 1500, L+1, D]
        states = torch.cat(windows, dim=1)[:, :needed]
        grouped = torch.stack([states[:, :, a:b].mean(2) for a, b in ranges], dim=2)
        out.append(_interpolate_time(grouped, frames))
    return torch.cat(out)


def _interpolate_time(features: Tensor, length: int) -> Tensor:
    """[N, T0, G, D] -> [N, length, G, D], linear with aligned corners (HuMo's resampling)."""
    n, t0, g, d = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(n, g * d, t0)
    if t0 == 1:
        flat = flat.expand(n, g * d, length)
    else:
        flat = F.interpolate(flat, size=length, mode="linear", align_corners=True)
    return flat.reshape(n, g, d, length).permute(0, 3, 1, 2).contiguous()


def resample(waveforms: Tensor, rate_in: int, rate_out: int) -> Tensor:
    """Waveforms [N, S] at `rate_in` Hz -> [N, round(S * rate_out / rate_in)] at `rate_out`
    (Whisper's 16 kHz), band-limited by the FFT: the spectrum is cut (or zero-padded) at the
    lower Nyquist frequency and the amplitude kept. Exact for band-limited periodic signals;
    the clip's ends wrap, which a few samples of a clip's silence edge make harmless."""
    if rate_in == rate_out:
        return waveforms
    n_in = waveforms.shape[-1]
    n_out = int(round(n_in * int(rate_out) / int(rate_in)))
    spectrum = torch.fft.rfft(waveforms.double(), dim=-1)
    bins = n_out // 2 + 1
    if spectrum.shape[-1] >= bins:
        spectrum = spectrum[..., :bins]
    else:
        spectrum = F.pad(spectrum, (0, bins - spectrum.shape[-1]))
    out = torch.fft.irfft(spectrum, n=n_out, dim=-1) * (n_out / n_in)
    return out.float()


def _check_groups(groups, layers: int, section: str) -> list[tuple[int, int]]:
    ranges = []
    for group in groups or ():
        ok = isinstance(group, Sequence) and len(group) == 2
        a, b = (group[0], group[1]) if ok else (None, None)
        if not ok or not all(isinstance(x, int) for x in (a, b)) or not 0 <= a < b <= layers:
            raise ReproInputError(
                f"{section}.groups: each group must be [start, stop) with 0 <= start < stop <= "
                f"{layers} (the encoder's hidden states), got {group!r}"
            )
        ranges.append((a, b))
    if not ranges:
        raise ReproInputError(f"{section}.groups: at least one layer range is needed")
    return ranges


def _samples_per_frame(sample_rate, fps, section: str) -> int:
    for key, value in (("sample_rate", sample_rate), ("fps", fps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReproInputError(f"{section}.{key}: must be an integer >= 1, got {value!r}")
    if sample_rate % fps:
        raise ReproInputError(
            f"{section}.sample_rate: {sample_rate} Hz is not a whole number of samples per "
            f"frame at {section}.fps {fps}"
        )
    return sample_rate // fps


def audio_features(
    waveforms: Tensor,
    params: Mapping,
    *,
    section: str = "params",
    device: torch.device | str | None = None,
) -> Tensor:
    """Audio features per video frame, [N, T, G, D], of waveforms [N, S].

    `params["encoder"]` picks the encoder: "logmel" (`logmel_features`, G = 1) or "whisper"
    (`whisper_features`); the other keys are that function's arguments (the keys of both
    may be present, so that a scale overlay can switch the encoder; each uses its own).
    `section` names the config section in error messages.
    """
    if "encoder" not in params:
        raise ReproInputError(f"{section}.encoder: missing (one of {list(AUDIO_ENCODERS)})")
    encoder = params["encoder"]
    unknown = sorted(set(params) - {"encoder", *LOGMEL_KEYS, *WHISPER_KEYS})
    if unknown:
        raise ReproInputError(
            f"{section}: unknown keys {unknown}, allowed encoder and "
            f"{sorted({*LOGMEL_KEYS, *WHISPER_KEYS})}"
        )
    if encoder == "logmel":
        kwargs = {k: params[k] for k in LOGMEL_KEYS if k in params}
        return logmel_features(waveforms, section=section, **kwargs)
    if encoder == "whisper":
        kwargs = {k: params[k] for k in WHISPER_KEYS if k in params}
        return whisper_features(waveforms, section=section, device=device, **kwargs)
    raise ReproInputError(
        f"{section}.encoder: unknown audio encoder {encoder!r}, expected one of "
        f"{list(AUDIO_ENCODERS)}"
    )


# --------------------------------------------------------------------------- stage


def main(argv: list[str] | None = None) -> None:
    from repro.core.stage import Stage

    stage = Stage(
        "Write the talking-faces splits (train / val / test, disjoint identities): drawn, or "
        "read from the clip tree params.root.",
        paper="foundation",
    )
    stage.parser.prog = "repro.foundation.faces"
    stage.parser.add_argument(
        "--out-dir", type=Path, required=True, help="directory for the three splits"
    )
    args = stage.start(argv)
    manifest = write_splits(args.out_dir, stage.params)
    counts = {name: entry["clips"] for name, entry in manifest["splits"].items()}
    log.info("faces written to %s: %s clips", args.out_dir, counts)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

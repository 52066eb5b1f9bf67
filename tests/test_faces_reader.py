"""Real talking-head clips read into the talking-faces splits: frames picked by hand-checkable
times, cropped and resized, audio decoded and resampled, envelope and mouth as the generator
computes them, identities and classes mapped, every bad tree refused naming the file; the
stage writes what load_faces and HuMo's audio stage read."""

import json
import math
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.core.errors import ReproInputError
from repro.foundation import faces_reader as fr
from repro.foundation.faces import (
    SPLITS,
    check_params,
    frame_envelope,
    load_faces,
    main,
    mouth_from_envelope,
    resample,
)

FPS, RATE = 8, 4000  # output fps and sample rate
PARAMS = {"frames": 5, "size": 8, "fps": FPS, "sample_rate": RATE}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


# --------------------------------------------------------------------------- writing trees


def write_wav(path: Path, ints, rate: int, width: int = 2) -> None:
    """Integer samples [S] or [S, C] as a PCM WAV (8-bit: unsigned 0..255)."""
    ints = np.asarray(ints)
    ints = ints[:, None] if ints.ndim == 1 else ints
    if width == 1:
        raw = ints.astype(np.uint8).tobytes()
    elif width == 3:
        v = ints.astype(np.int64) & 0xFFFFFF
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], axis=-1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(ints.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def tone(seconds: float, rate: int, hz: float = 100.0, level: float = 0.3) -> np.ndarray:
    """A 16-bit tone, loudness rising over the clip (so the envelope changes by frame)."""
    t = np.arange(int(round(seconds * rate))) / rate
    ramp = np.linspace(0.1, 1.0, len(t))
    return np.round(32767 * level * ramp * np.sin(2 * np.pi * hz * t)).astype(np.int64)


def make_clip(
    root: Path,
    split: str,
    name: str,
    identity: str = "ann",
    *,
    n_frames: int = 10,
    src_fps: float = 8,
    image_size=(12, 8),
    rate: int = RATE,
    audio=None,
    mouth_open=None,
    **labels,
) -> Path:
    """A clip folder. Source frame i is the colour (10 i, 100, 200 - 10 i) inside its centre
    square (a wide frame's 2-column sides are black, so the crop shows); mask i is nonzero
    on the left half (the value 7). The reference is grey 123."""
    clip = root / split / name
    (clip / "frames").mkdir(parents=True)
    (clip / "masks").mkdir()
    w, h = image_size
    side = min(w, h)
    for i in range(n_frames):
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        top, left = (h - side) // 2, (w - side) // 2
        pixels[top : top + side, left : left + side] = (10 * i % 256, 100, (200 - 10 * i) % 256)
        Image.fromarray(pixels).save(clip / "frames" / f"{i + 1:04d}.png")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[:, : w // 2] = 7
        Image.fromarray(mask).save(clip / "masks" / f"{i + 1:04d}.png")
    Image.new("RGB", (w, h), (123, 123, 123)).save(clip / "reference.png")
    if audio is None:
        audio = tone(n_frames / src_fps + 0.1, rate)
    write_wav(clip / "audio.wav", audio, rate)
    meta = {"caption": f"{identity} talks", "identity": identity, "fps": src_fps, **labels}
    if mouth_open is not None:
        meta["mouth_open"] = mouth_open
    (clip / "clip.json").write_text(json.dumps(meta))
    return clip


def make_tree(root: Path) -> Path:
    """train: bob (2 clips, one labelled nod / green wall), zoe; val: carl; test: dan."""
    make_clip(root, "train", "c1", "bob", motion="nod", background="green wall")
    make_clip(root, "train", "c0", "zoe", motion="shake")
    make_clip(root, "train", "c2", "bob", mouth_open=[i / 10 for i in range(10)])
    make_clip(root, "val", "v0", "carl", background="blue wall")
    make_clip(root, "test", "t0", "dan", motion="nod")
    return root


def read(root: Path, split: str = "train", **params):
    p = {**PARAMS, **params}
    tree = fr.scan_tree(root, frames=p["frames"], fps=p["fps"])
    return fr.read_split(
        tree, split, frames=p["frames"], size=p["size"], fps=p["fps"], sample_rate=p["sample_rate"]
    )


# --------------------------------------------------------------------------- time


def test_frame_indices_by_hand():
    assert fr.frame_indices(5, 16, 8) == [0, 2, 4, 6, 8]
    # 25 -> 8 fps: k * 3.125 = 0, 3.125, 6.25, 9.375, 12.5 (half: up), 15.625, 18.75, 21.875
    assert fr.frame_indices(8, 25, 8) == [0, 3, 6, 9, 13, 16, 19, 22]
    # 29.97 -> 25: k * 1.1988 = 0, 1.1988, 2.3976, 3.5964, 4.7952 (exact decimals)
    assert fr.frame_indices(5, Fraction("29.97"), 25) == [0, 1, 2, 4, 5]
    assert fr.frame_indices(3, 4, 8) == [0, 1, 1]  # slower source: frames repeat


@pytest.mark.parametrize(
    "src_fps, n_frames, frames, expected",
    [(16, 20, 9, [0, 2, 4, 6, 8, 10, 12, 14, 16]), (25, 23, 8, [0, 3, 6, 9, 13, 16, 19, 22])],
)
def test_video_holds_the_picked_source_frames(tmp_path, src_fps, n_frames, frames, expected):
    for split in SPLITS:
        make_clip(tmp_path, split, "a", split, n_frames=n_frames, src_fps=src_fps)
    faces, _ = read(tmp_path, frames=frames)
    assert faces.video.shape == (1, 3, frames, 8, 8)
    # Each frame is one colour after the centre crop: R = 10 i, G = 100, B = 200 - 10 i.
    video = faces.video[0].long()
    assert (video == video[:, :, :1, :1]).all()
    assert video[0, :, 0, 0].tolist() == [10 * i for i in expected]
    assert video[2, :, 0, 0].tolist() == [(200 - 10 * i) % 256 for i in expected]
    assert (video[1] == 100).all()
    # The mask of the same source frame (left half), cropped and resized nearest.
    assert faces.mask.dtype == torch.uint8
    assert faces.mask[0].tolist() == [[[1] * 4 + [0] * 4] * 8] * frames
    assert (faces.reference == 123).all()


def test_crop_resize_and_masks_by_hand(tmp_path):
    # 6 x 10 portrait: the centre square is rows 2..7, a bright 2 x 2 block in its corner.
    pixels = np.zeros((10, 6, 3), dtype=np.uint8)
    pixels[2:8] = 40
    pixels[2:4, 0:2] = 240  # top-left block of the square
    Image.fromarray(pixels).save(tmp_path / "f.png")
    image, size = fr.read_frame(tmp_path / "f.png", 3)
    assert size == (6, 10)
    # Shrinking 6 -> 3 with an antialiased bilinear filter: a triangle of half-width 2
    # input pixels around the output's centre, weights renormalised inside the image.
    # Output 0 (centre 1.0): inputs 0, 1, 2 weigh 0.75, 0.75, 0.25 -> 3/7, 3/7, 1/7, so
    # the bright block has 6/7 x 6/7 of the weight: 40 + 200 * 36 / 49 = 186.9 -> 187.
    # Output 1 (centre 3.0): inputs 1..4 weigh 1/8, 3/8, 3/8, 1/8: 40 + 200 / 64 -> 43.
    assert image[:, 0, 0].tolist() == [187] * 3
    assert image[0, 1, 1] == 43 and image[0, 2, 2] == 40 and image[0, 0, 2] == 40
    # An RGB mask that is nonzero in blue only still marks the face; sizes kept as read.
    mask = np.zeros((10, 6, 3), dtype=np.uint8)
    mask[2:5, 0:3, 2] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    m, size = fr.read_mask(tmp_path / "m.png", 3)
    # nearest-exact from 6 to 3: output i reads source row / column 2 i + 1 -> 1, 3, 5.
    assert size == (6, 10) and m.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    m6, _ = fr.read_mask(tmp_path / "m.png", 6)  # no resize: the crop itself
    assert m6.sum() == 9 and m6[:3, :3].all()


# --------------------------------------------------------------------------- audio


@pytest.mark.parametrize(
    "width, value",
    [(1, 192), (2, 16384), (3, 1 << 22), (4, 1 << 30)],
)
def test_wav_integers_scale_to_half(tmp_path, width, value):
    write_wav(tmp_path / "a.wav", np.full(50, value), 8000, width)
    audio, rate = fr.read_wav(tmp_path / "a.wav")
    assert rate == 8000 and audio.dtype == torch.float32 and audio.shape == (50,)
    assert torch.equal(audio, torch.full((50,), 0.5))


def test_wav_channels_are_averaged_and_negatives_kept(tmp_path):
    stereo = np.stack([np.full(20, 16384), np.full(20, -8192)], axis=1)
    write_wav(tmp_path / "s.wav", stereo, 4000)
    audio, _ = fr.read_wav(tmp_path / "s.wav")
    assert torch.equal(audio, torch.full((20,), 0.125))  # (0.5 - 0.25) / 2
    write_wav(tmp_path / "n.wav", np.full(5, -32768), 4000)
    assert torch.equal(fr.read_wav(tmp_path / "n.wav")[0], torch.full((5,), -1.0))
    write_wav(tmp_path / "u.wav", np.full(5, 0), 4000, 1)  # 8-bit 0 is the most negative
    assert torch.equal(fr.read_wav(tmp_path / "u.wav")[0], torch.full((5,), -1.0))


@pytest.mark.parametrize("rate", [4000, 8000, 44100, 22050])
def test_audio_is_the_clip_span_resampled(tmp_path, rate):
    # 9 frames at 8 fps = 1.125 s -> 4500 samples at 4 kHz, whatever the file's rate
    # (44.1 kHz: ceil(49612.5) = 49613 samples read); a constant stays that constant.
    write_wav(tmp_path / "a.wav", np.full(2 * rate, 16384), rate)
    assert fr.audio_samples_needed(9, 8, rate) == math.ceil(9 * rate / 8)
    audio = fr.read_audio(tmp_path / "a.wav", 9, 8, 4000)
    assert audio.shape == (4500,)
    assert torch.allclose(audio, torch.full((4500,), 0.5), atol=1e-5)


def test_audio_equals_resample_of_the_first_seconds(tmp_path):
    samples = tone(2.0, 8000)
    write_wav(tmp_path / "a.wav", samples, 8000)
    audio = fr.read_audio(tmp_path / "a.wav", 5, 8, 4000)
    first = torch.tensor(samples[:5000] / 32768, dtype=torch.float32)
    assert torch.allclose(audio, resample(first[None], 8000, 4000)[0], atol=1e-6)
    assert audio.shape == (2500,)


def test_envelope_and_mouth_from_the_audio_or_the_annotation(tmp_path):
    make_tree(tmp_path)
    faces, annotated = read(tmp_path)
    assert annotated == 1 and faces.audio.shape == (3, 5 * 500)
    assert torch.equal(faces.envelope, frame_envelope(faces.audio, 500))
    assert faces.envelope[0, -1] > faces.envelope[0, 0]  # the tone gets louder
    # Clips in folder order: c0 (zoe), c1 (bob), c2 (bob, annotated 0, 0.1, ..., 0.9).
    assert [c.split(" ")[0] for c in faces.captions] == ["zoe", "bob", "bob"]
    derived = mouth_from_envelope(faces.envelope[:2])
    assert torch.equal(faces.mouth_open[:2], derived)
    assert torch.allclose(faces.mouth_open[2], torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))
    # 16 -> 8 fps samples the annotation like the frames: source frames 0, 2, 4.
    clip = make_clip(
        tmp_path / "b", "train", "x", n_frames=6, src_fps=16, mouth_open=[0, 0.1, 0.2, 0.3, 0.4, 1]
    )
    for split in ("val", "test"):
        make_clip(tmp_path / "b", split, "x", split)
    faces, _ = read(tmp_path / "b", frames=3)
    assert clip.is_dir() and torch.allclose(faces.mouth_open[0], torch.tensor([0.0, 0.2, 0.4]))


# --------------------------------------------------------------------------- labels


def test_identities_and_classes(tmp_path):
    make_tree(tmp_path)
    tree = fr.scan_tree(tmp_path, frames=5, fps=FPS)
    # Split by split, sorted names: train bob 0, zoe 1; val carl 2; test dan 3.
    assert tree.identities == {"bob": 0, "zoe": 1, "carl": 2, "dan": 3}
    assert tree.motions == ("nod", "shake", "unknown")
    assert tree.backgrounds == ("blue wall", "green wall", "unknown")
    train, _ = read(tmp_path)
    assert train.identity.tolist() == [1, 0, 0] and train.identity.dtype == torch.int64
    assert train.motion.tolist() == [1, 0, 2] and train.background.tolist() == [2, 1, 2]
    assert train.motions == tree.motions and train.backgrounds == tree.backgrounds
    val, _ = read(tmp_path, "val")
    assert val.identity.tolist() == [2] and val.motion.tolist() == [2]
    assert val.background.tolist() == [0]


def test_every_clip_labelled_has_no_unknown_class(tmp_path):
    for split, motion in zip(SPLITS, ("talk", "nod", "talk"), strict=True):
        make_clip(tmp_path, split, "a", split, motion=motion, background="studio")
    tree = fr.scan_tree(tmp_path, frames=5, fps=FPS)
    assert tree.motions == ("nod", "talk") and tree.backgrounds == ("studio",)


def test_identity_in_two_splits_is_refused_naming_both_clips(tmp_path):
    make_tree(tmp_path)
    make_clip(tmp_path, "test", "t1", "zoe")
    a, b = tmp_path / "train" / "c0" / "clip.json", tmp_path / "test" / "t1" / "clip.json"
    with pytest.raises(ReproInputError, match="identity 'zoe' is in two splits") as err:
        fr.scan_tree(tmp_path, frames=5, fps=FPS)
    assert str(a) in str(err.value) and str(b) in str(err.value)


# --------------------------------------------------------------------------- bad trees


def _remove(path: Path) -> None:
    if path.is_dir():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    else:
        path.unlink()


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def _bad_cases(clip: Path):
    """(what breaks the clip, the path the error names, a phrase of it)."""
    return [
        (lambda: _remove(clip / "frames"), clip / "frames", "missing"),
        (lambda: _remove(clip / "masks"), clip / "masks", "missing"),
        (lambda: _remove(clip / "masks" / "0003.png"), clip / "masks", "9 masks for the 10 frames"),
        (lambda: _remove(clip / "clip.json"), clip / "clip.json", "file not found"),
        (lambda: _edit_json(clip / "clip.json", fps=None), clip / "clip.json", "missing key 'fps'"),
        (
            lambda: _edit_json(clip / "clip.json", identity=None),
            clip / "clip.json",
            "missing key 'identity'",
        ),
        (lambda: _edit_json(clip / "clip.json", fps=0), clip / "clip.json", "'fps' must be"),
        (
            lambda: _edit_json(clip / "clip.json", mouth_open=[0.5] * 3),
            clip / "clip.json",
            "'mouth_open' has 3 values",
        ),
        (
            lambda: _edit_json(clip / "clip.json", mouth_open=[2.0] * 10),
            clip / "clip.json",
            "numbers in \\[0, 1\\]",
        ),
        (lambda: (clip / "clip.json").write_text("{"), clip / "clip.json", "not valid JSON"),
        (lambda: _edit_json(clip / "clip.json", fps=25), clip, "10 frames at 25 fps"),
        (lambda: _remove(clip / "reference.png"), clip / "reference.png", "file not found"),
        (lambda: _remove(clip / "audio.wav"), clip / "audio.wav", "file not found"),
        (
            lambda: (clip / "audio.wav").write_bytes(b"RIFF not a wav at all"),
            clip / "audio.wav",
            "not a readable PCM WAV",
        ),
        (
            lambda: write_wav(clip / "audio.wav", np.zeros(100), RATE),
            clip / "audio.wav",
            "100 samples at 4000 Hz",
        ),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_clip_is_refused_naming_the_file(tmp_path, case):
    make_tree(tmp_path)
    clip = tmp_path / "train" / "c1"
    breaks, path, phrase = _bad_cases(clip)[case]
    breaks()
    with pytest.raises(ReproInputError, match=phrase) as err:
        fr.scan_tree(tmp_path, frames=5, fps=FPS)
    assert str(err.value).startswith(str(path)), str(err.value)


def test_bad_files_found_while_decoding_are_named(tmp_path):
    make_tree(tmp_path)
    clip = tmp_path / "train" / "c1"
    (clip / "frames" / "0003.png").write_bytes(b"not a png")
    with pytest.raises(ReproInputError, match=f"{clip / 'frames' / '0003.png'}: not a readable"):
        read(tmp_path)  # 8 -> 8 fps: frame index 2 is decoded
    make_clip(tmp_path / "b", "train", "x", image_size=(8, 8))
    Image.new("L", (6, 6)).save(tmp_path / "b" / "train" / "x" / "masks" / "0002.png")
    for split in ("val", "test"):
        make_clip(tmp_path / "b", split, "x", split)
    with pytest.raises(ReproInputError, match="0002.png: 6x6 pixels, its frame"):
        read(tmp_path / "b")
    wav = tmp_path / "t.wav"
    write_wav(wav, np.zeros(400), RATE)
    wav.write_bytes(wav.read_bytes()[:-100])  # the header still says 400 samples
    with pytest.raises(ReproInputError, match=f"{wav}: truncated"):
        fr.read_wav(wav)


def test_empty_or_missing_split_and_root_are_refused(tmp_path):
    make_tree(tmp_path)
    _remove(tmp_path / "val" / "v0" / "frames")
    _remove(tmp_path / "val" / "v0" / "masks")
    for name in ("clip.json", "reference.png", "audio.wav"):
        (tmp_path / "val" / "v0" / name).unlink()
    (tmp_path / "val" / "v0").rmdir()
    (tmp_path / "val" / "notes.txt").write_text("a file is not a clip")
    with pytest.raises(ReproInputError, match=f"{tmp_path / 'val'}: empty split"):
        fr.scan_tree(tmp_path, frames=5, fps=FPS)
    (tmp_path / "val").rename(tmp_path / "valid")
    with pytest.raises(ReproInputError, match=f"{tmp_path / 'val'}: missing"):
        fr.scan_tree(tmp_path, frames=5, fps=FPS)
    with pytest.raises(ReproInputError, match="params.root: .* is not a directory"):
        fr.scan_tree(tmp_path / "none", frames=5, fps=FPS)


def test_check_params_with_a_root():
    root = {**PARAMS, "root": "/data/clips"}
    check_params(root)  # the generator's keys are not needed
    check_params({**root, "seed": 1, "identities": {}, "clips_per_identity": None})  # nor checked
    with pytest.raises(ReproInputError, match=r"params: missing keys \['fps'\]"):
        check_params({k: v for k, v in root.items() if k != "fps"})
    with pytest.raises(ReproInputError, match="params.root: must be null"):
        check_params({**root, "root": 3})
    with pytest.raises(ReproInputError, match=r"params: unknown keys \['roots'\]"):
        check_params({**root, "roots": "x"})
    with pytest.raises(ReproInputError, match="params.sample_rate: 4001 Hz"):
        check_params({**root, "sample_rate": 4001})
    # root null: the generator's keys are required again.
    with pytest.raises(ReproInputError, match="params: missing keys"):
        check_params({**PARAMS, "root": None})


# --------------------------------------------------------------------------- the stage


def test_stage_writes_what_load_faces_and_humo_audio_read(tmp_path):
    from repro.core.io import sha256_file
    from repro.humo import audio as humo_audio

    root = make_tree(tmp_path / "clips")
    out = tmp_path / "faces"
    params = {**PARAMS, "root": str(root), "seed": 0, "identities": {}, "clips_per_identity": {}}
    main(["--out-dir", str(out), "--params", json.dumps(params)])
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test.safetensors",
        "train.safetensors",
        "val.safetensors",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert manifest["kind"] == "talking_faces" and manifest["params"] == params
    assert source["root"] == str(root) and source["clips"] == {"train": 3, "val": 1, "test": 1}
    assert source["mouth_open_source"] == {"train": "mixed", "val": "envelope", "test": "envelope"}
    expected_ids = {"train": [0, 2], "val": [2, 3], "test": [3, 4]}
    for split in SPLITS:
        path = out / f"{split}.safetensors"
        faces = load_faces(path)
        entry = manifest["splits"][split]
        assert entry["sha256"] == sha256_file(path) and entry["clips"] == len(faces)
        assert entry["identities"] == expected_ids[split]
        assert entry["motion_counts"] == torch.bincount(faces.motion, minlength=3).tolist()
        assert faces.video.shape[1:] == (3, 5, 8, 8) and faces.audio.shape[1] == 2500
        assert faces.fps == FPS and faces.sample_rate == RATE and faces.split == split
        assert faces.motions == ("nod", "shake", "unknown")
    assert manifest["splits"]["train"]["motion_counts"] == [1, 1, 1]

    features = tmp_path / "audio_train.safetensors"
    humo_params = {"audio": {"encoder": "logmel", "n_mels": 8, "pretrained": None, "groups": None}}
    humo_audio.main(
        [
            "--faces",
            str(out / "train.safetensors"),
            "--out",
            str(features),
            "--params",
            json.dumps(humo_params),
        ]
    )
    got = humo_audio.load_audio(features, clips=3, frames=5)
    assert got.shape == (3, 5, 1, 8) and torch.isfinite(got).all()


def test_stage_refuses_a_bad_tree_and_writes_nothing(tmp_path):
    root = make_tree(tmp_path / "clips")
    (root / "test" / "t0" / "reference.png").unlink()
    out = tmp_path / "faces"
    with pytest.raises(ReproInputError, match="reference.png: file not found"):
        main(["--out-dir", str(out), "--params", json.dumps({**PARAMS, "root": str(root)})])
    assert not out.exists() or not list(out.iterdir())


def test_sla_reads_the_same_root_and_drops_a_null_one():
    from repro.sla.workflow import faces_params

    cfg = {
        "data": {"faces": {"root": None, "size": 16, "frames": 9}},
        "sla": {"quality": {"faces": {"size": 32}}},
    }
    assert faces_params(cfg) == {"size": 32, "frames": 9}
    cfg["data"]["faces"]["root"] = "/data/clips"
    assert faces_params(cfg) == {"root": "/data/clips", "size": 32, "frames": 9}


def test_config_accepts_a_root(tmp_path):
    from repro.core.config import load_yaml, merge, schema_errors

    base = Path(__file__).resolve().parents[1]
    cfg = load_yaml(base / "config.yaml")
    assert cfg["data"]["faces"]["root"] is None and schema_errors(cfg) == []
    assert load_yaml(base / "configs" / "paper.yaml")["data"]["faces"]["root"] is None
    assert schema_errors(merge(cfg, {"data": {"faces": {"root": str(tmp_path)}}})) == []
    errors = schema_errors(merge(cfg, {"data": {"faces": {"root": 3}}}))
    assert errors and "data.faces.root" in errors[0]

"""The talking-faces substrate: clips, audio, masks, references, splits, audio features."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors, sha256_file
from repro.foundation import faces as fc
from repro.foundation.faces import (
    BACKGROUNDS,
    MOTIONS,
    PORTRAIT,
    audio_features,
    caption,
    frame_envelope,
    generate_faces,
    identity_traits,
    load_faces,
    logmel_features,
    main,
    mel_filter_bank,
    motion_offsets,
    mouth_from_envelope,
    render_faces,
    write_faces,
)

SEED = 0
IDS = range(6)
CLIPS = 8
STAGE = {
    "seed": 3,
    "frames": 9,
    "size": 16,
    "fps": 8,
    "sample_rate": 4000,
    "identities": {"train": 4, "val": 2, "test": 2},
    "clips_per_identity": {"train": 4, "val": 3, "test": 3},
}
LUMA = torch.tensor([0.299, 0.587, 0.114])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips():
    torch.set_num_threads(1)
    return generate_faces(IDS, CLIPS, SEED, split="train")


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("faces")
    main(["--out-dir", str(out), "--params", json.dumps(STAGE)])
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def lagged(mouth: torch.Tensor, env: torch.Tensor, lag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mouth(t) against env(t - lag) over the frames both have."""
    if lag >= 0:
        return mouth[..., lag:], env[..., : env.shape[-1] - lag]
    return mouth[..., :lag], env[..., -lag:]


# --------------------------------------------------------------------------- captions


def test_caption_names_motion_and_background():
    assert caption("nod", "green wall") == "a person nodding in front of a green wall"
    assert caption("still", "striped wall") == "a person keeping still in front of a striped wall"
    assert caption(2, 1) == "a person shaking their head in front of a blue wall"
    assert caption(3, 2) == "a person swaying in front of a purple wall"
    texts = {caption(m, b) for m in MOTIONS for b in BACKGROUNDS}
    assert len(texts) == len(MOTIONS) * len(BACKGROUNDS)  # every pair has its own caption
    with pytest.raises(ReproInputError, match="motion"):
        caption("dance", "green wall")
    with pytest.raises(ReproInputError, match="background"):
        caption("nod", "beach")


def test_generated_captions_match_the_labels(clips):
    for text, m, b in zip(clips.captions, clips.motion, clips.background, strict=True):
        assert text == caption(int(m), int(b))
        assert BACKGROUNDS[int(b)] in text


# --------------------------------------------------------------------------- determinism


def test_generation_is_deterministic_seeded_and_split_independent(clips):
    again = generate_faces(IDS, CLIPS, SEED, split="train")
    for name, tensor in clips.tensors().items():
        assert torch.equal(tensor, getattr(again, name)), name
    assert again.captions == clips.captions

    other = generate_faces(IDS, CLIPS, SEED + 1)
    assert not torch.equal(other.video, clips.video)
    assert not torch.equal(other.audio, clips.audio)

    # A clip depends on (seed, identity) only: identity 4 drawn alone equals its rows here.
    alone = generate_faces([4], CLIPS, SEED)
    rows = clips.identity == 4
    for name, tensor in alone.tensors().items():
        assert torch.equal(tensor, getattr(clips, name)[rows]), name

    # Rendering in chunks is memory bookkeeping only.
    chunked = generate_faces([4], CLIPS, SEED, chunk=7)
    assert torch.equal(chunked.video, alone.video) and torch.equal(chunked.mask, alone.mask)


def test_same_seed_same_bytes(stage_dir, tmp_path):
    """Every tensor's bytes and every metadata value are the same on a second run.

    (The files' own bytes are not compared: safetensors writes its metadata keys in a
    random order.)"""
    main(["--out-dir", str(tmp_path), "--params", json.dumps(STAGE)])
    for split in fc.SPLITS:
        name = f"{split}.safetensors"
        again, meta_again = load_tensors(tmp_path / name)
        first, meta = load_tensors(stage_dir / name)
        assert meta_again == meta and sorted(again) == sorted(first)
        for key, tensor in first.items():
            assert tensor.dtype == again[key].dtype
            assert tensor.numpy().tobytes() == again[key].numpy().tobytes(), key


def test_identity_traits_depend_on_seed_and_index_only():
    few = identity_traits([5], SEED)
    many = identity_traits([3, 4, 5], SEED)
    for key in few:
        assert torch.equal(few[key][0], many[key][2]), key
    assert not torch.equal(identity_traits([5], SEED + 1)["skin"], few["skin"])
    # Hair always stands out from the skin (luminance gap >= 0.25).
    traits = identity_traits(range(300), SEED)
    gap = ((traits["hair"] - traits["skin"]) @ LUMA).abs()
    assert gap.min() >= fc._MIN_HAIR_CONTRAST
    assert set(traits["hair_style"].tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------- splits, files


def test_stage_writes_identity_disjoint_splits(stage_dir):
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["kind"] == "talking_faces" and manifest["params"] == STAGE
    expected = {"train": (range(0, 4), 4), "val": (range(4, 6), 3), "test": (range(6, 8), 3)}
    seen = set()
    for split, (ids, per) in expected.items():
        path = stage_dir / f"{split}.safetensors"
        faces = load_faces(path)
        _, meta = load_tensors(path)
        assert set(faces.identity.tolist()) == set(ids)
        assert torch.bincount(faces.identity - ids.start).tolist() == [per] * len(ids)
        assert not seen & set(ids)
        seen |= set(ids)
        n = len(ids) * per
        assert faces.video.shape == (n, 3, 9, 16, 16) and faces.video.dtype == torch.uint8
        assert faces.reference.shape == (n, 3, 16, 16) and faces.reference.dtype == torch.uint8
        assert faces.mask.shape == (n, 9, 16, 16) and faces.mask.dtype == torch.uint8
        assert faces.audio.shape == (n, 9 * 500) and faces.audio.dtype == torch.float32
        assert faces.mouth_open.shape == faces.envelope.shape == (n, 9)
        assert len(faces.captions) == n and faces.fps == 8 and faces.sample_rate == 4000
        assert faces.motions == MOTIONS and faces.backgrounds == BACKGROUNDS
        assert (meta["frames"], meta["size"], meta["split"], meta["seed"]) == (9, 16, split, 3)
        entry = manifest["splits"][split]
        assert entry["clips"] == n and entry["identities"] == [ids.start, ids.stop]
        assert entry["sha256"] == sha256_file(path)


def test_motions_and_backgrounds_are_balanced(clips):
    # Each identity cycles through the classes, so 6 x 8 clips hold 12 of each.
    assert torch.bincount(clips.motion).tolist() == [12] * 4
    assert torch.bincount(clips.background).tolist() == [12] * 4


def test_video_float_and_select(clips):
    video = clips.video_float([0, 1])
    assert video.dtype == torch.float32 and video.shape == (2, 3, 9, 16, 16)
    assert torch.equal(video, clips.video[:2].float() / 127.5 - 1)
    assert clips.reference_float().min() >= -1 and clips.reference_float().max() <= 1
    assert torch.equal(clips.video_float(torch.tensor([3]))[0], clips.video[3].float() / 127.5 - 1)
    picked = clips.select([5, 2])
    assert picked.captions == [clips.captions[5], clips.captions[2]]
    assert torch.equal(picked.audio, clips.audio[[5, 2]]) and picked.fps == clips.fps


def test_load_faces_rejects_bad_files(clips, tmp_path):
    with pytest.raises(ReproInputError, match="file not found"):
        load_faces(tmp_path / "none.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"images": torch.zeros(1)}, "digits")
    with pytest.raises(ReproInputError, match="expected a 'talking_faces' file"):
        load_faces(foreign)

    good = tmp_path / "good.safetensors"
    write_faces(good, clips)
    assert torch.equal(load_faces(good).video, clips.video)
    tensors, meta = load_tensors(good)
    meta = {k: v for k, v in meta.items() if k not in ("repro_kind", "format_version")}

    def broken(name: str, **changes) -> str:
        path = tmp_path / f"{name}.safetensors"
        save_tensors(path, {**tensors, **changes}, "talking_faces", meta)
        return str(path)

    path = broken("short_mask", mask=tensors["mask"][:, :8])
    with pytest.raises(ReproInputError, match=f"{path}: mask has 8 frames for 9 video frames"):
        load_faces(path)
    path = broken("small_ref", reference=tensors["reference"][:, :, :8, :8])
    with pytest.raises(ReproInputError, match=f"{path}: reference must be uint8"):
        load_faces(path)
    path = broken("grey_ref", reference=tensors["reference"][:, :1])
    with pytest.raises(ReproInputError, match=f"{path}: reference"):
        load_faces(path)
    path = broken("class", motion=tensors["motion"] + 4)
    with pytest.raises(ReproInputError, match=f"{path}: motion outside"):
        load_faces(path)
    path = broken("mouth", mouth_open=tensors["mouth_open"][:, :3])
    with pytest.raises(ReproInputError, match=f"{path}: mouth_open"):
        load_faces(path)


def test_stage_refuses_bad_params(tmp_path):
    def run(params):
        main(["--out-dir", str(tmp_path), "--params", json.dumps(params)])

    missing = {k: v for k, v in STAGE.items() if k != "fps"}
    with pytest.raises(ReproInputError, match=r"params: missing keys \['fps'\]"):
        run(missing)
    with pytest.raises(ReproInputError, match=r"params: unknown keys \['colour'\]"):
        run({**STAGE, "colour": 1})
    with pytest.raises(ReproInputError, match="params.sample_rate: 4001 Hz"):
        run({**STAGE, "sample_rate": 4001})
    with pytest.raises(ReproInputError, match="params.identities.val: must be an integer >= 1"):
        run({**STAGE, "identities": {"train": 4, "val": 0, "test": 2}})
    with pytest.raises(ReproInputError, match="params.clips_per_identity: must map each"):
        run({**STAGE, "clips_per_identity": {"train": 4}})
    with pytest.raises(ReproInputError, match="params.size: must be an integer >= 8"):
        run({**STAGE, "size": 4})
    assert not list(tmp_path.iterdir())  # nothing written


def test_stage_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "repro.foundation.faces",
            "--out-dir",
            str(tmp_path),
            "--params",
            json.dumps({**STAGE, "frames": 0}),
        ],
        env={**os.environ, "REPRO_MLFLOW": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "params.frames" in lines[0], proc.stderr


# --------------------------------------------------------------------------- audio and mouth


def test_frame_envelope_is_rms_per_frame():
    spf = 100
    t = torch.arange(3 * spf + 7, dtype=torch.float32)  # 7 trailing samples are dropped
    wave = torch.zeros(2, len(t))
    wave[0, :spf] = 0.5  # constant: RMS 0.5
    wave[0, spf : 2 * spf] = 0.3 * torch.sin(2 * math.pi * t[:spf] / 10)  # whole periods
    wave[1, 2 * spf :] = -0.2
    env = frame_envelope(wave, spf, level=0.5)
    expected = torch.tensor([[1.0, 0.3 / math.sqrt(2) / 0.5, 0.0], [0.0, 0.0, 0.4]])
    assert env.shape == (2, 3)
    assert torch.allclose(env, expected, atol=1e-6)
    assert torch.allclose(frame_envelope(wave, spf), env * 0.5 / fc.VOICE_LEVEL)


def test_mouth_from_envelope_by_hand():
    # An impulse of loudness: the opening is symmetric about it (no lag) and by hand
    # (0.15, 0.7, 0.15) smoothing, then (x - 0.1) / 0.65 clamped to [0, 1].
    env = torch.tensor([[0.1, 0.1, 0.75, 0.1, 0.1]])
    mouth = mouth_from_envelope(env)[0]
    centre = (0.15 * 0.1 + 0.7 * 0.75 + 0.15 * 0.1 - 0.1) / 0.65
    side = (0.15 * 0.1 + 0.7 * 0.1 + 0.15 * 0.75 - 0.1) / 0.65
    assert torch.allclose(mouth, torch.tensor([0.0, side, centre, side, 0.0]), atol=1e-6)
    # Just inside / outside the clamps; edge frames repeat.
    flat = mouth_from_envelope(torch.tensor([[0.09, 0.09], [0.11, 0.11], [0.74, 0.74], [0.8, 0.8]]))
    assert flat[0].tolist() == [0.0, 0.0] and flat[3].tolist() == [1.0, 1.0]
    assert 0 < flat[1, 0] < 0.05 and 0.95 < flat[2, 0] < 1.0


def test_stored_envelope_and_mouth_come_from_the_audio(clips):
    assert torch.equal(frame_envelope(clips.audio, 500), clips.envelope)
    assert torch.equal(mouth_from_envelope(clips.envelope), clips.mouth_open)
    assert clips.mouth_open.min() >= 0 and clips.mouth_open.max() <= 1


def test_mouth_follows_the_envelope_at_lag_zero(clips):
    mouth, env = clips.mouth_open, clips.envelope
    pooled = {lag: pearson(*lagged(mouth, env, lag)) for lag in range(-2, 3)}
    assert pooled[0] > 0.9
    assert max(pooled, key=pooled.get) == 0
    # No partial lag either: leading and lagging by a frame match equally (a symmetric
    # smoothing), where mouth(t) drawing on env(t - 1) more than env(t + 1) would not.
    assert abs(pooled[1] - pooled[-1]) < 0.05
    for i in range(len(env)):
        per_clip = {lag: pearson(*lagged(mouth[i], env[i], lag)) for lag in range(-2, 3)}
        assert per_clip[0] > 0.9 and max(per_clip, key=per_clip.get) == 0, (i, per_clip)


def test_syllables_change_within_a_clip(clips):
    env = clips.envelope
    # Loud and quiet frames inside every clip of 9 frames.
    assert (env.amax(1) > 0.4).all() and (env.amin(1) < 0.3).all()
    assert (env.std(1) > 0.1).float().mean() > 0.9


def test_voice_pitch_belongs_to_the_identity(clips):
    """A loud frame's strongest frequency is the speaker's pitch (times the clip's and the
    syllable's factors, within 0.95 * 0.9 .. 1.05 * 1.12), so pitch tells identities apart."""
    pitch = identity_traits(IDS, SEED)["pitch"][clips.identity]
    frames = clips.audio.view(len(clips), 9, 500)
    spectrum = torch.fft.rfft(frames * torch.hann_window(500), n=4000).abs()  # 1 Hz bins
    peak = spectrum[..., 50:].argmax(-1) + 50.0
    loud = clips.envelope > 0.4
    ratio = (peak / pitch[:, None])[loud]
    inside = (ratio > 0.95 * 0.9 - 0.02) & (ratio < 1.05 * 1.12 + 0.02)
    assert loud.sum() > 100 and inside.float().mean() > 0.95


# --------------------------------------------------------------------------- pictures


def one_face(**overrides):
    traits = {k: v[:1] for k, v in identity_traits([7], SEED).items()}
    args = dict(
        offset=torch.zeros(1, 2),
        mouth_open=torch.zeros(1),
        background=torch.tensor([0]),
        gain=torch.ones(1),
        gradient=torch.zeros(1),
    )
    args.update(overrides)
    return render_faces(traits, **args)


def test_mouth_pixels_darken_with_mouth_open_inside_the_mask():
    shut, cover = one_face(mouth_open=torch.tensor([0.0]))
    half, _ = one_face(mouth_open=torch.tensor([0.5]))
    wide, _ = one_face(mouth_open=torch.tensor([1.0]))
    luma = [(img[0] * LUMA.view(3, 1, 1)).sum(0) for img in (shut, half, wide)]
    assert luma[0].sum() > luma[1].sum() + 1 > luma[2].sum() + 2  # monotone, clearly visible
    changed = (luma[2] - luma[0]).abs() > 1e-6
    mask = cover[0] >= 0.5
    assert 4 <= changed.sum() <= 20  # the mouth, not the whole face
    assert (mask[changed]).all()  # the mask covers every mouth pixel
    rows = changed.nonzero()[:, 0]
    assert rows.min() >= 9  # the lower half of a face centred at row 8.5
    # Anti-aliased: half open gives graded pixels, strictly between shut and wide.
    between = (luma[1] < luma[0] - 1e-3) & (luma[1] > luma[2] + 1e-3)
    assert between.any()


def test_mask_is_the_face_ellipse(clips):
    mask = clips.mask
    assert set(mask.unique().tolist()) <= {0, 1}
    traits = identity_traits(IDS, SEED)
    area = math.pi * traits["rx"] * traits["ry"] * 16 * 16  # pixels
    per_clip = mask.float().sum((2, 3)).mean(1)
    expected = area[clips.identity]
    assert ((per_clip - expected).abs() / expected).max() < 0.12
    # (That the mask covers the mouth is checked through the renderer above.)


def test_motion_classes_move_the_head_as_named(clips):
    mask = clips.mask.float()
    grid = torch.arange(16, dtype=torch.float32)
    weight = mask.sum((2, 3))
    cy = (mask.sum(3) * grid).sum(2) / weight  # [N, F] centroid rows
    cx = (mask.sum(2) * grid).sum(2) / weight
    sx, sy = cx.std(1), cy.std(1)
    for i, motion in enumerate(clips.motion.tolist()):
        name = MOTIONS[motion]
        if name == "still":
            assert sx[i] < 0.1 and sy[i] < 0.1, (i, sx[i], sy[i])
        elif name == "nod":
            assert sy[i] > 0.4 and sx[i] < 0.15, (i, sx[i], sy[i])
        elif name == "shake":
            assert sx[i] > 0.4 and sy[i] < 0.15, (i, sx[i], sy[i])
        else:  # sway: both ways
            assert sx[i] > 0.2 and sy[i] > 0.1, (i, sx[i], sy[i])


def test_motion_offsets_by_hand():
    motion = torch.tensor([0, 1, 2, 3])
    amp, period, phase = torch.full((4,), 0.1), torch.full((4,), 4.0), torch.zeros(4)
    off = motion_offsets(motion, amp, period, phase, 5)
    s = 0.1 * torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0])
    c = 0.1 * torch.tensor([1.0, 0.0, -1.0, 0.0, 1.0])
    assert torch.allclose(off[0], torch.zeros(5, 2))
    assert torch.allclose(off[1], torch.stack([torch.zeros(5), s], 1), atol=1e-6)
    assert torch.allclose(off[2], torch.stack([s, torch.zeros(5)], 1), atol=1e-6)
    assert torch.allclose(off[3], torch.stack([c, 0.6 * s], 1), atol=1e-6)


def test_backgrounds_are_drawn_as_named(clips):
    corner = clips.video[:, :, 0, 0, :4].float()  # [N, 3, 4]: top row, first 4 columns
    for i, b in enumerate(clips.background.tolist()):
        r, g, bl = corner[i, :, 0]
        name = BACKGROUNDS[b]
        if name == "green wall":
            assert g > r + 40 and g > bl + 40
        elif name == "blue wall":
            assert bl > r + 60 and bl > g + 40
        elif name == "purple wall":
            assert r > g + 30 and bl > g + 30
        else:  # 2-pixel stripes: bright yellow, then dark slate
            bright = corner[i, :, :2].T @ LUMA
            dark = corner[i, :, 2:].T @ LUMA
            assert (bright > dark + 80).all()


def medoid_chroma(pixels: torch.Tensor) -> torch.Tensor:
    """The chroma (RGB / sum) of the pixel [3, P] nearest all others in chroma: the colour
    of the majority, robust to a minority of other colours (unlike per-channel medians)."""
    chroma = (pixels / pixels.sum(0, keepdim=True).clamp_min(1)).T
    return chroma[torch.cdist(chroma, chroma).sum(1).argmin()]


def test_reference_differs_from_every_frame_but_shares_the_skin(clips):
    skin = identity_traits(IDS, SEED)["skin"][clips.identity]
    skin_chroma = skin / skin.sum(1, keepdim=True)
    ref = clips.reference.float()
    # A neutral backdrop, not the clip's background.
    corner = ref[:, :, 0, 0]
    assert ((corner.amax(1) - corner.amin(1)) < 10).all()
    # Different from each frame of its clip.
    diff = (ref[:, :, None] - clips.video.float()).abs().mean((1, 3, 4))  # [N, F]
    assert diff.min() > 10
    # The skin: the medoid (by chroma) of the reference's central 4x4 block, mostly skin
    # (an eye or the mouth may reach in), has the identity's skin chroma (lighting scales
    # all channels alike); so has the medoid of the clip's pixels inside its face mask
    # (skin, with a fringe, eyes and the mouth).
    chroma = torch.stack([medoid_chroma(r[:, 7:11, 6:10].flatten(1)) for r in ref])
    assert (chroma - skin_chroma).abs().max() < 0.02
    for i in range(len(clips)):
        inside = clips.video[i].float().permute(1, 2, 3, 0)[clips.mask[i].bool()].T  # [3, P]
        assert (medoid_chroma(inside) - skin_chroma[i]).abs().max() < 0.02
    # And another identity's skin is further away than the own one, on average.
    other = skin_chroma.roll(CLIPS, dims=0)
    assert (chroma - other).abs().sum(1).mean() > 2 * (chroma - skin_chroma).abs().sum(1).mean()


def test_reference_uses_the_portrait_backdrop():
    image, _ = one_face(background=torch.tensor([PORTRAIT]))
    assert torch.allclose(image[0, :, 0, 0], fc._BACKGROUND_RGB[PORTRAIT, 0])


# --------------------------------------------------------------------------- audio features


def hand_mel_filters(n_freqs, n_mels, sample_rate, f_min, f_max):
    """HTK triangles written out: corners equally spaced in mel, evaluated at bin freqs."""

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    corners = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_freqs)
    out = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, c, hi = corners[m : m + 3]
        up = (freqs - lo) / (c - lo)
        down = (hi - freqs) / (hi - c)
        out[:, m] = np.maximum(0.0, np.minimum(up, down))
    return out, corners


def test_mel_filter_bank_is_htk_triangles():
    bank = mel_filter_bank(129, 16, 4000, 50.0, 2000.0).numpy()
    hand, corners = hand_mel_filters(129, 16, 4000, 50.0, 2000.0)
    assert bank.shape == (129, 16)
    assert np.allclose(bank, hand, atol=1e-5)
    freqs = np.linspace(0, 2000, 129)
    # Between the first and last centres the triangles sum to 1; outside the corners, 0.
    middle = (freqs >= corners[1]) & (freqs <= corners[-2])
    assert np.allclose(bank[middle].sum(1), 1.0, atol=1e-5)
    assert (bank[(freqs < 50.0) | (freqs > 2000.0)] == 0).all()
    # Each filter peaks at the bin nearest its centre.
    nearest = np.abs(freqs[:, None] - corners[None, 1:-1]).argmin(0)
    assert (bank.argmax(0) == nearest).all()


def test_logmel_pools_exactly_the_frames_samples():
    spf = 500
    wave = torch.zeros(1, 5 * spf + 30)  # 30 trailing samples: not a frame
    t = torch.arange(spf, dtype=torch.float32)
    wave[0, 2 * spf : 3 * spf] = 0.5 * torch.sin(2 * math.pi * 440 * t / 4000)
    feats = logmel_features(wave, sample_rate=4000, fps=8, n_fft=256, hops_per_frame=10)
    assert feats.shape == (1, 5, 1, 16)
    silent = math.log(1e-6)
    # Frames 0 and 4 are farther than half a window (128) from frame 2's samples.
    assert torch.allclose(feats[0, [0, 4]], torch.full((2, 1, 16), silent))
    energy = feats[0, :, 0].exp().sum(-1)
    assert energy.argmax() == 2 and energy[2] > 10 * energy[1]
    # STFT frames centred inside their video frame: frames 1 and 3 see the same leakage.
    assert torch.isclose(energy[1], energy[3], rtol=0.2)
    # The 440 Hz tone lands in the band whose centre is nearest 440 Hz.
    _, corners = hand_mel_filters(129, 16, 4000, 50.0, 2000.0)
    assert feats[0, 2, 0].argmax() == np.abs(corners[1:-1] - 440).argmin()


def test_audio_features_logmel_on_clips(clips):
    params = {
        "encoder": "logmel",
        "sample_rate": 4000,
        "fps": 8,
        "n_fft": 256,
        "hops_per_frame": 10,
        "n_mels": 16,
        "f_min": 50.0,
        "f_max": None,
        # Whisper's keys may sit beside (a scale overlay switches the encoder).
        "pretrained": "unused",
        "groups": [[0, 1]],
    }
    feats = audio_features(clips.audio, params)
    assert feats.shape == (len(clips), 9, 1, 16) and torch.isfinite(feats).all()
    assert torch.equal(feats, logmel_features(clips.audio))
    # Loudness is in the features: their total energy follows the envelope.
    energy = feats[:, :, 0].exp().sum(-1).log()
    assert pearson(energy, clips.envelope.log()) > 0.85


def test_audio_features_bad_inputs(clips):
    wave = clips.audio[:2]
    with pytest.raises(ReproInputError, match="humo.audio.encoder: unknown audio encoder 'mfcc'"):
        audio_features(wave, {"encoder": "mfcc"}, section="humo.audio")
    with pytest.raises(ReproInputError, match="params.encoder: missing"):
        audio_features(wave, {})
    with pytest.raises(ReproInputError, match=r"params: unknown keys \['hop'\]"):
        audio_features(wave, {"encoder": "logmel", "hop": 3})
    with pytest.raises(ReproInputError, match="params.hops_per_frame: must divide the 500"):
        audio_features(wave, {"encoder": "logmel", "hops_per_frame": 3})
    with pytest.raises(ReproInputError, match="params.sample_rate: 4000 Hz .* params.fps 7"):
        audio_features(wave, {"encoder": "logmel", "fps": 7})
    with pytest.raises(ReproInputError, match="params.pretrained: the Whisper checkpoint"):
        audio_features(wave, {"encoder": "whisper"})
    with pytest.raises(ReproInputError, match="waveforms: expected"):
        logmel_features(wave[0])


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A tiny Whisper (3 encoder layers, 16 mel bins, 1 s windows) saved locally."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    path = tmp_path_factory.mktemp("whisper")
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=16,
        d_model=16,
        encoder_layers=3,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=50,  # 1 s of 100 mel frames, halved by the encoder's conv
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(path)
    return path


def test_whisper_groups_are_layer_means_interpolated_to_the_frames(tiny_whisper):
    from transformers import WhisperFeatureExtractor, WhisperModel

    gen = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(2, 9600, generator=gen)  # 0.6 s at 16 kHz: 15 frames at 25 fps
    groups = [[0, 2], [2, 4], [3, 4]]
    params = {"encoder": "whisper", "pretrained": str(tiny_whisper), "groups": groups}
    feats = audio_features(wave, {**params, "sample_rate": 16000, "fps": 25})
    assert feats.shape == (2, 15, 3, 16)

    # By hand: the 4 hidden states (embeddings, 2 layers, the last layer after the final
    # LayerNorm), 30 of them at 50 Hz cover 0.6 s, group means, then np.interp.
    extractor = WhisperFeatureExtractor.from_pretrained(tiny_whisper)
    encoder = WhisperModel.from_pretrained(tiny_whisper).get_encoder().eval()
    mel = extractor(list(wave.numpy()), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        hidden = encoder(mel, output_hidden_states=True).hidden_states
    assert len(hidden) == 4
    states = torch.stack(hidden, 2)[:, :30].numpy()  # [2, 30, 4, 16]
    means = [states[:, :, 0:2].mean(2), states[:, :, 2:4].mean(2), states[:, :, 3]]
    where = np.arange(15) * (29 / 14)  # align_corners: first and last states kept
    expected = np.zeros((2, 15, 3, 16))
    for g, m in enumerate(means):
        for n in range(2):
            for d in range(16):
                expected[n, :, g, d] = np.interp(where, np.arange(30), m[n, :, d])
    assert np.allclose(feats.numpy(), expected, atol=1e-5)

    # A clip longer than a window runs window by window; 4 kHz audio is resampled first.
    long = audio_features(
        0.1 * torch.randn(1, 4000 * 3, generator=gen), {**params, "sample_rate": 4000, "fps": 8}
    )
    assert long.shape == (1, 24, 3, 16) and torch.isfinite(long).all()

    with pytest.raises(ReproInputError, match=r"humo.audio.groups: .* <= 4 .*\[3, 5\]"):
        audio_features(wave, {**params, "groups": [[3, 5]]}, section="humo.audio")
    with pytest.raises(ReproInputError, match="params.pretrained: .*nowhere"):
        audio_features(wave, {**params, "pretrained": str(tiny_whisper / "nowhere")})


def test_resample_keeps_a_tone_and_its_loudness():
    """A 100 Hz tone at 4 kHz resampled to 16 kHz is the same tone (an independent sine at
    16 kHz), and back; the clip's length scales with the rate."""
    from repro.foundation.faces import resample

    t_in = torch.arange(400, dtype=torch.float64) / 4000
    tone = torch.sin(2 * torch.pi * 100 * t_in).float()[None]
    up = resample(tone, 4000, 16000)
    t_out = torch.arange(1600, dtype=torch.float64) / 16000
    assert up.shape == (1, 1600)
    assert torch.allclose(up[0].double(), torch.sin(2 * torch.pi * 100 * t_out), atol=1e-4)
    assert torch.allclose(resample(up, 16000, 4000), tone, atol=1e-4)
    assert resample(tone, 4000, 4000) is tone

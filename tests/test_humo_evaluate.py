"""HuMo's judges and metrics (repro.humo.evaluate).

The pure functions are checked against hand computations and independent references
(numpy's corrcoef, scipy's sqrtm); the judges are trained on a small synthetic
talking-faces set drawn here (a coloured square per identity, a dark mouth bar whose
height is the mouth opening, a coloured wall, a head that stays, nods or shakes), so
the tests do not depend on repro.foundation.faces.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.humo import evaluate as ev

MOTIONS = ["still", "nod", "shake"]
BACKGROUNDS = ["grey wall", "green wall", "blue wall"]
WALLS = torch.tensor([[110, 110, 110], [40, 150, 60], [40, 60, 170]], dtype=torch.float32)
# Per-frame head offsets (dy, dx) of each motion class, cycled over the frames.
PATTERNS = {0: [(0, 0)], 1: [(0, 0), (1, 0), (0, 0), (-1, 0)], 2: [(0, 0), (0, 1), (0, 0), (0, -1)]}


def identity_colours(identity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(skin, hair) colours of an identity, drawn from its own seed."""
    g = torch.Generator().manual_seed(1000 + identity)
    skin = 140 + 115 * torch.rand(3, generator=g)
    hair = 100 * torch.rand(3, generator=g)
    return skin, hair


def draw_frame(skin, hair, wall, dy: int, dx: int, mouth: float, size: int) -> torch.Tensor:
    """One frame [3, S, S] float in [0, 255]: wall, an 8x8 face square with hair on top
    and a dark mouth bar (rows 9.. of the face) of height 3 * mouth pixels, the last row
    graded (anti-aliased)."""
    img = wall.view(3, 1, 1).expand(3, size, size).clone()
    top, left = 4 + dy, 4 + dx
    img[:, top : top + 8, left : left + 8] = skin.view(3, 1, 1)
    img[:, top : top + 2, left : left + 8] = hair.view(3, 1, 1)
    height = 3.0 * mouth
    for r in range(3):
        alpha = min(max(height - r, 0.0), 1.0)
        row = top + 5 + r
        img[:, row, left + 2 : left + 6] = (1 - alpha) * img[
            :, row, left + 2 : left + 6
        ] + alpha * 20
    return img


def make_clips(identities, clips_per_identity: int, frames: int = 6, size: int = 16, seed: int = 0):
    """The tensors of a talking-faces split (the evaluate module's subset of the contract)."""
    g = torch.Generator().manual_seed(seed)
    video, reference, envelope, ids, motion, background = [], [], [], [], [], []
    for identity in identities:
        skin, hair = identity_colours(identity)
        for _ in range(clips_per_identity):
            m = int(torch.randint(3, (1,), generator=g))
            b = int(torch.randint(3, (1,), generator=g))
            env = torch.rand(frames, generator=g)
            light = 0.85 + 0.3 * float(torch.rand(1, generator=g))
            pattern = PATTERNS[m]
            clip = [
                draw_frame(skin * light, hair * light, WALLS[b], *pattern[t % len(pattern)],
                           float(env[t]), size)
                for t in range(frames)
            ]  # fmt: skip
            video.append(torch.stack(clip, dim=1))
            # The reference: another lighting, the head still, the mouth half open, grey wall.
            reference.append(draw_frame(skin * 1.1, hair * 1.1, WALLS[0], 0, 0, 0.3, size))
            envelope.append(env)
            ids.append(identity)
            motion.append(m)
            background.append(b)
    as_uint8 = lambda x: torch.stack(x).clamp(0, 255).round().to(torch.uint8)  # noqa: E731
    envelope = torch.stack(envelope)
    return {
        "video": as_uint8(video),
        "reference": as_uint8(reference),
        "mouth_open": envelope.clone(),
        "envelope": envelope,
        "identity": torch.tensor(ids),
        "motion": torch.tensor(motion),
        "background": torch.tensor(background),
    }


def write_faces(path, tensors, split="train"):
    meta = {"motions": MOTIONS, "backgrounds": BACKGROUNDS, "split": split, "fps": 8}
    save_tensors(path, tensors, kind="talking_faces", metadata=meta)
    return path


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------


def test_pearson_by_hand_and_constant_guard():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([2.0, 1.0, 4.0, 3.0])
    # centred a = [-1.5,-.5,.5,1.5], b = [-.5,-1.5,1.5,.5]: dot = .75+.75+.75+.75 = 3,
    # |a|^2 = |b|^2 = 5 -> r = 3 / 5.
    assert ev.pearson(a, b).item() == pytest.approx(0.6, abs=1e-12)
    assert ev.pearson(a, -a).item() == pytest.approx(-1.0, abs=1e-12)
    assert ev.pearson(torch.full((4,), 0.7), b).item() == 0.0
    # Just below / just above the constant threshold (std of +-d is d).
    tiny = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    assert ev.pearson(0.5 * ev.CONSTANT_STD * tiny, tiny).item() == 0.0
    assert ev.pearson(2.0 * ev.CONSTANT_STD * tiny, tiny).item() == pytest.approx(1.0)


def test_sync_scores_find_a_planted_offset_exactly():
    g = torch.Generator().manual_seed(3)
    frames, lag = 12, 2
    envelope = torch.rand(5, frames, generator=g)
    # mouth(t) = envelope(t - lag): the mouth lags the audio by `lag` frames.
    mouth = torch.roll(envelope, lag, dims=1)
    mouth[:, :lag] = torch.rand(5, lag, generator=g)
    best, offset, curve = ev.sync_scores(mouth, envelope, max_offset=3)
    assert offset.tolist() == [lag] * 5
    assert torch.allclose(best, torch.ones(5, dtype=best.dtype))
    assert curve.shape == (5, 7)
    assert torch.equal(curve[:, ev.sync_offsets(3).index(lag)], best)
    # The other direction: the mouth leads.
    best, offset, _ = ev.sync_scores(envelope, mouth, max_offset=3)
    assert offset.tolist() == [-lag] * 5


def test_sync_curve_entries_by_hand():
    mouth = torch.tensor([[0.0, 1.0, 0.0, 2.0, 1.0, 3.0]])
    envelope = torch.tensor([[1.0, 0.0, 2.0, 2.0, 0.0, 1.0]])
    _, _, curve = ev.sync_scores(mouth, envelope, max_offset=2)
    for k, o in enumerate(range(-2, 3)):
        # mouth(t) against envelope(t - o) over t in [max(0, o), min(F, F + o)).
        pairs = [(mouth[0, t], envelope[0, t - o]) for t in range(6) if 0 <= t - o < 6]
        m, e = np.array(pairs, dtype=np.float64).T
        assert curve[0, k].item() == pytest.approx(np.corrcoef(m, e)[0, 1], abs=1e-12)


def test_sync_ties_prefer_the_offset_nearest_zero_and_constant_series_give_zero():
    # A period-2 signal correlates perfectly at offsets 0 and +-2: the best offset is 0.
    mouth = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    best, offset, _ = ev.sync_scores(mouth, mouth.clone(), max_offset=2)
    assert offset.item() == 0 and best.item() == pytest.approx(1.0)
    frozen = torch.full((2, 8), 0.4)
    best, offset, curve = ev.sync_scores(frozen, torch.rand(2, 8), max_offset=2)
    assert torch.all(curve == 0) and torch.all(best == 0) and torch.all(offset == 0)


def test_sync_scores_refuse_too_large_offsets_and_bad_shapes():
    x = torch.rand(2, 6)
    ev.sync_scores(x, x, max_offset=3)  # 3 overlapping frames: just allowed
    with pytest.raises(ReproInputError, match="max_offset"):
        ev.sync_scores(x, x, max_offset=4)
    with pytest.raises(ReproInputError, match="max_offset"):
        ev.sync_scores(x, x, max_offset=-1)
    with pytest.raises(ReproInputError, match="envelope"):
        ev.sync_scores(x, torch.rand(2, 5), max_offset=1)


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_has_no_fixed_point(n):
    for seed in range(20):
        perm = ev.derangement(n, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert not torch.any(perm == torch.arange(n))
    env = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 4)
    shuffled = ev.shuffled_envelopes(env, torch.Generator().manual_seed(0))
    assert not torch.any(shuffled[:, 0] == env[:, 0])
    with pytest.raises(ReproInputError, match="at least 2 clips"):
        ev.derangement(1, torch.Generator())


def test_frechet_frames_against_an_independent_formula():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(300, 4, generator=g, dtype=torch.float64) + 1.0
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert ev.frechet_frames(a, b) == pytest.approx(expected, rel=1e-6)
    assert ev.frechet_frames(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ReproInputError, match="feature sizes"):
        ev.frechet_frames(a, b[:, :3])


class StubScene:
    """classify() returns fixed predictions: text alignment is then counting by hand."""

    def __init__(self, motion, background):
        self.motion, self.background = torch.tensor(motion), torch.tensor(background)

    def classify(self, video):
        return self.motion, self.background


def test_text_alignment_counts_by_hand():
    stub = StubScene(motion=[0, 1, 2, 1], background=[2, 2, 0, 1])
    motion_ok, background_ok = ev.text_alignment(
        stub, torch.zeros(4, 3, 2, 4, 4), torch.tensor([0, 1, 1, 1]), torch.tensor([2, 0, 0, 1])
    )
    assert motion_ok.tolist() == [True, True, False, True]
    assert background_ok.tolist() == [True, False, True, True]


def test_identity_similarity_of_identical_inputs_is_one():
    torch.manual_seed(0)
    encoder = ev.IdentityEncoder(size=16, width=4, embed_dim=8, num_identities=3).eval()
    reference = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    video = reference[:, :, None].expand(3, 3, 5, 16, 16)  # every frame = the reference
    sim = ev.identity_similarity(encoder, video, reference)
    assert torch.allclose(sim, torch.ones(3), atol=1e-5)
    # Frames of other clips: the mean over frames of the cosine, computed here directly.
    mixed = torch.stack([reference.roll(k, dims=0) for k in range(4)], dim=2)  # [3, 3, 4, H, W]
    sim = ev.identity_similarity(encoder, mixed, reference)
    with torch.no_grad():
        raw = lambda x: encoder.body(x.float() / 127.5 - 1)  # noqa: E731
        expected = torch.stack(
            [torch.cosine_similarity(raw(mixed[:, :, t]), raw(reference)) for t in range(4)]
        ).mean(0)
    assert torch.allclose(sim, expected, atol=1e-6)
    assert sim.max() < 1 - 1e-6  # frames 1..3 are other clips' references
    with pytest.raises(ReproInputError, match="reference"):
        ev.identity_similarity(encoder, video, reference[:2])


# ---------------------------------------------------------------------------------------
# Judges and stages on synthetic faces
# ---------------------------------------------------------------------------------------

QUICK = {"epochs": 12, "batch_size": 32, "lr": 3e-3, "seed": 0, "width": 8, "embed_dim": 16}


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Synthetic splits: 12 train identities x 12 clips, 5 val and 6 test identities."""
    root = tmp_path_factory.mktemp("faces")
    splits = {
        "train": make_clips(range(12), 12, seed=1),
        "val": make_clips(range(12, 17), 6, seed=2),
        "test": make_clips(range(17, 23), 5, seed=3),
    }
    return {name: write_faces(root / f"{name}.safetensors", t, name) for name, t in splits.items()}


@pytest.fixture(scope="module")
def judges_file(faces, tmp_path_factory):
    """The judges trained through the CLI stage (one thread)."""
    import os

    os.environ["REPRO_MLFLOW"] = "0"
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("judges")
    out, metrics = root / "judges.safetensors", root / "judges.json"
    ev.main(["judges", "--faces-train", str(faces["train"]), "--faces-val", str(faces["val"]),
             "--out", str(out), "--metrics", str(metrics), "--params", json.dumps(QUICK)])  # fmt: skip
    return out, json.loads(metrics.read_text())


def test_judges_read_real_clips_better_than_chance(judges_file):
    _, quality = judges_file
    # 5 val identities: chance top-1 is 0.2; 3 classes: chance accuracy 1/3.
    assert quality["identity_chance"] == pytest.approx(0.2)
    assert quality["identity_top1"] >= 0.8
    assert quality["id_sim_same"] > quality["id_sim_other"] + 0.2
    assert quality["mouth_r"] > 0.8
    assert quality["sync_offset"] < 0.5 and quality["sync_c"] > quality["sync_c_shuffled"] + 0.3
    assert quality["motion_acc"] > 0.7
    assert quality["background_acc"] > 0.9


def test_judges_round_trip_and_deterministic(judges_file, faces):
    path, quality = judges_file
    judges = ev.load_judges(path)
    assert judges.motions == MOTIONS and judges.backgrounds == BACKGROUNDS
    assert judges.quality["identity_top1"] == pytest.approx(quality["identity_top1"])
    val = ev.read_clips(faces["val"])
    again = ev.judge_quality(judges, val, max_offset=2)
    for key in ("identity_top1", "mouth_r", "motion_acc", "background_acc"):
        assert again[key] == pytest.approx(quality[key], abs=1e-6)
    with pytest.raises(ReproInputError, match="humo_judges"):
        ev.load_judges(faces["val"])


def run_metrics(judges, faces, out, *extra, params=None):
    ev.main(["metrics", "--judges", str(judges), "--faces-test", str(faces["test"]),
             "--out", str(out), "--params", json.dumps(params or {"max_offset": 2, "seed": 0}),
             *extra])  # fmt: skip
    return json.loads(out.read_text())


def test_metrics_of_the_real_clips(judges_file, faces, tmp_path):
    row = run_metrics(judges_file[0], faces, tmp_path / "real.json", "--real")
    assert {k: row[k] for k in ("task", "variant", "cfg", "seed")} == {
        "task": "real", "variant": "real", "cfg": "none", "seed": 0
    }  # fmt: skip
    assert row["n_clips"] == 30
    assert row["fid"] == pytest.approx(0.0, abs=1e-4)  # the clips against themselves
    assert row["sync_c"] > row["sync_c_shuffled"] + 0.3 and row["sync_offset"] < 0.5
    assert row["id_sim"] > 0.5 and row["text_align"] > 0.6
    assert row["text_align"] <= min(row["motion_acc"], row["background_acc"])
    assert row["max_offset"] == 2 and len(row["sync_curve"]) == 5
    assert len(row["sync_curve_shuffled"]) == 5
    # The matched curve peaks at offset 0; its mean there is below the mean best corr.
    assert int(np.argmax(row["sync_curve"])) == 2
    assert row["sync_curve"][2] <= row["sync_c"] + 1e-9
    # Against other people's frames (the val identities) the frame FID is no longer 0.
    other = run_metrics(judges_file[0], faces, tmp_path / "r.json", "--real", "--fid-reference",
                        str(faces["val"]))  # fmt: skip
    assert other["fid"] > 0.02 and other["sync_c"] == row["sync_c"]


def write_generated(path, video, index, **meta):
    meta = {"task": "TIA", "variant": "full", "cfg": "paper", "seed": 1, "audio": "matched", **meta}
    save_tensors(path, {"video": video, "index": index}, "humo_generated", meta)
    return path


def test_metrics_of_generated_sets_see_what_was_broken(judges_file, faces, tmp_path):
    """ "Generated" sets made of test clips, each broken in one way, for some rows of the
    test split: the frames reversed (the mouth out of sync with the audio), the clips of
    other identities (the wrong person), noise (the frames off the real distribution)."""
    test = ev.read_clips(faces["test"])
    index = torch.tensor([3, 0, 7, 12, 20, 21, 5, 9, 14, 28])
    real = run_metrics(judges_file[0], faces, tmp_path / "real.json", "--real",
                       params={"max_offset": 2, "seed": 0, "clips": 10})  # fmt: skip
    assert real["n_clips"] == 10

    untouched = write_generated(tmp_path / "same.safetensors", test.video[index], index)
    row = run_metrics(judges_file[0], faces, tmp_path / "same.json", "--generated", str(untouched))
    assert {k: row[k] for k in ev.ROW_KEYS} == {"task": "TIA", "variant": "full", "cfg": "paper",
                                                 "seed": 1}  # fmt: skip
    assert row["n_clips"] == 10 and set(ev.ROW_METRICS) <= set(row)
    assert row["fid"] == pytest.approx(0.0, abs=1e-4) and row["id_sim"] > 0.8

    reversed_ = write_generated(tmp_path / "rev.safetensors", test.video[index].flip(2), index)
    row_rev = run_metrics(
        judges_file[0], faces, tmp_path / "rev.json", "--generated", str(reversed_)
    )
    assert row_rev["sync_c"] < row["sync_c"] - 0.2
    assert row_rev["id_sim"] == pytest.approx(row["id_sim"], abs=1e-4)  # same frames

    # Clip 3 of identity 17 shown as clip 0's, etc: test rows 5 apart are other identities.
    others = write_generated(tmp_path / "others.safetensors", test.video[(index + 5) % 30], index)
    row_other = run_metrics(judges_file[0], faces, tmp_path / "o.json", "--generated", str(others))
    assert row_other["id_sim"] < row["id_sim"] - 0.5

    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-100, 101, test.video[index].shape, generator=g)
    noisy = (test.video[index].int() + noise).clamp(0, 255).to(torch.uint8)
    noisy_file = write_generated(tmp_path / "noisy.safetensors", noisy, index)
    row_noisy = run_metrics(
        judges_file[0], faces, tmp_path / "n.json", "--generated", str(noisy_file)
    )
    # Frames far off the real ones are further than real frames of other people.
    assert row_noisy["fid"] > 2 * row_other["fid"] > 0.02


def test_metrics_refuse_bad_inputs(judges_file, faces, tmp_path):
    test = ev.read_clips(faces["test"])
    meta = {"task": "TA", "variant": "full", "cfg": "paper", "seed": 0}
    bad_index = tmp_path / "bad_index.safetensors"
    save_tensors(bad_index, {"video": test.video[:2], "index": torch.tensor([0, 30])},
                 "humo_generated", meta)  # fmt: skip
    with pytest.raises(ReproInputError, match="bad_index.*index outside"):
        run_metrics(judges_file[0], faces, tmp_path / "x.json", "--generated", str(bad_index))
    short = tmp_path / "short.safetensors"
    save_tensors(short, {"video": test.video[:2, :, :4], "index": torch.tensor([0, 1])},
                 "humo_generated", meta)  # fmt: skip
    with pytest.raises(ReproInputError, match="short.*do not match"):
        run_metrics(judges_file[0], faces, tmp_path / "x.json", "--generated", str(short))
    no_meta = tmp_path / "no_meta.safetensors"
    save_tensors(no_meta, {"video": test.video[:2], "index": torch.tensor([0, 1])},
                 "humo_generated", {"task": "TA"})  # fmt: skip
    with pytest.raises(ReproInputError, match="no_meta.*lacks"):
        run_metrics(judges_file[0], faces, tmp_path / "x.json", "--generated", str(no_meta))
    with pytest.raises(ReproInputError, match="humo_generated"):
        run_metrics(judges_file[0], faces, tmp_path / "x.json", "--generated", str(faces["val"]))
    with pytest.raises(ReproInputError, match="unknown keys"):
        run_metrics(judges_file[0], faces, tmp_path / "x.json", "--real", params={"offset": 2})
    with pytest.raises(ReproInputError, match="max_offset"):
        run_metrics(judges_file[0], faces, tmp_path / "x.json", "--real",
                    params={"max_offset": 4, "seed": 0})  # fmt: skip


def test_read_clips_refuses_inconsistent_files(faces, tmp_path):
    tensors = make_clips([0], 2, frames=4)
    tensors["envelope"] = tensors["envelope"][:, :3]
    path = write_faces(tmp_path / "broken.safetensors", tensors)
    with pytest.raises(ReproInputError, match="broken.*envelope"):
        ev.read_clips(path)
    tensors = make_clips([0], 2, frames=4)
    tensors["motion"][0] = 5
    path = write_faces(tmp_path / "labels.safetensors", tensors)
    with pytest.raises(ReproInputError, match="labels.*motion labels"):
        ev.read_clips(path)
    with pytest.raises(ReproInputError, match="unknown keys"):
        ev.judge_params({"epoch": 3})


def test_main_needs_a_subcommand():
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["evaluate"])
    assert exit_info.value.code == 2
    assert math.isfinite(ev.CONSTANT_STD)

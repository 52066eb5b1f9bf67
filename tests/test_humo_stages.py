"""HuMo's stages as the rules run them (rules/humo.smk): audio features, stage 1, stage 2,
the joint stage, an interrupted run resumed, test clips for every task and CFG form, the
strips of the figure, the metric rows of a generated directory, and bad input.

Everything runs in-process through each module's `main([...])` on a tiny talking-faces
split (5 frames of 8 x 8 pixels) and a tiny text-to-video foundation saved here with
save_t2v; one real subprocess checks the one-line error and exit status 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors
from repro.foundation.faces import generate_faces, load_faces, logmel_features, write_faces
from repro.foundation.t2v import build_t2v, load_t2v, save_t2v
from repro.humo import audio, evaluate, generate, train
from repro.humo.model import WEIGHTS_FILE, audio_windows, load_humo, save_humo
from repro.humo.plots import load_strips
from repro.humo.table import gather
from repro.humo.train import mask_to_latent, subject_fraction
from repro.humo.workflow import generated_sets

FRAMES, SIZE = 5, 8
# The foundation: test_foundation_t2v's tiny model with two blocks.
T2V = {
    "pretrained": None,
    "subfolder": None,
    "vocab_size": 600,
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 3,
        "out_channels": 3,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 2,
        "rope_max_seq_len": 16,
    },
    "text_encoder": {
        "d_model": 16,
        "d_ff": 32,
        "d_kv": 8,
        "num_layers": 1,
        "num_heads": 2,
        "max_length": 12,
    },
    "shift": 3.0,
    "seed": 0,
}
# The config's humo section, shrunk (config.yaml's keys and shapes).
AUDIO = {"encoder": "logmel", "pretrained": None, "n_mels": 8, "groups": None}
MODEL = {"window_shift": 2, "audio_hidden": 16, "audio_tokens": 2, "mask_blocks": 1}


def optimiser(steps):
    return {
        "steps": steps,
        "lr": 0.01,
        "weight_decay": 0.0,
        "warmup_fraction": 0.05,
        "checkpoint_every": 2,
    }


TRAIN = {
    "batch_size": 4,
    "text_dropout": 0.1,
    "audio_dropout": 0.1,
    "task_mix": {"start": 0.8, "end": 0.5},
    "timesteps": {"kind": "logit_normal", "mean": 0.0, "std": 1.0},
    "mask_weight": 0.1,
    "stage1": optimiser(3),
    "stage2": optimiser(4),
    "grad_clip": 1.0,
    "processes": 1,
}
GENERATE = {
    "clips": 3,
    "steps": 4,
    "shift": 3.0,
    "batch_size": 2,
    "tasks": ["TI", "TA", "TIA"],
    "cfg": "paper",
    "cfg_forms": ["paper", "code_17b", "code_1_7b", "fixed"],
}
CFG = {
    "paper": {
        "switch": 0.98,
        "early": {"audio": 1.0, "image": 5.0, "text": 7.5},
        "late": {"audio": 5.5, "image": 3.0, "text": 3.0},
    },
    "code_17b": {"switch": 0.98, "audio": 5.5, "text_early": 5.0, "text_late": 3.0},
    "code_1_7b": {"image": 4.0, "audio": 7.5, "text": 7.5},
    "fixed": {"audio": 5.5, "image": 3.0, "text": 3.0},
}
SETS = [list(pair) for pair in generated_sets({"humo": {"generate": GENERATE}}, "full")]


# No MLflow runs; one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_and_one_thread")


# ----------------------------------------------------------------------------- helpers


def foundation_params(root):
    """What store.model_params gives for a built directory."""
    return {"name": "t2v", "pretrained": str(root / "t2v"), "subfolder": None,
            "local_files_only": True}  # fmt: skip


def model_params(root, **extra):
    """rules/humo_common.smk's humo_model_params."""
    node = {
        "injection": "append",
        "audio": AUDIO,
        "model": MODEL,
        "frames": FRAMES,
        "foundation": {"t2v": foundation_params(root)},
    }
    node.update(extra)
    return node


def train_params(root, stage, variant, seed=0, **train_changes):
    """humo_train_params(stage, variant, seed)."""
    return model_params(
        root, train={**TRAIN, **train_changes}, stage=stage, variant=variant, seed=seed
    )


def generate_params(root, sets=SETS, cfg=CFG, seed=0, variant="full"):
    """humo_generate_params(variant, seed)."""
    return model_params(root, generate=GENERATE, cfg=cfg, sets=sets, variant=variant, seed=seed)


def train_args(root, out, params, init=None, faces=None, checkpoints=None):
    return [
        "--faces",
        str(faces or root / "train.safetensors"),
        "--audio",
        str(root / "audio_train.safetensors"),
        *(["--init", str(init)] if init else []),
        "--out",
        str(out / "model"),
        "--metrics",
        str(out / "metrics.json"),
        "--checkpoint-dir",
        str(checkpoints or out / "ckpt"),
        "--params",
        json.dumps(params),
    ]


def run_train(root, out, params, init=None):
    """A training job; returns (its weights, its metrics JSON, train.train's summary)."""
    summaries = []
    real_train = train.train

    def recording_train(*args, **kwargs):
        summaries.append(real_train(*args, **kwargs))
        return summaries[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train", recording_train)
        train.main(train_args(root, out, params, init))
    metrics = json.loads((out / "metrics.json").read_text())
    return weights(out / "model"), metrics, summaries[-1]


def weights(model_dir):
    return load_file(str(Path(model_dir) / WEIGHTS_FILE))


def sample(root, out_dir, params, model=None, faces=None, audio_file=None):
    generate.main(
        [
            "sample",
            "--model",
            str(model or root / "gen_model"),
            "--faces",
            str(faces or root / "test.safetensors"),
            "--audio",
            str(audio_file or root / "audio_test.safetensors"),
            "--out-dir",
            str(out_dir),
            "--params",
            json.dumps(params),
        ]
    )
    return {
        (task, form): generate.load_generated(generate.set_file(out_dir, task, form))
        for task, form in params["sets"]
    }


def is_attn1(key):
    return key.startswith("transformer.") and ".attn1." in key


def is_audio(key):
    return ".audio_attn." in key or key.startswith(("audio_projector.", "mask_predictor."))


def changed(a, b, keys):
    return sorted(k for k in keys if not torch.equal(a[k], b[k]))


# ----------------------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Faces (train: 3 identities x 3 clips, test: 2 x 2), the foundation, the audio
    features of both splits through the audio stage, a stage-1 model (minimal) with the
    HuMo it started from, a stage-2 model (full) from it, and a model to generate with."""
    root = tmp_path_factory.mktemp("humo")
    splits = {
        "train": generate_faces(range(3), 3, 0, frames=FRAMES, size=SIZE, split="train"),
        "test": generate_faces(range(3, 5), 2, 0, frames=FRAMES, size=SIZE, split="test"),
    }
    for name, faces in splits.items():
        write_faces(root / f"{name}.safetensors", faces)
    captions = splits["train"].captions + splits["test"].captions
    save_t2v(build_t2v(T2V, captions), root / "t2v")
    for name in splits:
        audio.main(
            [
                "--faces",
                str(root / f"{name}.safetensors"),
                "--out",
                str(root / f"audio_{name}.safetensors"),
                "--params",
                json.dumps(model_params(root)),
            ]
        )

    # Stage 1, with the HuMo that train.main builds recorded before it trains.
    built = {}
    real_build = train.build_humo

    def recording_build(*args, **kwargs):
        humo = real_build(*args, **kwargs)
        built["state"] = {k: v.clone() for k, v in humo.state_dict().items()}
        return humo

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_humo", recording_build)
        *_, stage1 = run_train(root, root / "stage1", train_params(root, "1", "minimal"))
    *_, full = run_train(
        root, root / "full", train_params(root, "2", "full"), init=root / "stage1/model"
    )

    # The model to generate with: the full model, its zero-initialised audio output
    # projections drawn large, so that the audio shows in 8-bit pixels.
    humo = load_humo(root / "full/model", load_t2v(foundation_params(root)).transformer)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in humo.transformer.blocks:
            out = block.audio_attn.to_out
            out.weight.copy_(torch.randn(out.weight.shape, generator=gen) * 0.5)
            out.bias.copy_(torch.randn(out.bias.shape, generator=gen) * 0.2)
    save_humo(humo, root / "gen_model", {"variant": "full", "stage": "2"})
    summaries = {"stage1": stage1, "full": full}
    return {"root": root, "initial": built["state"], "summaries": summaries, **splits}


@pytest.fixture(scope="module")
def generated(work):
    """Every set of the full model (generated_sets), seed 0."""
    root = work["root"]
    return sample(root, root / "generated", generate_params(root))


# ----------------------------------------------------------------------------- 1. audio


def test_audio_stage_writes_log_mel_features_per_video_frame(work):
    root, faces = work["root"], work["train"]
    path = root / "audio_train.safetensors"
    features = audio.load_audio(path, clips=9, frames=FRAMES)
    # 9 clips, one log-mel row of n_mels per video frame (T = the clip's 5 frames), G = 1.
    assert features.shape == (9, FRAMES, 1, AUDIO["n_mels"]) and features.dtype == torch.float32
    # The faces' own rates reach the encoder (fps 8 at 4000 Hz: 500 samples a frame).
    want = logmel_features(faces.audio, sample_rate=4000, fps=8, n_mels=AUDIO["n_mels"])
    torch.testing.assert_close(features, want, rtol=0, atol=0)
    # The clips differ: the rows are the clips', in order.
    assert not torch.equal(features[0], features[1])


def test_load_audio_refuses_other_clip_counts_and_short_features(work, tmp_path):
    path = work["root"] / "audio_train.safetensors"
    with pytest.raises(ReproInputError, match=rf"{path}: 9 clips, the faces split has 8"):
        audio.load_audio(path, clips=8, frames=FRAMES)
    with pytest.raises(ReproInputError, match=rf"{path}: .* 5 frames are shorter than the 6"):
        audio.load_audio(path, clips=9, frames=FRAMES + 1)
    # Just inside: exactly as many feature frames as video frames.
    assert audio.load_audio(path, clips=9, frames=FRAMES).shape[1] == FRAMES
    flat = tmp_path / "flat.safetensors"
    save_tensors(flat, {"features": torch.zeros(9, FRAMES, 8)}, audio.KIND)
    with pytest.raises(ReproInputError, match=rf"{flat}: features \(9, 5, 8\)"):
        audio.load_audio(flat, clips=9, frames=FRAMES)
    with pytest.raises(ReproInputError, match=r"humo.audio: missing"):
        audio.main(
            [
                "--faces",
                str(work["root"] / "train.safetensors"),
                "--out",
                str(tmp_path / "a.safetensors"),
                "--params",
                json.dumps({"model": MODEL}),
            ]
        )
    assert not (tmp_path / "a.safetensors").exists()


# ----------------------------------------------------------------------------- 2. pure parts


def test_subject_fraction_by_hand():
    mix = {"start": 0.8, "end": 0.5}
    # Stage 1: `start` throughout.
    assert [subject_fraction(mix, "1", s, 4) for s in range(4)] == [0.8] * 4
    # Stage 2 and joint: linear from start (step 0) to end (the last step, 3 of 4).
    for stage in ("2", "joint"):
        got = [subject_fraction(mix, stage, s, 4) for s in range(4)]
        assert got == pytest.approx([0.8, 0.7, 0.6, 0.5], abs=1e-12)
    assert subject_fraction(mix, "2", 0, 1) == 0.8  # one step: start
    assert subject_fraction({"start": 0.2, "end": 1.0}, "2", 1, 3) == pytest.approx(0.6)


def test_mask_to_latent_by_hand():
    # r = 1: the masks themselves, as floats.
    mask = torch.randint(0, 2, (2, 3, 4, 4), dtype=torch.uint8)
    same = mask_to_latent(mask, 1, (4, 4))
    assert same.dtype == torch.float32 and torch.equal(same, mask.float())
    # Area pooling 4 x 4 -> 2 x 2: each latent pixel the mean of a 2 x 2 block.
    one = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    one[0, 0, 0, 0] = one[0, 0, 0, 1] = one[0, 0, 1, 0] = 1  # 3 of the top-left block
    one[0, 0, 3, 3] = 1  # 1 of the bottom-right block
    assert mask_to_latent(one, 1, (2, 2)).tolist() == [[[[0.75, 0.0], [0.0, 0.25]]]]
    # r = 4, 9 frames -> 3 latent frames: frame 0 alone, then frames 1-4 and 5-8 averaged.
    mask = torch.zeros(1, 9, 2, 2, dtype=torch.uint8)
    mask[0, [0, 1, 2], 0, 0] = 1  # pixel (0, 0) on in frames 0, 1, 2
    mask[0, [4, 5, 6, 7, 8], 1, 1] = 1  # pixel (1, 1) on in frames 4..8
    got = mask_to_latent(mask, 4, (2, 2))
    assert got.tolist() == [
        [
            [[1.0, 0.0], [0.0, 0.0]],  # video frame 0
            [[0.5, 0.0], [0.0, 0.25]],  # frames 1-4: (0,0) in 1, 2; (1,1) in 4
            [[0.0, 0.0], [0.0, 1.0]],  # frames 5-8
        ]
    ]
    # ... then area-pooled to one pixel: the frame means.
    assert mask_to_latent(mask, 4, (1, 1)).flatten().tolist() == [0.25, 0.1875, 0.25]


def test_training_loss_draws_the_conditions_it_is_given(work):
    """Which rows carry the reference (`subject`) and hear audio (stage 2, less
    `audio_dropout`), at the extremes where the draw is certain; the mask loss only
    with audio and focus."""
    root, faces = work["root"], work["train"]
    t2v = load_t2v(foundation_params(root))
    features = audio.load_audio(root / "audio_train.safetensors", 9, FRAMES)
    windows = torch.stack([audio_windows(f, FRAMES, 1, 2) for f in features])
    humo = train.build_humo(t2v, train_params(root, "2", "full"), tuple(windows.shape[2:]))
    calls, real = [], humo.forward_train

    def spy(x, sigma, text, reference=None, audio=None, audio_on=None, **kwargs):
        on = None if audio_on is None else audio_on.tolist()
        calls.append((len(x), reference is not None, audio is not None, on))
        return real(x, sigma, text, reference=reference, audio=audio, audio_on=audio_on, **kwargs)

    humo.forward_train = spy
    idx = torch.tensor([0, 3, 5, 8])
    batch = {
        "video": faces.video_float(idx),
        "reference": faces.reference_float(idx),
        "mask": faces.mask[idx],
        "windows": windows[idx],
        "captions": [faces.captions[int(i)] for i in idx],
    }
    cases = [  # stage, subject, audio_dropout, focus -> the one call, a mask loss?
        ("1", 1.0, 0.0, True, (4, True, False, None), False),
        ("1", 0.0, 0.0, True, (4, False, False, None), False),
        ("2", 0.0, 0.0, True, (4, False, True, [True] * 4), True),
        ("2", 1.0, 0.0, False, (4, True, True, [True] * 4), False),
        ("2", 1.0, 1.0, True, (4, True, False, None), False),
        ("joint", 0.0, 0.0, True, (4, False, True, [True] * 4), True),
    ]
    for stage, subject, dropout, focus, call, mask in cases:
        calls.clear()
        loss, parts = train.training_loss(
            humo,
            t2v,
            batch,
            torch.Generator().manual_seed(0),
            stage=stage,
            subject=subject,
            train={**TRAIN, "audio_dropout": dropout},
            focus=focus,
        )
        assert calls == [call], (stage, subject, dropout)
        assert ("mask" in parts) == mask and parts["flow"] > 0
        want = parts["flow"] + (TRAIN["mask_weight"] * parts["mask"] if mask else 0.0)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- 3. stage 1


def test_stage1_minimal_trains_self_attention_only(work):
    root = work["root"]
    stage1 = weights(root / "stage1/model")
    foundation = load_t2v(foundation_params(root)).transformer.state_dict()
    initial = work["initial"]
    assert stage1.keys() == initial.keys()
    transformer = sorted(k for k in stage1 if k.startswith("transformer.") and not is_audio(k))
    assert {k[len("transformer.") :] for k in transformer} == set(foundation)
    attn1 = [k for k in transformer if is_attn1(k)]
    assert len(attn1) == 2 * (4 * 2 + 2)  # 2 blocks: q, k, v, out (weight, bias), 2 qk norms
    # Every self-attention weight moved; every other foundation weight is untouched.
    assert changed(stage1, initial, attn1) == attn1
    for key in transformer:
        same = torch.equal(stage1[key], foundation[key[len("transformer.") :]])
        assert same != (key in attn1), key
    # The audio modules and the mask predictor: as built, bit for bit.
    audio_keys = [k for k in stage1 if is_audio(k)]
    assert any(k.startswith("mask_predictor.") for k in audio_keys)
    assert any(k.startswith("audio_projector.") for k in audio_keys)
    assert changed(stage1, initial, audio_keys) == []
    metrics = json.loads((root / "stage1/metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["resumed_from"] == 0 and metrics["clips"] == 9
    summary = work["summaries"]["stage1"]
    assert summary["trainable_parameters"] == sum(stage1[k].numel() for k in attn1)
    assert summary["total_parameters"] == sum(v.numel() for v in stage1.values())
    assert "final_mask_loss" not in summary and summary["final_flow_loss"] > 0


def test_stage1_full_finetune_trains_every_transformer_weight(work, tmp_path, monkeypatch):
    root = work["root"]
    calls = record_losses(monkeypatch)
    built = {}
    real_build = train.build_humo

    def recording_build(*args, **kwargs):
        humo = real_build(*args, **kwargs)
        built.update({k: v.clone() for k, v in humo.state_dict().items()})
        return humo

    monkeypatch.setattr(train, "build_humo", recording_build)
    full, _, summary = run_train(root, tmp_path, train_params(root, "1", "full_finetune"))
    transformer = [k for k in full if k.startswith("transformer.") and not is_audio(k)]
    ffn = [k for k in transformer if ".ffn." in k]
    attn2 = [k for k in transformer if ".attn2." in k]
    assert ffn and attn2
    assert changed(full, built, ffn) == sorted(ffn)
    assert changed(full, built, attn2) == sorted(attn2)
    assert changed(full, built, [k for k in full if is_audio(k)]) == []
    assert summary["trainable_parameters"] == sum(full[k].numel() for k in transformer)
    assert calls == [("1", 0.8, False)] * 3  # stage 1: `start` throughout, no mask loss


# ----------------------------------------------------------------------------- 4. stage 2


def record_losses(monkeypatch):
    """Every training_loss call's (stage, subject, focus), in order."""
    real, calls = train.training_loss, []

    def recording(*args, **kwargs):
        calls.append((kwargs["stage"], round(kwargs["subject"], 12), kwargs["focus"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "training_loss", recording)
    return calls


def check_stage2(stage1, stage2, mask_trains: bool):
    keys = list(stage1)
    projector = [k for k in keys if k.startswith("audio_projector.")]
    audio_attn = [k for k in keys if ".audio_attn." in k]
    predictor = [k for k in keys if k.startswith("mask_predictor.")]
    others = [k for k in keys if not is_audio(k) and not is_attn1(k)]
    assert changed(stage1, stage2, projector) == sorted(projector)
    assert changed(stage1, stage2, audio_attn) == sorted(audio_attn)
    assert changed(stage1, stage2, predictor) == (sorted(predictor) if mask_trains else [])
    assert changed(stage1, stage2, [k for k in keys if is_attn1(k)])  # stage 1's set trains on
    assert changed(stage1, stage2, others) == []  # minimal: FFN, text attention, ... untouched


def test_stage2_full_trains_the_audio_modules_and_the_mask_predictor(work):
    root = work["root"]
    check_stage2(weights(root / "stage1/model"), weights(root / "full/model"), mask_trains=True)
    metrics = json.loads((root / "full/metrics.json").read_text())
    assert metrics["steps"] == 4 and work["summaries"]["full"]["final_mask_loss"] > 0


def test_stage2_no_focus_leaves_the_mask_predictor_alone(work, tmp_path, monkeypatch):
    root = work["root"]
    calls = record_losses(monkeypatch)
    stage2, metrics, summary = run_train(
        root, tmp_path, train_params(root, "2", "no_focus"), init=root / "stage1/model"
    )
    check_stage2(weights(root / "stage1/model"), stage2, mask_trains=False)
    assert "final_mask_loss" not in summary and metrics["steps"] == 4
    # The task mix moves from 80 % to 50 % subject preservation over the 4 steps.
    assert calls == [("2", 0.8, False), ("2", 0.7, False), ("2", 0.6, False), ("2", 0.5, False)]
    config = json.loads((tmp_path / "model/humo_config.json").read_text())
    assert config["config"] == {"variant": "no_focus", "stage": "2"}


def test_init_is_required_by_stage2_and_refused_elsewhere(work, tmp_path):
    root, init = work["root"], work["root"] / "stage1/model"
    cases = [
        (train_params(root, "2", "full"), None, r"humo stage 2: --init .* is required"),
        (train_params(root, "1", "minimal"), init, r"humo stage 1: --init is for stage 2 only"),
        (
            train_params(root, "joint", "no_progressive"),
            init,
            r"humo stage joint: --init is for stage 2 only",
        ),
        (train_params(root, "1", "full"), None, r"humo.variants: 'full' in stage 1"),
        (train_params(root, "joint", "full"), None, r"joint stage trains no_progressive"),
        (train_params(root, "3", "full"), None, r"humo stage: '3'"),
    ]
    for params, init_dir, message in cases:
        with pytest.raises(ReproInputError, match=message):
            train.main(train_args(root, tmp_path, params, init=init_dir))
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()


def test_the_metrics_json_reports_the_loss_parts_and_parameter_counts(work):
    root = work["root"]
    for name in ("stage1", "full"):
        metrics = json.loads((root / name / "metrics.json").read_text())
        summary = work["summaries"][name]
        for key in ("final_flow_loss", "trainable_parameters", "total_parameters"):
            assert metrics.get(key) == summary[key], (name, key)
    full = json.loads((root / "full/metrics.json").read_text())
    assert full.get("final_mask_loss") == work["summaries"]["full"]["final_mask_loss"]


# ----------------------------------------------------------------------------- 5. joint


def test_joint_stage_trains_both_stages_steps_from_the_foundation(work, tmp_path, monkeypatch):
    root = work["root"]
    calls = record_losses(monkeypatch)
    joint, metrics, summary = run_train(
        root, tmp_path, train_params(root, "joint", "no_progressive")
    )
    assert metrics["steps"] == TRAIN["stage1"]["steps"] + TRAIN["stage2"]["steps"] == 7
    assert summary["final_mask_loss"] > 0
    # Stage 2's recipe over all 7 steps: 0.8 -> 0.5 in steps of 0.05, with the mask loss.
    want = [0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    assert calls == [("joint", pytest.approx(w), True) for w in want]
    foundation = load_t2v(foundation_params(root)).transformer.state_dict()
    attn1 = [k for k in joint if is_attn1(k)]
    ffn = [k for k in joint if ".ffn." in k]
    assert all(not torch.equal(joint[k], foundation[k[len("transformer.") :]]) for k in attn1)
    assert all(torch.equal(joint[k], foundation[k[len("transformer.") :]]) for k in ffn)
    # The audio output projections left zero, so the audio modules trained.
    outs = [k for k in joint if ".audio_attn.to_out." in k]
    assert outs and all(joint[k].abs().sum() > 0 for k in outs)


def test_a_run_does_not_depend_on_the_global_rng(work, tmp_path):
    root = work["root"]
    params = train_params(root, "joint", "no_progressive")
    torch.manual_seed(1)
    a, *_ = run_train(root, tmp_path / "a", params)
    torch.manual_seed(2)
    b, *_ = run_train(root, tmp_path / "b", params)
    assert changed(a, b, list(a)) == []


# ----------------------------------------------------------------------------- 6. resume


def interrupt_after_checkpoint(monkeypatch, calls_before_kill=3):
    """training_loss raises KeyboardInterrupt at its (calls_before_kill + 1)-th call: with
    checkpoint_every 2, after the checkpoint of step 2 and one step past it."""
    real, calls = train.training_loss, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == calls_before_kill + 1:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "training_loss", dying)
    return real


def test_an_interrupted_stage2_resumes_to_the_same_model(work, tmp_path, monkeypatch):
    root = work["root"]
    params, init = train_params(root, "2", "full"), root / "stage1/model"
    real = interrupt_after_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(root, tmp_path, params, init=init))
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(train, "training_loss", real)
    resumed, metrics, _ = run_train(root, tmp_path, params, init=init)
    reference = json.loads((root / "full/metrics.json").read_text())
    assert metrics["resumed_from"] == 2 and metrics["steps"] == 4
    assert metrics["final_loss"] == reference["final_loss"]
    assert changed(resumed, weights(root / "full/model"), list(resumed)) == []


def test_a_resumed_run_reports_the_same_loss_parts(work, tmp_path, monkeypatch):
    root = work["root"]
    params, init = train_params(root, "2", "full"), root / "stage1/model"
    real = interrupt_after_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(root, tmp_path, params, init=init))
    monkeypatch.setattr(train, "training_loss", real)
    *_, summary = run_train(root, tmp_path, params, init=init)
    reference = work["summaries"]["full"]
    for key in ("final_flow_loss", "final_mask_loss"):
        assert summary.get(key) == reference[key], key


# ----------------------------------------------------------------------------- 7. sample


def test_sample_writes_every_set_of_the_variant(work, generated):
    assert sorted(generated) == sorted(map(tuple, SETS))
    assert len(SETS) == 6  # TI, TA, TIA at paper + TIA at the 3 other forms
    for (task, form), (tensors, meta) in generated.items():
        video = tensors["video"]
        assert video.dtype == torch.uint8 and video.shape == (3, 3, FRAMES, SIZE, SIZE)
        assert tensors["index"].tolist() == [0, 1, 2]  # the first `clips` test rows
        assert meta["task"] == task and meta["cfg"] == form
        assert meta["variant"] == "full" and meta["seed"] == 0 and meta["audio"] == "matched"
        assert video.float().std() > 1  # not a constant image
    # Different tasks and forms, different videos (same noise per clip).
    videos = [t["video"] for t, _ in generated.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(videos) for b in videos[i + 1 :])


def test_sample_is_deterministic_in_its_seed(work, generated, tmp_path):
    root = work["root"]
    again = sample(root, tmp_path / "again", generate_params(root))
    for key, (tensors, _) in generated.items():
        assert torch.equal(tensors["video"], again[key][0]["video"]), key
    other = sample(root, tmp_path / "other", generate_params(root, sets=[["TI", "paper"]], seed=1))
    assert not torch.equal(
        other[("TI", "paper")][0]["video"], generated[("TI", "paper")][0]["video"]
    )


def test_a_clips_noise_and_video_do_not_depend_on_the_batching(work, generated, tmp_path):
    """Clip i starts from sample_generator(seed, i): one clip a batch (3 batches) gives the
    videos of two clips a batch (2 batches)."""
    root = work["root"]
    params = generate_params(root, sets=[["TIA", "paper"]])
    params["generate"] = {**GENERATE, "batch_size": 1}
    out = sample(root, tmp_path / "one", params)
    one, two = out[("TIA", "paper")][0]["video"], generated[("TIA", "paper")][0]["video"]
    assert (one.int() - two.int()).abs().max() <= 1  # float round-off may flip a level
    assert (one == two).float().mean() > 0.99


def swap_rows(tensor, i, j):
    out = tensor.clone()
    out[[i, j]] = tensor[[j, i]]
    return out


TASK_SETS = [["TI", "paper"], ["TA", "paper"], ["TIA", "paper"]]


def assert_changed_rows(before, after, rows):
    """Clips `rows` differ, the others are bit-identical."""
    for i in range(len(before)):
        assert torch.equal(before[i], after[i]) != (i in rows), i


def test_ti_ignores_the_audio_and_ta_and_tia_hear_it(work, generated, tmp_path):
    root = work["root"]
    tensors, _ = load_tensors(root / "audio_test.safetensors", kind=audio.KIND)
    swapped = tmp_path / "audio_swapped.safetensors"
    save_tensors(swapped, {"features": swap_rows(tensors["features"], 1, 2)}, audio.KIND)
    out = sample(root, tmp_path / "gen", generate_params(root, sets=TASK_SETS), audio_file=swapped)
    video = {task: out[(task, "paper")][0]["video"] for task, _ in TASK_SETS}
    base = {task: generated[(task, "paper")][0]["video"] for task, _ in TASK_SETS}
    assert torch.equal(video["TI"], base["TI"])
    # Clips 1 and 2 heard each other's audio; clip 0 (batched with clip 1) did not change.
    assert_changed_rows(base["TA"], video["TA"], {1, 2})
    assert_changed_rows(base["TIA"], video["TIA"], {1, 2})


def test_ta_ignores_the_references_and_ti_and_tia_see_them(work, generated, tmp_path):
    root, test = work["root"], work["test"]
    faces = load_faces(root / "test.safetensors")
    faces.reference = swap_rows(faces.reference, 1, 2)
    write_faces(tmp_path / "test.safetensors", faces)
    assert not torch.equal(test.reference[1], test.reference[2])
    out = sample(
        root,
        tmp_path / "gen",
        generate_params(root, sets=TASK_SETS),
        faces=tmp_path / "test.safetensors",
    )
    video = {task: out[(task, "paper")][0]["video"] for task, _ in TASK_SETS}
    base = {task: generated[(task, "paper")][0]["video"] for task, _ in TASK_SETS}
    assert torch.equal(video["TA"], base["TA"])
    assert_changed_rows(base["TI"], video["TI"], {1, 2})
    assert_changed_rows(base["TIA"], video["TIA"], {1, 2})


def test_the_forms_weights_come_from_the_config(work, generated, tmp_path):
    """With the switch at 1.0 no step is "early" (sigma > 1 never holds): the paper form
    is then Eq. 4 with its late weights at every step, which is the config's fixed form
    (the same weights), prediction for prediction: bit-identical videos. At the config's
    switch 0.98 the first step (sigma = 1) is early, and the videos differ."""
    root = work["root"]
    assert CFG["fixed"] == CFG["paper"]["late"]
    cfg = {**CFG, "paper": {**CFG["paper"], "switch": 1.0}}
    out = sample(root, tmp_path / "gen", generate_params(root, sets=[["TIA", "paper"]], cfg=cfg))
    late_only = out[("TIA", "paper")][0]["video"]
    assert torch.equal(late_only, generated[("TIA", "fixed")][0]["video"])
    assert not torch.equal(late_only, generated[("TIA", "paper")][0]["video"])
    # The audio weight reaches the sum: fixed with audio 0 differs from fixed.
    cfg = {**CFG, "fixed": {**CFG["fixed"], "audio": 0.0}}
    out = sample(root, tmp_path / "gen0", generate_params(root, sets=[["TIA", "fixed"]], cfg=cfg))
    assert not torch.equal(
        out[("TIA", "fixed")][0]["video"], generated[("TIA", "fixed")][0]["video"]
    )


# ----------------------------------------------------------------------------- 8. strips


def test_strips_hold_the_first_clips_of_each_task(work, generated, tmp_path):
    root, test = work["root"], work["test"]
    generate.main(
        [
            "strips",
            "--generated",
            str(root / "generated"),
            "--faces",
            str(root / "test.safetensors"),
            "--out",
            str(tmp_path / "strips.safetensors"),
            "--clips",
            "2",
            "--params",
            json.dumps(GENERATE),
        ]
    )
    strips = load_strips(tmp_path / "strips.safetensors")
    assert strips.tasks == ["TI", "TA", "TIA"]
    for task in strips.tasks:
        want = generated[(task, "paper")][0]["video"][:2]
        assert (strips.videos[task] == want.numpy()).all() and strips.videos[task].shape[0] == 2
    assert (strips.real == test.video[:2].numpy()).all()
    assert (strips.reference == test.reference[:2].numpy()).all()
    assert (strips.envelope == test.envelope[:2].numpy()).all()
    assert strips.captions == test.captions[:2]


# ----------------------------------------------------------------------------- 9. metrics


def test_metrics_of_a_generated_directory_are_one_row_per_set(work, generated, tmp_path):
    root, test = work["root"], work["test"]
    torch.manual_seed(0)
    judges = evaluate.Judges(
        identity=evaluate.IdentityEncoder(SIZE, 4, 8, 3),
        mouth=evaluate.MouthReader(SIZE, 4),
        scene=evaluate.SceneReader(SIZE, FRAMES, 4, len(test.motions), len(test.backgrounds)),
        motions=list(test.motions),
        backgrounds=list(test.backgrounds),
        quality={},
    )
    evaluate.save_judges(tmp_path / "judges.safetensors", judges)
    evaluate.main(
        [
            "metrics",
            "--judges",
            str(tmp_path / "judges.safetensors"),
            "--generated",
            str(root / "generated"),
            "--faces-test",
            str(root / "test.safetensors"),
            "--out",
            str(tmp_path / "rows.json"),
            "--params",
            json.dumps({"max_offset": 1, "seed": 0}),
        ]
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert isinstance(rows, list) and len(rows) == len(SETS)
    assert sorted((r["task"], r["cfg"]) for r in rows) == sorted(map(tuple, SETS))
    assert all(r["variant"] == "full" and r["seed"] == 0 and r["n_clips"] == 3 for r in rows)
    table, curves = gather([tmp_path / "rows.json"])
    assert len(table) == len(SETS)
    assert sorted(zip(table["task"], table["cfg"], strict=True)) == sorted(map(tuple, SETS))
    assert set(table["variant"]) == {"full"} and len(curves) > 0


# ----------------------------------------------------------------------------- 10. bad input


@pytest.fixture(scope="module")
def foreign_run(work, tmp_path_factory):
    """`python -m repro.humo.train` given a humo_audio file as --faces: (process, file, out)."""
    root, out = work["root"], tmp_path_factory.mktemp("foreign")
    foreign = root / "audio_train.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "repro.humo.train",
            *train_args(root, out, train_params(root, "1", "minimal"), faces=foreign),
        ],
        env={**os.environ, "REPRO_MLFLOW": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, foreign, out


def test_a_foreign_faces_file_ends_the_stage_with_an_error_line(foreign_run):
    proc, foreign, out = foreign_run
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr
    assert errors[0] == (
        f"error: {foreign}: expected a 'talking_faces' file, found 'humo_audio'"
    ), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_the_error_is_the_only_line_on_stderr(foreign_run):
    proc, _, _ = foreign_run
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- 11. two processes


@pytest.mark.slow
def test_stage2_trains_as_two_cpu_processes_under_torchrun(work, tmp_path):
    """Stage 2 as rules/common.smk's stage(..., processes=2) launches it at paper scale:
    `python -m torch.distributed.run --standalone --nproc_per_node 2 -m repro.humo.train`,
    here two CPU ranks over gloo, each drawing its half (2) of the batch of 4. Rank 0
    alone writes the model and the metrics; both ranks checkpoint (rank 1 its RNG).

    Not compared with the one-process run of the whole batch (the fixture's `full`):
    rank r draws its batch, conditions and noise from step_generator's stream r, so the
    two runs see different samples by design (tests/test_distributed.py does not compare
    them either); what must hold is the same recipe: the same steps, the same modules
    trained, the rest of the stage-1 model untouched."""
    root, init = work["root"], work["root"] / "stage1/model"
    params = train_params(root, "2", "full")
    assert params["train"]["batch_size"] % 2 == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "repro.humo.train"]
    command += train_args(root, tmp_path, params, init=init)
    command += ["--threads", "1", "--rule", "humo_stage2", "--scale", "tiny"]
    # CPU ranks even on a GPU machine (two ranks cannot share one GPU under nccl).
    env = dict(os.environ, REPRO_MLFLOW="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Both ranks started the stage; only rank 0 finished it (metrics JSON, log line).
    assert log.count("command: python -m repro.humo.train") == 2, log[-4000:]
    assert log.count("humo_stage2 done in") == 1, log[-4000:]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == TRAIN["stage2"]["steps"] == 4
    assert metrics["resumed_from"] == 0 and metrics["clips"] == 9
    reference = work["summaries"]["full"]
    for key in ("trainable_parameters", "total_parameters"):
        assert metrics[key] == reference[key], key
    assert metrics["final_mask_loss"] > 0 and metrics["final_flow_loss"] > 0
    config = json.loads((tmp_path / "model/humo_config.json").read_text())
    assert config["config"] == {"variant": "full", "stage": "2"}

    # The last checkpoint: saved by 2 processes, with rank 1's RNG, the same weights.
    (run_dir,) = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    last = run_dir / (run_dir / "latest").read_text().strip()
    assert last.name == "step_00000004"
    assert json.loads((last / "checkpoint.json").read_text())["processes"] == 2
    assert (last / "rng.json").exists() and (last / "rng.rank1.json").exists()
    assert len(json.loads((last / "extra.json").read_text())["loss_history"]) == 4

    # Training happened, as in one process: the audio modules, the mask predictor and
    # stage 1's self-attention moved; every other weight is the stage-1 model's.
    stage1, two = weights(init), weights(tmp_path / "model")
    assert two.keys() == stage1.keys()
    check_stage2(stage1, two, mask_trains=True)
    saved, _ = load_tensors(last / "module.humo.safetensors", kind="checkpoint_module")
    assert changed(saved, two, list(two)) == []

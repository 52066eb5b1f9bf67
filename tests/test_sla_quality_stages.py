"""SLA's quality stages as the rules run them (rules/sla.smk): fine-tuning with a variant
installed, samples with losses / FLOPs / timing, the judge and the table; SLA at
k_h = 100 % against full attention step for step; the FLOPs counter on a small model
against a hand count; an interrupted fine-tune resumed; bad input.

Tiny everything: talking faces of 2 frames x 16 x 16 with 2 x 2 patches (128 tokens,
8 key blocks of 16 a row) on a 2-block Wan of head_dim 16 saved here with save_t2v.
"""

import copy
import json

import pandas as pd
import pytest
import torch

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, read_json
from repro.foundation.faces import generate_faces, write_faces
from repro.foundation.t2v import build_t2v, save_t2v
from repro.kernels.attention_flops import AttentionFlopsCounter
from repro.sla import evaluate, finetune, sample
from repro.sla import workflow as sla_workflow
from repro.sla.processor import install_sla, sla_modules
from repro.sla.table import COLUMNS

FRAMES, SIZE = 2, 16
T2V = {
    "pretrained": None,
    "subfolder": None,
    "vocab_size": 600,
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 16,
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
OBJECTIVE = {"timesteps": {"kind": "logit_normal", "mean": 0.0, "std": 1.0}, "caption_dropout": 0.1}
FINETUNE = {
    "steps": 3,
    "batch_size": 4,
    "lr": 0.01,
    "weight_decay": 0.0,
    "warmup_fraction": 0.0,
    "grad_clip": 1.0,
    "checkpoint_every": 2,
}
SLA = {
    "variant": "paper",
    "k_h": 0.25,
    "k_l": 0.25,
    "phi": "softmax",
    "block_q": 16,
    "block_kv": 16,
}


# No MLflow runs; one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quiet_and_one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Faces splits and a saved foundation."""
    root = tmp_path_factory.mktemp("sla_quality")
    splits = {"train": (range(0, 4), 3), "val": (range(4, 6), 2), "test": (range(6, 8), 2)}
    for split, (ids, per_id) in splits.items():
        faces = generate_faces(list(ids), per_id, seed=5, frames=FRAMES, size=SIZE, split=split)
        write_faces(root / f"{split}.safetensors", faces)
    captions = [f"caption {i}" for i in range(4)]
    from repro.foundation.faces import load_faces

    captions = sorted(set(load_faces(root / "train.safetensors").captions))
    save_t2v(build_t2v(T2V, captions * 4), root / "t2v")
    return root


def foundation(root):
    return {"name": "t2v", "pretrained": str(root / "t2v"), "subfolder": None,
            "local_files_only": True}  # fmt: skip


def finetune_params(root, name="sla", settings=SLA, **changes):
    return {
        "variant": name,
        "seed": 0,
        "settings": settings,
        "finetune": {**FINETUNE, **changes},
        "objective": OBJECTIVE,
        "foundation": {"t2v": foundation(root)},
    }


def run_finetune(root, out, params, checkpoints=None):
    args = ["--faces", str(root / "train.safetensors"), "--out", str(out / "model"),
            "--metrics", str(out / "metrics.json"), "--params", json.dumps(params),
            "--rule", "sla_finetune", "--scale", "smoke"]  # fmt: skip
    args += ["--checkpoint-dir", str(out / "checkpoints" if checkpoints is None else checkpoints)]
    finetune.main(args)


# ----------------------------------------------------------------------------- the method


def clip_batch(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, FRAMES, SIZE, SIZE, generator=gen) * 2 - 1


def test_sla_at_k_h_100_fine_tunes_like_full_attention():
    """Every block critical (k_h = 1, k_l = 0): the paper's form has no marginal block, so
    no linear branch and no Proj term; fine-tuning is full attention's, step for step."""
    from repro.foundation.t2v import Clips

    captions = ["a face nods", "a face shakes"]
    base = build_t2v(T2V, captions * 8)
    video = clip_batch(8)
    clips = Clips(video, captions * 4, video[:0], [])
    results = {}
    for name, settings in (
        ("full", {**SLA, "variant": "full", "k_h": 1.0, "k_l": 0.0}),
        ("sla_100", {**SLA, "k_h": 1.0, "k_l": 0.0}),
    ):
        t2v = copy.deepcopy(base)
        install_sla(t2v.transformer, **settings)
        params = {"variant": name, "seed": 3, "finetune": FINETUNE, "objective": OBJECTIVE}
        summary = finetune.finetune(t2v, clips, params, checkpoint_dir=None)
        results[name] = (summary["loss_history"], t2v.transformer.state_dict())
    (loss_full, w_full), (loss_sla, w_sla) = results["full"], results["sla_100"]
    assert len(loss_full) == FINETUNE["steps"]
    assert loss_sla == pytest.approx(loss_full, rel=1e-5)
    for key, value in w_full.items():
        torch.testing.assert_close(w_sla[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Proj never entered the output: it stayed at its zero initialisation.
    proj = [k for k in w_sla if ".sla.proj." in k]
    assert proj and all(w_sla[k].abs().sum() == 0 for k in proj)


def test_the_flops_counter_matches_a_hand_count_on_a_small_model():
    """One frame of 32 x 32 with 4 x 4 patches: L = 64 tokens, 2 heads of D = 16, blocks
    of 16 (4 key blocks a row), k_h = k_l = 25 %: 1 critical, 1 negligible, 2 marginal.
    Per self-attention call (batch 1), by hand:
      dense  = 4 * 2 * 64 * 64 * 16                                   = 524288
      sparse = 4 * 16 * (16 queries * 16 keys * 1 block * 4 rows * 2 heads) = 131072
      linear = 2*64*(2*256 + 16)       key states h_j, z_j            =  67584
             + 2*4*(256 + 16)          pre-aggregation                =   2176
             + 16 non-marginal blocks * (256 + 16)  subtracted         =   4352
             + 2*64*(2*256 + 3*16)     phi(Q) H, phi(Q) Z, division    =  71680
                                                                       = 145792
    Two blocks: twice each. Linear-only has no subtraction: 141440 a call."""
    transformer = {**T2V, "transformer": {**T2V["transformer"], "patch_size": [1, 4, 4]}}
    t2v = build_t2v(transformer, ["a face"])
    x = torch.randn(1, 3, 1, 32, 32)
    text = t2v.encode_prompts(["a face"])
    expected = {
        "paper": (2 * 524288, 2 * (131072 + 145792)),
        "full": (2 * 524288, 2 * 524288),
        "linear_only": (2 * 524288, 2 * 141440),
        "sparse_only": (2 * 524288, 2 * 131072),
    }
    for variant, (dense, spent) in expected.items():
        model = copy.deepcopy(t2v)
        install_sla(model.transformer, **{**SLA, "variant": variant})
        with torch.no_grad(), AttentionFlopsCounter() as counter:
            model.velocity(x, 0.5, text)
        assert counter.calls == 2, variant
        assert counter.flops.dense == dense, variant
        assert counter.flops.total == spent, variant


# ----------------------------------------------------------------------------- the stages


def test_finetune_sample_judge_and_table_through_their_clis(work, tmp_path):
    out = tmp_path / "sla"
    run_finetune(work, out, finetune_params(work))
    sla = json.loads((out / "model" / finetune.SLA_FILE).read_text())
    assert sla["settings"] == SLA and sla["seq_len"] == 128 and sla["key_blocks"] == 8
    assert (sla["critical_blocks"], sla["negligible_blocks"]) == (2, 2)
    metrics = read_json(out / "metrics.json")
    assert len(metrics["loss_history"]) == FINETUNE["steps"] and metrics["variant"] == "sla"

    # The saved model is the fine-tuned one: Proj moved and came back from disk.
    t2v, _ = finetune.load_finetuned(out / "model")
    proj = [p for m in sla_modules(t2v.transformer).values() for p in m.proj.parameters()]
    assert len(proj) == 4 and any(p.abs().sum() > 0 for p in proj)

    params = {
        "sample": {"clips": 2, "steps": 2, "guidance": 3.0, "batch_size": 2, "seed": 7},
        "timing": {"batch": 1, "repeats": 2, "warmup": 0},
        "objective": OBJECTIVE,
    }
    sample_args = ["--model", str(out / "model"), "--finetune-metrics", str(out / "metrics.json"),
                   "--faces-val", str(work / "val.safetensors"),
                   "--faces-test", str(work / "test.safetensors"),
                   "--out", str(out / "samples.safetensors"), "--row", str(out / "row.json"),
                   "--params", json.dumps(params), "--rule", "sla_sample", "--scale", "smoke"]  # fmt: skip
    sample.main(sample_args)
    row = read_json(out / "row.json")
    # 2 of 8 key blocks critical in every row: block sparsity 6/8.
    assert row["block_sparsity"] == pytest.approx(0.75)
    assert row["flops_reduction"] == pytest.approx(
        row["dense_attention_flops"] / row["attention_flops"]
    )
    assert 1 < row["flops_reduction"] < 8 and row["test_loss"] > 0 and row["attention_ms"] > 0
    tensors, meta = load_tensors(out / "samples.safetensors", kind=sample.SAMPLES_KIND)
    assert tensors["video"].shape == (2, 3, FRAMES, SIZE, SIZE)
    assert tensors["video"].dtype == torch.uint8 and meta["variant"] == "sla"
    # Same params, same model: the same losses and samples (noise from sample.seed alone).
    sample.main([*sample_args[:-10], "--out", str(out / "again.safetensors"),
                 "--row", str(out / "again.json"), *sample_args[-6:]])  # fmt: skip
    again = read_json(out / "again.json")
    assert again["test_loss"] == row["test_loss"] and again["val_loss"] == row["val_loss"]
    assert torch.equal(load_tensors(out / "again.safetensors")[0]["video"], tensors["video"])

    judge = {"steps": 3, "batch_size": 8, "lr": 0.01, "seed": 0}
    evaluate.main(["judge", "--faces-train", str(work / "train.safetensors"),
                   "--faces-val", str(work / "val.safetensors"), "--out", str(out / "judge.st"),
                   "--metrics", str(out / "judge.json"), "--params", json.dumps(judge),
                   "--rule", "sla_judge", "--scale", "smoke"])  # fmt: skip
    evaluate.main(["table", "--judge", str(out / "judge.st"),
                   "--faces-val", str(work / "val.safetensors"),
                   "--faces-test", str(work / "test.safetensors"), "--rows", str(out / "row.json"),
                   "--out", str(out / "table.csv"), "--params", json.dumps({"order": ["sla"]}),
                   "--rule", "sla_eval", "--scale", "smoke"])  # fmt: skip
    table = pd.read_csv(out / "table.csv")
    assert list(table.columns) == COLUMNS and list(table.variant) == ["sla", "real"]
    assert (table.frame_fid >= 0).all() and table.background_acc.between(0, 1).all()


def test_an_interrupted_finetune_resumes_to_the_same_model(work, tmp_path, monkeypatch):
    import repro.foundation.t2v as t2v_module

    params = finetune_params(work, steps=4)
    run_finetune(work, tmp_path / "straight", params)
    straight = load_tensors_of(tmp_path / "straight" / "model")

    real_loss, calls = t2v_module.flow_matching_loss, []

    def killed_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    checkpoints = tmp_path / "ckpt"
    monkeypatch.setattr(t2v_module, "flow_matching_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(work, tmp_path / "resumed", params, checkpoints)
    monkeypatch.setattr(t2v_module, "flow_matching_loss", real_loss)
    run_finetune(work, tmp_path / "resumed", params, checkpoints)
    assert read_json(tmp_path / "resumed" / "metrics.json")["resumed_from"] == 2
    resumed = load_tensors_of(tmp_path / "resumed" / "model")
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, msg=key)


def load_tensors_of(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))


# ----------------------------------------------------------------------------- bad input


def test_a_k_h_that_leaves_no_critical_block_is_refused_naming_the_variant(work, tmp_path):
    with pytest.raises(ReproInputError, match=r"variants \(sla0\).*no critical block"):
        run_finetune(work, tmp_path, finetune_params(work, "sla0", {**SLA, "k_h": 0.0}))
    with pytest.raises(ReproInputError, match="sla.quality.block_kv.*longer than the sequence"):
        finetune.check_blocks({**SLA, "block_kv": 256}, 128, "sla")
    # Just inside: one critical block of 8 at k_h = 1/8.
    assert (
        finetune.check_blocks({**SLA, "k_h": 0.125, "k_l": 0.0}, 128, "x")["critical_blocks"] == 1
    )


def test_more_sample_clips_than_test_clips_is_refused(work, tmp_path):
    out = tmp_path / "m"
    run_finetune(work, out, finetune_params(work, steps=1))
    params = {
        "sample": {"clips": 99, "steps": 1, "guidance": 1.0, "batch_size": 2, "seed": 0},
        "timing": {"batch": 1, "repeats": 1, "warmup": 0},
        "objective": OBJECTIVE,
    }
    with pytest.raises(ReproInputError, match="sla.quality.sample.clips: 99"):
        sample.main(["--model", str(out / "model"), "--finetune-metrics", str(out / "metrics.json"),
                     "--faces-val", str(work / "val.safetensors"),
                     "--faces-test", str(work / "test.safetensors"),
                     "--out", str(tmp_path / "s.st"), "--row", str(tmp_path / "r.json"),
                     "--params", json.dumps(params)])  # fmt: skip


def test_a_model_without_sla_json_is_refused(work):
    with pytest.raises(ReproInputError, match="sla.json: missing"):
        finetune.load_finetuned(work / "t2v")


# ----------------------------------------------------------------------------- config checks


def quality_config(**changes):
    import yaml

    from repro.core.config import merge

    base = yaml.safe_load(open("config.yaml"))
    return merge(base, {"sla": {"quality": changes}}) if changes else base


def test_the_tiny_config_has_36_key_blocks_and_2_critical_a_row():
    cfg = quality_config()
    faces = sla_workflow.faces_params(cfg)
    patch = cfg["foundation"]["t2v"]["transformer"]["patch_size"]
    assert sla_workflow.tokens(faces["frames"], faces["size"], patch) == 576
    assert sla_workflow.quality_checks(cfg) == []


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"variants": [{"name": "full", "attention": "full"}]}, "sla.quality.claims.sla: 'sla'"),
        (
            {
                "variants": [
                    {"name": "full", "attention": "full"},
                    {"name": "full", "attention": "paper"},
                ]
            },
            "'full' is defined more than once",
        ),
        ({"block_kv": 1024}, "sla.quality.block_kv: blocks of 1024 tokens"),
        (
            {"variants": [{"name": "sla", "attention": "paper", "k_h": 0.0}]},
            "sla.quality.variants[0] (sla): k_h = 0.0 leaves no critical block of the 36",
        ),
        (
            {"variants": [{"name": "sla", "attention": "paper", "k_h": 0.6, "k_l": 0.5}]},
            "k_h + k_l = 0.6 + 0.5 exceeds",
        ),
        ({"variants": [{"name": "real", "attention": "full"}]}, "'real' names the real data"),
    ],
)
def test_bad_quality_settings_name_their_key(changes, needle):
    errors = sla_workflow.quality_checks(quality_config(**changes))
    assert any(needle in e for e in errors), errors


def test_k_h_just_inside_one_block_passes_the_config_check():
    # Critical blocks are ceil(k_h * 36): any k_h above the 1e-9 rounding slack keeps one
    # block (just inside), k_h = 0 none (just outside).
    names = ("full", "sla", "sparse_85", "linear_only")
    inside = [{"name": n, "attention": "paper", "k_h": 1e-6} for n in names]
    assert sla_workflow.quality_checks(quality_config(variants=inside)) == []
    outside = [{**v, "k_h": 0.0} for v in inside]
    errors = sla_workflow.quality_checks(quality_config(variants=outside))
    assert len(errors) == 4 and all("no critical block" in e for e in errors)

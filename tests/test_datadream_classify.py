"""repro.datadream.classify through its CLI: methods, selection on validation only,
the real + synthetic loss by hand, resume after a kill, bad input before training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from test_datadream_model import CLASSNAMES, PROMPT, prompts, save_tiny_clip

from repro.core.data import load_digit_splits, write_image_dataset
from repro.core.errors import ReproInputError
from repro.datadream import classify
from repro.datadream.classify import batch_indices, mixed_loss, train_pool
from repro.datadream.table import RUN_COLUMNS

SHOTS = 2
CLASSIFIER = {
    "rank": 4,
    "alpha": 8,
    "dropout": 0.1,
    "targets": ["q_proj", "v_proj"],
    "epochs": 3,
    "steps_per_epoch": 2,
    "batch_size": 16,
    "lr": 0.01,
    "weight_decay": 0.01,
    "warmup_fraction": 0.1,
    "grad_clip": 1.0,
    "real_weight": 0.8,
    "synthetic_weight": 0.2,
    "checkpoint_every": 1,
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def write_synthetic(path, images, labels, generator="dset", shots=SHOTS, captions=None, **meta):
    """A synthetic set as repro.datadream.generate writes it (captions = class prompts)."""
    if captions is None:
        captions = [prompts()[int(y)] for y in labels]
    meta = {
        "generator": generator,
        "shots": shots,
        "seed": 0,
        "n_per_class": 6,
        "classnames": CLASSNAMES,
        "num_classes": 10,
        **meta,
    }
    write_image_dataset(path, images, labels, "datadream_synthetic", meta, captions)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The real digits' val/test splits, a 2-shot set and a 6-per-class synthetic set
    (other train digits standing in for generated ones), and a tiny CLIP."""
    root = tmp_path_factory.mktemp("classify")
    splits = load_digit_splits(0, 0.2, 0.2)
    for name in ("val", "test"):
        write_image_dataset(root / f"{name}.safetensors", *splits[name], "digits")
    images, labels = splits["train"]
    order = torch.argsort(labels * len(labels) + torch.arange(len(labels)))
    by_class = [order[labels[order] == c] for c in range(10)]
    shots = torch.cat([idx[:SHOTS] for idx in by_class])
    meta = {"shots": SHOTS, "seed": 0, "classnames": CLASSNAMES, "num_classes": 10}
    write_image_dataset(
        root / "fewshot.safetensors", images[shots], labels[shots], "datadream_fewshot", meta
    )
    synth = torch.cat([idx[SHOTS : SHOTS + 6] for idx in by_class])  # class-major
    write_synthetic(root / "dset.safetensors", images[synth], labels[synth])
    write_synthetic(
        root / "unadapted.safetensors", images[synth].flip(-1), labels[synth], "unadapted", 0
    )
    clip = save_tiny_clip(root / "clip")
    return {"root": root, "clip": clip, "splits": splits}


def params(data, **change):
    return {
        **CLASSIFIER,
        "seed": 0,
        "shots": SHOTS,
        "n_synthetic": [2, 4],
        "prompt": PROMPT,
        "classnames": CLASSNAMES,
        "foundation": {"clip": data["clip"]},
        **change,
    }


def run_stage(
    data,
    out,
    method,
    generator="none",
    *,
    fewshot=True,
    synthetic=None,
    test=None,
    p=None,
    checkpoints=None,
):
    root = data["root"]
    args = ["--val", str(root / "val.safetensors")]
    args += ["--test", str(test or root / "test.safetensors")]
    if fewshot:
        args += ["--fewshot", str(root / "fewshot.safetensors")]
    if synthetic:
        args += ["--synthetic", str(synthetic)]
    args += ["--method", method, "--generator", generator]
    args += ["--out", str(out / "run.csv"), "--metrics", str(out / "run.json")]
    args += ["--checkpoint-dir", str(checkpoints or out / "ckpt")]
    args += ["--params", json.dumps(p or params(data))]
    classify.main(args)
    return pd.read_csv(out / "run.csv"), json.loads((out / "run.json").read_text())


# ----------------------------------------------------------------------------- the loss


def ce(logits, label):
    """Cross-entropy of one row, by hand."""
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


LOGITS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -2.0, 0.5]]
LABELS = [0, 2, 2, 1]


def test_real_synthetic_loss_by_hand():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    rows = [ce(LOGITS[i], LABELS[i]) for i in range(4)]
    is_real = torch.tensor([True, False, True, False])
    expected = 0.8 * (rows[0] + rows[2]) / 2 + 0.2 * (rows[1] + rows[3]) / 2
    assert mixed_loss(logits, labels, is_real, 0.8, 0.2).item() == pytest.approx(expected)
    # Not the pooled mean: each term is the mean over its own images.
    pooled = sum(rows) / 4
    assert expected != pytest.approx(pooled)


def test_a_batch_without_real_images_keeps_only_the_synthetic_term():
    logits = torch.tensor(LOGITS, requires_grad=True)
    labels = torch.tensor(LABELS)
    rows = [ce(LOGITS[i], LABELS[i]) for i in range(4)]
    none_real = mixed_loss(logits, labels, torch.zeros(4, dtype=torch.bool), 0.8, 0.2)
    assert none_real.item() == pytest.approx(0.2 * sum(rows) / 4)  # no NaN from an empty CE
    none_real.backward()
    assert torch.isfinite(logits.grad).all()
    all_real = mixed_loss(logits, labels, torch.ones(4, dtype=torch.bool), 0.8, 0.2)
    assert all_real.item() == pytest.approx(0.8 * sum(rows) / 4)


def test_batches_are_seeded_passes_over_the_pool():
    n, batch = 10, 4
    stream = torch.cat([batch_indices(n, batch, step, seed=7) for step in range(5)])
    # Steps 0-4 = 20 positions = two whole passes, each a permutation of the pool.
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])
    assert torch.equal(batch_indices(n, batch, 3, seed=7), stream[12:16])  # pure in the step
    assert not torch.equal(batch_indices(n, batch, 3, seed=8), stream[12:16])
    big = batch_indices(3, 8, 0, seed=0)  # a batch larger than the pool spans passes
    assert len(big) == 8 and sorted(big[:3].tolist()) == [0, 1, 2]


def test_real_shots_are_replicated_floor_n_over_shots_times(data):
    root = data["root"]
    from repro.core.data import load_image_dataset

    fewshot = load_image_dataset(root / "fewshot.safetensors")
    synthetic = load_image_dataset(root / "dset.safetensors")
    images, labels, is_real, distinct = train_pool("real_synthetic", 5, fewshot, synthetic, 10)
    # floor(5 / 2) = 2 copies of the 20 real shots + 5 synthetic images of each class
    assert int(is_real.sum()) == 2 * 20 and int((~is_real).sum()) == 50
    assert distinct == 20 + 50
    assert torch.equal(images[:20], images[20:40])  # the copies are the shots themselves
    assert torch.bincount(labels[~is_real]).tolist() == [5] * 10
    # N below the shots: the shots still come once (floor would give none)
    _, _, is_real, _ = train_pool("real_synthetic", 1, fewshot, synthetic, 10)
    assert int(is_real.sum()) == 20
    _, labels, is_real, distinct = train_pool("synthetic", 4, None, synthetic, 10)
    assert not is_real.any() and distinct == 40 and torch.bincount(labels).tolist() == [4] * 10
    # the FIRST N of each class
    first = train_pool("synthetic", 2, None, synthetic, 10)[0]
    assert torch.equal(first[:2], synthetic.images[:2])


# ----------------------------------------------------------------------------- the stage


def test_real_only_through_the_cli(data, tmp_path):
    table, metrics = run_stage(data, tmp_path, "real")
    assert list(table.columns) == RUN_COLUMNS
    row = table.iloc[0]
    assert len(table) == 1 and (row.method, row.generator) == ("real", "none")
    assert (row.shots, row.n_synthetic_per_class, row.seed) == (SHOTS, 0, 0)
    assert (row.epochs, row.train_images) == (3, 20)
    assert row.trainable_params == 8 * 2 * 4 * 32
    history = metrics["runs"]["0"]["val_history"]
    assert len(history) == 3
    # The selected epoch is the FIRST of the best val accuracy, and the table's val_acc is it.
    assert row.selected_epoch == history.index(max(history)) + 1
    assert row.val_acc == max(history)
    assert 0 <= row.test_acc <= 1


def test_test_labels_never_reach_selection(data, tmp_path):
    """Shuffled test labels: the same epoch is selected with the same val numbers."""
    images, labels = data["splits"]["test"]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(shuffled, labels)
    other = tmp_path / "shuffled_test.safetensors"
    write_image_dataset(other, images, shuffled, "digits")
    runs = {}
    for name, test in (("plain", None), ("shuffled", other)):
        out = tmp_path / name
        runs[name] = run_stage(
            data,
            out,
            "real_synthetic",
            "dset",
            synthetic=data["root"] / "dset.safetensors",
            test=test,
        )
    (a, ma), (b, mb) = runs["plain"], runs["shuffled"]
    assert a.selected_epoch.tolist() == b.selected_epoch.tolist()
    assert a.val_acc.tolist() == b.val_acc.tolist()
    for n in ("2", "4"):
        assert ma["runs"][n]["val_history"] == mb["runs"][n]["val_history"]


def test_synthetic_sweep_rows_and_shots_column(data, tmp_path):
    table, metrics = run_stage(
        data, tmp_path / "dset", "synthetic", "dset", synthetic=data["root"] / "dset.safetensors"
    )
    assert table.n_synthetic_per_class.tolist() == [2, 4]
    assert table.train_images.tolist() == [20, 40]
    assert table.shots.tolist() == [SHOTS, SHOTS]
    assert set(metrics["runs"]) == {"2", "4"}
    # The unadapted generator saw no real image: shots 0, and no few-shot set needed.
    table, _ = run_stage(
        data,
        tmp_path / "unadapted",
        "synthetic",
        "unadapted",
        fewshot=False,
        synthetic=data["root"] / "unadapted.safetensors",
        p=params(data, shots=0),
    )
    assert table.shots.tolist() == [0, 0]
    assert table.generator.tolist() == ["unadapted"] * 2


def test_zero_shot_row_is_clip_untrained(data, tmp_path):
    from repro.datadream.model import ClipClassifier
    from repro.foundation.clip import load_clip

    table, _ = run_stage(data, tmp_path, "zero_shot", fewshot=False, p=params(data, shots=0))
    row = table.iloc[0]
    assert (row.shots, row.n_synthetic_per_class, row.selected_epoch, row.epochs) == (0, 0, 0, 0)
    assert (row.train_images, row.trainable_params) == (0, 0)
    clip = ClipClassifier(load_clip(data["clip"]), prompts())
    images, labels = data["splits"]["test"]
    assert row.test_acc == pytest.approx(clip.accuracy(images, labels))


def test_the_best_epochs_weights_are_what_is_scored(data):
    """After training, the classifier holds the selected epoch's LoRA weights: its
    val accuracy is the selected epoch's, not the last epoch's."""
    from repro.core.data import load_image_dataset
    from repro.datadream.model import ClipClassifier
    from repro.foundation.clip import load_clip

    root = data["root"]
    fewshot = load_image_dataset(root / "fewshot.safetensors")
    val = load_image_dataset(root / "val.safetensors")
    classifier = ClipClassifier(load_clip(data["clip"]), prompts(), CLASSIFIER, seed=0)
    settings = classify.training_settings({**CLASSIFIER, "epochs": 4, "lr": 0.05})
    pool = train_pool("real", 0, fewshot, None, 10)[:3]
    result = classify.train_classifier(
        classifier, pool, val, settings, seed=0, checkpoint_dir=None, device=torch.device("cpu")
    )
    assert classifier.accuracy(val.images, val.labels) == result["val_acc"]
    assert result["val_acc"] == max(result["val_history"])


def test_a_killed_run_resumes_to_the_same_numbers(data, tmp_path, monkeypatch):
    """A run dies in epoch 3 of N=4 (after epoch 2's checkpoint); the rerun resumes
    there and ends with the numbers of an uninterrupted run."""
    from repro.datadream import evaluate as model

    synthetic = data["root"] / "dset.safetensors"
    reference, ref_metrics = run_stage(
        data, tmp_path / "straight", "real_synthetic", "dset", synthetic=synthetic
    )

    record = model.Selection.record
    calls = []

    def dying(self, epoch, accuracy):
        calls.append(epoch)
        if len(calls) == 6:  # N=2 ran epochs 1-3; N=4 dies at its epoch 3
            raise KeyboardInterrupt("killed")
        return record(self, epoch, accuracy)

    out = tmp_path / "killed"
    monkeypatch.setattr(model.Selection, "record", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage(data, out, "real_synthetic", "dset", synthetic=synthetic)
    assert not (out / "run.csv").exists() and not (out / "run.json").exists()
    monkeypatch.setattr(model.Selection, "record", record)
    resumed, metrics = run_stage(data, out, "real_synthetic", "dset", synthetic=synthetic)
    assert metrics["runs"]["2"]["resumed_from"] == 6  # N=2 was complete
    assert metrics["runs"]["4"]["resumed_from"] == 4  # epoch 2 of 2 steps each
    pd.testing.assert_frame_equal(resumed, reference)
    for n in ("2", "4"):
        assert metrics["runs"][n]["val_history"] == ref_metrics["runs"][n]["val_history"]
        assert metrics["runs"][n]["final_loss"] == ref_metrics["runs"][n]["final_loss"]


def test_runs_that_share_a_checkpoint_dir_do_not_resume_each_other(data, tmp_path):
    """Snakemake gives every classify job one --checkpoint-dir: synthetic-only and real +
    synthetic on the same data and params must each train (a bug once let the second
    resume the first's finished run and report its numbers)."""
    synthetic, shared = data["root"] / "dset.safetensors", tmp_path / "ckpt"
    alone, first = run_stage(
        data, tmp_path / "a", "synthetic", "dset", synthetic=synthetic, checkpoints=shared
    )
    mixed, second = run_stage(
        data, tmp_path / "b", "real_synthetic", "dset", synthetic=synthetic, checkpoints=shared
    )
    assert all(run["resumed_from"] == 0 for run in second["runs"].values())
    assert not (alone.train_images == mixed.train_images).all()
    assert [r["final_loss"] for r in first["runs"].values()] != [
        r["final_loss"] for r in second["runs"].values()
    ]


# ----------------------------------------------------------------------------- bad input


def bad_synthetic(data, tmp_path, kind):
    images, labels = data["splits"]["train"]
    labels = labels[:120]
    idx = torch.argsort(labels * 1000 + torch.arange(120))
    images, labels = images[:120][idx], labels[idx]
    path = tmp_path / f"{kind}.safetensors"
    if kind == "empty":
        return write_synthetic(path, images[:0], labels[:0], n_per_class=0)
    if kind == "classes":
        meta_names = [*CLASSNAMES[:9], "ten"]
        return write_synthetic(path, images, labels, classnames=meta_names)
    if kind == "captions":  # the classes' images under each other's prompts
        captions = [prompts()[(int(y) + 1) % 10] for y in labels]
        return write_synthetic(path, images, labels, captions=captions)
    if kind == "few":  # 3 per class; n_synthetic asks for 4
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:3] for c in range(10)])
        return write_synthetic(path, images[keep], labels[keep])
    if kind == "generator":
        return write_synthetic(path, images, labels, generator="cls")
    if kind == "shots":
        return write_synthetic(path, images, labels, shots=16)
    if kind == "nine_classes":
        keep = labels < 9
        return write_synthetic(path, images[keep], labels[keep])
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", r"empty.safetensors: the synthetic set holds no image"),
        (
            "classes",
            r"classes.safetensors: a synthetic set of classes .*'ten'.*datadream.classnames",
        ),
        (
            "captions",
            r"captions.safetensors: image 0 of class 'zero' was drawn for .*datadream.prompt",
        ),
        ("few", r"datadream.n_synthetic: 4 images per class .*few.safetensors holds fewer"),
        (
            "generator",
            r"generator.safetensors: images of generator 'cls', but --generator is 'dset'",
        ),
        ("shots", r"shots.safetensors: from a generator adapted on 16 shots.*datadream.shots is 2"),
        (
            "nine_classes",
            r"datadream.n_synthetic: .*nine_classes.safetensors holds fewer for \{'nine': 0\}",
        ),
    ],
)
def test_bad_synthetic_sets_fail_before_training_naming_the_file(
    data, tmp_path, kind, message, monkeypatch
):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(classify, "train_classifier", no_training)
    path = bad_synthetic(data, tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(ReproInputError, match=message):
        run_stage(data, out, "real_synthetic", "dset", synthetic=path)
    assert not out.exists()  # no table, no metrics, no checkpoint


@pytest.mark.parametrize(
    "method, generator, fewshot, synthetic, change, message",
    [
        ("real", "dset", True, False, {}, r"--generator: 'dset' with --method real"),
        ("real", "none", False, False, {}, r"--fewshot: method real"),
        ("synthetic", "dset", True, False, {}, r"--synthetic: method synthetic"),
        ("real", "none", True, True, {}, r"--synthetic: method real uses no synthetic set"),
        (
            "real",
            "none",
            True,
            False,
            {"shots": 3},
            r"fewshot.safetensors: \[2, 2.*datadream.shots is 3",
        ),
        ("real", "none", True, False, {"epochs": 0}, r"datadream.classifier.epochs"),
        ("real", "none", True, False, {"lr": "fast"}, r"datadream.classifier.lr"),
        ("synthetic", "dset", True, True, {"n_synthetic": []}, r"datadream.n_synthetic"),
        ("synthetic", "dset", True, True, {"n_synthetic": [7]}, r"datadream.n_synthetic: 7 images"),
        (
            "real",
            "none",
            True,
            False,
            {"classnames": CLASSNAMES[:9]},
            r"val.safetensors: label 9 .*datadream.classnames",
        ),
        ("synthetic", "dset", False, True, {"seed": 1}, r"dset.safetensors: made for seed 0"),
        ("real", "none", True, False, {"seed": 1}, r"fewshot.safetensors: made for seed 0"),
    ],
)
def test_bad_arguments_fail_before_training(
    data, tmp_path, monkeypatch, method, generator, fewshot, synthetic, change, message
):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(classify, "train_classifier", no_training)
    out = tmp_path / "out"
    with pytest.raises(ReproInputError, match=message):
        run_stage(
            data,
            out,
            method,
            generator,
            fewshot=fewshot,
            synthetic=data["root"] / "dset.safetensors" if synthetic else None,
            p=params(data, **change),
        )
    assert not out.exists()


def test_a_foreign_clip_directory_names_foundation_clip(data, tmp_path):
    out = tmp_path / "out"
    bad = params(data, foundation={"clip": {**data["clip"], "pretrained": str(tmp_path / "none")}})
    with pytest.raises(ReproInputError, match="foundation.clip"):
        run_stage(data, out, "real", p=bad)
    assert not (out / "run.csv").exists()


def stage_command(data, out, p):
    root = data["root"]
    return [
        sys.executable,
        "-m",
        "repro.datadream.classify",
        "--fewshot",
        str(root / "fewshot.safetensors"),
        "--val",
        str(root / "val.safetensors"),
        "--test",
        str(root / "test.safetensors"),
        "--method",
        "real",
        "--generator",
        "none",
        "--out",
        str(out / "run.csv"),
        "--metrics",
        str(out / "run.json"),
        "--checkpoint-dir",
        str(out / "ckpt"),
        "--params",
        json.dumps(p),
    ]


def test_bad_input_ends_the_command_with_one_line(data, tmp_path):
    """`python -m repro.datadream.classify` with a synthetic set for real-only: exit 2
    and ONE line on stderr naming the argument, nothing written."""
    cmd = stage_command(data, tmp_path, params(data))
    cmd += ["--synthetic", str(data["root"] / "dset.safetensors")]
    proc = subprocess.run(
        cmd, env={**os.environ, "REPRO_MLFLOW": "0"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--synthetic: method real uses no synthetic set" in lines[0]
    assert not (tmp_path / "run.csv").exists()


@pytest.mark.slow
def test_sigkilled_stage_resumes_to_the_uninterrupted_numbers(data, tmp_path):
    """SIGKILL a real `python -m repro.datadream.classify` after a checkpoint, rerun it:
    the table and the validation history are those of an uninterrupted run."""
    p = params(data, epochs=25, steps_per_epoch=4)
    env = {**os.environ, "REPRO_MLFLOW": "0"}
    reference = tmp_path / "reference"
    run_stage(data, reference, "real", p=p)  # in this process: the same numbers, no start-up

    out = tmp_path / "killed"
    cmd = stage_command(data, out, p)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "ckpt").glob("*/n0/latest")):
        assert proc.poll() is None, "the run ended before a checkpoint was seen"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.csv").exists(), "the run finished before it could be killed"

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    resumed = json.loads((out / "run.json").read_text())["runs"]["0"]
    expected = json.loads((reference / "run.json").read_text())["runs"]["0"]
    assert 0 < resumed["resumed_from"] < 100 and resumed["resumed_from"] % 4 == 0
    assert resumed["val_history"] == expected["val_history"]
    assert resumed["final_loss"] == expected["final_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "run.csv"), pd.read_csv(reference / "run.csv"))


def test_a_seeds_runs_in_one_process_equal_each_run_alone(data, tmp_path):
    """Rule datadream_classify_real runs zero-shot and real-only classifiers in one
    process (repro.core.each): the real run's numbers are those it has alone."""
    from repro.core.each import run_each

    root = data["root"]

    def argv(method, out, fewshot):
        args = ["--val", str(root / "val.safetensors"), "--test", str(root / "test.safetensors")]
        if fewshot:
            args += ["--fewshot", str(root / "fewshot.safetensors")]
        args += ["--method", method, "--generator", "none"]
        args += ["--out", str(out / f"{method}.csv"), "--metrics", str(out / f"{method}.json")]
        return args + ["--checkpoint-dir", str(out / "ckpt"), "--params", json.dumps(params(data))]

    grouped = tmp_path / "grouped"
    run_each(classify.main, [argv("zero_shot", grouped, False), argv("real", grouped, True)])
    alone, _ = run_stage(data, tmp_path / "alone", "real")
    pd.testing.assert_frame_equal(pd.read_csv(grouped / "real.csv"), alone)
    history = json.loads((grouped / "real.json").read_text())["runs"]["0"]["val_history"]
    assert (
        history
        == json.loads((tmp_path / "alone" / "run.json").read_text())["runs"]["0"]["val_history"]
    )

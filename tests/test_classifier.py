"""The 8x8 digit classifier: learns, has the right feature shape, and round-trips."""

import json
import os

import pytest
import torch

from repro.core.classifier import (
    DigitClassifier,
    accuracy,
    load_classifier,
    main,
    random_shift,
    save_classifier,
    train_classifier,
)
from repro.core.data import load_digit_splits, write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors

FAST = {"epochs": 6, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny batches: one thread is as fast as two and immune to a busy machine (OpenMP barriers
    # between two threads slow small ops down many-fold when the other core is taken).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits(seed=0, val_fraction=0.1, test_fraction=0.2)


@pytest.fixture(scope="module")
def trained(splits):
    x, y = splits["train"]
    return train_classifier((x[:800], y[:800]), splits["val"], FAST)


def test_classifier_learns(trained, splits):
    model, metrics = trained
    assert metrics["val_accuracy"] > 0.8
    assert metrics["val_accuracy"] == pytest.approx(accuracy(model, *splits["val"]))
    assert 1 <= metrics["best_epoch"] <= FAST["epochs"]
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert not model.training


def test_features_and_logits_shapes():
    model = DigitClassifier(num_classes=7, width=8, feature_dim=24).eval()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert model.features(x).shape == (5, 24)
    assert model(x).shape == (5, 7)
    assert model.config == {"num_classes": 7, "image_size": 8, "width": 8, "feature_dim": 24}


def test_training_is_deterministic(splits):
    x, y = splits["train"]
    params = {**FAST, "epochs": 1}
    a, _ = train_classifier((x[:256], y[:256]), splits["val"], params)
    b, _ = train_classifier((x[:256], y[:256]), splits["val"], params)
    c, _ = train_classifier((x[:256], y[:256]), splits["val"], {**params, "seed": 1})
    xv = splits["val"][0]
    assert torch.equal(a(xv), b(xv))
    assert not torch.equal(a(xv), c(xv))


def test_random_shift_moves_by_at_most_one_pixel():
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, :, 3, 4] = 1.0
    shifted = random_shift(x, torch.Generator().manual_seed(0))
    pos = shifted.view(64, -1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert (rows - 3).abs().max() <= 1 and (cols - 4).abs().max() <= 1
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 9
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == x.sum(dim=(1, 2, 3)))


def test_save_load_round_trip(trained, splits, tmp_path):
    model, metrics = trained
    path = tmp_path / "clf.safetensors"
    save_classifier(path, model, metrics)
    loaded = load_classifier(path)
    assert not loaded.training and loaded.config == model.config
    x = splits["test"][0]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.features(x), loaded.features(x))


def test_bad_classifier_files_name_the_path(trained, tmp_path):
    model, _ = trained
    good = tmp_path / "clf.safetensors"
    save_classifier(good, model)

    with pytest.raises(ReproInputError, match=str(tmp_path / "missing.safetensors")):
        load_classifier(tmp_path / "missing.safetensors")

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(ReproInputError, match=str(truncated)):
        load_classifier(truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_tensors(
        foreign, {"images": torch.zeros(2, 1, 8, 8), "labels": torch.zeros(2).long()}, "digits"
    )
    with pytest.raises(ReproInputError, match=str(foreign)):
        load_classifier(foreign)

    wrong = tmp_path / "wrong.safetensors"
    state = model.state_dict()
    state.pop("head.bias")
    save_tensors(wrong, state, "digit_classifier", {"config": model.config})
    with pytest.raises(ReproInputError, match=str(wrong)):
        load_classifier(wrong)


def test_cli_trains_and_evaluates_test_once(splits, tmp_path):
    data = tmp_path / "digits"
    for name, (images, labels) in splits.items():
        n = 300 if name == "train" else len(labels)
        write_image_dataset(data / f"{name}.safetensors", images[:n], labels[:n], "digits")
    out, metrics_path = tmp_path / "clf.safetensors", tmp_path / "clf.json"
    params = json.dumps({**FAST, "epochs": 2})
    main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--metrics",
            str(metrics_path),
            "--params",
            params,
        ]
    )
    metrics = json.loads(metrics_path.read_text())
    assert {"val_accuracy", "test_accuracy", "params", "epochs"} <= set(metrics)
    assert metrics["test_accuracy"] == pytest.approx(
        accuracy(load_classifier(out), *splits["test"])
    )


@pytest.mark.slow
def test_full_training_reaches_95_percent_on_test(splits):
    params = {"epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0}
    model, metrics = train_classifier(splits["train"], splits["val"], params)
    assert accuracy(model, *splits["test"]) >= 0.95

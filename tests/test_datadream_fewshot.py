"""DataDream's few-shot sets: one fixed set per (shots, seed), ordered, from the train
split only; requests a class cannot meet and foreign files are refused before writing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from repro.core.data import load_image_dataset, write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import sha256_file
from repro.datadream import fewshot

NAMES = ["zero", "one", "two"]


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture
def train(tmp_path):
    """A digits-like train split: 3 classes with 6, 9 and 12 images, labels interleaved;
    image i is filled with the value i so that every image says which row it was."""
    labels = torch.tensor([0] * 6 + [1] * 9 + [2] * 12)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    path = tmp_path / "train.safetensors"
    write_image_dataset(path, images.contiguous(), labels, "digits", {"num_classes": 3})
    return path


def run(train, out, **params):
    fewshot.main(
        [
            "--train",
            str(train),
            "--out",
            str(out),
            "--params",
            json.dumps({"shots": 4, "seed": 0, "classnames": NAMES, **params}),
        ]
    )
    return load_image_dataset(out, kind=fewshot.KIND)


def test_shots_per_class_ordered_by_label_then_train_index(train, tmp_path):
    data = run(train, tmp_path / "4shot_s0.safetensors")
    full = load_image_dataset(train)
    idx = data.meta["indices"]
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Label-major, then increasing train index; each image is that train row.
    assert all(full.labels[i] == y for i, y in zip(idx, data.labels.tolist(), strict=True))
    for c in range(3):
        block = idx[4 * c : 4 * c + 4]
        assert block == sorted(block)
    assert torch.equal(data.images, full.images[idx])
    assert data.images[:, 0, 0, 0].tolist() == [float(i) for i in idx]
    assert data.meta["classnames"] == NAMES and data.meta["shots"] == 4 and data.meta["seed"] == 0
    assert data.meta["source_sha256"] == sha256_file(train)


def test_one_fixed_set_per_shots_and_seed(train, tmp_path):
    a = run(train, tmp_path / "a.safetensors")
    b = run(train, tmp_path / "b.safetensors")
    assert a.meta["indices"] == b.meta["indices"]
    other = run(train, tmp_path / "c.safetensors", seed=1)
    assert other.meta["indices"] != a.meta["indices"]
    # The same seed's smaller set is inside the larger one: more shots add images.
    one = run(train, tmp_path / "d.safetensors", shots=1)
    assert set(one.meta["indices"]) <= set(a.meta["indices"])
    assert len(one.labels) == 3


def test_more_shots_than_a_class_has_names_the_key_and_writes_nothing(train, tmp_path):
    out = tmp_path / "7shot.safetensors"
    # Class zero (6 images) is short of 7; the others (9, 12) are not.
    with pytest.raises(ReproInputError, match=rf"datadream\.shots.*{train}.*classes \{{0: 6\}}"):
        run(train, out, shots=7)
    assert not out.exists() and not out.with_suffix(".json").exists()
    run(train, out, shots=6)  # just inside: every image of class zero
    with pytest.raises(ReproInputError, match=r"datadream\.shots"):
        run(train, tmp_path / "x.safetensors", shots=0)


def test_class_names_must_match_the_classes(train, tmp_path):
    out = tmp_path / "f.safetensors"
    with pytest.raises(
        ReproInputError, match=rf"datadream\.classnames.*2 names.*3 classes.*{train}"
    ):
        run(train, out, classnames=["zero", "one"])
    with pytest.raises(ReproInputError, match=r"datadream\.classnames.*unique"):
        run(train, out, classnames=["zero", "one", "one"])
    assert not out.exists()
    run(train, out)
    with pytest.raises(ReproInputError, match=rf"{out}.*classes.*datadream\.classnames"):
        fewshot.load_fewshot(out, ["zero", "one", "seven"])


def test_foreign_or_truncated_train_file_names_it(train, tmp_path):
    glyphs = tmp_path / "glyphs.safetensors"
    write_image_dataset(glyphs, torch.zeros(3, 1, 8, 8), torch.arange(3), "glyphs")
    with pytest.raises(ReproInputError, match=rf"{glyphs}.*'digits'"):
        run(glyphs, tmp_path / "f.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(train.read_bytes()[:100])
    with pytest.raises(ReproInputError, match=str(cut)):
        run(cut, tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()


def test_the_command_ends_bad_input_with_one_line(train, tmp_path):
    out = tmp_path / "f.safetensors"
    args = ["--train", str(train), "--out", str(out)]
    params = json.dumps({"shots": 50, "seed": 0, "classnames": NAMES})
    proc = subprocess.run(
        [sys.executable, "-m", "repro.datadream.fewshot", *args, "--params", params],
        env={**os.environ, "REPRO_MLFLOW": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "datadream.shots" in lines[0] and str(train) in lines[0]
    assert not out.exists()

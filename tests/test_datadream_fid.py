"""DataDream's FID stage: the shared FID on the digit classifier's features, checked
against a hand-written Frechet distance; empty, foreign and misshapen sets refused."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from repro.core.classifier import DigitClassifier, save_classifier
from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.datadream import fid

META = {"generator": "cls", "shots": 16, "seed": 0, "n_per_class": 30, "num_classes": 10}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1 + shift).clamp(-1, 1)


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(width=4, feature_dim=8).eval()
    clf = tmp_path / "clf.safetensors"
    save_classifier(clf, model)
    ref = tmp_path / "test.safetensors"
    write_image_dataset(ref, images(200, 1), torch.arange(200) % 10, "digits")
    syn = tmp_path / "syn.safetensors"
    write_image_dataset(
        syn, images(300, 2, 0.8), torch.arange(300) // 30, "datadream_synthetic", META
    )
    return model, clf, ref, syn


def numpy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def run(syn, ref, clf, out):
    fid.main(
        [
            "--synthetic",
            str(syn),
            "--reference",
            str(ref),
            "--classifier",
            str(clf),
            "--out",
            str(out),
            "--params",
            json.dumps({"feature_net": "digit_classifier", "batch_size": 64}),
        ]
    )
    return json.loads(out.read_text())


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units
def test_fid_of_a_synthetic_set_matches_a_hand_computed_one(files, tmp_path):
    model, clf, ref, syn = files
    result = run(syn, ref, clf, tmp_path / "fid.json")
    with torch.no_grad():
        want = numpy_fid(
            model.features(images(200, 1)).double().numpy(),
            model.features(images(300, 2, 0.8)).double().numpy(),
        )
    assert result["fid"] == pytest.approx(want, rel=1e-3)
    assert {k: result[k] for k in ("generator", "shots", "seed", "n_per_class")} == {
        k: META[k] for k in ("generator", "shots", "seed", "n_per_class")
    }
    assert result["num_images"] == 300 and result["num_reference"] == 200
    # The reference against itself: FID ~ 0 (a sanity bound, far below the set above).
    same = tmp_path / "same.safetensors"
    write_image_dataset(same, images(200, 1), torch.arange(200) % 10, "datadream_synthetic", META)
    assert abs(run(same, ref, clf, tmp_path / "same.json")["fid"]) < 1e-3 * result["fid"]


def test_empty_foreign_or_misshapen_sets_are_refused_naming_the_file(files, tmp_path):
    _, clf, ref, _ = files
    out = tmp_path / "fid.json"
    empty = tmp_path / "empty.safetensors"
    write_image_dataset(
        empty,
        torch.zeros(0, 1, 8, 8),
        torch.zeros(0, dtype=torch.long),
        "datadream_synthetic",
        META,
    )
    with pytest.raises(ReproInputError, match=rf"{empty}.*0 images"):
        run(empty, ref, clf, out)
    with pytest.raises(ReproInputError, match=rf"{ref}.*datadream_synthetic"):
        run(ref, ref, clf, out)  # a digits file where a synthetic set belongs
    big = tmp_path / "big.safetensors"
    write_image_dataset(
        big, torch.zeros(4, 1, 16, 16), torch.arange(4), "datadream_synthetic", META
    )
    with pytest.raises(ReproInputError, match=rf"{big}.*shape"):
        run(big, ref, clf, out)
    bare = tmp_path / "bare.safetensors"
    write_image_dataset(bare, images(4, 3), torch.arange(4), "datadream_synthetic", {"seed": 0})
    with pytest.raises(ReproInputError, match=rf"{bare}.*generator"):
        run(bare, ref, clf, out)
    assert not out.exists()

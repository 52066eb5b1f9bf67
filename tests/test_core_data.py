"""Digits splits, glyph rendering and the image-dataset file format."""

import json

import pytest
import torch

from repro.core.data import (
    DIGIT_NAMES,
    few_shot_indices,
    load_digit_splits,
    load_image_dataset,
    main,
    render_glyphs,
    write_image_dataset,
)
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors, sha256_file


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits(seed=0, val_fraction=0.1, test_fraction=0.2)


def test_digit_splits_cover_all_images_disjointly(splits):
    from sklearn.datasets import load_digits

    digits = load_digits()
    sizes = {k: len(v[1]) for k, v in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360 and sizes["val"] == 180

    # The union of the splits, as a multiset of (pixels, label) rows, is exactly the full set:
    # so no image is lost or used twice.
    def rows(images, labels):
        pixels = torch.round((images.reshape(len(images), -1) + 1) * 8).long()
        return sorted(map(tuple, torch.cat([pixels, labels[:, None]], 1).tolist()))

    full = rows(torch.from_numpy(digits.images).float() / 8 - 1, torch.from_numpy(digits.target))
    union = rows(
        torch.cat([v[0] for v in splits.values()]), torch.cat([v[1] for v in splits.values()])
    )
    assert union == full


def test_digit_splits_are_stratified_ranged_and_typed(splits):
    for name, (images, labels) in splits.items():
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (1, 8, 8)
        assert images.min() == -1.0 and images.max() == 1.0
        counts = torch.bincount(labels, minlength=10).float()
        frac = counts / counts.sum()
        assert torch.all((frac - 0.1).abs() < 0.02), (name, counts)


def test_digit_splits_deterministic_and_seeded(splits):
    again = load_digit_splits(seed=0, val_fraction=0.1, test_fraction=0.2)
    other = load_digit_splits(seed=1, val_fraction=0.1, test_fraction=0.2)
    for name in splits:
        assert torch.equal(splits[name][0], again[name][0])
        assert torch.equal(splits[name][1], again[name][1])
    assert not torch.equal(splits["test"][0], other["test"][0])


def test_bad_fractions_name_the_key():
    with pytest.raises(ReproInputError, match="val_fraction"):
        load_digit_splits(0, 0.0, 0.2)
    with pytest.raises(ReproInputError, match="test_fraction"):
        load_digit_splits(0, 0.5, 0.6)


def test_few_shot_indices(splits):
    labels = splits["train"][1]
    idx = few_shot_indices(labels, shots=5, seed=3)
    assert len(idx) == 50 and len(torch.unique(idx)) == 50
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), 5))
    assert torch.equal(idx, few_shot_indices(labels, shots=5, seed=3))
    assert not torch.equal(idx, few_shot_indices(labels, shots=5, seed=4))
    with pytest.raises(ReproInputError, match="shots"):
        few_shot_indices(labels, shots=10_000, seed=0)


def test_glyphs_shapes_ranges_and_captions():
    g = render_glyphs(200, seed=1)
    assert g.images.shape == (200, 1, 8, 8) and g.images.dtype == torch.float32
    assert g.labels.dtype == torch.int64 and g.labels.shape == (200,)
    assert g.images.min() >= -1 and g.images.max() <= 1
    # Ink is bright on a dark background, like the digits: corners are background.
    assert g.images[:, 0, 0, 0].mean() < -0.9
    assert g.images.amax(dim=(1, 2, 3)).min() == 1.0
    assert torch.equal(torch.bincount(g.labels), torch.full((10,), 20))
    assert len(g.captions) == len(g.fonts) == 200
    for label, caption in zip(g.labels.tolist(), g.captions, strict=True):
        assert caption.endswith(f"glyph of the digit {DIGIT_NAMES[label]}"), caption
    assert len(set(g.fonts)) > 6


def test_glyphs_look_like_digits_on_average(splits):
    # Mean ink and occupied frame close to the real digits (the point of the jitter defaults).
    g = render_glyphs(500, seed=2)
    ink = (g.images + 1) / 2
    real = (splits["train"][0] + 1) / 2
    assert abs(ink.mean() - real.mean()) < 0.05
    rows = (ink.sum(3) > 0).sum(-1).float().mean()
    assert rows > 7.5


def test_glyphs_deterministic_per_seed():
    a = render_glyphs(64, seed=5)
    b = render_glyphs(64, seed=5)
    c = render_glyphs(64, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_glyph_letters_and_sizes():
    g = render_glyphs(30, seed=0, size=16, chars="qQ+", jitter={"rotation": 0.0})
    assert g.images.shape == (30, 1, 16, 16)
    names = {0: "the letter q", 1: "the capital letter Q", 2: "the character +"}
    for label, caption in zip(g.labels.tolist(), g.captions, strict=True):
        assert caption.endswith(names[label])
    with pytest.raises(ReproInputError, match="jitter"):
        render_glyphs(4, seed=0, jitter={"spin": 1})


def test_write_load_round_trip(tmp_path):
    g = render_glyphs(40, seed=0)
    path = tmp_path / "g.safetensors"
    write_image_dataset(path, g.images, g.labels, "glyphs", {"seed": 0}, g.captions)
    ds = load_image_dataset(path, kind="glyphs")
    assert torch.equal(ds.images, g.images) and torch.equal(ds.labels, g.labels)
    assert ds.captions == g.captions and ds.meta["seed"] == 0
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256_file(path)
    assert manifest["count"] == 40 and sum(manifest["class_counts"].values()) == 40
    assert manifest["meta"]["seed"] == 0


def test_bad_files_name_the_path(tmp_path, splits):
    images, labels = splits["val"]
    good = tmp_path / "val.safetensors"
    write_image_dataset(good, images, labels, "digits")

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ReproInputError, match=str(missing)):
        load_image_dataset(missing)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ReproInputError, match=str(truncated)):
        load_image_dataset(truncated)

    with pytest.raises(ReproInputError, match=str(good)):
        load_image_dataset(good, kind="glyphs")

    foreign = tmp_path / "foreign.safetensors"
    save_tensors(foreign, {"weight": torch.zeros(3)}, "digit_classifier")
    with pytest.raises(ReproInputError, match=str(foreign)):
        load_image_dataset(foreign)

    bad_labels = tmp_path / "bad_labels.safetensors"
    save_tensors(
        bad_labels,
        {"images": images, "labels": labels + 5},
        "digits",
        {"meta": {"num_classes": 10}},
    )
    with pytest.raises(ReproInputError, match=str(bad_labels)):
        load_image_dataset(bad_labels)


def test_cli_digits_and_glyphs(tmp_path):
    out = tmp_path / "digits"
    main(
        [
            "digits",
            "--out-dir",
            str(out),
            "--params",
            '{"seed":0,"val_fraction":0.1,"test_fraction":0.2}',
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(m["count"] for m in manifest["splits"].values()) == 1797
    for name in ("train", "val", "test"):
        assert load_image_dataset(out / f"{name}.safetensors", kind="digits").meta["split"] == name
        assert (out / f"{name}.json").is_file()

    glyphs = tmp_path / "glyphs" / "digits.safetensors"
    main(["glyphs", "--out", str(glyphs), "--params", '{"n":50,"seed":1,"size":8}'])
    ds = load_image_dataset(glyphs, kind="glyphs")
    assert ds.images.shape == (50, 1, 8, 8) and len(ds.captions) == 50
    assert ds.meta["chars"] == "0123456789"

    with pytest.raises(ReproInputError, match="params.seed"):
        main(
            [
                "digits",
                "--out-dir",
                str(out),
                "--params",
                '{"val_fraction":0.1,"test_fraction":0.2}',
            ]
        )


def test_bad_jitter_names_the_key():
    with pytest.raises(ReproInputError, match="params.jitter.scale"):
        render_glyphs(4, seed=0, jitter={"scale": 1.0})

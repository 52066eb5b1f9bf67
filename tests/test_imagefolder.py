"""ImageFolder trees: read, cropped, resized and scaled by hand-checkable rules, split
stratified and seeded (or as the tree gives them), written as the digits' three files;
every bad tree is refused naming the path or the key; DataDream reads the result."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repro.core.data import (
    CLASSIFICATION_KINDS,
    ORIGIN_TRAIN_TEST,
    ORIGIN_TRAIN_VAL_TEST,
    ORIGIN_TREE,
    image_folder_splits,
    list_image_folder,
    load_image_dataset,
    main,
    read_image,
    write_image_dataset,
)
from repro.core.errors import ReproInputError

CLASSES = ("gamma", "alpha", "beta")  # written in this order; read sorted


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def write_class(folder, label: int, n: int, size=(12, 8)):
    """n PNGs of one class; image i is the constant grey 10 * label + i (it says which it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * label + i,) * 3).save(folder / f"img{i:02d}.png")


def make_tree(root, n=10, classes=CLASSES):
    for k, name in enumerate(classes):
        write_class(root / name, k, n)
    return root


def counts(labels, k=3):
    return np.bincount(np.asarray(labels), minlength=k).tolist()


# --------------------------------------------------------------------------- pixels


def test_centre_crop_resize_and_scaling_by_hand(tmp_path):
    # Wide 12x8: the middle 8 columns are one colour, 2 columns each side another. The
    # square centre crop keeps only the middle, so a resize of it is that colour exactly.
    img = Image.new("RGB", (12, 8), (0, 255, 0))
    img.paste((255, 0, 51), (2, 0, 10, 8))
    img.save(tmp_path / "wide.png")
    x = read_image(tmp_path / "wide.png", 4, 3)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    want = np.float32([255, 0, 51]) / np.float32(127.5) - 1  # 0..255 -> [-1, 1]
    np.testing.assert_allclose(x, np.broadcast_to(want[:, None, None], x.shape), atol=1e-6)
    assert x[0].min() == 1.0 and x[1].max() == -1.0

    # Tall 8x12, greyscale out: rows cropped top and bottom, one channel.
    tall = Image.new("L", (8, 12), 0)
    tall.paste(204, (0, 2, 8, 10))
    tall.save(tmp_path / "tall.bmp")
    y = read_image(tmp_path / "tall.bmp", 16, 1)  # upscaled: still the constant
    assert y.shape == (1, 16, 16)
    np.testing.assert_allclose(y, 204 / 127.5 - 1, atol=1e-6)

    # RGB read as one channel, and a greyscale file read as three.
    assert read_image(tmp_path / "wide.png", 2, 1).shape == (1, 2, 2)
    np.testing.assert_allclose(read_image(tmp_path / "tall.bmp", 2, 3), 204 / 127.5 - 1, atol=1e-6)


def test_downscaling_antialiases(tmp_path):
    # A 1-pixel checkerboard averages to mid-grey when shrunk 8x (no aliasing to 0 or 255).
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "board.png")
    x = read_image(tmp_path / "board.png", 8, 1)
    np.testing.assert_allclose(x, 0.0, atol=0.02)


# --------------------------------------------------------------------------- listing and splits


def test_class_order_is_sorted_or_as_given(tmp_path):
    root = make_tree(tmp_path / "tree", n=3)
    (root / "alpha" / "notes.txt").write_text("not an image")  # ignored
    (root / ".cache").mkdir()  # hidden: not a class
    names, files, labels = list_image_folder(root)
    assert names == ["alpha", "beta", "gamma"]
    assert [f.parent.name for f in files] == ["alpha"] * 3 + ["beta"] * 3 + ["gamma"] * 3
    assert [f.name for f in files[:3]] == ["img00.png", "img01.png", "img02.png"]
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    names, files, labels = list_image_folder(root, ["gamma", "alpha", "beta"])
    assert names == ["gamma", "alpha", "beta"]
    assert [f.parent.name for f in files[::3]] == ["gamma", "alpha", "beta"]


def test_one_tree_splits_stratified_seeded_and_disjoint(tmp_path):
    root = make_tree(tmp_path / "tree", n=10)
    names, splits, origin = image_folder_splits(root, 0, 0.2, 0.2)
    assert origin == ORIGIN_TREE and names == ["alpha", "beta", "gamma"]
    # test 20 % of 30 = 6 (2 a class); val 20 % of 30 = 6 (2 a class); train the rest.
    assert {k: counts(v[1]) for k, v in splits.items()} == {
        "train": [6, 6, 6],
        "val": [2, 2, 2],
        "test": [2, 2, 2],
    }
    every = [f for files, _ in splits.values() for f in files]
    assert len(set(every)) == 30
    again = image_folder_splits(root, 0, 0.2, 0.2)[1]
    assert again["test"][0] == splits["test"][0]
    other = image_folder_splits(root, 1, 0.2, 0.2)[1]
    assert other["test"][0] != splits["test"][0]
    capped = image_folder_splits(root, 0, 0.2, 0.2, max_per_class=4)[1]
    assert counts(capped["train"][1]) == [4, 4, 4] and counts(capped["val"][1]) == [2, 2, 2]
    assert set(capped["train"][0]) <= set(splits["train"][0])


def test_given_train_and_test_val_cut_from_train(tmp_path):
    root = tmp_path / "given"
    make_tree(root / "train", n=10)
    make_tree(root / "test", n=4)
    names, splits, origin = image_folder_splits(root, 0, 0.2, None)
    assert origin == ORIGIN_TRAIN_TEST and names == ["alpha", "beta", "gamma"]
    assert counts(splits["train"][1]) == [8, 8, 8]
    assert counts(splits["val"][1]) == [2, 2, 2]
    assert counts(splits["test"][1]) == [4, 4, 4]
    assert all(f.parts[-3] == "test" for f in splits["test"][0])
    assert not set(splits["train"][0]) & set(splits["val"][0])
    # A given val/ is used as it is.
    make_tree(root / "val", n=1)
    _, splits, origin = image_folder_splits(root, 0, None, None)
    assert origin == ORIGIN_TRAIN_VAL_TEST
    assert counts(splits["train"][1]) == [10, 10, 10] and counts(splits["val"][1]) == [1, 1, 1]


# --------------------------------------------------------------------------- bad input


def run_cli(root, out, **params):
    params = {
        "root": str(root),
        "size": 4,
        "channels": 3,
        "seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "classnames": None,
        **params,
    }
    main(["imagefolder", "--out-dir", str(out), "--params", json.dumps(params)])


def test_bad_trees_are_refused_naming_the_path(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ReproInputError, match=r"params\.root.*nowhere.*not a directory"):
        run_cli(tmp_path / "nowhere", out)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    with pytest.raises(ReproInputError, match=rf"params\.root: {flat} holds no class folders"):
        run_cli(flat, out)

    root = make_tree(tmp_path / "tree", n=4)
    (root / "delta").mkdir()
    with pytest.raises(ReproInputError, match=rf"{root / 'delta'}: empty class folder"):
        run_cli(root, out)
    (root / "delta" / "readme.txt").write_text("x")
    with pytest.raises(ReproInputError, match=rf"{root / 'delta'}: no image file.*\['\.txt'\]"):
        run_cli(root, out)
    (root / "delta" / "readme.txt").unlink()
    (root / "delta").rmdir()

    # A corrupt file and a truncated PNG: named; nothing is left in --out-dir.
    (root / "beta" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ReproInputError, match=rf"{root / 'beta' / 'broken.jpg'}: not a readable"):
        run_cli(root, out)
    (root / "beta" / "broken.jpg").unlink()
    good = (root / "gamma" / "img00.png").read_bytes()
    (root / "gamma" / "img00.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ReproInputError, match=rf"{root / 'gamma' / 'img00.png'}: not a readable"):
        run_cli(root, out, val_fraction=0.25, test_fraction=0.25)
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_keys_are_refused_naming_them(tmp_path):
    root = make_tree(tmp_path / "tree", n=4)
    out = tmp_path / "out"
    with pytest.raises(ReproInputError, match=r"params\.classnames.*no folder for \['delta'\]"):
        run_cli(root, out, classnames=["alpha", "beta", "delta"])
    with pytest.raises(ReproInputError, match=r"params\.classnames.*not listed \['gamma'\]"):
        run_cli(root, out, classnames=["alpha", "beta"])
    with pytest.raises(ReproInputError, match=r"params\.classnames.*unique"):
        run_cli(root, out, classnames=["alpha", "alpha", "beta"])
    with pytest.raises(ReproInputError, match=r"params\.channels"):
        run_cli(root, out, channels=2)
    with pytest.raises(ReproInputError, match=r"params\.size"):
        run_cli(root, out, size=0)
    with pytest.raises(ReproInputError, match=r"params\.root: missing"):
        main(["imagefolder", "--out-dir", str(out), "--params", '{"size": 4}'])
    with pytest.raises(ReproInputError, match=r"params: unknown keys \['sise'\]"):
        run_cli(root, out, sise=4)
    with pytest.raises(ReproInputError, match=r"params\.test_fraction"):
        run_cli(root, out, test_fraction=None)
    with pytest.raises(ReproInputError, match=r"params\.val_fraction \+ params\.test_fraction"):
        run_cli(root, out, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ReproInputError, match=r"params\.max_per_class"):
        run_cli(root, out, max_per_class=0)
    # 3 classes cannot share a test split of 1 image, stratified.
    with pytest.raises(
        ReproInputError, match=rf"params\.val_fraction / params\.test_fraction.*{root}"
    ):
        run_cli(root, out, val_fraction=0.1, test_fraction=0.05)

    given = tmp_path / "given"
    make_tree(given / "train", n=4)
    with pytest.raises(ReproInputError, match=rf"params\.root: {given} holds train/ but no test/"):
        run_cli(given, out)
    make_tree(given / "test", n=2, classes=("alpha", "beta", "omega"))
    with pytest.raises(ReproInputError, match=rf"{given / 'train'}.*{given / 'test'}.*omega"):
        run_cli(given, out)
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------- the command


def test_the_command_writes_three_splits_and_a_manifest(tmp_path):
    root = make_tree(tmp_path / "tree", n=10)
    out = tmp_path / "datasets" / "tree"
    run_cli(root, out, size=6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "imagefolder" and manifest["classnames"] == [
        "alpha",
        "beta",
        "gamma",
    ]
    assert sorted(manifest["splits"]) == ["test", "train", "val"]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test.json",
        "test.safetensors",
        "train.json",
        "train.safetensors",
        "val.json",
        "val.safetensors",
    ]
    seen = 0
    for name, n in (("train", 18), ("val", 6), ("test", 6)):
        data = load_image_dataset(out / f"{name}.safetensors", kind="imagefolder")
        assert data.images.shape == (n, 3, 6, 6) and data.images.dtype == torch.float32
        assert data.meta["split"] == name and data.meta["num_classes"] == 3
        assert data.meta["classnames"] == ["alpha", "beta", "gamma"]
        assert data.meta["split_origin"] == ORIGIN_TREE and data.meta["root"] == str(root)
        assert data.meta["size"] == 6 and data.meta["channels"] == 3
        assert manifest["splits"][name]["count"] == n
        # Each image is its constant grey 10 * (written class) + i, read back exactly.
        grey = torch.round((data.images[:, 0, 0, 0] + 1) * 127.5)
        written = torch.tensor([CLASSES.index(n) for n in data.meta["classnames"]])
        assert torch.equal(torch.div(grey, 10, rounding_mode="floor").long(), written[data.labels])
        assert torch.all(data.images == data.images[:, :1, :1, :1])
        seen += n
        assert load_image_dataset(out / f"{name}.safetensors", kind=CLASSIFICATION_KINDS)
    assert seen == 30
    with pytest.raises(
        ReproInputError, match=rf"{out / 'val.safetensors'}.*'digits'.*'imagefolder'"
    ):
        load_image_dataset(out / "val.safetensors", kind=("digits",))


def test_load_image_dataset_takes_allowed_kinds(tmp_path):
    path = tmp_path / "g.safetensors"
    write_image_dataset(path, torch.zeros(2, 1, 4, 4), torch.arange(2), "glyphs")
    with pytest.raises(
        ReproInputError, match=rf"{path}: expected a file of kind 'digits' or 'imagefolder'"
    ):
        load_image_dataset(path, kind=CLASSIFICATION_KINDS)
    assert len(load_image_dataset(path, kind=("glyphs", "digits")).labels) == 2


# --------------------------------------------------------------------------- DataDream


def test_datadream_reads_an_imagefolder_set(tmp_path):
    from repro.datadream import classify, fewshot

    root = make_tree(tmp_path / "tree", n=10)
    out = tmp_path / "datasets" / "tree"
    run_cli(root, out, size=4)
    names = ["an alpha", "a beta", "a gamma"]  # the prompts' words, by position
    shots = tmp_path / "fewshot" / "2shot_s0.safetensors"
    fewshot.main(
        [
            "--train",
            str(out / "train.safetensors"),
            "--out",
            str(shots),
            "--params",
            json.dumps({"shots": 2, "seed": 0, "classnames": names}),
        ]
    )
    data = fewshot.load_fewshot(shots, names)
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.images.shape == (6, 3, 4, 4)
    assert data.meta["source_classnames"] == ["alpha", "beta", "gamma"]
    assert data.meta["num_classes"] == 3

    with pytest.raises(ReproInputError, match=r"datadream\.classnames.*2 names.*3 classes"):
        fewshot.main(
            [
                "--train",
                str(out / "train.safetensors"),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--params",
                json.dumps({"shots": 2, "seed": 0, "classnames": names[:2]}),
            ]
        )
    # The folders' own names in another order would prompt each class with another's name.
    for order, ok in ((["alpha", "beta", "gamma"], True), (["beta", "alpha", "gamma"], False)):
        params = json.dumps({"shots": 2, "seed": 0, "classnames": order})
        argv = ["--train", str(out / "train.safetensors"), "--params", params]
        argv += ["--out", str(tmp_path / f"{order[0]}.safetensors")]
        if ok:
            fewshot.main(argv)
        else:
            with pytest.raises(ReproInputError, match=r"datadream\.classnames.*another order"):
                fewshot.main(argv)
    # The classifier's val / test splits: an imagefolder split of as many classes.
    val = classify.check_split(out / "val.safetensors", names)
    assert len(val.labels) == 6
    with pytest.raises(ReproInputError, match=rf"{out / 'test.safetensors'}.*3 classes.*names 4"):
        classify.check_split(out / "test.safetensors", [*names, "a delta"])


def test_datadream_reads_an_imagefolder_data_set_through_the_rules(tmp_path):
    """datadream.dataset naming a data.imagefolders entry: rule imagefolder converts the
    tree (its params are the entry), and DataDream's stages read its splits."""
    root = pathlib.Path(__file__).resolve().parents[1]
    overlay = tmp_path / "overlay.yaml"
    entry = {"root": str(tmp_path / "tree"), "size": 8, "channels": 1, "seed": 0}
    overlay.write_text(
        json.dumps(
            {"data": {"imagefolders": {"tiny_set": entry}}, "datadream": {"dataset": "tiny_set"}}
        )
    )
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "-d", str(tmp_path)]
    cmd += ["-n", "-p", "--cores", "2", "results/datadream_accuracy.csv", "--configfile"]
    cmd += [str(root / "configs/smoke.yaml"), str(overlay)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    plan = proc.stdout + proc.stderr
    assert proc.returncode == 0, plan[-3000:]
    block = plan.split("rule imagefolder:")[1].split("\n\n")[0]
    assert "data/datasets/tiny_set/train.safetensors" in block
    command = re.search(r"python\S* -m repro.core.data imagefolder .*", plan).group(0)
    assert "--out-dir data/datasets/tiny_set" in command and str(tmp_path / "tree") in command
    # A seed's few-shot sets are one job: repro.core.each runs the stage once per size.
    fewshot = re.search(r"-m repro.core.each repro.datadream.fewshot .*", plan).group(0)
    assert "--train data/datasets/tiny_set/train.safetensors" in fewshot
    classify = re.search(r"-m repro.datadream.classify .*", plan).group(0)
    assert "data/datasets/tiny_set/val.safetensors" in classify
    assert "data/datasets/tiny_set/test.safetensors" in classify

"""The zoo's files and manifest: one layer of every model as X [N, out, in] (a conv's
weight flattened), labels multi-hot, splits as written; every bad input refused naming
the file, layer or manifest; a directory of foreign safetensors models (Model-J's
way: classes in the metadata `dataset_chosen_targets`) read the same way."""

import json

import pytest
import torch
from safetensors.torch import save_file

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.probex.zoo import (
    assign_splits,
    load_base_state,
    load_layer,
    load_states,
    load_zoo,
    write_manifest,
    write_zoo_model,
    zoo_from_safetensors_dir,
)

NAMES = ["zero", "one", "two", "three"]
LABELS = [[0, 1], [1, 2], [3], [0, 2, 3]]
SPLITS = ["train", "train", "val", "test"]


def state(i: int) -> dict:
    """Model i's tensors: a 3x2 linear, a 3x2x2x2 conv (3 x 8 as a matrix), a head."""
    return {
        "lin.weight": torch.full((3, 2), float(i)),
        "lin.bias": torch.zeros(3),
        "conv.weight": torch.arange(24, dtype=torch.float32).view(3, 2, 2, 2) + 100 * i,
        "head.weight": torch.ones(4, 3),
    }


@pytest.fixture
def zoo_dir(tmp_path):
    root = tmp_path / "zoo"
    save_tensors(tmp_path / "base.safetensors", state(-1), "backbone", {"arch": "x"})
    models = []
    for i, (labels, split) in enumerate(zip(LABELS, SPLITS, strict=True)):
        file = f"models/{i:04d}.safetensors"
        write_zoo_model(root / file, state(i), labels, {"tree": "t", "lr": 0.1 * (i + 1)})
        models.append({"file": file, "labels": labels, "split": split, "lr": 0.1 * (i + 1)})
    write_manifest(
        root / "manifest.json",
        tree="t",
        arch="x",
        base=tmp_path / "base.safetensors",
        classnames=NAMES,
        layers={"lin": (3, 2), "conv": (3, 8)},
        models=models,
    )
    return root


def edit_manifest(root, change):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


def test_load_layer_stacks_matrices_labels_and_splits(zoo_dir):
    zoo = load_zoo(zoo_dir / "manifest.json")
    assert zoo.tree == "t" and zoo.num_classes == 4 and zoo.layers["conv"] == (3, 8)
    X, Y, splits = load_layer(zoo, "lin")
    assert X.shape == (4, 3, 2) and X.dtype == torch.float32
    assert X[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert Y.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 1, 1]]
    assert splits == SPLITS
    X, _, _ = load_layer(zoo, "conv")
    # Row o of the conv = weight[o] flattened (channel, kh, kw): o=1 starts at 8.
    assert X.shape == (4, 3, 8)
    assert X[2, 1].tolist() == [200.0 + 8 + j for j in range(8)]


def test_states_and_base(zoo_dir, tmp_path):
    zoo = load_zoo(zoo_dir / "manifest.json")
    states = list(load_states(zoo))
    assert len(states) == 4 and set(states[0]) == set(state(0))
    assert torch.equal(states[3]["conv.weight"], state(3)["conv.weight"])
    assert torch.equal(load_base_state(zoo)["lin.weight"], state(-1)["lin.weight"])
    # The base's path is kept relative to the manifest: a moved zoo still finds it.
    manifest = json.loads((zoo_dir / "manifest.json").read_text())
    assert manifest["base"] == "../base.safetensors"
    assert manifest["models"][1]["lr"] == pytest.approx(0.2)


def test_unknown_layer_is_refused_naming_layer_and_manifest(zoo_dir):
    zoo = load_zoo(zoo_dir / "manifest.json")
    with pytest.raises(ReproInputError, match=r"'blocks\.9'.*manifest\.json"):
        load_layer(zoo, "blocks.9")


def test_a_file_whose_layer_shape_differs_from_the_manifest_is_named(zoo_dir):
    bad = {**state(1), "lin.weight": torch.zeros(3, 5)}
    write_zoo_model(zoo_dir / "models/0001.safetensors", bad, [1, 2], {})
    zoo = load_zoo(zoo_dir / "manifest.json")
    with pytest.raises(ReproInputError, match=r"0001\.safetensors.*\(3, 5\).*\[3, 2\]"):
        load_layer(zoo, "lin")
    load_layer(zoo, "conv")  # the other layer still reads


def test_manifest_naming_a_missing_file_is_refused(zoo_dir):
    (zoo_dir / "models/0002.safetensors").unlink()
    with pytest.raises(ReproInputError, match=r"0002\.safetensors: model file not found"):
        load_zoo(zoo_dir / "manifest.json")


def test_labels_outside_the_classes_are_refused_naming_the_file(zoo_dir):
    path = edit_manifest(zoo_dir, lambda m: m["models"][3].update(labels=[0, 4]))
    with pytest.raises(ReproInputError, match=r"0003\.safetensors: labels \[0, 4\].*range\(4\)"):
        load_zoo(path)


def test_unknown_split_and_foreign_manifest_are_refused(zoo_dir):
    path = edit_manifest(zoo_dir, lambda m: m["models"][0].update(split="holdout"))
    with pytest.raises(ReproInputError, match=r"0000\.safetensors: unknown split 'holdout'"):
        load_zoo(path)
    path = edit_manifest(zoo_dir, lambda m: m.update(kind="digits"))
    with pytest.raises(ReproInputError, match=r"manifest\.json.*'probex_zoo'"):
        load_zoo(path)


def test_a_model_file_of_another_kind_is_refused(zoo_dir):
    save_tensors(zoo_dir / "models/0000.safetensors", state(0), "backbone")
    zoo = load_zoo(zoo_dir / "manifest.json")
    with pytest.raises(ReproInputError, match=r"0000\.safetensors: expected a 'probex_zoo_model'"):
        load_layer(zoo, "lin")


def test_assign_splits_counts_and_seed():
    splits = assign_splits(20, 0.15, 0.25, seed=3)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (12, 3, 5)
    assert splits == assign_splits(20, 0.15, 0.25, seed=3)
    assert splits != assign_splits(20, 0.15, 0.25, seed=4)
    with pytest.raises(ReproInputError, match=r"zoo\.split"):
        assign_splits(2, 0.5, 0.5, seed=0)


def test_zoo_from_a_directory_of_foreign_safetensors(tmp_path):
    """Model-J's layout: plain safetensors, classes as a JSON string in the metadata,
    a `classifier` head that is not a layer."""
    models = tmp_path / "modelj"
    models.mkdir()
    for i, labels in enumerate(LABELS):
        tensors = {k: v for k, v in state(i).items() if not k.startswith("head")}
        tensors["classifier.weight"] = torch.zeros(4, 3)
        save_file(tensors, models / f"m{i}.safetensors", {"dataset_chosen_targets": str(labels)})
    zoo = zoo_from_safetensors_dir(
        models,
        NAMES,
        tree="modelj",
        splits=dict(zip([f"m{i}.safetensors" for i in range(4)], SPLITS, strict=True)),
    )
    assert zoo.layers == {"conv": (3, 8), "lin": (3, 2)} and zoo.base is None
    X, Y, splits = load_layer(zoo, "conv")
    assert X[1, 0, 0] == 100 and splits == SPLITS
    assert Y[3].tolist() == [1, 0, 1, 1]
    drawn = zoo_from_safetensors_dir(
        models, NAMES, tree="modelj", split={"val": 0.25, "test": 0.25}
    )
    assert sorted(drawn.splits) == ["test", "train", "train", "val"]
    with pytest.raises(ReproInputError, match="names no base"):
        load_base_state(zoo)
    save_file(state(0), models / "m9.safetensors")  # no dataset_chosen_targets
    with pytest.raises(ReproInputError, match=r"m9\.safetensors: metadata lacks"):
        zoo_from_safetensors_dir(models, NAMES, tree="modelj")

"""Learning on weights: a planted class signal is learned and shuffled labels are not, the
best epoch is chosen on validation models only, nearest-base routing, and the probe and
layers stages through their command lines on small zoos written here (bad input too)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.foundation.backbones import eligible_layers
from repro.probex import layers as layers_stage
from repro.probex import probe
from repro.probex.model import DenseExpert, ProbeX
from repro.probex.route import base_distance, route, routing_accuracy
from repro.probex.zoo import load_zoo, write_manifest, write_zoo_model

ROOT = Path(__file__).resolve().parents[1]
C, K = 10, 5  # classes, classes per fine-tune
TRAINING = dict(epochs=40, batch_size=64, lr=1e-2, weight_decay=1e-5, seed=0)
PROBE = {
    "probex": {"rank_u": 8, "rank_v": 8, "rank_t": 16},
    "statnn": {"hidden": 16},
    "epochs": 40,
    "batch_size": 16,
    "lr": 0.01,
    "weight_decay": 0.00001,
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def draw_labels(n: int, gen: torch.Generator) -> torch.Tensor:
    """Multi-hot [n, C]: each model's K random classes of C."""
    Y = torch.zeros(n, C)
    for row in range(n):
        Y[row, torch.randperm(C, generator=gen)[:K]] = 1.0
    return Y


def planted_zoo(n: int, shape=(12, 12), signal=0.5, noise=0.1, seed=0):
    """Weights base + signal * sum of the model's classes' patterns + noise, and labels."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    patterns = torch.randn(C, *shape, generator=gen) / math.sqrt(K)
    Y = draw_labels(n, gen)
    X = base + signal * torch.einsum("nc,cij->nij", Y, patterns)
    return X + noise * torch.randn(X.shape, generator=gen), Y


def split(X, Y, n_train, n_val):
    parts = [slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)]
    return [(X[p], Y[p]) for p in parts]


def test_elementwise_accuracy_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    # Predictions (sigmoid > 0.5): [1 0 1], [0 0 1]: right 2 of 3, then 2 of 3.
    assert probe.elementwise_accuracy(logits, targets) == pytest.approx(4 / 6)


def test_planted_signal_is_learned_and_shuffled_labels_are_not():
    X, Y = planted_zoo(300)
    (Xt, Yt), (Xv, Yv), (Xs, Ys) = split(X, Y, 200, 50)
    torch.manual_seed(0)
    model = ProbeX(12, 12, C, 8, 8, 16)
    fit = probe.fit_probe(model, Xt, Yt, Xv, Yv, **TRAINING)
    _, test = probe.evaluate(model, Xs, Ys, 64)
    assert fit.val_accuracy > 0.85 and test > 0.85, (fit.val_accuracy, test)
    torch.manual_seed(0)
    dense = DenseExpert(12, 12, C)
    probe.fit_probe(dense, Xt, Yt, Xv, Yv, **TRAINING)
    assert probe.evaluate(dense, Xs, Ys, 64)[1] > 0.85

    # The same weights with every model's labels swapped for another's: nothing to learn.
    shuffled = Y[torch.randperm(len(Y), generator=torch.Generator().manual_seed(1))]
    (Xt, Yt), (Xv, Yv), (Xs, Ys) = split(X, shuffled, 200, 50)
    torch.manual_seed(0)
    model = ProbeX(12, 12, C, 8, 8, 16)
    probe.fit_probe(model, Xt, Yt, Xv, Yv, **TRAINING)
    _, test = probe.evaluate(model, Xs, Ys, 64)
    assert abs(test - 0.5) < 0.07, test


def test_the_best_epoch_is_chosen_on_validation_not_test():
    """Validation labels are the complement of the truth, test labels the truth: the more
    the probe learns, the worse it validates and the better it tests. The state kept must
    be the best on validation (an early one), which tests badly."""
    X, Y = planted_zoo(300)
    (Xt, Yt), (Xv, Yv), (Xs, Ys) = split(X, Y, 200, 50)
    torch.manual_seed(0)
    model = ProbeX(12, 12, C, 8, 8, 16)
    fit = probe.fit_probe(model, Xt, Yt, Xv, 1 - Yv, **TRAINING)
    by_val = max(fit.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert fit.best_epoch == by_val["epoch"] < TRAINING["epochs"]
    assert fit.val_accuracy == by_val["val_accuracy"]
    # The model holds that epoch's state: it validates as recorded and tests badly.
    assert probe.evaluate(model, Xv, 1 - Yv, 64)[1] == pytest.approx(fit.val_accuracy)
    best_test = probe.evaluate(model, Xs, Ys, 64)[1]
    # Trained to the end (the state test would choose), the same probe tests well.
    torch.manual_seed(0)
    last = ProbeX(12, 12, C, 8, 8, 16)
    probe.fit_probe(last, Xt, Yt, Xv, Yv, **TRAINING)
    assert best_test < probe.evaluate(last, Xs, Ys, 64)[1] - 0.2


def test_fit_is_reproducible_from_the_seed():
    X, Y = planted_zoo(120)
    (Xt, Yt), (Xv, Yv), _ = split(X, Y, 80, 20)
    fits = []
    for _ in range(2):
        torch.manual_seed(3)
        model = ProbeX(12, 12, C, 4, 4, 8)
        fits.append(probe.fit_probe(model, Xt, Yt, Xv, Yv, **{**TRAINING, "epochs": 5}))
    assert fits[0].history == fits[1].history
    for key, value in fits[0].state.items():
        assert torch.equal(value, fits[1].state[key])


# --------------------------------------------------------------------------- routing


def test_routing_picks_the_tree_of_the_nearest_base():
    gen = torch.Generator().manual_seed(0)

    def vit():
        return {
            "embed.weight": torch.randn(32, 4, generator=gen),
            "blocks.0.proj.weight": torch.randn(32, 32, generator=gen),
            "blocks.0.proj.bias": torch.randn(32, generator=gen),
            "head.weight": torch.randn(10, 32, generator=gen),
        }

    bases = {
        "vit_a": vit(),
        "vit_b": vit(),
        # Another architecture: only the head has a name and shape in common.
        "cnn": {
            "conv.weight": torch.randn(32, 1, 3, 3, generator=gen),
            "head.weight": torch.randn(10, 32, generator=gen),
        },
    }

    def fine_tune(base):
        """Small steps from the base, and a freshly drawn head (as a re-initialised head)."""
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        state["head.weight"] = torch.randn(10, 32, generator=gen)
        return state

    trees = ["vit_a", "vit_b", "cnn", "vit_b", "vit_a", "cnn"]
    states = [fine_tune(bases[t]) for t in trees]
    assert route(states, bases) == trees
    assert routing_accuracy(route(states, bases), trees) == 1.0
    assert routing_accuracy(["vit_a", "cnn"], ["vit_a", "vit_a"]) == 0.5
    # Summed (not averaged) over the shared tensors, the cnn base, sharing only the head,
    # would look nearer to a vit model than its own base does.
    vit_model = states[0]
    own = base_distance(vit_model, bases["vit_a"])
    assert own < base_distance(vit_model, bases["cnn"])
    summed = {
        t: sum(float((vit_model[k] - b[k]).square().sum()) for k in b if k in vit_model)
        for t, b in bases.items()
    }
    assert summed["cnn"] < summed["vit_a"]
    # A base with nothing in common is infinitely far; a model near no base is refused.
    assert math.isinf(base_distance(vit_model, {"other.weight": torch.zeros(3, 3)}))
    with pytest.raises(ReproInputError, match="stray.safetensors.*cannot be routed"):
        route([{"x": torch.zeros(2)}], bases, names=["stray.safetensors"])


# --------------------------------------------------------------------------- stages


ARCHS = {
    # Two trees of one architecture, one of another; only the head is common to all.
    "vit": {"blocks.0.proj.weight": (8, 8), "blocks.0.proj.bias": (8,), "embed.weight": (8, 4)},
    "cnn": {"conv.weight": (8, 2, 2, 2), "conv.bias": (8,)},
}
PROBED = {"vit": "blocks.0.proj", "cnn": "conv"}
PROBED_LAYERS = ["blocks.0.proj", "blocks.0.proj", "conv"]  # of trees vit_a, vit_b, cnn


def write_tree(root: Path, tree: str, arch: str, seed: int, n: int = 40, splits=None) -> Path:
    """A zoo of n models (by default 24 train, 6 val, 10 test) whose probed layer carries a
    planted signal of its classes; the other tensors are the base's plus noise."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {**ARCHS[arch], "head.weight": (10, 8), "head.bias": (10,)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    save_tensors(root / f"{tree}_base.safetensors", base, "probex_base", {"arch": arch})
    layer = f"{PROBED[arch]}.weight"
    patterns = torch.randn(C, *shapes[layer], generator=torch.Generator().manual_seed(99))
    labels = draw_labels(n, gen)
    splits = splits or ["train"] * 24 + ["val"] * 6 + ["test"] * 10
    models = []
    for i in range(n):
        state = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        state[layer] = state[layer] + 0.5 * torch.einsum("c,c...->...", labels[i], patterns)
        chosen = labels[i].nonzero().flatten().tolist()
        file = f"models/{i:04d}.safetensors"
        write_zoo_model(root / tree / file, state, chosen, {"tree": tree, "arch": arch, "seed": i})
        models.append({"file": file, "labels": chosen, "split": splits[i]})
    manifest = root / tree / "manifest.json"
    write_manifest(
        manifest,
        tree=tree,
        arch=arch,
        base=root / f"{tree}_base.safetensors",
        classnames=[f"c{i}" for i in range(C)],
        layers=eligible_layers(base),
        models=models,
    )
    return manifest


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoos")
    return {
        "vit_a": write_tree(root, "vit_a", "vit", 0),
        "vit_b": write_tree(root, "vit_b", "vit", 1),
        "cnn": write_tree(root, "cnn", "cnn", 2),
    }


def params(**trees):
    trees = trees or {"vit_a": "blocks.0.proj", "vit_b": "blocks.0.proj", "cnn": "conv"}
    return {
        "seed": 0,
        "trees": [{"name": t, "layer": layer} for t, layer in trees.items()],
        "probe": PROBE,
    }


def stage_args(zoos, out: Path, params: dict) -> list[str]:
    args = []
    for manifest in zoos.values():
        args += ["--zoo", str(manifest)]
    return args + [
        "--out",
        str(out),
        "--metrics",
        str(out.with_suffix(".json")),
        "--params",
        json.dumps(params),
    ]


def test_probe_stage_through_its_command_line(zoos, tmp_path):
    out = tmp_path / "probe_s0.csv"
    probe.main(stage_args(zoos, out, params()))
    table = pd.read_csv(out)
    assert list(table.columns) == probe.ROW_COLUMNS
    methods = ["probex", "dense", "statnn"] * 3 + ["probex_single"] * 3 + ["probex_experts"] * 3
    assert table["method"].tolist() == methods
    assert (
        table["tree"].tolist()
        == ["vit_a"] * 3 + ["vit_b"] * 3 + ["cnn"] * 3 + ["vit_a", "vit_b", "cnn"] * 2
    )
    assert table.loc[table["method"] == "statnn", "layer"].tolist() == ["all"] * 3
    assert table.loc[table["method"] == "probex", "layer"].tolist() == PROBED_LAYERS
    per_tree = table[table["method"].isin(["probex", "dense", "statnn"])]
    assert (per_tree[["n_train", "n_val", "n_test"]].values == [24, 6, 10]).all()
    assert per_tree["routing_accuracy"].isna().all()
    # The planted signal is learned by ProbeX and Dense, in every tree.
    learned = table[table["method"].isin(["probex", "dense"])]
    assert (learned["test_accuracy"] > 0.75).all(), learned
    assert (
        table.loc[table["method"] == "probex", "parameters"].tolist()
        == [8 * 8 + 8 * 8 + 64 * 16 + 16 + 16 * 10 + 10] * 3
    )
    assert table.loc[table["method"] == "dense", "parameters"].tolist() == [64 * 10 + 10] * 3
    single = table[table["method"] == "probex_single"]
    assert (single[["n_train", "n_val", "n_test"]].values == [72, 18, 10]).all()
    assert single["val_accuracy"].nunique() == 1
    experts = table[table["method"] == "probex_experts"]
    assert (experts["routing_accuracy"] == 1.0).all()
    assert experts["best_epoch"].isna().all()
    assert experts["parameters"].tolist() == [3 * 1338] * 3
    # Routed right, each expert answers as its tree's own ProbeX does.
    assert experts["test_accuracy"].tolist() == pytest.approx(
        table.loc[table["method"] == "probex", "test_accuracy"].tolist()
    )
    accuracies = table[["val_accuracy", "test_accuracy"]].values
    assert ((accuracies >= 0) & (accuracies <= 1)).all()
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["probex_experts/cnn/routing_accuracy"] == 1.0 and metrics["seconds"] > 0


def test_layers_stage_probes_every_layer_and_chooses_on_validation(zoos, tmp_path):
    out = tmp_path / "layers_s0.csv"
    layers_stage.main(stage_args(zoos, out, params()))
    table = pd.read_csv(out)
    assert list(table.columns) == layers_stage.ROW_COLUMNS
    assert table["tree"].tolist() == ["vit_a", "vit_a", "vit_b", "vit_b", "cnn"]
    assert table["layer"].tolist() == ["blocks.0.proj", "embed"] * 2 + ["conv"]
    assert table["shape"].tolist() == ["8 x 8", "8 x 4"] * 2 + ["8 x 8"]
    for _, rows in table.groupby("tree"):
        assert rows["chosen"].sum() == 1
        assert rows.loc[rows["chosen"], "val_accuracy"].item() == rows["val_accuracy"].max()
    # Only the probed layers carry the signal: they are the ones chosen.
    assert table.loc[table["chosen"], "layer"].tolist() == [
        "blocks.0.proj",
        "blocks.0.proj",
        "conv",
    ]


def test_single_probe_across_layers_of_different_shapes_names_the_key(zoos, tmp_path):
    out = tmp_path / "bad.csv"
    mixed = params(vit_a="embed", vit_b="blocks.0.proj", cnn="conv")
    with pytest.raises(
        ReproInputError, match=r"probex\.trees.*vit_a embed 8x4.*vit_b blocks\.0\.proj 8x8"
    ):
        probe.main(stage_args(zoos, out, mixed))
    assert not out.exists()
    # As a command: one line on stderr naming the key, exit status 2, nothing written.
    env = {**os.environ, "REPRO_MLFLOW": "0", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "repro.probex.probe", *stage_args(zoos, out, mixed)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "probex.trees" in proc.stderr
    assert not out.exists()


def test_bad_trees_and_layers_are_refused_naming_them(zoos, tmp_path):
    out = tmp_path / "bad.csv"
    with pytest.raises(ReproInputError, match=r"layer 'blocks\.9'.*vit_a"):
        probe.main(
            stage_args(zoos, out, params(vit_a="blocks.9", vit_b="blocks.0.proj", cnn="conv"))
        )
    with pytest.raises(ReproInputError, match=r"probex\.trees.*no zoo: \['vit_c'\]"):
        probe.main(
            stage_args(
                zoos,
                out,
                params(vit_a="blocks.0.proj", vit_b="blocks.0.proj", cnn="conv", vit_c="x"),
            )
        )
    with pytest.raises(ReproInputError, match=r"probex\.probe\.probex\.rank_u"):
        bad = params()
        bad["probe"] = {**PROBE, "probex": {"rank_u": 0, "rank_v": 4, "rank_t": 8}}
        probe.main(stage_args(zoos, out, bad))
    assert not out.exists()


def test_a_zoo_without_validation_models_or_with_unlike_models_is_refused(tmp_path):
    manifest = write_tree(tmp_path, "vit_a", "vit", 0, n=6, splits=["train"] * 4 + ["test"] * 2)
    zoo = load_zoo(manifest)
    with pytest.raises(ReproInputError, match=rf"{manifest}: no val models"):
        probe.tree_data(zoo, "blocks.0.proj")
    # A model with other tensors than the rest of its tree: StatNN's features differ.
    odd = zoo.path(zoo.models[3])
    state = load_file(odd)
    state["extra.weight"] = torch.zeros(3, 3)
    write_zoo_model(odd, state, zoo.models[3]["labels"], {})
    with pytest.raises(ReproInputError, match=rf"{odd}: 28 weight statistics.*has 21"):
        probe.statistics_features(zoo)


def test_a_model_routed_to_a_tree_whose_layer_it_lacks_is_answered_no_class():
    torch.manual_seed(0)
    experts = {"vit": ProbeX(8, 8, C, 2, 2, 4), "cnn": ProbeX(8, 8, C, 2, 2, 4)}
    layers = {"vit": "blocks.0.proj", "cnn": "conv"}
    vit_model = {"blocks.0.proj.weight": torch.randn(8, 8)}
    cnn_model = {"conv.weight": torch.randn(8, 2, 2, 2)}  # read as 8 x 8
    logits = probe.expert_logits(
        [vit_model, cnn_model, vit_model], ["vit", "cnn", "cnn"], experts, layers, C, 4
    )
    torch.testing.assert_close(
        logits[0], experts["vit"](vit_model["blocks.0.proj.weight"][None])[0]
    )
    torch.testing.assert_close(
        logits[1], experts["cnn"](cnn_model["conv.weight"].reshape(1, 8, 8))[0]
    )
    assert torch.isneginf(logits[2]).all()  # misrouted: no "conv" layer
    assert (
        probe.elementwise_accuracy(logits[2:], torch.tensor([[1.0] * K + [0.0] * (C - K)])) == 0.5
    )

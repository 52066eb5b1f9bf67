"""ProbeX's tables gathered from per-seed runs: order, checks, the chosen layer."""

import pandas as pd
import pytest

from repro.core.errors import ReproInputError
from repro.probex import table as probex_table
from repro.probex.table import ACCURACY_COLUMNS, LAYER_COLUMNS, ZEROSHOT_COLUMNS


def accuracy_rows(seed, methods=("dense", "probex", "probex_experts"), acc=0.8):
    return pd.DataFrame(
        [
            {
                "method": m,
                "tree": "vit_a",
                "layer": "blocks.1.attn.proj",
                "seed": seed,
                "val_accuracy": acc,
                "test_accuracy": acc,
                "parameters": 10,
                "n_train": 9,
                "n_val": 2,
                "n_test": 4,
                "best_epoch": 1,
                "routing_accuracy": 1.0 if m == "probex_experts" else float("nan"),
            }
            for m in methods
        ],
        columns=ACCURACY_COLUMNS,
    )


def layer_rows(seed, chosen=("b",)):
    return pd.DataFrame(
        [
            {
                "tree": "cnn",
                "layer": name,
                "shape": "8 x 8",
                "seed": seed,
                "val_accuracy": 0.7,
                "test_accuracy": 0.6,
                "parameters": 5,
                "chosen": name in chosen,
            }
            for name in ("a", "b")
        ],
        columns=LAYER_COLUMNS,
    )


def zeroshot_rows(seed, methods=("dense", "probex"), acc=0.7):
    return pd.DataFrame(
        [
            {
                "method": m,
                "seed": seed,
                "layer": "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
                "heldout": "three+five+eight",
                "seen_val_accuracy": 0.9,
                "seen_test_accuracy": 0.85,
                "zeroshot_accuracy": acc,
                "chance": 1 / 3,
                "parameters": 100,
                "best_epoch": 3,
                "n_train": 70,
                "n_zeroshot": 60,
            }
            for m in methods
        ],
        columns=ZEROSHOT_COLUMNS,
    )


def write(frames, tmp_path, stem):
    paths = []
    for i, frame in enumerate(frames):
        path = tmp_path / f"{stem}_{i}.csv"
        frame.to_csv(path, index=False)
        paths.append(path)
    return paths


def test_accuracy_rows_are_ordered_by_method_then_tree_then_seed(tmp_path):
    paths = write([accuracy_rows(1), accuracy_rows(0)], tmp_path, "probe")
    t = probex_table.accuracy_table(paths)
    assert list(t.columns) == ACCURACY_COLUMNS
    assert list(zip(t.method, t.seed, strict=True)) == [
        ("probex", 0),
        ("probex", 1),
        ("dense", 0),
        ("dense", 1),
        ("probex_experts", 0),
        ("probex_experts", 1),
    ]


def test_a_run_seen_twice_an_unknown_method_or_a_non_fraction_is_refused(tmp_path):
    with pytest.raises(ReproInputError, match="appears 2 times"):
        probex_table.accuracy_table(write([accuracy_rows(0), accuracy_rows(0)], tmp_path, "d"))
    with pytest.raises(ReproInputError, match="unknown methods"):
        probex_table.accuracy_table(write([accuracy_rows(0, ("probe_x",))], tmp_path, "u"))
    with pytest.raises(ReproInputError, match="not a fraction"):
        probex_table.accuracy_table(write([accuracy_rows(0, acc=81.0)], tmp_path, "f"))


def test_exactly_one_chosen_layer_per_tree_and_seed(tmp_path):
    t = probex_table.layers_table(write([layer_rows(0), layer_rows(1)], tmp_path, "l"))
    assert t.chosen.dtype == bool and t.chosen.sum() == 2
    with pytest.raises(ReproInputError, match="2 chosen"):
        probex_table.layers_table(write([layer_rows(0, ("a", "b"))], tmp_path, "two"))
    with pytest.raises(ReproInputError, match="0 chosen"):
        probex_table.layers_table(write([layer_rows(0, ())], tmp_path, "none"))


def test_zeroshot_rows_are_checked_and_ordered(tmp_path):
    t = probex_table.zeroshot_table(write([zeroshot_rows(1), zeroshot_rows(0)], tmp_path, "z"))
    assert list(t.columns) == ZEROSHOT_COLUMNS
    assert list(zip(t.method, t.seed, strict=True)) == [
        ("probex", 0),
        ("probex", 1),
        ("dense", 0),
        ("dense", 1),
    ]
    with pytest.raises(ReproInputError, match="zeroshot_accuracy.*not a fraction"):
        probex_table.zeroshot_table(write([zeroshot_rows(0, acc=70.0)], tmp_path, "pct"))
    with pytest.raises(ReproInputError, match="unknown methods"):
        probex_table.zeroshot_table(write([zeroshot_rows(0, ("statnn",))], tmp_path, "m"))


def test_the_stage_writes_the_three_tables(tmp_path):
    runs = write([accuracy_rows(0)], tmp_path, "p")
    layer_runs = write([layer_rows(0)], tmp_path, "l")
    zeroshot_runs = write([zeroshot_rows(0)], tmp_path, "z")
    acc, layers, zeroshot = tmp_path / "acc.csv", tmp_path / "layers.csv", tmp_path / "z.csv"
    probex_table.main(
        ["--runs", *map(str, runs), "--layer-runs", *map(str, layer_runs)]
        + ["--zeroshot-runs", *map(str, zeroshot_runs)]
        + ["--accuracy-out", str(acc), "--layers-out", str(layers), "--zeroshot-out", str(zeroshot)]
    )
    assert len(pd.read_csv(acc)) == 3 and len(pd.read_csv(layers)) == 2
    assert len(pd.read_csv(zeroshot)) == 2

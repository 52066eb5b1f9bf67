"""Stage probex_table: ProbeX's headline tables, gathered from the per-seed runs.

- results/probex_accuracy.csv: one row per method x tree x seed (repro.probex.probe):
  each probe trained on its tree's train models, its epoch chosen on the val models,
  scored once on the test models. Accuracy is element-wise over the classes (is
  class c among the model's training classes?) at threshold 0.5, so chance is ~0.5.
- results/probex_layers.csv: one row per tree x layer x seed (repro.probex.layers),
  `chosen` on the layer of best VALIDATION accuracy per tree and seed.
- results/probex_zeroshot.csv: one row per method x seed (repro.probex.zeroshot):
  probes aligned to the class names' text embeddings, trained on the LoRA zoo's
  models of the seen classes, scored on every model of classes held out from
  training (`zeroshot_accuracy`, among the held-out classes: chance 1 / k).

    python -m repro.probex.table --runs results/probex/runs/probe_s*.csv \
        --layer-runs results/probex/runs/layers_s*.csv \
        --zeroshot-runs results/probex/runs/zeroshot_s*.csv \
        --accuracy-out results/probex_accuracy.csv --layers-out results/probex_layers.csv \
        --zeroshot-out results/probex_zeroshot.csv

The columns below are the contract with the claims, the figures and the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import read_table, write_table
from repro.core.stage import Stage, run
from repro.probex.workflow import METHODS

ACCURACY_COLUMNS = [
    "method",
    "tree",
    "layer",
    "seed",
    "val_accuracy",
    "test_accuracy",
    "parameters",
    "n_train",
    "n_val",
    "n_test",
    "best_epoch",
    "routing_accuracy",
]
ACCURACY_KEYS = ["method", "tree", "seed"]
LAYER_COLUMNS = [
    "tree",
    "layer",
    "shape",
    "seed",
    "val_accuracy",
    "test_accuracy",
    "parameters",
    "chosen",
]
LAYER_KEYS = ["tree", "layer", "seed"]
ZEROSHOT_COLUMNS = [
    "method",
    "seed",
    "layer",
    "heldout",
    "seen_val_accuracy",
    "seen_test_accuracy",
    "zeroshot_accuracy",
    "chance",
    "parameters",
    "best_epoch",
    "n_train",
    "n_zeroshot",
]
ZEROSHOT_KEYS = ["method", "seed"]
ZEROSHOT_METHODS = ("probex", "dense")


def _gather(
    paths: Sequence,
    columns: list[str],
    keys: list[str],
    what: str,
    fractions: tuple[str, ...] = ("val_accuracy", "test_accuracy"),
) -> pd.DataFrame:
    frames = [read_table(path, required=columns)[columns] for path in paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    duplicated = table[table.duplicated(keys, keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0][keys]
        times = int((table[keys] == first).all(axis=1).sum())
        raise ReproInputError(f"{what}: the row {_plain(first)} appears {times} times")
    for column in fractions:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table[values.isna() | (values < 0) | (values > 1)]
        if not bad.empty:
            first = _plain(bad.iloc[0][keys])
            raise ReproInputError(
                f"{what}: {column} of {first} is {bad.iloc[0][column]!r}, not a fraction in [0, 1]"
            )
    return table


def _plain(row: pd.Series) -> dict:
    """A row's keys as plain Python values, for messages."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}


def accuracy_table(paths: Sequence) -> pd.DataFrame:
    """The probe runs' rows, checked (known methods, no key twice), methods in order."""
    table = _gather(paths, ACCURACY_COLUMNS, ACCURACY_KEYS, "the probe runs")
    unknown = sorted(set(table.method) - set(METHODS))
    if unknown:
        raise ReproInputError(f"the probe runs: unknown methods {unknown} (allowed {METHODS})")
    order = {m: i for i, m in enumerate(METHODS)}
    table = table.assign(_m=table.method.map(order)).sort_values(["_m", "tree", "seed"])
    return table.drop(columns="_m").reset_index(drop=True)


def layers_table(paths: Sequence) -> pd.DataFrame:
    """The layer runs' rows, checked: exactly one chosen layer per tree and seed."""
    table = _gather(paths, LAYER_COLUMNS, LAYER_KEYS, "the layer runs")
    table["chosen"] = table.chosen.astype(str).str.lower().map({"true": True, "false": False})
    if table.chosen.isna().any():
        raise ReproInputError("the layer runs: `chosen` must be True or False on every row")
    per_group = table.groupby(["tree", "seed"]).chosen.sum()
    wrong = per_group[per_group != 1]
    if not wrong.empty:
        raise ReproInputError(
            f"the layer runs: (tree, seed) {wrong.index[0]} has {int(wrong.iloc[0])} chosen "
            "layers, not one"
        )
    return table.sort_values(["tree", "seed", "layer"]).reset_index(drop=True)


def zeroshot_table(paths: Sequence) -> pd.DataFrame:
    """The zero-shot runs' rows, checked (known methods, accuracies and chance in [0, 1])."""
    fractions = ("seen_val_accuracy", "seen_test_accuracy", "zeroshot_accuracy", "chance")
    table = _gather(paths, ZEROSHOT_COLUMNS, ZEROSHOT_KEYS, "the zero-shot runs", fractions)
    unknown = sorted(set(table.method) - set(ZEROSHOT_METHODS))
    if unknown:
        raise ReproInputError(
            f"the zero-shot runs: unknown methods {unknown} (allowed {ZEROSHOT_METHODS})"
        )
    order = {m: i for i, m in enumerate(ZEROSHOT_METHODS)}
    table = table.assign(_m=table.method.map(order)).sort_values(["_m", "seed"])
    return table.drop(columns="_m").reset_index(drop=True)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="probex")
    add = stage.parser.add_argument
    add("--runs", nargs="*", default=[], help="repro.probex.probe tables (one per seed)")
    add("--layer-runs", nargs="*", default=[], help="repro.probex.layers tables (one per seed)")
    add("--zeroshot-runs", nargs="*", default=[], help="repro.probex.zeroshot tables")
    add("--accuracy-out", required=True, help="results/probex_accuracy.csv")
    add("--layers-out", required=True, help="results/probex_layers.csv")
    add("--zeroshot-out", required=True, help="results/probex_zeroshot.csv")
    args = stage.start(argv)
    accuracy = accuracy_table(args.runs)
    layers = layers_table(args.layer_runs)
    zeroshot = zeroshot_table(args.zeroshot_runs)
    write_table(accuracy, args.accuracy_out)
    write_table(layers, args.layers_out)
    write_table(zeroshot, args.zeroshot_out)


if __name__ == "__main__":
    run(main)

"""Stage datadream_table: DataDream's headline tables, gathered from the runs.

- results/datadream_accuracy.csv: one row per method x generator x shots x synthetic
  images per class x seed (the rows of every repro.datadream.classify run), plus the
  column `selected`: for each method x generator x shots x seed, the row whose N (synthetic
  images per class) has the best VALIDATION accuracy (ties: the smaller N). The test
  accuracy of that row is the method's number; the test split never chooses anything.
- results/datadream_fid.csv: one row per synthetic set (generator x shots x seed), from
  the FID JSONs of repro.datadream.fid.

    python -m repro.datadream.table --runs results/datadream/runs/*.csv \
        --fid results/datadream/fid/*.json --accuracy-out results/datadream_accuracy.csv \
        --fid-out results/datadream_fid.csv [--metrics results/datadream_metrics.json]

The columns below are the contract with the claims, the figures and the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.io import read_json, write_json
from repro.core.results import read_table, write_table
from repro.core.stage import Stage, run

METHODS = ("zero_shot", "real", "synthetic", "real_synthetic")
GENERATORS = ("none", "unadapted", "cls", "dset")
# The generator each method may be trained with: zero-shot and real-only use none.
METHOD_GENERATORS = {
    "zero_shot": ("none",),
    "real": ("none",),
    "synthetic": ("unadapted", "cls", "dset"),
    "real_synthetic": ("unadapted", "cls", "dset"),
}
# One classifier: (method, generator, shots, N, seed).
RUN_KEYS = ["method", "generator", "shots", "n_synthetic_per_class", "seed"]
# What repro.datadream.classify writes: one row per N it trained.
RUN_COLUMNS = RUN_KEYS + [
    "val_acc",
    "test_acc",
    "selected_epoch",
    "epochs",
    "train_images",
    "trainable_params",
]
# The groups within which N is chosen on validation.
GROUP_KEYS = ["method", "generator", "shots", "seed"]
ACCURACY_COLUMNS = RUN_COLUMNS + ["selected"]
FID_COLUMNS = ["generator", "shots", "seed", "fid", "num_images", "n_per_class"]


def check_runs(table: pd.DataFrame, source: str) -> None:
    """Refuse rows of an unknown method / generator pairing or a key seen twice."""
    for row in table[["method", "generator"]].drop_duplicates().itertuples(index=False):
        if row.method not in METHODS:
            raise ReproInputError(f"{source}: unknown method {row.method!r} (allowed {METHODS})")
        if row.generator not in METHOD_GENERATORS[row.method]:
            raise ReproInputError(
                f"{source}: method {row.method!r} with generator {row.generator!r} "
                f"(allowed {METHOD_GENERATORS[row.method]})"
            )
    duplicated = table[table.duplicated(RUN_KEYS, keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise ReproInputError(
            f"{source}: the run {dict(first[RUN_KEYS])} appears {len(duplicated)} times"
        )


def mark_selected(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with `selected`: per (method, generator, shots, seed) True on the row of
    best val_acc, ties going to the smaller N (fewer synthetic images is cheaper)."""
    table = table.copy()
    table["selected"] = False
    if table.empty:
        return table
    # Stable sort by N, then the first row of maximal val_acc per group.
    ordered = table.sort_values("n_synthetic_per_class", kind="stable")
    best = ordered.groupby(GROUP_KEYS, sort=False)["val_acc"].transform("max")
    winners = ordered[ordered.val_acc == best].drop_duplicates(GROUP_KEYS, keep="first")
    table.loc[winners.index, "selected"] = True
    return table


def accuracy_table(paths: Sequence) -> pd.DataFrame:
    """The runs' rows with `selected`, checked, in a stable order."""
    frames = []
    for path in paths:
        frame = read_table(path, required=RUN_COLUMNS)[RUN_COLUMNS]
        check_runs(frame, str(path))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS)
    check_runs(table, "the runs tables (together)")
    table = mark_selected(table)[ACCURACY_COLUMNS]
    order = {m: i for i, m in enumerate(METHODS)}
    gens = {g: i for i, g in enumerate(GENERATORS)}
    table = table.assign(_m=table.method.map(order), _g=table.generator.map(gens))
    table = table.sort_values(["_m", "_g", "shots", "n_synthetic_per_class", "seed"])
    return table.drop(columns=["_m", "_g"]).reset_index(drop=True)


def fid_row(path) -> dict:
    """One FID JSON of repro.datadream.fid as a table row (errors name the file)."""
    record = read_json(path)
    if not isinstance(record, dict):
        raise ReproInputError(f"{path}: expected a JSON object")
    missing = [k for k in FID_COLUMNS if k not in record]
    if missing:
        raise ReproInputError(f"{path}: missing keys {missing}")
    if record["generator"] not in GENERATORS[1:]:
        raise ReproInputError(f"{path}: generator {record['generator']!r} not in {GENERATORS[1:]}")
    fid = record["fid"]
    if not isinstance(fid, int | float) or math.isnan(fid):
        raise ReproInputError(f"{path}: fid is {fid!r}, expected a number")
    return {k: record[k] for k in FID_COLUMNS}


def fid_table(paths: Sequence) -> pd.DataFrame:
    rows = [fid_row(p) for p in paths]
    table = pd.DataFrame(rows, columns=FID_COLUMNS)
    keys = ["generator", "shots", "seed"]
    if table.duplicated(keys).any():
        first = table[table.duplicated(keys)].iloc[0]
        raise ReproInputError(f"--fid: the synthetic set {dict(first[keys])} appears twice")
    gens = {g: i for i, g in enumerate(GENERATORS)}
    table = table.assign(_g=table.generator.map(gens)).sort_values(["_g", "shots", "seed"])
    return table.drop(columns="_g").reset_index(drop=True)


def summary(table: pd.DataFrame, fid: pd.DataFrame) -> dict:
    """What `dvc metrics show` reads: mean test accuracy of the selected rows per
    method/generator/shots and mean FID per generator/shots, over seeds."""
    out = {}
    chosen = table[table.selected]
    for (method, generator, shots), g in chosen.groupby(["method", "generator", "shots"]):
        out[f"accuracy/{method}/{generator}/{shots}shot"] = float(g.test_acc.mean())
    for (generator, shots), g in fid.groupby(["generator", "shots"]):
        out[f"fid/{generator}/{shots}shot"] = float(g.fid.mean())
    return out


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="datadream")
    add = stage.parser.add_argument
    add("--runs", nargs="+", required=True, help="the classify stage's CSVs")
    add("--fid", nargs="*", default=[], help="the fid stage's JSONs")
    add("--accuracy-out", required=True, help="output: results/datadream_accuracy.csv")
    add("--fid-out", required=True, help="output: results/datadream_fid.csv")
    add("--metrics", help="output (optional): summary JSON for dvc metrics")
    args = stage.start(argv)
    # Everything is read and checked before anything is written.
    table = accuracy_table(args.runs)
    fid = fid_table(args.fid)
    write_table(table, args.accuracy_out)
    write_table(fid, args.fid_out)
    if args.metrics:
        write_json(args.metrics, summary(table, fid))
    print(
        f"{len(table)} accuracy rows -> {args.accuracy_out}; {len(fid)} FID rows -> {args.fid_out}"
    )


if __name__ == "__main__":
    run(main)

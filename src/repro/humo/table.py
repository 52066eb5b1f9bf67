"""Stage humo_table: HuMo's headline table, gathered from the metric rows of the generated sets.

repro.humo.evaluate writes one JSON object per generated set (one task x variant x cfg
form x seed, plus the "real" rows that measure the test clips themselves). This stage
checks them and writes:

- results/humo_metrics.csv (COLUMNS, in that order): one row per (task, variant, cfg,
  seed), sorted by task (TASKS order), variant (VARIANTS order), cfg (CFG_FORMS order),
  seed. What the claims, the figures and the report read.
- with --curves, results/humo_sync_curves.csv (CURVE_COLUMNS), tidy: one row per
  (task, variant, cfg, seed, audio, offset), `corr` the mean over clips of the Pearson
  correlation of the mouth series with the audio envelope shifted by `offset` video
  frames; audio "matched" is the clip's own audio, "shuffled" another clip's (control).
  Only rows that carry `sync_curve` / `sync_curve_shuffled` (with `max_offset`) add to it.

    python -m repro.humo.table --rows results/humo/metrics/*.json \
        --out results/humo_metrics.csv --curves results/humo_sync_curves.csv

Nothing is written unless every row passes. A metric may be null in the JSON (not
measured: e.g. no FID for a set too small); it becomes NaN in the table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.io import read_json
from repro.core.results import write_table
from repro.core.stage import Stage, run

TASKS = ("TI", "TA", "TIA", "real")
VARIANTS = ("full", "no_focus", "no_progressive", "full_finetune", "real")
CFG_FORMS = ("paper", "code_17b", "code_1_7b", "fixed", "none")
# The rows that measure the test clips themselves: the reference every metric is read against.
REAL = {"task": "real", "variant": "real", "cfg": "none"}

KEYS = ["task", "variant", "cfg", "seed"]
METRICS = [
    "id_sim",
    "sync_c",
    "sync_offset",
    "sync_c_shuffled",
    "motion_acc",
    "background_acc",
    "text_align",
    "fid",
]
COLUMNS = [*KEYS, "n_clips", *METRICS]
CURVE_COLUMNS = [*KEYS, "audio", "offset", "corr"]
AUDIO = ("matched", "shuffled")
CURVE_KEYS = {"matched": "sync_curve", "shuffled": "sync_curve_shuffled"}

# The range each metric must lie in (None: unbounded on that side). Cosines and Pearson
# correlations lie in [-1, 1], accuracies in [0, 1], |offsets| and distances are >= 0.
# A value outside its range is a mix-up upstream (percent for a fraction, a signed
# offset), refused rather than averaged.
RANGES = {
    "id_sim": (-1.0, 1.0),
    "sync_c": (-1.0, 1.0),
    "sync_offset": (0.0, None),
    "sync_c_shuffled": (-1.0, 1.0),
    "motion_acc": (0.0, 1.0),
    "background_acc": (0.0, 1.0),
    "text_align": (0.0, 1.0),
    "fid": (0.0, None),
}
# Float round-off allowed past a bound (a correlation of 1 + 2e-16 is a correlation of 1).
ROUNDING = 1e-6


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(value, low: int, path, key: str) -> int:
    """`value` as an int if it is a whole number >= `low` (1.0 is accepted, 1.5, True and
    "1" are not), else ReproInputError naming the file and key."""
    if not _is_number(value) or not math.isfinite(value) or value % 1 or value < low:
        raise ReproInputError(f"{path}: {key} is {value!r}, not a whole number >= {low}")
    return int(value)


def _metric(value, path, key: str) -> float:
    """A metric's value as a float (null -> NaN), checked against RANGES[key]."""
    if value is None:
        return math.nan
    if not _is_number(value) or math.isinf(value):
        raise ReproInputError(f"{path}: {key} is {value!r}, not a finite number or null")
    value = float(value)
    if math.isnan(value):
        return value
    low, high = RANGES[key]
    if (low is not None and value < low - ROUNDING) or (
        high is not None and value > high + ROUNDING
    ):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ReproInputError(f"{path}: {key} is {value!r}, outside its range {bounds}")
    return value


def _known(value, allowed: tuple[str, ...], path, key: str) -> str:
    if value not in allowed:
        raise ReproInputError(f"{path}: unknown {key} {value!r} (allowed: {', '.join(allowed)})")
    return value


def metric_records(path) -> list[dict]:
    """The metric rows of one file of repro.humo.evaluate: a JSON object (one generated
    set) or a list of them (every set of one model); errors name the file."""
    data = read_json(path)
    records = data if isinstance(data, list) else [data]
    if not records or not all(isinstance(r, dict) for r in records):
        raise ReproInputError(f"{path}: expected a JSON object or a non-empty list of them")
    return records


def metric_row(path, record: dict | None = None) -> tuple[dict, list[dict]]:
    """One metric row of repro.humo.evaluate, checked: (the table row, its curve rows).
    `record` is one object of the file (default: the file holds that one object).

    The row must hold every column of COLUMNS; task, variant and cfg must be known and
    agree (task "real" goes with variant "real" and cfg "none", and only with them);
    seed a whole number >= 0, n_clips >= 1; each metric a number in its RANGES or null.
    Curves, if present, are lists of 2 * max_offset + 1 numbers (offsets -max_offset ..
    max_offset). Every error names the file.
    """
    if record is None:
        record = read_json(path)
    if not isinstance(record, dict):
        raise ReproInputError(f"{path}: expected a JSON object (one metric row)")
    missing = [c for c in COLUMNS if c not in record]
    if missing:
        raise ReproInputError(f"{path}: missing columns {missing}")
    row = {
        "task": _known(record["task"], TASKS, path, "task"),
        "variant": _known(record["variant"], VARIANTS, path, "variant"),
        "cfg": _known(record["cfg"], CFG_FORMS, path, "cfg"),
        "seed": _whole(record["seed"], 0, path, "seed"),
        "n_clips": _whole(record["n_clips"], 1, path, "n_clips"),
    }
    real = [row[k] == v for k, v in REAL.items()]
    if any(real) and not all(real):
        found = {k: row[k] for k in REAL}
        raise ReproInputError(
            f"{path}: {found}: the real clips' rows are task 'real', variant 'real' and "
            "cfg 'none', together (a generated set is none of them)"
        )
    row.update({m: _metric(record[m], path, m) for m in METRICS})
    return row, curve_rows(record, row, path)


def curve_rows(record: dict, row: dict, path) -> list[dict]:
    """The tidy curve rows (CURVE_COLUMNS) of one metric row; [] when it has no curve."""
    present = [audio for audio, key in CURVE_KEYS.items() if record.get(key) is not None]
    if not present:
        return []
    if "max_offset" not in record:
        raise ReproInputError(f"{path}: has a sync curve but no max_offset")
    max_offset = _whole(record["max_offset"], 0, path, "max_offset")
    offsets = range(-max_offset, max_offset + 1)
    rows = []
    for audio in present:
        key = CURVE_KEYS[audio]
        curve = record[key]
        if not isinstance(curve, list) or len(curve) != len(offsets):
            length = len(curve) if isinstance(curve, list) else type(curve).__name__
            raise ReproInputError(
                f"{path}: {key} must be a list of 2 * max_offset + 1 = {len(offsets)} "
                f"correlations, got {length}"
            )
        for offset, corr in zip(offsets, curve, strict=True):
            value = _metric(corr, path, "sync_c")  # a correlation: [-1, 1]
            rows.append({**{k: row[k] for k in KEYS}, "audio": audio, "offset": offset})
            rows[-1]["corr"] = value
    return rows


def _order(table: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    """Rows sorted by task, variant and cfg in their declared orders, then seed, `extra`."""
    ranks = {
        column: table[column].map({name: i for i, name in enumerate(names)})
        for column, names in (("task", TASKS), ("variant", VARIANTS), ("cfg", CFG_FORMS))
    }
    order = table.assign(**{f"_{c}": r for c, r in ranks.items()})
    order = order.sort_values(["_task", "_variant", "_cfg", "seed", *extra], kind="stable")
    return order[list(table.columns)].reset_index(drop=True)


def gather(paths: Sequence) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the metrics table, the tidy curves table) of the metric rows in `paths`, checked:
    each row by `metric_row`, and no (task, variant, cfg, seed) twice (the message names
    both files); sorted deterministically whatever the order of `paths`."""
    rows, curves, seen = [], [], {}
    for path in paths:
        for record in metric_records(path):
            row, curve = metric_row(path, record)
            key = tuple(row[k] for k in KEYS)
            if key in seen:
                raise ReproInputError(
                    f"{path}: the row {dict(zip(KEYS, key, strict=True))} is also in {seen[key]}"
                )
            seen[key] = path
            rows.append(row)
            curves.extend(curve)
    table = _order(pd.DataFrame(rows, columns=COLUMNS), [])
    curves = _order(pd.DataFrame(curves, columns=CURVE_COLUMNS), ["audio", "offset"])
    return table, curves


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="humo")
    add = stage.parser.add_argument
    add("--rows", nargs="+", required=True, help="repro.humo.evaluate's metric rows (JSON)")
    add("--out", required=True, help="output: results/humo_metrics.csv")
    add("--curves", help="output (optional): results/humo_sync_curves.csv")
    args = stage.start(argv)
    table, curves = gather(args.rows)  # everything checked before anything is written
    write_table(table, args.out)
    if args.curves:
        write_table(curves, args.curves)
    print(f"{len(table)} metric rows -> {args.out}; {len(curves)} curve points")


if __name__ == "__main__":
    run(main)

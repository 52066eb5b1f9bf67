"""Stage fedre_table: FedRE's headline tables, gathered from the simulation's run files.

Each simulation job (one task x partition x seed, every algorithm; repro.fedre.simulate)
writes an accuracy run and a communication run. This stage gathers them, checks them
and writes:

- results/fedre_accuracy.csv (ACCURACY_COLUMNS): one row per task x partition x
  algorithm x seed x round x client. `round` 1..R is the evaluation after that round's
  broadcast; `client` 0..N-1 is that client's model on its own test split, client -1
  (arch "all") the sample-weighted accuracy over all clients (sum correct / sum test
  samples): the headline number.
- results/fedre_summary.csv (SUMMARY_COLUMNS): one row per task x partition x algorithm
  x seed, from the client -1 rows: the accuracy at the last round, the mean of the last
  `last_rounds` rounds (what the claims use) and the best round's accuracy, which is
  HtFLlib's reported number but is chosen on the test data (`max_selected_on_test`),
  so it is shown, never claimed on.
- results/fedre_communication.csv (COMMUNICATION_COLUMNS): one row per task x partition
  x algorithm x seed x round x direction ("upload": clients to server, "broadcast":
  server to clients), totals over the clients of that round.

    python -m repro.fedre.table --runs results/fedre/runs/*_accuracy.csv \
        --comm-runs results/fedre/runs/*_communication.csv \
        --accuracy-out results/fedre_accuracy.csv --summary-out results/fedre_summary.csv \
        --communication-out results/fedre_communication.csv --params '{"last_rounds": 10}'

Nothing is written unless every check passes. The columns below are the contract with
the simulation, the claims, the figures and the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import read_table, write_table
from repro.core.stage import Stage, run
from repro.fedre.workflow import ALGORITHMS

# One job of the simulation: all its algorithms share the clients' data and seed.
RUN_KEYS = ["task", "partition", "algorithm", "seed"]
ROUND_COLUMNS = [*RUN_KEYS, "round", "client", "arch", "test_samples", "accuracy"]
ROUND_KEYS = [*RUN_KEYS, "round", "client"]
COMM_COLUMNS = [
    *RUN_KEYS,
    "round",
    "direction",
    "messages",
    "tensors",
    "scalars",
    "bytes",
]
COMM_KEYS = [*RUN_KEYS, "round", "direction"]
DIRECTIONS = ("upload", "broadcast")
COUNT_COLUMNS = ("messages", "tensors", "scalars", "bytes")
ALL_CLIENTS = -1  # the `client` of the sample-weighted accuracy over every client

ACCURACY_COLUMNS = ROUND_COLUMNS
SUMMARY_COLUMNS = [
    *RUN_KEYS,
    "rounds",
    "final_accuracy",
    "last_rounds",
    "last_mean_accuracy",
    "max_accuracy",
    "max_round",
    "max_selected_on_test",
]
COMMUNICATION_COLUMNS = COMM_COLUMNS
LAST_ROUNDS = 10

# Where each row came from, kept while checking so that errors can name the file.
_SOURCE = "_source"


def _plain(row: pd.Series) -> dict:
    """A row's keys as plain Python values, for messages."""
    return {k: _value(v) for k, v in row.items()}


def _value(value):
    """A numpy scalar as the Python value it holds (so messages read 0, not np.int64(0))."""
    return value.item() if hasattr(value, "item") else value


def _gather(paths: Sequence, columns: list[str]) -> pd.DataFrame:
    """The rows of every file in `paths` (only `columns`), each tagged with its file."""
    frames = [
        read_table(path, required=columns)[columns].assign(**{_SOURCE: str(path)}) for path in paths
    ]
    if not frames:
        return pd.DataFrame(columns=[*columns, _SOURCE])
    return pd.concat(frames, ignore_index=True)


def _sources(rows: pd.DataFrame, what: str) -> str:
    """The files the rows came from, for the start of a message ("a.csv, b.csv")."""
    names = list(dict.fromkeys(rows[_SOURCE])) if _SOURCE in rows else []
    return ", ".join(names) if names else what


def _check_unique(table: pd.DataFrame, keys: list[str], what: str) -> None:
    duplicated = table[table.duplicated(keys, keep=False)]
    if duplicated.empty:
        return
    first = duplicated.iloc[0][keys]
    same = duplicated[(duplicated[keys] == first).all(axis=1)]
    raise ReproInputError(
        f"{_sources(same, what)}: the row {_plain(first)} appears {len(same)} times"
    )


def _check_integers(table: pd.DataFrame, column: str, low: int, keys: list[str], what: str):
    """Refuse a value of `column` that is not a whole number >= `low`; make it int64."""
    values = pd.to_numeric(table[column], errors="coerce")
    finite = values.notna() & np.isfinite(values.astype(float))
    whole = finite & (values.where(finite, 0) % 1 == 0)
    bad = table[~whole | (values.where(finite, low) < low)]
    if not bad.empty:
        row = bad.iloc[0]
        raise ReproInputError(
            f"{_sources(bad.iloc[:1], what)}: {column} of {_plain(row[keys])} is "
            f"{_value(row[column])!r}, not a whole number >= {low}"
        )
    table[column] = values.astype("int64")


def _check_known(table: pd.DataFrame, column: str, allowed: tuple[str, ...], what: str) -> None:
    unknown = table[~table[column].isin(allowed)]
    if not unknown.empty:
        names = sorted(set(unknown[column].astype(str)))
        raise ReproInputError(
            f"{_sources(unknown, what)}: unknown {column} {names} (allowed: {', '.join(allowed)})"
        )


def _check_rounds(table: pd.DataFrame, what: str) -> None:
    """Every run has the rounds 1..R with no gap, and every run of one task x partition
    the same R (algorithms and seeds are compared round by round)."""
    last_round: dict[tuple, tuple[int, dict]] = {}
    for key, rows in table.groupby(RUN_KEYS, sort=True):
        rounds = sorted(set(rows["round"]))
        run_name = _plain(pd.Series(dict(zip(RUN_KEYS, key, strict=True))))
        if rounds != list(range(1, len(rounds) + 1)):
            raise ReproInputError(
                f"{_sources(rows, what)}: the run {run_name} has rounds "
                f"{_short(rounds)}, not 1..R with no gap"
            )
        setting = key[:2]
        if setting not in last_round:
            last_round[setting] = (len(rounds), run_name)
        elif last_round[setting][0] != len(rounds):
            other_rounds, other = last_round[setting]
            raise ReproInputError(
                f"{_sources(rows, what)}: the run {run_name} has {len(rounds)} rounds but "
                f"{other} has {other_rounds}"
            )


def _short(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{values[0]}, ..., {values[-1]}]"


def _check_same_per_round(table: pd.DataFrame, column: str, what: str, need=()) -> None:
    """Within each run, every round has the same set of `column` values (clients, or
    directions), including every value of `need`."""
    per_round = table.groupby([*RUN_KEYS, "round"], sort=True)[column].agg(frozenset)
    for key, values in per_round.groupby(level=list(range(len(RUN_KEYS))), sort=False):
        first = values.iloc[0]
        for (*_, round_), found in values.items():
            missing = sorted(set(need) - found)
            if found != first or missing:
                run_name = _plain(pd.Series(dict(zip(RUN_KEYS, key, strict=True))))
                rows = table[(table[RUN_KEYS] == list(key)).all(axis=1)]
                expected = sorted(first | set(need))
                raise ReproInputError(
                    f"{_sources(rows, what)}: round {round_} of the run {run_name} has "
                    f"{column} {sorted(found)}, expected {expected}"
                )


def _ordered(table: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """Rows sorted by task, partition, algorithm (in ALGORITHMS order), then `keys`."""
    order = {a: i for i, a in enumerate(ALGORITHMS)}
    table = table.assign(_a=table["algorithm"].map(order))
    table = table.sort_values(["task", "partition", "_a", *keys], kind="stable")
    return table[columns].reset_index(drop=True)


def accuracy_table(paths: Sequence) -> pd.DataFrame:
    """The accuracy runs' rows, checked: no key twice, known algorithms, accuracies in
    [0, 1], rounds 1..R with no gap (the same R per task x partition), every round with
    the same clients and the all-clients row (client -1); sorted."""
    what = "the accuracy runs"
    table = _gather(paths, ROUND_COLUMNS)
    _check_known(table, "algorithm", ALGORITHMS, what)
    for column, low in (("seed", 0), ("round", 1), ("client", ALL_CLIENTS), ("test_samples", 0)):
        _check_integers(table, column, low, ROUND_KEYS, what)
    accuracy = pd.to_numeric(table["accuracy"], errors="coerce")
    bad = table[accuracy.isna() | (accuracy < 0) | (accuracy > 1)]
    if not bad.empty:
        row = bad.iloc[0]
        raise ReproInputError(
            f"{_sources(bad.iloc[:1], what)}: accuracy of {_plain(row[ROUND_KEYS])} is "
            f"{_value(row['accuracy'])!r}, not a fraction in [0, 1]"
        )
    table["accuracy"] = accuracy.astype(float)
    _check_unique(table, ROUND_KEYS, what)
    _check_rounds(table, what)
    _check_same_per_round(table, "client", what, need=(ALL_CLIENTS,))
    return _ordered(table, ["seed", "round", "client"], ACCURACY_COLUMNS)


def communication_table(paths: Sequence) -> pd.DataFrame:
    """The communication runs' rows, checked: no key twice, known algorithms and
    directions, counts whole numbers >= 0, rounds 1..R with no gap (the same R per task
    x partition), both directions in every round; sorted (upload before broadcast)."""
    what = "the communication runs"
    table = _gather(paths, COMM_COLUMNS)
    _check_known(table, "algorithm", ALGORITHMS, what)
    _check_known(table, "direction", DIRECTIONS, what)
    for column, low in (("seed", 0), ("round", 1)) + tuple((c, 0) for c in COUNT_COLUMNS):
        _check_integers(table, column, low, COMM_KEYS, what)
    _check_unique(table, COMM_KEYS, what)
    _check_rounds(table, what)
    _check_same_per_round(table, "direction", what, need=DIRECTIONS)
    directions = {d: i for i, d in enumerate(DIRECTIONS)}
    table = table.assign(_d=table["direction"].map(directions))
    return _ordered(table, ["seed", "round", "_d"], COMMUNICATION_COLUMNS)


def check_same_runs(accuracy: pd.DataFrame, communication: pd.DataFrame) -> None:
    """Both tables cover the same runs with the same number of rounds: a missing
    communication file would otherwise leave a claim silently undecided."""
    counts = [
        table.groupby(RUN_KEYS)["round"].max().rename(name)
        for table, name in ((accuracy, "accuracy"), (communication, "communication"))
    ]
    both = pd.concat(counts, axis=1)
    differ = both[both["accuracy"].ne(both["communication"])]
    if differ.empty:
        return
    key, rounds = differ.index[0], differ.iloc[0]
    run_name = _plain(pd.Series(dict(zip(RUN_KEYS, key, strict=True))))

    def text(r):
        return "no rows" if pd.isna(r) else f"{int(r)} rounds"

    raise ReproInputError(
        f"--runs / --comm-runs: the run {run_name} has {text(rounds['accuracy'])} in the "
        f"accuracy runs but {text(rounds['communication'])} in the communication runs"
    )


def check_last_rounds(value) -> int:
    """`value` if it is a whole number >= 1 (not a bool, not 10.0), else ReproInputError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ReproInputError(f"fedre.last_rounds: must be an integer >= 1, got {value!r}")
    return int(value)


def summary_table(accuracy: pd.DataFrame, last_rounds: int = LAST_ROUNDS) -> pd.DataFrame:
    """One row per task x partition x algorithm x seed from the all-clients rows (client
    -1): final, mean of the last `last_rounds` rounds (all of them if fewer) and best
    round (the earliest of equal bests) accuracy."""
    last_rounds = check_last_rounds(last_rounds)
    missing = [c for c in ACCURACY_COLUMNS if c not in accuracy]
    if missing:
        raise ReproInputError(f"the accuracy table lacks columns {missing}")
    overall = accuracy[accuracy["client"] == ALL_CLIENTS]
    lacking = (
        accuracy[RUN_KEYS]
        .drop_duplicates()
        .merge(overall[RUN_KEYS].drop_duplicates(), how="left", indicator=True)
    )
    lacking = lacking[lacking["_merge"] == "left_only"]
    if not lacking.empty:
        raise ReproInputError(
            f"the accuracy table: the run {_plain(lacking.iloc[0][RUN_KEYS])} has no "
            f"all-clients rows (client {ALL_CLIENTS})"
        )
    rows = []
    for key, run_rows in overall.groupby(RUN_KEYS, sort=False):
        curve = run_rows.sort_values("round")
        values = curve["accuracy"].to_numpy(dtype=float)
        used = min(last_rounds, len(values))
        best = int(np.argmax(values))  # the first of equal maxima
        rows.append(
            {
                **dict(zip(RUN_KEYS, key, strict=True)),
                "rounds": len(values),
                "final_accuracy": float(values[-1]),
                "last_rounds": used,
                "last_mean_accuracy": float(values[-used:].mean()),
                "max_accuracy": float(values[best]),
                "max_round": int(curve["round"].iloc[best]),
                "max_selected_on_test": True,
            }
        )
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    if summary.empty:
        return summary
    return _ordered(summary, ["seed"], SUMMARY_COLUMNS)


ABLATION_COLUMNS = [
    "task",
    "partition",
    "variant",
    "entangle",
    "resample_weights",
    "seed",
    "rounds",
    "final_accuracy",
    "last_rounds",
    "last_mean_accuracy",
]
ABLATION_KEYS = ["task", "partition", "variant", "seed"]
PRIVACY_COLUMNS = [
    "task",
    "partition",
    "algorithm",
    "seed",
    "client",
    "arch",
    "vectors",
    "mse",
    "psnr",
]
PRIVACY_KEYS = ["task", "partition", "algorithm", "seed", "client"]


def privacy_table(paths: Sequence) -> pd.DataFrame:
    """The inversion attack's rows (repro.fedre.privacy), checked: no key twice, known
    algorithms, MSE in [0, 1] (pixels in [0, 1]), at least one vector decoded."""
    table = _gather(paths, PRIVACY_COLUMNS)
    if table.empty:
        return table[PRIVACY_COLUMNS]
    _check_unique(table, PRIVACY_KEYS, "the privacy runs")
    _check_known(table, "algorithm", ALGORITHMS, "the privacy runs")
    mse = pd.to_numeric(table["mse"], errors="coerce")
    bad = table[mse.isna() | (mse < 0) | (mse > 1) | (table["vectors"] < 1)]
    if not bad.empty:
        raise ReproInputError(
            f"the privacy runs ({_sources(bad, 'privacy')}): the row "
            f"{_plain(bad.iloc[0][PRIVACY_KEYS])} has mse {_value(bad.iloc[0]['mse'])} and "
            f"{_value(bad.iloc[0]['vectors'])} vectors (need mse in [0, 1], >= 1 vector)"
        )
    return _ordered(table, ["seed", "client"], PRIVACY_COLUMNS)


def ablation_table(paths: Sequence) -> pd.DataFrame:
    """The ablation runs' rows (repro.fedre.ablation), checked: no (task, partition,
    variant, seed) twice, accuracies in [0, 1], the reference "fedre" in every seed."""
    table = _gather(paths, ABLATION_COLUMNS)
    if table.empty:
        return table[ABLATION_COLUMNS]
    _check_unique(table, ABLATION_KEYS, "the ablation runs")
    for column in ("final_accuracy", "last_mean_accuracy"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table[values.isna() | (values < 0) | (values > 1)]
        if not bad.empty:
            raise ReproInputError(
                f"the ablation runs ({_sources(bad, 'ablation')}): {column} of "
                f"{_plain(bad.iloc[0][ABLATION_KEYS])} is not a fraction in [0, 1]"
            )
    lacking = set(table.seed) - set(table[table.variant == "fedre"].seed)
    if lacking:
        raise ReproInputError(
            f"the ablation runs: seeds {sorted(lacking)} lack the reference variant 'fedre'"
        )
    return table.sort_values(["task", "partition", "variant", "seed"])[ABLATION_COLUMNS]


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="fedre")
    add = stage.parser.add_argument
    add("--runs", nargs="*", default=[], help="the simulation's accuracy runs (one per job)")
    add("--comm-runs", nargs="*", default=[], help="its communication runs (one per job)")
    add("--accuracy-out", required=True, help="results/fedre_accuracy.csv")
    add("--summary-out", required=True, help="results/fedre_summary.csv")
    add("--communication-out", required=True, help="results/fedre_communication.csv")
    add("--ablation-runs", nargs="*", default=[], help="the ablation's runs (one per seed)")
    add("--ablation-out", help="results/fedre_ablation.csv")
    add("--privacy-runs", nargs="*", default=[], help="the inversion attack's runs")
    add("--privacy-out", help="results/fedre_privacy.csv")
    args = stage.start(argv)
    last_rounds = check_last_rounds(stage.params.get("last_rounds", LAST_ROUNDS))
    accuracy = accuracy_table(args.runs)
    communication = communication_table(args.comm_runs)
    check_same_runs(accuracy, communication)
    summary = summary_table(accuracy, last_rounds)
    ablation = ablation_table(args.ablation_runs) if args.ablation_out else None
    privacy = privacy_table(args.privacy_runs) if args.privacy_out else None
    write_table(accuracy, args.accuracy_out)
    write_table(summary, args.summary_out)
    write_table(communication, args.communication_out)
    if ablation is not None:
        write_table(ablation, args.ablation_out)
    if privacy is not None:
        write_table(privacy, args.privacy_out)


if __name__ == "__main__":
    run(main)

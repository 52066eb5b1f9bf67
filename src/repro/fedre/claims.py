"""Stage fedre_claims: FedRE's headline claims, computed from the summary and
communication tables (repro.fedre.table).

Accuracy: every number is the mean of the last `last_rounds` rounds' sample-weighted
test accuracy over all clients (each client's model on its own test split), never the
best round's (`max_accuracy` is chosen on the test data: shown in the figures, never
claimed on). Algorithms are compared seed by seed, on one task and partition: a seed is
one data split, client architecture draw and initialisation shared by every algorithm.
"FedRE beats B" holds when mean - std of the per-seed gains (percentage points) lies
above 0, does not hold when mean + std <= 0, and is inconclusive when the spread
straddles 0 (core.results.spread_verdict).

Communication: per seed, FedProto's upload (scalars per round, mean over rounds) divided
by FedRE's, on the many-class task, where FedProto's per-class prototypes cost most;
holds when mean - std lies above `min_upload_ratio`.

Privacy (with --privacy): per seed, the inversion attack's PSNR on what prototypes
(FedProto) or all representations (FedAllRep) upload minus that on FedRE's entangled
representation, in dB, mean over tasks (repro.fedre.privacy); holds when mean - std > 0.

Fewer than `min_seeds` seeds (default 3) decide nothing. A claim whose task, partition
or algorithm is absent from the tables is inconclusive, its reference says what is
missing.

    python -m repro.fedre.claims --summary results/fedre_summary.csv \
        --communication results/fedre_communication.csv \
        --privacy results/fedre_privacy.csv --out results/claims/fedre.csv \
        --params '{"partition": "dir", "many_class_task": "glyphs", "min_upload_ratio": 50,
                   "baselines": ["fedproto", "fedgh", "local"]}'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import Claim, mean_std, read_table, spread_verdict, write_claims
from repro.core.stage import Stage, run
from repro.fedre.table import (
    COMMUNICATION_COLUMNS,
    PRIVACY_COLUMNS,
    RUN_KEYS,
    SUMMARY_COLUMNS,
)
from repro.fedre.workflow import ALGORITHMS

PAPER = "FedRE"
MIN_SEEDS = 3
PARTITION = "dir"
MANY_CLASS_TASK = "glyphs"
# "An order of magnitude less upload": the paper's CIFAR-100 numbers give ~50x.
MIN_UPLOAD_RATIO = 50.0
BASELINES = ("fedproto", "fedgh", "local")
DISPLAY_NAME = {
    "local": "Local",
    "fedproto": "FedProto",
    "fedgh": "FedGH",
    "lg_fedavg": "LG-FedAvg",
    "fedtgp": "FedTGP",
    "fedre": "FedRE",
    "fedallrep": "FedAllRep (all representations)",
}
# The paper's test accuracy (%) on CIFAR-10 / CIFAR-100 with Dirichlet partitions.
PAPER_ACCURACY = {
    "fedproto": (78.4, 35.0),
    "fedgh": (78.7, 40.9),
    "local": (81.2, 41.6),
    "fedre": (82.6, 46.4),
}
PAPER_UPLOAD = "paper (CIFAR-100): FedRE uploads 5.12k scalars per round, FedProto 257k (~50x)"


def name(algorithm: str) -> str:
    return DISPLAY_NAME.get(algorithm, algorithm)


def seeds_note(n: int, min_seeds: int) -> str:
    return f"; only {n} seeds (< {min_seeds}): undecided" if n < min_seeds else ""


def _paper_accuracy(algorithm: str) -> str:
    if algorithm not in PAPER_ACCURACY:
        return f"{name(algorithm)} (no paper number recorded here)"
    cifar10, cifar100 = PAPER_ACCURACY[algorithm]
    return f"{name(algorithm)} {cifar10} / {cifar100}"


def _check_columns(table: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table]
    if missing:
        raise ReproInputError(f"{what} lacks columns {missing} (has {list(table.columns)})")


def _check_unique(table: pd.DataFrame, keys: list[str], what: str) -> None:
    """Refuse a key seen twice: a per-seed pairing would silently average the two."""
    duplicated = table[table.duplicated(keys, keep=False)]
    if not duplicated.empty:
        first = {
            k: v.item() if hasattr(v, "item") else v for k, v in duplicated.iloc[0][keys].items()
        }
        raise ReproInputError(f"{what}: the row {first} appears more than once")


def per_seed_gain(summary: pd.DataFrame, task: str, partition: str, a: str, b: str) -> pd.Series:
    """Per seed: 100 * (last_mean_accuracy of `a` - that of `b`) on (task, partition),
    on the seeds both algorithms have."""
    rows = summary[(summary.task == task) & (summary.partition == partition)]
    by_seed = rows.pivot_table(
        index="seed", columns="algorithm", values="last_mean_accuracy", aggfunc="mean"
    )
    if a not in by_seed or b not in by_seed:
        return pd.Series(dtype=float)
    both = by_seed[[a, b]].dropna()
    return 100.0 * (both[a] - both[b])


def _missing(summary: pd.DataFrame, task: str, partition: str, algorithms: Sequence[str]) -> str:
    """What a claim on (task, partition) comparing `algorithms` lacks, or ""."""
    if not (summary.partition == partition).any():
        return f"the summary has no rows on partition {partition!r}"
    rows = summary[(summary.task == task) & (summary.partition == partition)]
    if rows.empty:
        return f"the summary has no rows on task {task!r} with partition {partition!r}"
    absent = [a for a in algorithms if not (rows.algorithm == a).any()]
    if absent:
        return f"no rows of {', '.join(map(name, absent))} on {task} ({partition})"
    return ""


def beats_claim(
    summary: pd.DataFrame, task: str, partition: str, baseline: str, min_seeds: int
) -> Claim:
    """FedRE beats `baseline` on (task, partition): per-seed gains in points against 0."""
    claim = f"FedRE beats {name(baseline)} in accuracy on {task} ({partition})"
    rows = summary[(summary.task == task) & (summary.partition == partition)]
    last = sorted({int(v) for v in rows.last_rounds})
    metric = (
        f"FedRE - {name(baseline)}: mean of the last {'/'.join(map(str, last)) or 'N'} "
        "rounds' sample-weighted test accuracy (percentage points), per seed; holds when "
        "mean - std > 0"
    )
    paper = (
        f"paper (CIFAR-10 / CIFAR-100, Dirichlet): {_paper_accuracy(baseline)}, "
        f"{_paper_accuracy('fedre')}"
    )
    missing = _missing(summary, task, partition, ("fedre", baseline))
    if missing:
        return Claim(
            PAPER, claim, metric, math.nan, math.nan, 0, f"{paper}; {missing}", "inconclusive"
        )
    gains = per_seed_gain(summary, task, partition, "fedre", baseline)
    mean, std, n, verdict = spread_verdict(gains, 0.0, "higher", min_seeds)

    def mean_of(algorithm: str) -> float:
        values = rows[rows.algorithm == algorithm].last_mean_accuracy
        return 100.0 * mean_std(values)[0]

    paired = "" if n else "; no seed has both"
    reference = (
        f"{paper}; here FedRE {mean_of('fedre'):.1f}% vs {name(baseline)} "
        f"{mean_of(baseline):.1f}% (mean over seeds){paired}{seeds_note(n, min_seeds)}"
    )
    return Claim(PAPER, claim, metric, mean, std, n, reference, verdict)


def accuracy_claims(
    summary: pd.DataFrame,
    partition: str = PARTITION,
    baselines: Sequence[str] = BASELINES,
    min_seeds: int = MIN_SEEDS,
) -> list[Claim]:
    """One "FedRE beats B" claim per baseline and task (tasks of the whole summary, in
    sorted order; a task absent on `partition` gives an inconclusive claim)."""
    _check_columns(summary, SUMMARY_COLUMNS, "the summary table")
    tasks = sorted(set(summary.task.astype(str)))
    if not tasks:
        return [
            Claim(
                PAPER,
                f"FedRE beats {name(b)} in accuracy ({partition})",
                "FedRE - baseline accuracy (percentage points), per seed",
                math.nan,
                math.nan,
                0,
                "the summary has no rows",
                "inconclusive",
            )
            for b in baselines
        ]
    return [
        beats_claim(summary, task, partition, baseline, min_seeds)
        for baseline in baselines
        for task in tasks
    ]


def upload_per_seed(communication: pd.DataFrame, task: str, partition: str, algorithm: str):
    """Per seed: the mean over rounds of `algorithm`'s upload (scalars, bytes) per round
    on (task, partition); a DataFrame indexed by seed."""
    rows = communication[
        (communication.task == task)
        & (communication.partition == partition)
        & (communication.algorithm == algorithm)
        & (communication.direction == "upload")
    ]
    return rows.groupby("seed")[["scalars", "bytes"]].mean()


def count_text(value: float) -> str:
    """5120 -> "5.1k", 257000 -> "257k", 1.2e6 -> "1.2M", 512 -> "512", 0 -> "0"."""
    if not math.isfinite(value):
        return str(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.1f}{unit}" if abs(scaled) < 10 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 10 else f"{value:.2g}"


def upload_claim(
    communication: pd.DataFrame,
    task: str = MANY_CLASS_TASK,
    partition: str = PARTITION,
    min_ratio: float = MIN_UPLOAD_RATIO,
    min_seeds: int = MIN_SEEDS,
) -> Claim:
    """FedProto's upload / FedRE's, per seed (scalars per round, mean over rounds),
    against `min_ratio`. A seed where FedRE uploads nothing has no ratio (NaN)."""
    _check_columns(communication, COMMUNICATION_COLUMNS, "the communication table")
    claim = (
        f"FedRE uploads >= {min_ratio:g}x fewer scalars than FedProto on the many-class "
        f"task ({task}, {partition})"
    )
    metric = (
        "FedProto / FedRE upload scalars per round (mean over rounds), per seed; holds "
        f"when mean - std > {min_ratio:g}"
    )
    rows = communication[(communication.task == task) & (communication.partition == partition)]
    missing = ""
    if not (communication.partition == partition).any():
        missing = f"the communication table has no rows on partition {partition!r}"
    elif rows.empty:
        missing = (
            f"the communication table has no rows on task {task!r} with partition {partition!r}"
        )
    else:
        absent = [a for a in ("fedproto", "fedre") if not (rows.algorithm == a).any()]
        if absent:
            missing = f"no rows of {', '.join(map(name, absent))} on {task} ({partition})"
    if missing:
        return Claim(
            PAPER,
            claim,
            metric,
            math.nan,
            math.nan,
            0,
            f"{PAPER_UPLOAD}; {missing}",
            "inconclusive",
        )
    fedproto = upload_per_seed(communication, task, partition, "fedproto")
    fedre = upload_per_seed(communication, task, partition, "fedre")
    seeds = fedproto.index.intersection(fedre.index)
    denominator = fedre.scalars[seeds].where(fedre.scalars[seeds] > 0)
    ratios = fedproto.scalars[seeds] / denominator
    mean, std, n, verdict = spread_verdict(ratios, min_ratio, "higher", min_seeds)
    notes = []
    if not len(seeds):
        notes.append("no seed has both")
    silent = int((fedre.scalars[seeds] == 0).sum())
    if silent:
        notes.append(f"FedRE uploads nothing on {silent} seeds (no ratio there)")
    reference = (
        f"{PAPER_UPLOAD}; here FedRE {count_text(fedre.scalars.mean())} scalars "
        f"({count_text(fedre.bytes.mean())}B) per round, FedProto "
        f"{count_text(fedproto.scalars.mean())} scalars ({count_text(fedproto.bytes.mean())}B)"
        + "".join(f"; {note}" for note in notes)
        + seeds_note(n, min_seeds)
    )
    return Claim(PAPER, claim, metric, mean, std, n, reference, verdict)


PAPER_PSNR = (
    "paper (inversion attack PSNR, lower = more private): all representations 12.89, "
    "prototypes 10.25, FedRE 9.66"
)


def psnr_per_seed(privacy: pd.DataFrame, partition: str, algorithm: str) -> pd.Series:
    """Per seed: the mean over tasks of the mean over clients of the inversion PSNR."""
    rows = privacy[(privacy.partition == partition) & (privacy.algorithm == algorithm)]
    return rows.groupby(["seed", "task"]).psnr.mean().groupby(level="seed").mean()


def privacy_claim(privacy: pd.DataFrame, partition: str, reference: str, min_seeds: int) -> Claim:
    """FedRE's upload inverts worse (lower PSNR) than `reference`'s: per seed, PSNR of
    `reference` - PSNR of FedRE in dB, mean over tasks; holds when mean - std > 0."""
    ours = psnr_per_seed(privacy, partition, "fedre")
    theirs = psnr_per_seed(privacy, partition, reference)
    gap = (theirs - ours).dropna()
    mean, std, n, verdict = spread_verdict(gap, 0.0, "higher", min_seeds)
    what = {"fedallrep": "all representations", "fedproto": "prototypes (FedProto)"}
    missing = "" if len(gap) else f"; no seed has both fedre and {reference} on {partition}"
    per_task = (
        privacy[privacy.partition == partition].groupby(["task", "algorithm"]).psnr.mean().unstack()
    )
    detail = "; ".join(
        f"{task}: FedRE {row.get('fedre', float('nan')):.2f} dB vs "
        f"{row.get(reference, float('nan')):.2f} dB"
        for task, row in per_task.iterrows()
    )
    return Claim(
        PAPER,
        f"FedRE's upload is harder to invert than {what.get(reference, reference)} ({partition})",
        f"inversion PSNR {reference} - fedre (dB, mean over tasks and clients), per seed; "
        "holds when mean - std > 0",
        mean,
        std,
        n,
        f"{PAPER_PSNR}; here {detail}{missing}{seeds_note(n, min_seeds)}",
        verdict,
    )


def build_claims(
    summary: pd.DataFrame,
    communication: pd.DataFrame,
    *,
    partition: str = PARTITION,
    many_class_task: str = MANY_CLASS_TASK,
    min_upload_ratio: float = MIN_UPLOAD_RATIO,
    baselines: Sequence[str] = BASELINES,
    min_seeds: int = MIN_SEEDS,
    privacy: pd.DataFrame | None = None,
) -> list[Claim]:
    """The accuracy claims (every baseline x task on `partition`), the upload claim, and
    (with the privacy table) FedRE against prototypes and all representations."""
    _check_columns(summary, SUMMARY_COLUMNS, "the summary table")
    _check_columns(communication, COMMUNICATION_COLUMNS, "the communication table")
    _check_unique(summary, RUN_KEYS, "the summary table")
    _check_unique(communication, [*RUN_KEYS, "round", "direction"], "the communication table")
    return [
        *accuracy_claims(summary, partition, baselines, min_seeds),
        upload_claim(communication, many_class_task, partition, min_upload_ratio, min_seeds),
        *(
            []
            if privacy is None
            else [
                privacy_claim(privacy, partition, reference, min_seeds)
                for reference in ("fedproto", "fedallrep")
            ]
        ),
    ]


def check_params(params: dict) -> dict:
    """The stage's settings from --params, defaults filled in, each checked; errors name
    the key (fedre.claims.<key>)."""
    settings = {
        "partition": params.get("partition", PARTITION),
        "many_class_task": params.get("many_class_task", MANY_CLASS_TASK),
        "min_upload_ratio": params.get("min_upload_ratio", MIN_UPLOAD_RATIO),
        "baselines": params.get("baselines", list(BASELINES)),
        "min_seeds": params.get("min_seeds", MIN_SEEDS),
    }
    for key in ("partition", "many_class_task"):
        if not isinstance(settings[key], str) or not settings[key]:
            raise ReproInputError(f"fedre.claims.{key}: must be a name, got {settings[key]!r}")
    ratio = settings["min_upload_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
        raise ReproInputError(f"fedre.claims.min_upload_ratio: must be a number > 0, got {ratio!r}")
    seeds = settings["min_seeds"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ReproInputError(f"fedre.claims.min_seeds: must be an integer >= 1, got {seeds!r}")
    baselines = settings["baselines"]
    if not isinstance(baselines, list | tuple) or not baselines:
        raise ReproInputError(
            f"fedre.claims.baselines: must be a non-empty list of algorithms, got {baselines!r}"
        )
    allowed = [a for a in ALGORITHMS if a != "fedre"]
    for baseline in baselines:
        if baseline not in allowed:
            raise ReproInputError(
                f"fedre.claims.baselines: unknown algorithm {baseline!r} "
                f"(allowed: {', '.join(allowed)})"
            )
    settings["min_upload_ratio"] = float(ratio)
    return settings


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="fedre")
    add = stage.parser.add_argument
    add("--summary", required=True, help="results/fedre_summary.csv")
    add("--communication", required=True, help="results/fedre_communication.csv")
    add("--privacy", help="results/fedre_privacy.csv")
    add("--out", required=True, help="results/claims/fedre.csv")
    args = stage.start(argv)
    settings = check_params(stage.params)
    summary = read_table(args.summary, required=SUMMARY_COLUMNS)
    communication = read_table(args.communication, required=COMMUNICATION_COLUMNS)
    privacy = read_table(args.privacy, required=PRIVACY_COLUMNS) if args.privacy else None
    claims = build_claims(summary, communication, privacy=privacy, **settings)
    write_claims(claims, args.out)
    for c in claims:
        print(f"[{c.verdict}] {c.claim}: {c.measured}")


if __name__ == "__main__":
    run(main)

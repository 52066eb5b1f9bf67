"""Stage datadream_claims: DataDream's headline claims, each computed from the tables.

Every number is a TEST accuracy of a classifier whose epoch was picked on the
validation split, and for the synthetic methods at the N (synthetic images per class)
picked on validation too: the accuracy table's `selected` rows. Methods are compared
seed by seed (each seed has its own few-shot set, LoRAs, synthetic sets and
classifiers), at the main table's shots (datadream.main_shots; the shot-free methods,
zero-shot CLIP and synthetic data from the unadapted generator, have shots 0).

A claim "A beats B" is decided on the per-seed differences A - B (percentage points):
it holds when mean - std > 0 (the spread lies above 0), does not hold when mean + std
<= 0, and is inconclusive when the spread straddles 0. "Lower FID" is decided the same
way on the per-seed ratios FID(adapted) / FID(unadapted) against 1. Beating is strict:
a tie is not a win (a bound within 1e-9 of the threshold is on it: float round-off). Fewer than `min_seeds` paired seeds (default 3) decide nothing
(inconclusive): one seed has no spread.

The claims on DataDream are made for each variant present (DataDream_cls: one LoRA
per class; DataDream_dset: one LoRA for the whole data set), one row each.

    python -m repro.datadream.claims --accuracy results/datadream_accuracy.csv \
        --fid results/datadream_fid.csv --out results/claims/datadream.csv \
        --params '{"main_shots": 16}'
"""

from __future__ import annotations

import math

import pandas as pd

from repro.core.cli import require
from repro.core.errors import ReproInputError
from repro.core.results import (
    Claim,
    read_table,
    spread_verdict,
    write_claims,
)
from repro.core.stage import Stage, run
from repro.datadream.table import ACCURACY_COLUMNS, FID_COLUMNS

PAPER = "DataDream"
MIN_SEEDS = 3
VARIANTS = ("cls", "dset")
VARIANT_NAME = {"cls": "DataDream_cls", "dset": "DataDream_dset", "unadapted": "unadapted"}
# The shot-free entries of the main table: trained on no real image.
SHOT_FREE = {("zero_shot", "none"), ("synthetic", "unadapted")}
# What the paper reports (16 shots, top-1 %, mean over 10 data sets).
PAPER_NUMBERS = "paper (16 shots, mean of 10 data sets): zero-shot CLIP 64.1%, real-only 84.2%, DataDream_dset 86.3%"


def entry_shots(method: str, generator: str, main_shots: int) -> int:
    """The shots column of (method, generator) in the main table: 0 if shot-free."""
    return 0 if (method, generator) in SHOT_FREE else int(main_shots)


def accuracy_per_seed(
    table: pd.DataFrame, method: str, generator: str, main_shots: int
) -> pd.Series:
    """Test accuracy per seed of the selected row (val-chosen N) of one method."""
    shots = entry_shots(method, generator, main_shots)
    rows = table[
        (table.method == method)
        & (table.generator == generator)
        & (table.shots == shots)
        & table.selected.astype(bool)
    ]
    return rows.groupby("seed").test_acc.mean()


def seeds_note(n: int, min_seeds: int) -> str:
    return f"; only {n} paired seeds (< {min_seeds}): undecided" if n < min_seeds else ""


def gain_claim(
    table: pd.DataFrame,
    claim: str,
    a: tuple[str, str],
    b: tuple[str, str],
    main_shots: int,
    reference: str,
    min_seeds: int = MIN_SEEDS,
) -> Claim:
    """Does (method, generator) `a` beat `b` in test accuracy, seed by seed?"""
    acc_a = accuracy_per_seed(table, *a, main_shots)
    acc_b = accuracy_per_seed(table, *b, main_shots)
    seeds = acc_a.index.intersection(acc_b.index)
    gains = 100.0 * (acc_a[seeds] - acc_b[seeds])
    mean, std, n, verdict = spread_verdict(gains, 0.0, "higher", min_seeds)
    metric = (
        f"test accuracy {label(*a)} - {label(*b)} (percentage points), "
        "each at its val-selected epoch and N, paired by seed"
    )
    if n:
        reference = (
            f"{reference}; {label(*a)} {acc_a[seeds].mean():.1%} vs {label(*b)} "
            f"{acc_b[seeds].mean():.1%}{seeds_note(n, min_seeds)}"
        )
    else:
        reference = f"{reference}; no paired seeds in the table"
    return Claim(PAPER, claim, metric, mean, std, n, reference, verdict)


def label(method: str, generator: str) -> str:
    """(synthetic, dset) -> 'synthetic[DataDream_dset]'; (real, none) -> 'real'."""
    if generator == "none":
        return method
    return f"{method}[{VARIANT_NAME.get(generator, generator)}]"


def fid_claim(fid: pd.DataFrame, variant: str, main_shots: int, min_seeds: int) -> Claim:
    """FID(DataDream variant) / FID(unadapted) per seed, against 1 (lower is closer)."""
    adapted = fid[(fid.generator == variant) & (fid.shots == main_shots)]
    unadapted = fid[fid.generator == "unadapted"]
    adapted, unadapted = adapted.groupby("seed").fid.mean(), unadapted.groupby("seed").fid.mean()
    seeds = adapted.index.intersection(unadapted.index)
    ratios = adapted[seeds] / unadapted[seeds]
    mean, std, n, verdict = spread_verdict(ratios, 1.0, "lower", min_seeds)
    name = VARIANT_NAME[variant]
    reference = (
        "synthetic sets of the unadapted generator (its LoRA scale 0); FID to the real test digits"
    )
    if n:
        reference += (
            f"; FID {name} {adapted[seeds].mean():.3g} vs unadapted "
            f"{unadapted[seeds].mean():.3g}{seeds_note(n, min_seeds)}"
        )
    return Claim(
        PAPER,
        f"Adapting the generator on the real shots ({name}) brings its synthetic images "
        "closer to the real data (lower FID) than the unadapted generator's.",
        f"FID({name}, {main_shots} shots) / FID(unadapted), paired by seed",
        mean,
        std,
        n,
        reference,
        verdict,
    )


def zero_shot_claim(table: pd.DataFrame, main_shots: int, min_seeds: int) -> Claim:
    """Per seed, the smallest gain over zero-shot CLIP of any trained classifier of the
    main table: every one beats it exactly when the smallest gain is above 0."""
    zero = accuracy_per_seed(table, "zero_shot", "none", main_shots)
    entries = [
        (m, g)
        for m, g in table[["method", "generator"]].drop_duplicates().itertuples(index=False)
        if m != "zero_shot"
    ]
    gains = {}
    for entry in entries:
        acc = accuracy_per_seed(table, *entry, main_shots)
        if acc.empty:
            continue
        # Zero-shot CLIP trains nothing, so it is one number whatever the seed: where a
        # seed has no zero-shot row, the others' mean stands in.
        ref = zero.reindex(acc.index).fillna(zero.mean()) if len(zero) else acc * math.nan
        gains[entry] = 100.0 * (acc - ref)
    claim = "Every classifier fine-tuned on real or synthetic data beats zero-shot CLIP."
    metric = (
        "smallest test-accuracy gain over zero-shot CLIP among the main table's "
        "fine-tuned classifiers (percentage points), per seed"
    )
    if not gains:
        return Claim(PAPER, claim, metric, math.nan, math.nan, 0, "no rows", "inconclusive")
    frame = pd.DataFrame(gains).dropna()  # seeds where every entry has a number
    smallest = frame.min(axis=1)
    mean, std, n, verdict = spread_verdict(smallest, 0.0, "higher", min_seeds)
    weakest = frame.mean().idxmin() if len(frame) else None
    reference = f"zero-shot CLIP {zero.mean():.1%}; {len(gains)} methods; {PAPER_NUMBERS}"
    if weakest is not None:
        reference += f"; weakest {label(*weakest)} ({frame[weakest].mean():+.1f} points)"
    reference += seeds_note(n, min_seeds) if n else "; no seed with every method"
    return Claim(PAPER, claim, metric, mean, std, n, reference, verdict)


def variants_in(table: pd.DataFrame, fid: pd.DataFrame) -> list[str]:
    present = set(table.generator) | set(fid.generator)
    return [v for v in VARIANTS if v in present] or list(VARIANTS)


def build_claims(
    table: pd.DataFrame, fid: pd.DataFrame, main_shots: int, min_seeds: int = MIN_SEEDS
) -> list[Claim]:
    """DataDream's claims: per variant, synthetic beats unadapted synthetic, real +
    synthetic beats real-only, lower FID than unadapted; then all beat zero-shot."""
    claims = []
    variants = variants_in(table, fid)
    for v in variants:
        claims.append(
            gain_claim(
                table,
                f"Synthetic data from the adapted generator ({VARIANT_NAME[v]}) trains a "
                "better classifier than synthetic data from the unadapted generator.",
                ("synthetic", v),
                ("synthetic", "unadapted"),
                main_shots,
                "synthetic-only from the unadapted generator (the baseline the official "
                "code cannot produce); strictly higher",
                min_seeds,
            )
        )
    for v in variants:
        claims.append(
            gain_claim(
                table,
                f"Real shots plus DataDream synthetic data ({VARIANT_NAME[v]}) beat "
                "fine-tuning on the real shots alone.",
                ("real_synthetic", v),
                ("real", "none"),
                main_shots,
                f"real-only on the same {main_shots} shots; loss 0.8 CE(real) + "
                f"0.2 CE(synthetic); strictly higher; {PAPER_NUMBERS}",
                min_seeds,
            )
        )
    for v in variants:
        claims.append(fid_claim(fid, v, main_shots, min_seeds))
    claims.append(zero_shot_claim(table, main_shots, min_seeds))
    return claims


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="datadream", out="output claims (CSV)")
    stage.parser.add_argument("--accuracy", required=True, help="results/datadream_accuracy.csv")
    stage.parser.add_argument("--fid", required=True, help="results/datadream_fid.csv")
    args = stage.start(argv)
    main_shots = require(stage.params, "main_shots", "datadream")
    min_seeds = stage.params.get("min_seeds", MIN_SEEDS)
    for key, value in (("main_shots", main_shots), ("min_seeds", min_seeds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ReproInputError(f"datadream.{key}: must be an integer >= 1, got {value!r}")
    table = read_table(args.accuracy, required=ACCURACY_COLUMNS)
    fid = read_table(args.fid, required=FID_COLUMNS)
    claims = build_claims(table, fid, main_shots, min_seeds)
    write_claims(claims, args.out)
    for c in claims:
        print(f"[{c.verdict}] {c.claim} {c.metric} = {c.measured}")


if __name__ == "__main__":
    run(main)

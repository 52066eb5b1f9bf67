"""Stage sla_claims: SLA's quality claims, each decided from the quality table seed by seed.

Every claim compares rows of results/sla_quality.csv (repro.sla.table) taken per seed:
the same seed means the same fine-tuning data order and the same test noise, so the
comparison cancels what the seed alone moves. The per-seed values go to
repro.core.results.spread_verdict against the claim's threshold: the claim holds when
the whole of [mean - std, mean + std] is strictly on its side, does not hold when the
whole of it is on the other side (or on the threshold), and is inconclusive when it
straddles the threshold or fewer than `min_seeds` seeds have every row. A claim whose
rows are absent is inconclusive, and its reference says which rows are missing.

`metric` is a quality metric of the table, lower is better (test_loss by default in
the config); the variants are config keys (sla.quality.variants). The claims (paper
label "SLA"), with the sparsities in their sentences read from the table:

1. SLA at its sparsity (95 %) matches full attention's quality: the relative gap
   (m_sla - m_full) / m_full per seed is below `match_tolerance`;
2. SLA beats sparse-only attention at a lower sparsity (85 %): m_sparse_low - m_sla
   per seed is above 0 (SLA computes fewer blocks exactly and still scores better);
3. linear-only attention fails: m_linear / m_full per seed is above
   `linear_fails_ratio`;
4. SLA cuts attention FLOPs by `flops_reduction`x: flops_reduction of the SLA rows
   (dense over SLA attention FLOPs per sample) is above it.

    python -m repro.sla.claims --table results/sla_quality.csv \
        --out results/claims/sla.csv \
        --params '{"min_seeds": 3, "metric": "test_loss", "match_tolerance": 0.05,
                   "full": "full", "sla": "sla", "sparse_low": "sparse_85",
                   "linear": "linear_only", "linear_fails_ratio": 1.5,
                   "flops_reduction": 15}'
"""

from __future__ import annotations

import math
import numbers

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import (
    ROUNDING,
    Claim,
    check_keyed_table,
    format_mean_std,
    mean_std,
    spread_verdict,
    write_claims,
)
from repro.core.stage import Stage, run
from repro.sla.table import COLUMNS, KEYS, REAL, read

PAPER = "SLA"
# Where the stage's settings live in the config; errors name their keys under it.
CONFIG = "sla.quality.claims"
# The metrics a claim may be decided on: quality measures where lower is better.
QUALITY_METRICS = ("test_loss", "val_loss", "final_train_loss", "frame_fid")
VARIANT_KEYS = ("full", "sla", "sparse_low", "linear")
# The paper's statements (Wan2.1-1.3B fine-tuned with SLA); only directions carry over
# to a tiny model, so no paper number is compared with ours.
PAPER_QUALITY = "paper: 95 % less attention computation without degrading generation quality"
PAPER_ABLATION = "paper: sparse attention alone loses quality at high sparsity"
PAPER_LINEAR = "paper: linear attention alone degrades video quality"


def check_params(params: dict) -> dict:
    """The stage's settings from --params, every one required and checked; errors name
    the key (sla.quality.claims.<key>)."""
    keys = (
        "min_seeds",
        "metric",
        "match_tolerance",
        *VARIANT_KEYS,
        "linear_fails_ratio",
        "flops_reduction",
    )
    if not isinstance(params, dict):
        raise ReproInputError(f"{CONFIG}: expected a mapping, got {type(params).__name__}")
    missing = [k for k in keys if k not in params]
    if missing:
        names = ", ".join(f"{CONFIG}.{k}" for k in missing)
        raise ReproInputError(f"missing settings {names} (every one is required)")
    seeds = params["min_seeds"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ReproInputError(f"{CONFIG}.min_seeds: must be an integer >= 1, got {seeds!r}")
    metric = params["metric"]
    if metric not in QUALITY_METRICS:
        what = "a table column, but not a quality metric" if metric in COLUMNS else "unknown"
        raise ReproInputError(
            f"{CONFIG}.metric: {metric!r} is {what} (allowed, lower is better: "
            f"{', '.join(QUALITY_METRICS)})"
        )
    settings = {
        "min_seeds": seeds,
        "metric": metric,
        # A tolerance of 0 asks for no loss at all; a ratio or a reduction of 0 means nothing.
        "match_tolerance": _positive(params, "match_tolerance", zero_allowed=True),
        "linear_fails_ratio": _positive(params, "linear_fails_ratio"),
        "flops_reduction": _positive(params, "flops_reduction"),
    }
    for key in VARIANT_KEYS:
        name = params[key]
        if not isinstance(name, str) or not name or name == REAL:
            raise ReproInputError(
                f"{CONFIG}.{key}: must be a variant name (not {REAL!r}, the real clips), "
                f"got {name!r}"
            )
        # Two roles for one variant would compare it with itself (a gap of 0 "matches").
        for earlier in VARIANT_KEYS[: VARIANT_KEYS.index(key)]:
            if settings[earlier] == name:
                raise ReproInputError(
                    f"{CONFIG}.{key}: {name!r} is {CONFIG}.{earlier} too; each claim compares "
                    "two different variants"
                )
        settings[key] = name
    return settings


def _positive(params: dict, key: str, zero_allowed: bool = False) -> float:
    value = params[key]
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero_allowed)
    ):
        bound = ">= 0" if zero_allowed else "> 0"
        raise ReproInputError(f"{CONFIG}.{key}: must be a finite number {bound}, got {value!r}")
    return float(value)


def check_table(table: pd.DataFrame, what: str = "the quality table") -> None:
    """Refuse a table without the contract's columns or with a (variant, seed) seen twice
    (a per-seed pairing would silently pick one)."""
    check_keyed_table(table, COLUMNS, KEYS, what)


def rows_of(table: pd.DataFrame, variant: str) -> pd.DataFrame:
    return table[table.variant == variant]


def per_seed(table: pd.DataFrame, variant: str, column: str) -> pd.Series:
    """`column` of `variant`'s rows indexed by seed (float, NaN kept)."""
    return rows_of(table, variant).set_index("seed")[column].astype(float).sort_index()


def on_common_seeds(*series: pd.Series) -> list[pd.Series]:
    """Each of `series` restricted to the seeds all of them have."""
    seeds = series[0].index
    for s in series[1:]:
        seeds = seeds.intersection(s.index)
    return [s[seeds] for s in series]


def missing_rows(table: pd.DataFrame, *variants: str) -> str:
    """What a claim over `variants` lacks ("no rows of variant 'sla' ..."), or ""."""
    absent = [repr(v) for v in variants if rows_of(table, v).empty]
    if not absent:
        return ""
    return f"no rows of variant {' and '.join(absent)} in the quality table"


def sparsity_text(table: pd.DataFrame, variant: str) -> str:
    """The sparsity of `variant`'s rows as the claims say it ("95 %"); "? %" without rows.
    Seeds of one variant share it; should they not, every value is named ("90 / 95 %")."""
    values = rows_of(table, variant).sparsity.dropna().unique()
    if not len(values):
        return "? %"
    return " / ".join(f"{round(100 * float(v), 4):g}" for v in sorted(values)) + " %"


def summary(table: pd.DataFrame, variant: str, column: str) -> str:
    """ "full (test_loss 0.128 ± 0.002)": `column` of `variant` over its seeds."""
    mean, std = mean_std(per_seed(table, variant, column))
    # Equal values leave a std of round-off (3e-17 for three 0.2s): say 0, as it is.
    if std <= ROUNDING * abs(mean):
        std = 0.0
    return f"{variant} ({column} {format_mean_std(mean, std)})"


def seeds_note(n: int, min_seeds: int) -> str:
    if n == 0:
        return "; no seed has every row measured"
    return f"; only {n} seeds (< {min_seeds}): undecided" if n < min_seeds else ""


def decide(
    claim: str,
    metric: str,
    reference: str,
    values: pd.Series,
    threshold: float,
    better: str,
    min_seeds: int,
) -> Claim:
    mean, std, n, verdict = spread_verdict(values, threshold, better, min_seeds)
    return Claim(PAPER, claim, metric, mean, std, n, reference + seeds_note(n, min_seeds), verdict)


def undecided(claim: str, metric: str, reference: str, missing: str) -> Claim:
    return Claim(
        PAPER, claim, metric, math.nan, math.nan, 0, f"{reference}; {missing}", "inconclusive"
    )


def match_claim(table: pd.DataFrame, s: dict) -> Claim:
    """Claim 1: (m_sla - m_full) / m_full per seed below match_tolerance."""
    metric, full, sla, tolerance = s["metric"], s["full"], s["sla"], s["match_tolerance"]
    claim = f"SLA at {sparsity_text(table, sla)} sparsity matches full attention's quality"
    what = (
        f"relative {metric} gap ({sla} - {full}) / {full}, per seed; holds when "
        f"mean + std < {tolerance:g}"
    )
    missing = missing_rows(table, full, sla)
    if missing:
        return undecided(claim, what, PAPER_QUALITY, missing)
    ours, theirs = on_common_seeds(per_seed(table, sla, metric), per_seed(table, full, metric))
    # A reference value of 0 cannot scale a gap: that seed is left out (NaN), not infinite.
    theirs = theirs.where(theirs > 0)
    reference = (
        f"{PAPER_QUALITY}; here {summary(table, sla, metric)} vs "
        f"{summary(table, full, metric)}, tolerance {100 * tolerance:g} %"
    )
    return decide(
        claim, what, reference, (ours - theirs) / theirs, tolerance, "lower", s["min_seeds"]
    )


def ablation_claim(table: pd.DataFrame, s: dict) -> Claim:
    """Claim 2: m_sparse_low - m_sla per seed above 0."""
    metric, sla, low = s["metric"], s["sla"], s["sparse_low"]
    claim = (
        f"SLA at {sparsity_text(table, sla)} sparsity beats sparse-only attention at "
        f"{sparsity_text(table, low)} sparsity"
    )
    what = f"{metric} of {low} - {sla}, per seed; holds when mean - std > 0"
    missing = missing_rows(table, sla, low)
    if missing:
        return undecided(claim, what, PAPER_ABLATION, missing)
    theirs, ours = on_common_seeds(per_seed(table, low, metric), per_seed(table, sla, metric))
    reference = (
        f"{PAPER_ABLATION}; here {summary(table, low, metric)} vs {summary(table, sla, metric)}"
    )
    return decide(claim, what, reference, theirs - ours, 0.0, "higher", s["min_seeds"])


def linear_claim(table: pd.DataFrame, s: dict) -> Claim:
    """Claim 3: m_linear / m_full per seed above linear_fails_ratio."""
    metric, full, linear, ratio = s["metric"], s["full"], s["linear"], s["linear_fails_ratio"]
    claim = "Linear-only attention fails"
    what = f"{metric} of {linear} / {full}, per seed; holds when mean - std > {ratio:g}"
    missing = missing_rows(table, full, linear)
    if missing:
        return undecided(claim, what, PAPER_LINEAR, missing)
    ours, theirs = on_common_seeds(per_seed(table, linear, metric), per_seed(table, full, metric))
    theirs = theirs.where(theirs > 0)  # as in claim 1: no ratio to a reference of 0
    reference = (
        f"{PAPER_LINEAR}; here {summary(table, linear, metric)} vs "
        f"{summary(table, full, metric)}, fails above {ratio:g}x"
    )
    return decide(claim, what, reference, ours / theirs, ratio, "higher", s["min_seeds"])


def flops_claim(table: pd.DataFrame, s: dict) -> Claim:
    """Claim 4: flops_reduction of the SLA rows above the target."""
    sla, target = s["sla"], s["flops_reduction"]
    claim = f"SLA cuts attention FLOPs >= {target:g}x"
    what = (
        f"flops_reduction of {sla} (dense / SLA attention FLOPs per sample), per seed; holds "
        f"when mean - std > {target:g}"
    )
    paper = f"paper: 95 % less attention computation; target {target:g}x"
    missing = missing_rows(table, sla)
    if missing:
        return undecided(claim, what, paper, missing)
    values = per_seed(table, sla, "flops_reduction")
    reference = f"{paper}; here {sla} at {sparsity_text(table, sla)} sparsity"
    return decide(claim, what, reference, values, target, "higher", s["min_seeds"])


def build_claims(table: pd.DataFrame, params: dict) -> list[Claim]:
    """The four claims of the module docstring, in that order; `params` as the stage's
    --params (checked by `check_params`)."""
    settings = check_params(params)
    check_table(table)
    return [
        match_claim(table, settings),
        ablation_claim(table, settings),
        linear_claim(table, settings),
        flops_claim(table, settings),
    ]


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="sla")
    add = stage.parser.add_argument
    add("--table", required=True, help="results/sla_quality.csv")
    add("--out", required=True, help="output: results/claims/sla.csv")
    args = stage.start(argv)
    check_params(stage.params)  # a bad setting is named before the table is read
    table = read(args.table)
    check_table(table, str(args.table))
    claims = build_claims(table, stage.params)
    write_claims(claims, args.out)
    for c in claims:
        print(f"[{c.verdict}] {c.claim}: {c.measured}")


if __name__ == "__main__":
    run(main)

"""Tidy result tables and the claims each paper's reproduction checks.

A claim is one sentence from a paper, the number we measured for it (mean ± std
over seeds), what it is compared with, and a verdict. Every paper writes its
claims CSV; `merge_claims` gathers them into results/claims.csv.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.io import atomic_write

VERDICTS = ("holds", "does not hold", "inconclusive")
CLAIM_COLUMNS = [
    "paper",
    "claim",
    "metric",
    "measured",
    "measured_mean",
    "measured_std",
    "n",
    "reference",
    "verdict",
]


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write `df` as CSV (no index), atomically."""
    with atomic_write(path) as tmp:
        df.to_csv(tmp, index=False)


def read_table(path: str | os.PathLike, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV written by `write_table`, checking that `required` columns are there."""
    path = Path(path)
    if not path.is_file():
        raise ReproInputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise ReproInputError(f"{path}: empty file, expected a CSV table") from err
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise ReproInputError(f"{path}: not a readable CSV table ({err})") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReproInputError(f"{path}: missing columns {missing} (has {list(df.columns)})")
    return df


def check_keyed_table(
    table: pd.DataFrame, columns: Sequence[str], keys: Sequence[str], what: str
) -> None:
    """Refuse a table without the contract's `columns` or with a `keys` combination seen
    twice (a per-seed pairing would silently pick or average one of them)."""
    missing = [c for c in columns if c not in table]
    if missing:
        raise ReproInputError(f"{what} lacks columns {missing} (has {list(table.columns)})")
    duplicated = table[table.duplicated(list(keys), keep=False)]
    if not duplicated.empty:
        first = {
            k: (v.item() if hasattr(v, "item") else v)
            for k, v in duplicated.iloc[0][list(keys)].items()
        }
        raise ReproInputError(f"{what}: the row {first} appears more than once")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite-or-infinite values, NaNs dropped.

    One value gives std 0.0; no values (or only NaNs) give (nan, nan).
    """
    xs = [float(v) for v in values if not math.isnan(float(v))]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


def verdict_from(holds: bool | None) -> str:
    """True -> "holds", False -> "does not hold", None -> "inconclusive"."""
    if holds is None:
        return "inconclusive"
    return "holds" if holds else "does not hold"


def compare(
    a_values: Iterable[float],
    b_values: Iterable[float],
    better: str,
    margin: float = 0.0,
) -> str:
    """Does method A do at least as well as B? A verdict string.

    `better` is "lower" or "higher". `margin` is a RELATIVE tolerance on B's mean:
    with better="lower" the claim holds when mean(a) <= mean(b) + margin * |mean(b)|,
    with better="higher" when mean(a) >= mean(b) - margin * |mean(b)|. So margin=0.05
    accepts A up to 5% worse than B ("comparable"), and a negative margin demands
    that A be better by that fraction. "inconclusive" when either side has no
    (non-NaN) values.
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"compare: better must be 'lower' or 'higher', got {better!r}")
    mean_a, _ = mean_std(a_values)
    mean_b, _ = mean_std(b_values)
    if math.isnan(mean_a) or math.isnan(mean_b):
        return "inconclusive"
    slack = margin * abs(mean_b)
    if better == "lower":
        return verdict_from(mean_a <= mean_b + slack)
    return verdict_from(mean_a >= mean_b - slack)


@dataclass(frozen=True)
class Spread:
    """Median and range (min, max) of n repeated measurements, NaNs dropped.

    The range of n independent measurements is a distribution-free confidence
    interval for their median: it misses it only when all n fall on one side,
    probability 2 * 0.5**n (coverage 75% for n = 3, 94% for 5, 97% for 6, 98% for 7).
    It assumes nothing about the noise, which on a shared machine is one-sided
    and heavy-tailed (load spikes), and is what `interval_verdict` takes.
    """

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        xs = sorted(float(v) for v in values if not math.isnan(float(v)))
        if not xs:
            return cls(math.nan, math.nan, math.nan, 0)
        mid = len(xs) // 2
        median = xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
        return cls(median, xs[0], xs[-1], len(xs))

    def __str__(self) -> str:
        """E.g. `median 1.95, range 1.8 to 2.01 over 6` (3 significant digits)."""
        if not self.n:
            return "nan"
        return f"median {self.median:.3g}, range {self.low:.3g} to {self.high:.3g} over {self.n}"


def interval_verdict(low: float, high: float, threshold: float, better: str = "higher") -> str:
    """The verdict of a claim "the quantity is at least (or at most) `threshold`",
    given the interval [low, high] that the measurements leave for it.

    better="higher" (at least): "holds" when low >= threshold (the whole interval is
    on the right side), "does not hold" when high < threshold (wholly on the wrong
    side), "inconclusive" when the interval straddles the threshold, or is NaN.
    better="lower" (at most) mirrors it: holds when high <= threshold, does not hold
    when low > threshold. A bound equal to the threshold counts as on its right side.
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"interval_verdict: better must be 'lower' or 'higher', got {better!r}")
    if any(math.isnan(x) for x in (low, high, threshold)):
        return "inconclusive"
    if low > high:
        raise ValueError(f"interval_verdict: low {low} > high {high}")
    if better == "higher":
        return verdict_from(True if low >= threshold else False if high < threshold else None)
    return verdict_from(True if high <= threshold else False if low > threshold else None)


# Far below one test item of any table here and far above float round-off: what
# "exactly on the threshold" means for a computed bound (strict_verdict).
ROUNDING = 1e-9


def strict_verdict(
    low: float, high: float, threshold: float, better: str, rounding: float = ROUNDING
) -> str:
    """Is the quantity strictly beyond `threshold` ("higher": above; "lower": below)?

    holds when the whole interval [low, high] is strictly beyond it, does not hold when
    the whole interval is on the other side or on it, inconclusive when it straddles.
    A bound within `rounding` of the threshold counts as ON it: accuracies are
    fractions k / n, and mean - std of exact ties comes out as 2e-16, not 0."""
    if any(math.isnan(x) for x in (low, high, threshold)):
        return "inconclusive"
    if better == "higher":
        above, below = low > threshold + rounding, high <= threshold + rounding
        return verdict_from(True if above else False if below else None)
    if better == "lower":
        below, above = high < threshold - rounding, low >= threshold - rounding
        return verdict_from(True if below else False if above else None)
    raise ValueError(f"strict_verdict: better must be 'lower' or 'higher', got {better!r}")


def spread_verdict(
    values: Iterable[float], threshold: float, better: str, min_seeds: int
) -> tuple[float, float, int, str]:
    """(mean, std, n, verdict) of per-seed values against `threshold`: strict_verdict on
    [mean - std, mean + std]; fewer than `min_seeds` values decide nothing (inconclusive)."""
    values = [float(v) for v in values]
    mean, std = mean_std(values)
    n = sum(not math.isnan(v) for v in values)
    if n < min_seeds:
        return mean, std, n, "inconclusive"
    return mean, std, n, strict_verdict(mean - std, mean + std, threshold, better)


@dataclass
class Claim:
    """One checked claim of a paper (one row of claims.csv).

    `spread`, when given, is what the verdict was decided on (median and range of
    repeated paired measurements); `measured` then shows it before mean ± std.
    """

    paper: str
    claim: str
    metric: str
    measured_mean: float
    measured_std: float
    n: int
    reference: str
    verdict: str
    spread: Spread | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim {self.claim!r}: verdict {self.verdict!r} not in {VERDICTS}")

    @property
    def measured(self) -> str:
        """`mean ± std`, the std to 2 significant digits and the mean to the same decimals;
        with a spread: `median 1.95, range 1.8 to 2.01 over 6 (mean 1.93 ± 0.08)`."""
        text = format_mean_std(self.measured_mean, self.measured_std)
        if self.spread is not None and self.spread.n:
            return f"{self.spread} (mean {text})"
        return text

    def row(self) -> dict:
        row = asdict(self)
        row["measured"] = self.measured
        return {c: row[c] for c in CLAIM_COLUMNS}


def format_mean_std(mean: float, std: float) -> str:
    """12.3456, 0.0123 -> "12.346 ± 0.012"; 0.5, 0 -> "0.5 ± 0"; nan -> "nan"."""
    if not math.isfinite(mean):
        return str(mean)
    if not (math.isfinite(std) and std > 0):
        return f"{mean:.4g} ± {'0' if std == 0 else std}"
    decimals = 1 - math.floor(math.log10(std))  # two significant digits of std
    if decimals > 6 or abs(mean) >= 1e6:
        return f"{mean:.3g} ± {std:.2g}"
    decimals = max(0, decimals)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def write_claims(claims: list[Claim], path: str | os.PathLike) -> pd.DataFrame:
    """Write `claims` as a CSV with CLAIM_COLUMNS; return the table."""
    df = pd.DataFrame([c.row() for c in claims], columns=CLAIM_COLUMNS)
    write_table(df, path)
    return df


def merge_claims(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Concatenate several papers' claims CSVs into `out` (e.g. results/claims.csv)."""
    tables = []
    for path in paths:
        df = read_table(path, required=CLAIM_COLUMNS)
        bad = sorted(set(df["verdict"]) - set(VERDICTS))
        if bad:
            raise ReproInputError(f"{path}: unknown verdicts {bad} (expected one of {VERDICTS})")
        tables.append(df[CLAIM_COLUMNS])
    merged = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=CLAIM_COLUMNS)
    write_table(merged, out)
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m repro.core.results merge --out results/claims.csv results/claims/*.csv`"""
    import argparse

    parser = argparse.ArgumentParser(description="Gather every paper's claims into one table.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="concatenate claim CSVs, validating their columns")
    merge.add_argument("--out", required=True)
    merge.add_argument("claims", nargs="+")
    args = parser.parse_args(argv)
    merged = merge_claims(args.claims, args.out)
    print(merged.to_string(index=False))


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

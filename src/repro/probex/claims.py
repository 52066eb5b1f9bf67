"""Stage probex_claims: ProbeX's headline claims, each computed from the accuracy table.

Every number is a TEST element-wise accuracy of a probe whose epoch was picked on the
validation models (repro.probex.probe). Methods are compared seed by seed: per seed,
the difference A - B in percentage points averaged over the trees both were run on
(a seed is one probe initialisation and data order over the same zoo).

A claim "A beats B" holds when mean - std of the per-seed differences lies above 0,
does not hold when mean + std <= 0, and is inconclusive when the spread straddles 0
(core.results.spread_verdict). "Matches or beats" uses the threshold -tolerance
instead of 0. Fewer than `min_seeds` seeds (default 3) decide nothing.

Zero-shot: per seed (each seed holds out its own classes), ProbeX's zero-shot accuracy
minus chance (1 / number of held-out classes) in points; "far above chance" holds when
mean - std of that lies above `zeroshot_margin` points.

    python -m repro.probex.claims --accuracy results/probex_accuracy.csv \
        --zeroshot results/probex_zeroshot.csv --out results/claims/probex.csv \
        --params '{"match_tolerance": 1.0, "max_param_ratio": 0.25, "zeroshot_margin": 10}'
"""

from __future__ import annotations

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import Claim, read_table, spread_verdict, write_claims
from repro.core.stage import Stage, run
from repro.probex.table import ACCURACY_COLUMNS, ZEROSHOT_COLUMNS

PAPER = "ProbeX"
MIN_SEEDS = 3
# "Matches" Dense: ProbeX at most this many percentage points below it (mean - std).
MATCH_TOLERANCE = 1.0
# "Far fewer parameters": ProbeX at most this fraction of Dense's on every tree (the
# paper's 2.5M against 32M is 0.08).
MAX_PARAM_RATIO = 0.25
# "Far above chance": zero-shot accuracy at least this many points above chance.
ZEROSHOT_MARGIN = 10.0
PAPER_NUMBERS = {
    "statnn": "paper (Model-J, element-wise %): StatNN ~55, ProbeX 72.5-88.1 per subset",
    "dense": "paper (SD_200): Dense 0.801 with 32M parameters, ProbeX 0.973 with 2.5M",
    "experts": "paper: one expert per Model Tree, a router by the nearest base model",
    "zeroshot": "paper (SD_200, held-out classes): ProbeX 0.898, Dense 0.706",
}


def per_seed_gain(table: pd.DataFrame, a: str, b: str) -> pd.Series:
    """Per seed: mean over trees of 100 * (test accuracy of `a` - that of `b`), on the
    (tree, seed) pairs both methods have."""
    pivot = table[table.method.isin([a, b])].pivot_table(
        index=["seed", "tree"], columns="method", values="test_accuracy", aggfunc="mean"
    )
    if a not in pivot or b not in pivot:
        return pd.Series(dtype=float)
    both = pivot[[a, b]].dropna()
    return (100.0 * (both[a] - both[b])).groupby(level="seed").mean()


def mean_accuracy(table: pd.DataFrame, method: str) -> float:
    return float(table[table.method == method].test_accuracy.mean())


def beats_claim(
    table: pd.DataFrame, claim: str, a: str, b: str, reference: str, min_seeds: int
) -> Claim:
    gains = per_seed_gain(table, a, b)
    mean, std, n, verdict = spread_verdict(gains, 0.0, "higher", min_seeds)
    metric = f"test element-wise accuracy {a} - {b} (percentage points), mean over trees, per seed"
    return Claim(
        PAPER,
        claim,
        metric,
        mean,
        std,
        n,
        f"{reference}; here {a} {mean_accuracy(table, a):.1%} vs {b} "
        f"{mean_accuracy(table, b):.1%}{seeds_note(n, min_seeds)}",
        verdict,
    )


def seeds_note(n: int, min_seeds: int) -> str:
    return f"; only {n} seeds (< {min_seeds}): undecided" if n < min_seeds else ""


def parameter_ratios(table: pd.DataFrame) -> pd.Series:
    """Per tree: ProbeX's parameters / Dense's (the counts do not depend on the seed)."""
    counts = table[table.method.isin(["probex", "dense"])].pivot_table(
        index="tree", columns="method", values="parameters", aggfunc="max"
    )
    if "probex" not in counts or "dense" not in counts:
        return pd.Series(dtype=float)
    return (counts["probex"] / counts["dense"]).dropna()


def matches_dense_claim(
    table: pd.DataFrame, tolerance: float, max_ratio: float, min_seeds: int
) -> Claim:
    """ProbeX within `tolerance` points of Dense (or better) with at most `max_ratio` of
    its parameters on every tree. Too many parameters on any tree: does not hold."""
    gains = per_seed_gain(table, "probex", "dense")
    mean, std, n, verdict = spread_verdict(gains, -tolerance, "higher", min_seeds)
    ratios = parameter_ratios(table)
    worst = float(ratios.max()) if len(ratios) else float("nan")
    if len(ratios) and worst > max_ratio:
        verdict = "does not hold"
    elif not len(ratios):
        verdict = "inconclusive"
    return Claim(
        PAPER,
        "ProbeX matches or beats the Dense linear expert with far fewer parameters",
        f"test accuracy probex - dense (percentage points, mean over trees, per seed) "
        f">= -{tolerance:g}, and parameters probex / dense <= {max_ratio:g} on every tree",
        mean,
        std,
        n,
        f"{PAPER_NUMBERS['dense']}; here parameter ratio at most {worst:.3f} "
        f"({_ratios_text(ratios)}){seeds_note(n, min_seeds)}",
        verdict,
    )


def _ratios_text(ratios: pd.Series) -> str:
    return ", ".join(f"{tree} {ratio:.3f}" for tree, ratio in ratios.items()) or "no trees"


def experts_claim(table: pd.DataFrame, min_seeds: int) -> Claim:
    claim = beats_claim(
        table,
        "Tree experts (one ProbeX per tree, routed by the nearest base) beat one ProbeX "
        "across all trees",
        "probex_experts",
        "probex_single",
        PAPER_NUMBERS["experts"],
        min_seeds,
    )
    routing = table[table.method == "probex_experts"].routing_accuracy
    if routing.notna().any():
        claim.reference += f"; routing accuracy {routing.mean():.1%}"
    return claim


def zeroshot_claim(zeroshot: pd.DataFrame, margin: float, min_seeds: int) -> Claim:
    """ProbeX aligned to text, on models of classes it never saw: accuracy - chance per
    seed (points), against `margin`."""
    rows = zeroshot[zeroshot.method == "probex"].groupby("seed")
    above = 100.0 * (rows.zeroshot_accuracy.mean() - rows.chance.mean())
    mean, std, n, verdict = spread_verdict(above, margin, "higher", min_seeds)
    dense = zeroshot[zeroshot.method == "dense"]
    probex = zeroshot[zeroshot.method == "probex"]
    reference = (
        f"{PAPER_NUMBERS['zeroshot']}; here ProbeX {probex.zeroshot_accuracy.mean():.1%} "
        f"(Dense aligned the same way {dense.zeroshot_accuracy.mean():.1%}) against chance "
        f"{probex.chance.mean():.1%}, held-out classes per seed: "
        f"{', '.join(sorted(set(probex.heldout.astype(str))))}{seeds_note(n, min_seeds)}"
    )
    return Claim(
        PAPER,
        "Zero-shot: ProbeX aligned to text embeddings classifies models of unseen classes "
        "far above chance",
        f"zero-shot accuracy - chance (percentage points), per seed, > {margin:g}",
        mean,
        std,
        n,
        reference,
        verdict,
    )


def build_claims(
    table: pd.DataFrame,
    zeroshot: pd.DataFrame | None = None,
    *,
    tolerance: float = MATCH_TOLERANCE,
    max_ratio: float = MAX_PARAM_RATIO,
    margin: float = ZEROSHOT_MARGIN,
    min_seeds: int = MIN_SEEDS,
) -> list[Claim]:
    missing = [c for c in ACCURACY_COLUMNS if c not in table]
    if missing:
        raise ReproInputError(f"the accuracy table lacks columns {missing}")
    extra = [] if zeroshot is None else [zeroshot_claim(zeroshot, margin, min_seeds)]
    return [
        beats_claim(
            table,
            "ProbeX beats StatNN (statistics of every layer's weights)",
            "probex",
            "statnn",
            PAPER_NUMBERS["statnn"],
            min_seeds,
        ),
        matches_dense_claim(table, tolerance, max_ratio, min_seeds),
        experts_claim(table, min_seeds),
        *extra,
    ]


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="probex")
    stage.parser.add_argument("--accuracy", required=True, help="results/probex_accuracy.csv")
    stage.parser.add_argument("--zeroshot", help="results/probex_zeroshot.csv")
    stage.parser.add_argument("--out", required=True, help="results/claims/probex.csv")
    args = stage.start(argv)
    table = read_table(args.accuracy, required=ACCURACY_COLUMNS)
    zeroshot = read_table(args.zeroshot, required=ZEROSHOT_COLUMNS) if args.zeroshot else None
    params = stage.params
    claims = build_claims(
        table,
        zeroshot,
        margin=float(params.get("zeroshot_margin", ZEROSHOT_MARGIN)),
        tolerance=float(params.get("match_tolerance", MATCH_TOLERANCE)),
        max_ratio=float(params.get("max_param_ratio", MAX_PARAM_RATIO)),
        min_seeds=int(params.get("min_seeds", MIN_SEEDS)),
    )
    write_claims(claims, args.out)


if __name__ == "__main__":
    run(main)

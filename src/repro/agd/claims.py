"""Stage agd_claims: AGD's headline claims, each computed from the measured tables.

Each method is compared at ITS best guidance scale, as the paper reports FIDs,
and that scale is picked on the validation split (mean FID over seeds), never on
test; the test FIDs at that scale are then compared seed by seed. "Matches or
beats" allows a 5% relative tolerance: with a few hundred samples per point, FID
moves by a few percent between seeds. A ratio claim holds when mean + std of the
per-seed ratios is within its bound, does not hold when mean - std is beyond it,
and is inconclusive when that spread straddles it.

The claim that AGD matches CFG is checked for every adapter type evaluated (the
paper's offset adapter, the official token-dependent mlp_gate, the paper's
cross-attention adapter and this project's adaLN-conditioning adapter); the
ablations (standard trajectories, GD, transfer) use the headline type
(`--adapter-type`, config agd.distill.adapter_type). Transfer is judged as a ratio
of ratios, (AGD/CFG on the derived checkpoint) / (AGD/CFG on the base), so that
a gap AGD already has on the base is not counted against transfer, and against
adapters trained on the derived checkpoint itself.

The speed claim is decided on pairs: each repeat of repro.agd.throughput times AGD
and CFG back to back (order alternated), giving one ratio; the claim reports their
median and range, and holds only when the whole range is at or above 1.9x.

    python -m repro.agd.claims --table results/agd_fid.csv --adapter-type offset \
        --throughput results/agd_throughput.csv --out results/claims/agd.csv
"""

from __future__ import annotations

import math

import pandas as pd

from repro.agd.methods import NO_ADAPTER
from repro.agd.table import COLUMNS
from repro.core.results import (
    Claim,
    Spread,
    interval_verdict,
    mean_std,
    read_table,
    write_claims,
)
from repro.core.stage import Stage, run

PAPER = "AGD"
FID_TOLERANCE = 0.05  # relative
MIN_SPEEDUP = 1.9
MAX_ADAPTER_FRACTION = 0.05
# The speed claim is decided on the range of the per-pair ratios (Spread): one pair
# has no spread, so it needs two at least (repeats of agd.throughput).
MIN_PAIRS = 2


# What each adapter type is, for the claims' references.
ADAPTER_ORIGIN = {
    "offset": "the paper's DiT adapter",
    "mlp_gate": "the official code's token-dependent adapter",
    "cross_attention": "the paper's cross-attention adapter",
    "adaln": "this project's adaLN-conditioning adapter, not the paper's",
}


def rows_of(table: pd.DataFrame, method: str, checkpoint: str, adapter_type=None):
    rows = table[(table.method == method) & (table.checkpoint == checkpoint)]
    if adapter_type is not None and "adapter_type" in rows:
        rows = rows[rows.adapter_type == adapter_type]
    return rows


def selected_fid(
    table: pd.DataFrame, method: str, checkpoint: str, adapter_type: str | None = None
) -> tuple[float, pd.Series]:
    """(w*, test FID per seed at w*), w* = the scale of lowest mean validation FID."""
    rows = rows_of(table, method, checkpoint, adapter_type)
    if rows.empty:
        return float("nan"), pd.Series(dtype=float)
    scale = rows.groupby("guidance_scale").fid_val.mean().idxmin()
    return scale, rows[rows.guidance_scale == scale].groupby("seed").fid.mean()


def ratio_verdict(mean: float, std: float, bound: float) -> str:
    """ "holds" if the ratio is at most `bound` over its spread (mean + std), "does not
    hold" if above it over its spread (mean - std), else "inconclusive"."""
    std = 0.0 if math.isnan(std) else std
    return interval_verdict(mean - std, mean + std, bound, better="lower")


def pair_ratios(throughput: pd.DataFrame) -> pd.Series:
    """AGD / CFG images/s of each pair (a `repeat` of repro.agd.throughput: both methods
    timed back to back in one process), indexed by repeat; pairs missing a side dropped.

    Each ratio compares two timings taken seconds apart, so slow drift in the machine's
    load cancels within a pair instead of landing on one method's mean.
    """
    if "repeat" not in throughput or not {"agd", "cfg"} <= set(throughput.method):
        return pd.Series(dtype=float)
    speed = throughput.pivot_table(index="repeat", columns="method", values="images_per_s")
    return (speed["agd"] / speed["cfg"]).dropna()


def fid_claim(
    table, claim, a, b, checkpoint, reference, tolerance=FID_TOLERANCE, a_type=None, b_type=None
) -> Claim:
    """Is FID(a) / FID(b) <= 1 + tolerance (0 for "beats", 5% for "matches or beats")?

    a_type / b_type restrict a method to one adapter type."""
    (wa, fa) = selected_fid(table, a, checkpoint, a_type)
    (wb, fb) = selected_fid(table, b, checkpoint, b_type)
    seeds = fa.index.intersection(fb.index)
    metric = f"test FID({label(a, a_type)}) / FID({label(b, b_type)}), each at its val-selected w"
    if len(seeds) == 0:
        nan = float("nan")
        return Claim(PAPER, claim, metric, nan, nan, 0, reference, "inconclusive")
    mean, std = mean_std((fa[seeds] / fb[seeds]).tolist())
    detail = (
        f"{reference}; FID {label(a, a_type)} {fa[seeds].mean():.3g} (w={wa:g}) "
        f"vs {label(b, b_type)} {fb[seeds].mean():.3g} (w={wb:g})"
    )
    return Claim(
        PAPER, claim, metric, mean, std, len(seeds), detail, ratio_verdict(mean, std, 1 + tolerance)
    )


def label(method: str, adapter_type: str | None) -> str:
    return method if adapter_type in (None, NO_ADAPTER) else f"{method}[{adapter_type}]"


def transfer_claim(table: pd.DataFrame, adapter_type: str) -> Claim:
    """(AGD/CFG on derived) / (AGD/CFG on base) per seed, each FID at its val-selected w."""
    ratios = {}
    for checkpoint in ("derived", "base"):
        _, agd = selected_fid(table, "agd", checkpoint, adapter_type)
        _, cfg = selected_fid(table, "cfg", checkpoint)
        ratios[checkpoint] = agd / cfg
    per_seed = (ratios["derived"] / ratios["base"]).dropna()
    mean, std = mean_std(per_seed.tolist())
    claim = "Adapters trained on the base transfer to a derived checkpoint without retraining, matching CFG there."
    metric = "(FID AGD / CFG on the derived checkpoint) / (FID AGD / CFG on the base)"
    if per_seed.empty:
        return Claim(PAPER, claim, metric, math.nan, math.nan, 0, "no rows", "inconclusive")
    reference = (
        f"{adapter_type} adapters; AGD/CFG {ratios['derived'].mean():.3g} on the derived "
        f"checkpoint vs {ratios['base'].mean():.3g} on the base; tolerance {FID_TOLERANCE:.0%}"
    )
    return Claim(
        PAPER,
        claim,
        metric,
        mean,
        std,
        len(per_seed),
        reference,
        ratio_verdict(mean, std, 1 + FID_TOLERANCE),
    )


def fidelity_claim(table: pd.DataFrame, adapter_type: str) -> Claim:
    """Fidelity MSE to CFG of AGD on CFG vs on standard trajectories, mean over the w grid."""
    per_method = {}
    for method in ("agd", "agd_standard"):
        rows = rows_of(table, method, "base", adapter_type)
        per_method[method] = rows.groupby("seed").fidelity_mse.mean()
    ratios = (per_method["agd"] / per_method["agd_standard"]).dropna()
    mean, std = mean_std(ratios.tolist())
    claim = "Adapters trained on CFG-guided trajectories simulate CFG more closely than ones trained on standard trajectories."
    metric = "fidelity MSE to CFG (same noise, class, w) AGD / AGD-standard, mean over the w grid"
    reference = (
        f"{adapter_type} adapters; MSE {per_method['agd'].mean():.3g} vs "
        f"{per_method['agd_standard'].mean():.3g}; lower"
    )
    if ratios.empty:
        return Claim(PAPER, claim, metric, math.nan, math.nan, 0, reference, "inconclusive")
    return Claim(
        PAPER, claim, metric, mean, std, len(ratios), reference, ratio_verdict(mean, std, 1.0)
    )


def speed_claim(throughput: pd.DataFrame) -> Claim:
    """AGD >= 1.9x CFG's images/s, decided on the range of the per-pair ratios."""
    ratios = pair_ratios(throughput)
    spread = Spread.of(ratios)
    mean, std = mean_std(ratios)
    if spread.n >= MIN_PAIRS:
        verdict = interval_verdict(spread.low, spread.high, MIN_SPEEDUP, better="higher")
    else:
        verdict = "inconclusive"
    return Claim(
        PAPER,
        "AGD samples at least 1.9x faster than CFG at the same number of steps.",
        "images/s AGD / CFG, per pair timed back to back",
        mean,
        std,
        spread.n,
        f"target {MIN_SPEEDUP}x, limit 2.0x (half the forward passes); holds if every "
        f"pair is >= {MIN_SPEEDUP}x, does not hold if every pair is below, else inconclusive",
        verdict,
        spread=spread,
    )


def adapter_types(table: pd.DataFrame) -> list[str]:
    """The adapter types of AGD's rows on the base, in ADAPTER_ORIGIN's order."""
    present = set(table[(table.method == "agd") & (table.checkpoint == "base")].adapter_type)
    return [t for t in ADAPTER_ORIGIN if t in present] + sorted(present - set(ADAPTER_ORIGIN))


def build_claims(table: pd.DataFrame, throughput: pd.DataFrame, adapter_type: str) -> list[Claim]:
    """AGD's claims; `adapter_type` is the headline type the ablations were run with."""
    claims = []
    cfg_nfe = table[(table.method == "cfg")].nfe
    kinds = adapter_types(table) or [adapter_type]
    for kind in kinds:
        claim = fid_claim(
            table,
            f"AGD ({kind} adapters) matches or beats CFG's FID with one forward pass per step instead of two.",
            "agd",
            "cfg",
            "base",
            f"{ADAPTER_ORIGIN.get(kind, kind)}; CFG on the same base, tolerance "
            f"{FID_TOLERANCE:.0%}; paper: DiT-XL/2 FID 2.13 (AGD) vs 2.17 (CFG)",
            a_type=kind,
        )
        agd_nfe = rows_of(table, "agd", "base", kind).nfe
        halves = len(cfg_nfe) and len(agd_nfe) and (agd_nfe.max() * 2 == cfg_nfe.min())
        if claim.verdict == "holds" and not halves:
            claim.verdict = "does not hold"
            claim.reference += f"; NFEs per image AGD {agd_nfe.max()} vs CFG {cfg_nfe.min()}"
        claims.append(claim)

    for kind in kinds:
        agd_rows = rows_of(table, "agd", "base", kind)
        fractions = (
            (agd_rows.trainable_params / agd_rows.base_params).groupby(agd_rows.seed).first()
        )
        mean, std = mean_std(fractions.tolist())
        claims.append(
            Claim(
                PAPER,
                f"The adapters ({kind}) are a small fraction (<= 5%) of the frozen base's parameters.",
                "trainable / base parameters",
                mean,
                std,
                len(fractions),
                "limit 5%; paper ~2% on DiT-XL/2",
                "holds"
                if len(fractions) and mean <= MAX_ADAPTER_FRACTION
                else ("inconclusive" if not len(fractions) else "does not hold"),
            )
        )
    claims.append(
        fid_claim(
            table,
            "Training adapters on CFG-guided trajectories beats training on standard (forward-noised) ones.",
            "agd",
            "agd_standard",
            "base",
            f"{adapter_type} adapters on standard trajectories with as many noise paths "
            "(the paper's ablation); strictly lower FID",
            tolerance=0.0,
            a_type=adapter_type,
            b_type=adapter_type,
        )
    )
    claims.append(fidelity_claim(table, adapter_type))
    claims.append(
        fid_claim(
            table,
            "AGD matches or beats whole-model guidance distillation (Meng et al.) while training only adapters.",
            "agd",
            "gd",
            "base",
            f"{adapter_type} adapters vs guidance distillation of the whole model on standard "
            "trajectories",
            a_type=adapter_type,
        )
    )
    claims.append(transfer_claim(table, adapter_type))
    claims.append(
        fid_claim(
            table,
            "Adapters transferred from the base match adapters trained on the derived checkpoint itself.",
            "agd",
            "agd_native",
            "derived",
            f"{adapter_type} adapters trained on the derived checkpoint's own CFG trajectories",
            a_type=adapter_type,
            b_type=adapter_type,
        )
    )
    claims.append(speed_claim(throughput))
    return claims


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output claims (CSV)")
    stage.parser.add_argument("--table", required=True)
    stage.parser.add_argument("--throughput", required=True)
    stage.parser.add_argument(
        "--adapter-type", required=True, help="the headline adapter type (the ablations')"
    )
    args = stage.start(argv)
    table = read_table(args.table, required=COLUMNS)
    throughput = read_table(args.throughput, required=("method", "repeat", "images_per_s"))
    claims = build_claims(table, throughput, args.adapter_type)
    write_claims(claims, args.out)
    for c in claims:
        print(f"[{c.verdict}] {c.claim} {c.metric} = {c.measured}")


if __name__ == "__main__":
    run(main)

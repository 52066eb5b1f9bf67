"""Stage humo_claims: HuMo's claims, each decided from the metrics table seed by seed.

Every claim is a difference "A - B > 0" between two rows of results/humo_metrics.csv
(or two columns of one row), taken per seed: the same seed means the same trained
weights and the same test noise, so the difference cancels what the seed alone moves.
The per-seed differences then go to repro.core.results.spread_verdict: the claim holds
when mean - std > 0, does not hold when mean + std <= 0 (a tie is not a win), and is
inconclusive when [mean - std, mean + std] straddles 0 or fewer than `min_seeds` seeds
have both rows. A claim whose rows are absent is inconclusive, and its reference says
which rows are missing.

The claims (paper label "HuMo"), on the task with text, image and audio (TIA) unless
said otherwise, at the CFG form `cfg` (the paper's time-adaptive Eq. 4 by default):

1. the model listens: sync_c with the clip's own audio - sync_c with another clip's
   (the shuffled-audio control of the same generated videos);
2. focus-by-predicting helps lip sync: sync_c of full - no_focus;
3. progressive two-stage training helps lip sync: sync_c of full - no_progressive;
4. minimal-invasive injection keeps identity: id_sim of full - full_finetune;
5. ... and text alignment: text_align of full - full_finetune;
6. time-adaptive CFG beats CFG with one fixed set of weights (`fixed_cfg`) on the sync /
   identity trade-off: both sync_c and id_sim differences, each decided as above; holds
   when both hold, does not hold when either does not, inconclusive otherwise;
7. one model serves every task, the reference carries identity: id_sim of TIA - TA;
8. ... and the audio carries lip sync: sync_c of TIA - TI.

    python -m repro.humo.claims --metrics results/humo_metrics.csv \
        --out results/claims/humo.csv \
        --params '{"min_seeds": 3, "cfg": "paper", "fixed_cfg": "fixed"}'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import (
    Claim,
    check_keyed_table,
    format_mean_std,
    read_table,
    spread_verdict,
    write_claims,
)
from repro.core.stage import Stage, run
from repro.humo.table import CFG_FORMS, COLUMNS, KEYS

PAPER = "HuMo"
MIN_SEEDS = 3
CFG = "paper"
FIXED_CFG = "fixed"
# The paper's numbers (HuMo-17B on the MoCha benchmark; Sync-C is SyncNet's confidence,
# not our correlation, so only the direction carries over).
PAPER_SYNC = "paper (HuMo-17B, MoCha, Sync-C): full 6.252"
PAPER_ABLATION = {
    "no_focus": f"{PAPER_SYNC} vs w/o focus-by-predicting 5.946",
    "no_progressive": f"{PAPER_SYNC} vs w/o progressive training 6.106",
    "full_finetune": "paper: full fine-tuning is the ablation of minimal-invasive injection "
    "(no number recorded here)",
}


@dataclass(frozen=True)
class Side:
    """One side of a comparison: the rows of (task, variant, cfg), one per seed."""

    task: str
    variant: str
    cfg: str

    def __str__(self) -> str:
        return f"{self.task}/{self.variant}/{self.cfg}"


@dataclass
class TwoMetricClaim(Claim):
    """A claim decided on two per-seed differences at once (claim 6). The first is in
    measured_mean / measured_std; `measured` shows both, each with its name."""

    first_name: str = ""
    second_name: str = ""
    second_mean: float = math.nan
    second_std: float = math.nan

    @property
    def measured(self) -> str:
        first = format_mean_std(self.measured_mean, self.measured_std)
        second = format_mean_std(self.second_mean, self.second_std)
        return f"{self.first_name} {first}; {self.second_name} {second}"


def check_table(table: pd.DataFrame, what: str = "the metrics table") -> None:
    """Refuse a table without the contract's columns or with a key seen twice (a per-seed
    pairing would silently average the two)."""
    check_keyed_table(table, COLUMNS, KEYS, what)


def rows_of(table: pd.DataFrame, side: Side) -> pd.DataFrame:
    return table[
        (table.task == side.task) & (table.variant == side.variant) & (table.cfg == side.cfg)
    ]


def per_seed(table: pd.DataFrame, side: Side, metric: str) -> pd.Series:
    """`metric` of `side`'s rows indexed by seed (float, NaN kept)."""
    return rows_of(table, side).set_index("seed")[metric].astype(float).sort_index()


def missing_rows(table: pd.DataFrame, *sides: Side) -> str:
    """What a claim over `sides` lacks ("no rows of TIA/no_focus/paper ..."), or ""."""
    absent = [str(s) for s in sides if rows_of(table, s).empty]
    if not absent:
        return ""
    return f"no rows of {' and '.join(absent)} (task/variant/cfg) in the metrics table"


def paired(table: pd.DataFrame, a: Side, b: Side, metric: str) -> pd.Series:
    """Per seed: `metric` of a - `metric` of b, on the seeds both have (NaN where either
    is NaN, which spread_verdict then leaves out)."""
    first, second = per_seed(table, a, metric), per_seed(table, b, metric)
    seeds = first.index.intersection(second.index)
    return first[seeds] - second[seeds]


def seeds_note(n: int, min_seeds: int) -> str:
    return f"; only {n} seeds (< {min_seeds}): undecided" if n < min_seeds else ""


def _means(table: pd.DataFrame, side: Side, metric: str) -> str:
    values = per_seed(table, side, metric).dropna()
    return f"{values.mean():.3f}" if len(values) else "nan"


def _undecided(claim: str, metric: str, reference: str, missing: str) -> Claim:
    return Claim(
        PAPER, claim, metric, math.nan, math.nan, 0, f"{reference}; {missing}", "inconclusive"
    )


def difference_claim(
    table: pd.DataFrame,
    claim: str,
    a: Side,
    b: Side,
    metric: str,
    paper: str,
    min_seeds: int,
) -> Claim:
    """ "`claim`": per seed, `metric` of a - `metric` of b, against 0 (spread_verdict)."""
    what = f"{metric} of {a} - {b} (task/variant/cfg), per seed; holds when mean - std > 0"
    missing = missing_rows(table, a, b)
    if missing:
        return _undecided(claim, what, paper, missing)
    gaps = paired(table, a, b, metric)
    mean, std, n, verdict = spread_verdict(gaps, 0.0, "higher", min_seeds)
    none = "" if n else "; no seed has both rows"
    reference = (
        f"{paper}; here {a} {_means(table, a, metric)} vs {b} {_means(table, b, metric)} "
        f"(mean over seeds){none}{seeds_note(n, min_seeds)}"
    )
    return Claim(PAPER, claim, what, mean, std, n, reference, verdict)


def shuffled_claim(table: pd.DataFrame, cfg: str, min_seeds: int) -> Claim:
    """Claim 1: sync_c - sync_c_shuffled of the full model's TIA rows at `cfg`."""
    side = Side("TIA", "full", cfg)
    claim = "HuMo's lip sync follows the audio: matched audio beats shuffled audio (TIA)"
    what = (
        f"sync_c - sync_c_shuffled of {side} (task/variant/cfg), per seed; holds when "
        "mean - std > 0"
    )
    paper = "control: the same videos against another clip's audio (no paper number)"
    missing = missing_rows(table, side)
    if missing:
        return _undecided(claim, what, paper, missing)
    gaps = per_seed(table, side, "sync_c") - per_seed(table, side, "sync_c_shuffled")
    mean, std, n, verdict = spread_verdict(gaps, 0.0, "higher", min_seeds)
    reference = (
        f"{paper}; here matched {_means(table, side, 'sync_c')} vs shuffled "
        f"{_means(table, side, 'sync_c_shuffled')} (mean over seeds){seeds_note(n, min_seeds)}"
    )
    return Claim(PAPER, claim, what, mean, std, n, reference, verdict)


def combined_verdict(first: str, second: str) -> str:
    """Both hold -> holds; either does not hold -> does not hold; else inconclusive."""
    if "does not hold" in (first, second):
        return "does not hold"
    if first == second == "holds":
        return "holds"
    return "inconclusive"


def cfg_claim(table: pd.DataFrame, cfg: str, fixed_cfg: str, min_seeds: int) -> Claim:
    """Claim 6: time-adaptive CFG (`cfg`) against fixed weights (`fixed_cfg`), TIA, full:
    the sync_c and the id_sim differences per seed, each decided by spread_verdict."""
    a, b = Side("TIA", "full", cfg), Side("TIA", "full", fixed_cfg)
    claim = (
        "Time-adaptive CFG beats fixed-weight CFG on the sync / identity trade-off "
        "(better lip sync and identity, TIA)"
    )
    what = (
        f"sync_c and id_sim of {a} - {b} (task/variant/cfg), per seed; holds when mean - std "
        "> 0 for both, does not hold when mean + std <= 0 for either"
    )
    paper = "paper: Eq. 4's weights switch at t > 0.98 (text / image early, audio later)"
    missing = missing_rows(table, a, b)
    if missing:
        return _undecided(claim, what, paper, missing)
    sync = spread_verdict(paired(table, a, b, "sync_c"), 0.0, "higher", min_seeds)
    ident = spread_verdict(paired(table, a, b, "id_sim"), 0.0, "higher", min_seeds)
    n = min(sync[2], ident[2])
    reference = (
        f"{paper}; here sync_c {_means(table, a, 'sync_c')} vs {_means(table, b, 'sync_c')} "
        f"({sync[3]}), id_sim {_means(table, a, 'id_sim')} vs {_means(table, b, 'id_sim')} "
        f"({ident[3]}) ({cfg} vs {fixed_cfg}, mean over seeds)"
        f"{'; no seed has both rows' if not n else ''}{seeds_note(n, min_seeds)}"
    )
    return TwoMetricClaim(
        PAPER,
        claim,
        what,
        sync[0],
        sync[1],
        n,
        reference,
        combined_verdict(sync[3], ident[3]),
        first_name="sync_c",
        second_name="id_sim",
        second_mean=ident[0],
        second_std=ident[1],
    )


def build_claims(
    table: pd.DataFrame, *, min_seeds: int = MIN_SEEDS, cfg: str = CFG, fixed_cfg: str = FIXED_CFG
) -> list[Claim]:
    """The eight claims of the module docstring, in that order."""
    check_table(table)
    full = Side("TIA", "full", cfg)

    def ablation(variant: str, metric: str, claim: str) -> Claim:
        side = Side("TIA", variant, cfg)
        return difference_claim(
            table, claim, full, side, metric, PAPER_ABLATION[variant], min_seeds
        )

    one_model = "paper: one model for TI, TA and TIA (HuMo-17B TIA: ID-Cur .747, Sync-C 6.252)"
    return [
        shuffled_claim(table, cfg, min_seeds),
        ablation("no_focus", "sync_c", "Focus-by-predicting improves lip sync (TIA)"),
        ablation(
            "no_progressive", "sync_c", "Progressive two-stage training improves lip sync (TIA)"
        ),
        ablation(
            "full_finetune",
            "id_sim",
            "Minimal-invasive injection keeps identity better than full fine-tuning (TIA)",
        ),
        ablation(
            "full_finetune",
            "text_align",
            "Minimal-invasive injection keeps text alignment better than full fine-tuning (TIA)",
        ),
        cfg_claim(table, cfg, fixed_cfg, min_seeds),
        difference_claim(
            table,
            "One model serves every task: the reference image carries identity (TIA vs TA)",
            full,
            Side("TA", "full", cfg),
            "id_sim",
            one_model,
            min_seeds,
        ),
        difference_claim(
            table,
            "One model serves every task: the audio carries lip sync (TIA vs TI)",
            full,
            Side("TI", "full", cfg),
            "sync_c",
            one_model,
            min_seeds,
        ),
    ]


def check_params(params: dict) -> dict:
    """The stage's settings from --params, defaults filled in, each checked; errors name
    the key (humo.claims.<key>)."""
    settings = {
        "min_seeds": params.get("min_seeds", MIN_SEEDS),
        "cfg": params.get("cfg", CFG),
        "fixed_cfg": params.get("fixed_cfg", FIXED_CFG),
    }
    seeds = settings["min_seeds"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ReproInputError(f"humo.claims.min_seeds: must be an integer >= 1, got {seeds!r}")
    forms = [f for f in CFG_FORMS if f != "none"]
    for key in ("cfg", "fixed_cfg"):
        if settings[key] not in forms:
            raise ReproInputError(
                f"humo.claims.{key}: unknown CFG form {settings[key]!r} (allowed: "
                f"{', '.join(forms)})"
            )
    if settings["cfg"] == settings["fixed_cfg"]:
        raise ReproInputError(
            f"humo.claims.fixed_cfg: {settings['fixed_cfg']!r} is humo.claims.cfg itself; "
            "claim 6 compares two different forms"
        )
    return settings


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="humo")
    add = stage.parser.add_argument
    add("--metrics", required=True, help="results/humo_metrics.csv")
    add("--out", required=True, help="output: results/claims/humo.csv")
    args = stage.start(argv)
    settings = check_params(stage.params)
    table = read_table(args.metrics, required=COLUMNS)
    check_table(table, str(args.metrics))
    claims = build_claims(table, **settings)
    write_claims(claims, args.out)
    for c in claims:
        print(f"[{c.verdict}] {c.claim}: {c.measured}")


if __name__ == "__main__":
    run(main)

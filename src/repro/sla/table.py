"""SLA's quality table results/sla_quality.csv: one row per fine-tuned attention variant
and seed, plus the row(s) that score the real clips themselves.

A variant is a config key (free-form: "full", "sla", "sparse_85", "linear_only", ...);
what kind of attention it is lives in the `attention` column:

- full: dense softmax attention (the reference); sparsity 0, phi "none";
- paper / main: SLA, the paper's form and the official code's main-branch form: sparse
  attention over the critical k_h of the blocks, linear attention (feature map phi)
  over the marginal ones, the negligible k_l skipped; sparsity 1 - k_h;
- sparse_only: the sparse branch alone (no linear branch); sparsity 1 - k_h;
- linear_only: linear attention alone; sparsity 1 (no block is computed exactly);
- real: the real test clips (variant "real", and only it): frame_fid and background_acc
  are measured on them, every other number is NaN, k_h / k_l / sparsity too, steps 0.

COLUMNS (this order) are the contract with the claims (repro.sla.claims) and the figures
(repro.sla.plots). A metric may be missing or None in a row (not measured): it becomes
NaN. There is no command line: the evaluation stage calls `write` with its rows, and
nothing is written unless every row passes `build_table`'s checks.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import read_table, write_table
from repro.sla.workflow import nominal_sparsity as workflow_nominal_sparsity

ATTENTION_KINDS = ("full", "paper", "main", "sparse_only", "linear_only", "real")
PHIS = ("softmax", "elu", "relu", "none")
# The row of the real clips: its variant and attention are both "real", and only its.
REAL = "real"
# The reference variant's name in the default order (first).
FULL = "full"

KEYS = ["variant", "seed"]
# What a variant is and how long it was fine-tuned: every row must carry these.
SETTINGS = ["variant", "attention", "k_h", "k_l", "phi", "sparsity", "seed", "steps"]
METRICS = [
    "final_train_loss",
    "val_loss",
    "test_loss",
    "frame_fid",
    "background_acc",
    "block_sparsity",
    "attention_flops",
    "dense_attention_flops",
    "flops_reduction",
    "attention_ms",
]
COLUMNS = [*SETTINGS, *METRICS]
# The text columns; seed and steps are int64, every other column float64.
TEXT = ("variant", "attention", "phi")
# The metrics measured on the real clips; every other one is NaN in their row.
REAL_METRICS = ("frame_fid", "background_acc")

# (low, high, low is exclusive); None: unbounded on that side. Fractions lie in [0, 1],
# losses, distances, FLOPs and times are >= 0, a reduction factor is > 0. A value outside
# is a mix-up upstream (a percentage for a fraction, a sign), refused rather than averaged.
FRACTION = (0.0, 1.0, False)
NON_NEGATIVE = (0.0, None, False)
RANGES = {
    "k_h": FRACTION,
    "k_l": FRACTION,
    "sparsity": FRACTION,
    "final_train_loss": NON_NEGATIVE,
    "val_loss": NON_NEGATIVE,
    "test_loss": NON_NEGATIVE,
    "frame_fid": NON_NEGATIVE,
    "background_acc": FRACTION,
    "block_sparsity": FRACTION,
    "attention_flops": NON_NEGATIVE,
    "dense_attention_flops": NON_NEGATIVE,
    "flops_reduction": (0.0, None, True),
    "attention_ms": NON_NEGATIVE,
}
# Float round-off allowed past an inclusive bound (1 - 0.05 + 0.05 need not be 1 exactly).
ROUNDING = 1e-6


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _where(row: dict) -> str:
    """How errors name a row: by its key, as far as it has one."""
    return f"row variant={row.get('variant', '?')!r} seed={row.get('seed', '?')!r}"


def _whole(value, low: int, where: str, key: str) -> int:
    """`value` as an int if it is a whole number >= `low` (1.0 is accepted, 1.5, True and
    "1" are not), else ReproInputError naming the row and key."""
    if not _is_number(value) or not math.isfinite(value) or value % 1 or value < low:
        raise ReproInputError(f"{where}: {key} is {value!r}, not a whole number >= {low}")
    return int(value)


def _number(value, where: str, key: str) -> float:
    """A number of RANGES[key] as a float (None -> NaN), checked against its range."""
    if value is None:
        return math.nan
    if not _is_number(value) or math.isinf(value):
        raise ReproInputError(f"{where}: {key} is {value!r}, not a finite number or null")
    value = float(value)
    if math.isnan(value):
        return value
    low, high, exclusive = RANGES[key]
    too_low = value <= low if exclusive else value < low - ROUNDING
    if too_low or (high is not None and value > high + ROUNDING):
        bounds = f"{'(' if exclusive else '['}{low}, {high if high is not None else 'inf'}]"
        raise ReproInputError(f"{where}: {key} is {value!r}, outside its range {bounds}")
    return value


def _name(value, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ReproInputError(f"{where}: {key} is {value!r}, not a non-empty string")
    return value


def _known(value, allowed: tuple[str, ...], where: str, key: str) -> str:
    if value not in allowed:
        raise ReproInputError(f"{where}: unknown {key} {value!r} (allowed: {', '.join(allowed)})")
    return value


def nominal_sparsity(attention: str, k_h: float) -> float:
    """The block sparsity the paper names for an attention kind
    (repro.sla.workflow.nominal_sparsity), NaN for the real clips."""
    if attention == REAL:
        return math.nan
    return workflow_nominal_sparsity(attention, k_h)


def check_row(row: dict) -> dict:
    """One row, checked and completed (missing metrics -> NaN), in COLUMNS order.

    Every SETTINGS key must be present; variant a non-empty string, attention one of
    ATTENTION_KINDS, "real" the variant exactly when it is the attention; phi one of PHIS,
    "none" for full attention and the real clips and not where a linear branch needs a
    feature map (paper, main, linear_only); seed and steps whole numbers >= 0 (steps 0 for
    the real clips); every number within RANGES; sparsity what `nominal_sparsity` says;
    the real clips' row NaN but for REAL_METRICS. Errors name the row and the key.
    """
    if not isinstance(row, dict):
        raise ReproInputError(f"a table row must be a dict, got {type(row).__name__}")
    where = _where(row)
    missing = [key for key in SETTINGS if key not in row]
    if missing:
        raise ReproInputError(f"{where}: missing columns {missing}")
    variant = _name(row["variant"], where, "variant")
    attention = _known(row["attention"], ATTENTION_KINDS, where, "attention")
    if (variant == REAL) != (attention == REAL):
        raise ReproInputError(
            f"{where}: variant {variant!r} with attention {attention!r}: the real clips' row "
            f"is variant {REAL!r} with attention {REAL!r}, together"
        )
    phi = _known(row["phi"], PHIS, where, "phi")
    if attention in ("full", REAL) and phi != "none":
        raise ReproInputError(f"{where}: phi is {phi!r}, must be 'none' for {attention!r}")
    if attention in ("paper", "main", "linear_only") and phi == "none":
        raise ReproInputError(
            f"{where}: phi is 'none', but {attention!r} attention has a linear branch "
            "(softmax, elu or relu)"
        )
    out = {
        "variant": variant,
        "attention": attention,
        "k_h": _number(row["k_h"], where, "k_h"),
        "k_l": _number(row["k_l"], where, "k_l"),
        "phi": phi,
        "sparsity": _number(row["sparsity"], where, "sparsity"),
        "seed": _whole(row["seed"], 0, where, "seed"),
        "steps": _whole(row["steps"], 0, where, "steps"),
    }
    out.update({m: _number(row.get(m), where, m) for m in METRICS})
    if attention == REAL:
        _check_real(out, where)
        return out
    for key in ("k_h", "k_l", "sparsity"):
        if math.isnan(out[key]):
            raise ReproInputError(f"{where}: {key} is NaN; only the real clips' row has none")
    expected = nominal_sparsity(attention, out["k_h"])
    if abs(out["sparsity"] - expected) > ROUNDING:
        rule = {"full": "0", "linear_only": "1"}.get(attention, f"1 - k_h = {expected:g}")
        raise ReproInputError(
            f"{where}: sparsity is {out['sparsity']!r}, but {attention!r} attention names {rule}"
        )
    return out


def _check_real(row: dict, where: str) -> None:
    """The real clips are no model: no settings, no training, no attention to measure."""
    if row["steps"] != 0:
        raise ReproInputError(f"{where}: steps is {row['steps']}, must be 0 for the real clips")
    measured = [
        key
        for key in ("k_h", "k_l", "sparsity", *METRICS)
        if key not in REAL_METRICS and not math.isnan(row[key])
    ]
    if measured:
        raise ReproInputError(
            f"{where}: the real clips' row has {measured}; only {list(REAL_METRICS)} are "
            "measured on real clips (the rest must be missing, None or NaN)"
        )


def variant_order(variants, order: Sequence[str] | None = None) -> list[str]:
    """The distinct `variants` in table order: those named in `order` first, in their
    first appearance there; then the others sorted by name, "full" first and "real" last
    (with no `order`, that is the whole order)."""
    present = list(dict.fromkeys(variants))
    listed = [v for v in dict.fromkeys(order or ()) if v in present]
    rest = sorted(set(present) - set(listed), key=lambda v: (v != FULL, v == REAL, v))
    return listed + rest


def build_table(rows: list[dict], order: Sequence[str] | None = None) -> pd.DataFrame:
    """The quality table (COLUMNS) of `rows`, each checked by `check_row`, no (variant,
    seed) twice; sorted by variant (`variant_order`), then seed."""
    if order is not None and (
        isinstance(order, str) or not all(isinstance(v, str) and v for v in order)
    ):
        raise ReproInputError(f"order must be a list of variant names, got {order!r}")
    checked, seen = [], set()
    for row in rows:
        row = check_row(row)
        key = (row["variant"], row["seed"])
        if key in seen:
            raise ReproInputError(f"{_where(row)}: appears more than once")
        seen.add(key)
        checked.append(row)
    table = pd.DataFrame(checked, columns=COLUMNS)
    # The dtypes do not depend on the rows (an empty table, a column all NaN).
    dtypes = {c: object if c in TEXT else "float64" for c in COLUMNS}
    table = table.astype({**dtypes, "seed": "int64", "steps": "int64"})
    ranks = {v: i for i, v in enumerate(variant_order(table.variant, order))}
    table = table.assign(_rank=table.variant.map(ranks)).sort_values(
        ["_rank", "seed"], kind="stable"
    )
    return table[COLUMNS].reset_index(drop=True)


def write(
    rows: list[dict], path: str | os.PathLike, order: Sequence[str] | None = None
) -> pd.DataFrame:
    """Check `rows` (`build_table`), then write the table to `path` atomically; returns it."""
    table = build_table(rows, order)
    write_table(table, path)
    return table


def read(path: str | os.PathLike) -> pd.DataFrame:
    """The quality table at `path`; errors name the file and any missing column."""
    return read_table(path, required=COLUMNS)

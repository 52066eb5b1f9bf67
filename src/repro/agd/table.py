"""Stage agd_table: the headline table results/agd_fid.csv, one row per
method x adapter type x checkpoint x guidance scale x seed, gathered from the
evaluation jobs, with each row's fidelity to CFG (repro.agd.fidelity) joined on.

    python -m repro.agd.table --out results/agd_fid.csv --metrics results/agd_metrics.json \
        --fidelity results/agd/fidelity/*.csv -- results/agd/eval/*/*.csv

The metrics JSON (mean FID per checkpoint and method, over scales and seeds) is
what `dvc metrics show` reads.
"""

from __future__ import annotations

import pandas as pd

from repro.core.io import write_json
from repro.core.results import read_table, write_table
from repro.core.stage import Stage, run

# The rows' key: one evaluation of one model at one guidance scale.
KEYS = ["method", "adapter_type", "checkpoint", "guidance_scale", "seed"]
# What repro.agd.evaluate writes: one row per (adapter type,) scale and seed.
EVAL_COLUMNS = [
    "method",
    "adapter_type",
    "checkpoint",
    "guidance_scale",
    "steps",
    "nfe",
    "seed",
    "fid",
    "fid_val",
    "inception_score",
    "images_per_s",
    "trainable_params",
    "base_params",
]
# What repro.agd.fidelity adds: the distance of each sample to the CFG sample from the
# same noise, class and w (pixel MSE; L2 between feature-network features), averaged.
FIDELITY_COLUMNS = ["fidelity_mse", "fidelity_feature"]
# The headline table's columns (its contract with claims and figures).
COLUMNS = EVAL_COLUMNS + FIDELITY_COLUMNS


def join_fidelity(table: pd.DataFrame, fidelity: pd.DataFrame) -> pd.DataFrame:
    """The evaluation rows with their fidelity columns (NaN where no CFG counterpart:
    real data, no guidance). Scales are matched after rounding (they pass through CSV)."""
    left, right = table.copy(), fidelity[KEYS + FIDELITY_COLUMNS].copy()
    for frame in (left, right):
        frame["_w"] = frame.guidance_scale.round(6)
    keys = [k for k in KEYS if k != "guidance_scale"] + ["_w"]
    if right.duplicated(keys).any():
        raise ValueError("fidelity tables: a row key appears twice")
    merged = left.merge(right.drop(columns="guidance_scale"), on=keys, how="left")
    return merged.drop(columns="_w")


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="the headline table (CSV)")
    stage.parser.add_argument("--metrics", required=True, help="summary JSON for dvc metrics")
    stage.parser.add_argument(
        "--fidelity", nargs="*", default=[], help="fidelity tables (repro.agd.fidelity)"
    )
    stage.parser.add_argument("tables", nargs="+", help="the evaluation tables")
    args = stage.start(argv)
    table = pd.concat(
        [read_table(p, required=EVAL_COLUMNS) for p in args.tables], ignore_index=True
    )
    fidelity_columns = KEYS + FIDELITY_COLUMNS
    fidelity = pd.concat(
        [read_table(p, required=fidelity_columns) for p in args.fidelity]
        or [pd.DataFrame(columns=fidelity_columns)],
        ignore_index=True,
    )
    table = join_fidelity(table[EVAL_COLUMNS], fidelity)[COLUMNS]
    table = table.sort_values(["checkpoint", "method", "adapter_type", "guidance_scale", "seed"])
    write_table(table, args.out)
    summary = {
        "/".join([ckpt, method] + ([kind] if kind != "-" else [])): {
            "fid": float(g.fid.mean()),
            "nfe": float(g.nfe.max()),
            "fidelity_mse": float(g.fidelity_mse.mean()),
        }
        for (ckpt, method, kind), g in table.groupby(["checkpoint", "method", "adapter_type"])
    }
    write_json(args.metrics, summary)
    print(f"{len(table)} rows -> {args.out}")


if __name__ == "__main__":
    run(main)

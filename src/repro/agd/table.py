"""Stage agd_table: the headline table results/agd_fid.csv, one row per
method x checkpoint x guidance scale x seed, gathered from the evaluation jobs.

    python -m repro.agd.table --out results/agd_fid.csv --metrics results/agd_metrics.json \
        results/agd/eval/*/*.csv

The metrics JSON (mean FID per checkpoint and method, over scales and seeds) is
what `dvc metrics show` reads.
"""

from __future__ import annotations

import pandas as pd

from repro.core.io import write_json
from repro.core.results import read_table, write_table
from repro.core.stage import Stage, run

# The headline table's columns (repro.agd.evaluate writes one row per scale and seed).
COLUMNS = [
    "method",
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


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="the headline table (CSV)")
    stage.parser.add_argument("--metrics", required=True, help="summary JSON for dvc metrics")
    stage.parser.add_argument("tables", nargs="+", help="the evaluation tables")
    args = stage.start(argv)
    table = pd.concat([read_table(p, required=COLUMNS) for p in args.tables], ignore_index=True)
    table = table[COLUMNS].sort_values(["checkpoint", "method", "guidance_scale", "seed"])
    write_table(table, args.out)
    summary = {
        f"{ckpt}/{method}": {"fid": float(g.fid.mean()), "nfe": float(g.nfe.max())}
        for (ckpt, method), g in table.groupby(["checkpoint", "method"])
    }
    write_json(args.metrics, summary)
    print(f"{len(table)} rows -> {args.out}")


if __name__ == "__main__":
    run(main)

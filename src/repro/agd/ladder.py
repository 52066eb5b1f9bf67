"""Stage agd_ladder: AGD against CFG on bases of several sizes (the scale ladder).

Each rung is the same experiment on another base (agd.ladder.rungs overlays the
agd section: more blocks, say); the main run is the first rung. Per rung and
adapter type: the headline claim "AGD matches or beats CFG's FID" computed as in
repro.agd.claims (each method at its validation-selected w, test FIDs compared seed
by seed, 5 % tolerance, inconclusive when the spread straddles it), plus the
adapters' share of the base and their fidelity to CFG at CFG's selected w. The figure shows the
AGD / CFG FID ratio against base size, so a reader sees which way scale moves
each verdict.

    python -m repro.agd.ladder --tables results/agd_fid.csv results/agd_ladder/b8_fid.csv \
        --out results/agd_ladder.csv --figure results/figures/agd_ladder.png \
        --params '{"rungs": [{"name": "main", "num_layers": 4}, {"name": "b8", "num_layers": 8}]}'
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from repro.agd.claims import FID_TOLERANCE, adapter_types, fid_claim, selected_fid  # noqa: E402
from repro.agd.table import EVAL_COLUMNS  # noqa: E402
from repro.core.errors import ReproInputError  # noqa: E402
from repro.core.io import atomic_write  # noqa: E402
from repro.core.results import read_table, write_table  # noqa: E402
from repro.core.stage import Stage, run  # noqa: E402

COLUMNS = [
    "rung",
    "num_layers",
    "base_params",
    "adapter_type",
    "adapter_fraction",
    "w_agd",
    "fid_agd",
    "w_cfg",
    "fid_cfg",
    "ratio_mean",
    "ratio_std",
    "n",
    "verdict",
    "fidelity_mse",
]


def rung_rows(table: pd.DataFrame, rung: str, num_layers: int) -> list[dict]:
    """One row per adapter type of one rung's headline table (base checkpoint)."""
    rows = []
    base = table[table.checkpoint == "base"]
    for kind in adapter_types(base):
        claim = fid_claim(base, "AGD matches CFG", "agd", "cfg", "base", "", a_type=kind)
        w_agd, fid_agd = selected_fid(base, "agd", "base", kind)
        w_cfg, fid_cfg = selected_fid(base, "cfg", "base")
        agd = base[(base.method == "agd") & (base.adapter_type == kind)]
        # At CFG's selected w: how closely AGD reproduces the best CFG, at one w
        # for every adapter type (AGD's own selected w differs between types and rungs).
        at_w = agd[agd.guidance_scale == w_cfg]
        rows.append(
            dict(
                rung=rung,
                num_layers=num_layers,
                base_params=int(agd.base_params.iloc[0]),
                adapter_type=kind,
                adapter_fraction=float((agd.trainable_params / agd.base_params).iloc[0]),
                w_agd=w_agd,
                fid_agd=float(fid_agd.mean()),
                w_cfg=w_cfg,
                fid_cfg=float(fid_cfg.mean()),
                ratio_mean=claim.measured_mean,
                ratio_std=claim.measured_std,
                n=claim.n,
                verdict=claim.verdict,
                fidelity_mse=float(at_w.fidelity_mse.mean())
                if "fidelity_mse" in at_w
                else float("nan"),
            )
        )
    return rows


def ladder_figure(ladder: pd.DataFrame):
    """AGD / CFG FID ratio (left) and fidelity MSE to CFG (right) against base size."""
    from repro.agd.plots import adapter_label, adapter_style

    fig, (ratio_ax, fidelity_ax) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for kind, rows in ladder.groupby("adapter_type", sort=False):
        rows = rows.sort_values("base_params")
        style = {**adapter_style(kind), "label": adapter_label(kind)}
        ratio_ax.errorbar(
            rows.base_params, rows.ratio_mean, yerr=rows.ratio_std, capsize=3, lw=1.8, **style
        )
        fidelity_ax.plot(rows.base_params, rows.fidelity_mse, lw=1.8, **style)
    ratio_ax.axhline(1.0, color="k", lw=1)
    ratio_ax.axhline(1 + FID_TOLERANCE, color="k", ls="--", lw=1, label="claim's bound (+5 %)")
    rungs = ladder.drop_duplicates("rung").sort_values("base_params")
    for ax in (ratio_ax, fidelity_ax):
        ax.set_xscale("log")
        ax.set_xticks(rungs.base_params, [f"{n} blocks\n{p / 1e3:.0f}k" for n, p in zip(
            rungs.num_layers, rungs.base_params, strict=True)])  # fmt: skip
        ax.minorticks_off()
        ax.set_xlabel("base model (blocks, parameters)")
        ax.grid(alpha=0.3)
    ratio_ax.set_ylabel(
        "test FID AGD / CFG, each at its val-selected w\n(below the bound: claim holds)"
    )
    ratio_ax.set_title("AGD vs CFG across base sizes (mean ± std over seeds)", fontsize=10)
    fidelity_ax.set_ylabel("pixel MSE to the CFG sample\n(same noise, class, w), lower is better")
    fidelity_ax.set_title("fidelity to CFG at CFG's val-selected w", fontsize=10)
    handles, labels = ratio_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=8,
               bbox_to_anchor=(0.5, -0.08))  # fmt: skip
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output ladder table (CSV)")
    stage.parser.add_argument("--tables", nargs="+", required=True, help="one per rung")
    stage.parser.add_argument("--figure", required=True, help="output figure (PNG)")
    args = stage.start(argv)
    rungs = stage.params["rungs"]
    if len(rungs) != len(args.tables):
        raise ReproInputError(
            f"--tables: {len(args.tables)} tables for {len(rungs)} rungs "
            f"{[r['name'] for r in rungs]}"
        )
    rows = []
    for rung, path in zip(rungs, args.tables, strict=True):
        rows += rung_rows(read_table(path, required=EVAL_COLUMNS), rung["name"], rung["num_layers"])
    ladder = pd.DataFrame(rows, columns=COLUMNS)
    write_table(ladder, args.out)
    fig = ladder_figure(ladder)
    with atomic_write(args.figure) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)
    for row in ladder.itertuples():
        print(
            f"[{row.verdict}] {row.rung} ({row.num_layers} blocks) {row.adapter_type}: "
            f"AGD/CFG {row.ratio_mean:.3f} ± {row.ratio_std:.3f}"
        )
    stage.finish(
        {f"{r.rung}_{r.adapter_type}_ratio": r.ratio_mean for r in ladder.itertuples()},
        artifacts=[args.out, args.figure],
    )


if __name__ == "__main__":
    run(main)

"""Stage fedre_ablation: FedRE with one part of its entanglement changed, one seed.

The paper's ablations (CIFAR-100, Dirichlet), on the many-class task here:
- the weights redrawn every round (FedRE) or drawn once and kept (`fixed`;
  paper: 46.36 vs 45.84);
- what is mixed: random weights (FedRE's random average of the prototypes), a uniform
  average, or one prototype at a time (one-hot);
- the distribution of the random weights: U(0, 1) normalised (FedRE) or uniform over
  the simplex (Dirichlet(1)).

Every variant runs from the same clients as FedRE itself (same data, architectures,
initial weights and data order), so a difference is the variant's.

Output (--out, ABLATION_COLUMNS): one row per variant, from its sample-weighted accuracy
per round (repro.fedre.table.summary_table): final and mean of the last rounds.

    python -m repro.fedre.ablation --data data/fedre/glyphs.safetensors \
        --params '{... the simulation's params ..., "variants": {"fixed":
                   {"resample_weights": false}, ...}}' \
        --out results/fedre/runs/ablation_s0.csv --metrics ....json
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from repro.core.errors import ReproInputError
from repro.core.results import write_table
from repro.core.stage import Stage, run
from repro.fedre.algorithms import Hyper
from repro.fedre.simulate import client_data, load_task, simulate_algorithm
from repro.fedre.table import ABLATION_COLUMNS, ROUND_COLUMNS, summary_table

log = logging.getLogger("repro")

REFERENCE = "fedre"  # the variant name of FedRE as configured
VARIANT_KEYS = ("entangle", "resample_weights")


def variant_hypers(base: Hyper, variants: dict) -> dict[str, Hyper]:
    """FedRE as configured ("fedre") and each variant: `base` with the variant's keys."""
    out = {REFERENCE: base}
    for name, change in variants.items():
        if name == REFERENCE:
            raise ReproInputError(f"fedre.ablation.variants.{name}: the reference's own name")
        unknown = sorted(set(change) - set(VARIANT_KEYS))
        if unknown or not change:
            raise ReproInputError(
                f"fedre.ablation.variants.{name}: {unknown or 'nothing'} to change "
                f"(allowed keys: {list(VARIANT_KEYS)})"
            )
        out[name] = dataclasses.replace(base, **change)
    return out


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="fedre", out="ablation rows (CSV)", metrics=True)
    stage.parser.add_argument("--data", nargs="+", required=True, help="the task's data files")
    args = stage.start(argv)
    fr = stage.params
    seed, task = int(fr["seed"]), str(fr["task"])
    hypers = variant_hypers(Hyper.from_config(fr), dict(fr.get("variants") or {}))
    images, labels, num_classes = load_task(args.data, task)
    data = client_data(fr, images, labels, seed)
    keys = {"task": task, "partition": fr["partition"], "seed": seed}
    rows = []
    for name, hp in hypers.items():
        r, _ = simulate_algorithm(
            "fedre",
            data,
            list(fr["clients"]),
            hp,
            rounds=int(fr["rounds"]),
            in_channels=images.shape[1],
            image_size=images.shape[-1],
            rep_dim=int(fr["rep_dim"]),
            num_classes=num_classes,
            seed=seed,
            keys=keys,
        )
        summary = summary_table(pd.DataFrame(r, columns=ROUND_COLUMNS), int(fr["last_rounds"]))
        (row,) = summary.to_dict("records")
        rows.append(
            {
                **row,
                "variant": name,
                "entangle": hp.entangle,
                "resample_weights": hp.resample_weights,
            }
        )
        log.info("%s: last-rounds accuracy %.3f", name, row["last_mean_accuracy"])
    table = pd.DataFrame(rows)[ABLATION_COLUMNS]
    write_table(table, args.out)
    metrics = {f"last_mean_accuracy_{r['variant']}": r["last_mean_accuracy"] for r in rows}
    stage.finish(metrics)


if __name__ == "__main__":
    run(main)

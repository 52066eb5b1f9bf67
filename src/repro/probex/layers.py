"""Stage probex_layers: which layer of a tree tells most about a fine-tune's classes? Every
eligible layer of every tree (the manifest's layers: each weight but the head's, a
conv's flattened to out x in*kh*kw) probed by its own ProbeX, trained, chosen and scored
as repro.probex.probe trains them. The paper's per-layer curve, and its advice to probe
the layer that validates best.

    python -m repro.probex.layers --zoo data/probex/zoo/vit_a/manifest.json \
        --zoo data/probex/zoo/vit_b/manifest.json --zoo data/probex/zoo/cnn/manifest.json \
        --out results/probex/runs/layers_s0.csv --metrics results/probex/runs/layers_s0.json \
        --params '{"seed": 0, "trees": [{"name": "vit_a", "layer": "blocks.1.attn.proj"}, ..],
                   "probe": {...}}'

(the same --params as probex_probe: its trees' `layer` is not read here). One row per
tree x layer, columns ROW_COLUMNS; `chosen` marks each tree's layer of best validation
accuracy (ties: lower validation loss, then name order); test accuracy never chooses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from repro.core.cli import require
from repro.core.results import write_table
from repro.core.stage import Stage, run
from repro.probex.model import count_parameters
from repro.probex.probe import (
    SECTION,
    load_zoos,
    probe_settings,
    train_and_score,
    tree_data,
    tree_layers,
)
from repro.probex.table import LAYER_COLUMNS
from repro.probex.zoo import Zoo

log = logging.getLogger(__name__)

ROW_COLUMNS = LAYER_COLUMNS  # the table's contract (repro.probex.table)


def probe_layers(
    zoos: Sequence[Zoo], params: Mapping, device: torch.device | str = "cpu"
) -> pd.DataFrame:
    """A ProbeX per layer of every zoo (probex.trees order, layers by name): ROW_COLUMNS rows."""
    settings = probe_settings(params)
    seed = int(require(params, "seed", SECTION))
    order = list(tree_layers(params, zoos))
    rows = []
    for zoo in sorted(zoos, key=lambda z: order.index(z.tree)):
        tree_rows = []
        for layer in sorted(zoo.layers):
            data = tree_data(zoo, layer)
            model, fit, test = train_and_score("probex", settings, data.X, data.Y, seed, device)
            out, inp = data.shape
            log.info(
                "%s %s (%dx%d): val %.3f test %.3f, %.1f s",
                zoo.tree,
                layer,
                out,
                inp,
                fit.val_accuracy,
                test,
                fit.seconds,
            )
            tree_rows.append(
                dict(
                    tree=zoo.tree,
                    layer=layer,
                    shape=f"{out} x {inp}",
                    seed=seed,
                    val_accuracy=fit.val_accuracy,
                    test_accuracy=test,
                    parameters=count_parameters(model),
                    chosen=False,
                    _val_loss=fit.val_loss,
                )
            )
        best = min(
            range(len(tree_rows)),
            key=lambda i: (
                -tree_rows[i]["val_accuracy"],
                tree_rows[i]["_val_loss"],
                tree_rows[i]["layer"],
            ),
        )
        tree_rows[best]["chosen"] = True
        rows += tree_rows
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def chosen_metrics(table: pd.DataFrame) -> dict:
    """Each tree's chosen layer's accuracies as flat metrics, and the layers probed."""
    metrics = {"layers": len(table)}
    for record in table[table["chosen"]].to_dict("records"):
        for key in ("val_accuracy", "test_accuracy"):
            if not math.isnan(record[key]):
                metrics[f"{record['tree']}/chosen/{key}"] = record[key]
    return metrics


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="probex", out="the per-layer table (.csv)", metrics=True)
    stage.parser.add_argument(
        "--zoo", action="append", required=True, help="a tree's zoo manifest (once per tree)"
    )
    args = stage.start(argv)
    table = probe_layers(load_zoos(args.zoo), stage.params, stage.device)
    if stage.is_main:
        write_table(table, args.out)
        stage.finish(
            {"seconds": time.perf_counter() - stage.started, **chosen_metrics(table)},
            artifacts=[args.out],
        )


if __name__ == "__main__":
    run(main)

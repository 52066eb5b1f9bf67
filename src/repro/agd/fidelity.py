"""Stage agd_fidelity: how closely each distilled sampler simulates CFG, sample by sample.

AGD's claim is that one forward of base + adapters simulates classifier-free
guidance. FID compares distributions; this stage compares samples: every method
draws the same evaluation noise in the same class order (repro.agd.evaluate), so
sample i of a distilled method at (seed, w) and CFG's sample i at (seed, w) start
from the same x_T with the same class, and with a deterministic sampler would be
equal if the distillation were exact. Per row:

    fidelity_mse      mean over samples and pixels of (x - x_cfg)^2, images in [-1, 1]
    fidelity_feature  mean over samples of ||f(x) - f(x_cfg)||_2, f = the feature network
                      of FID (digit classifier at tiny scale, Inception-v3 at paper scale)

No guidance ("none", one row at w = 1) is compared with CFG at every w of the grid:
that is the distance guidance itself makes, the scale against which to read the
distilled methods' (its rows are in this stage's table, not in the headline table).

    python -m repro.agd.fidelity --samples data/agd/samples/base/*.safetensors \
        --classifier models/core/digit_classifier.safetensors \
        --out results/agd/fidelity/base.csv --params '{...}'
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from repro.agd.table import FIDELITY_COLUMNS, KEYS
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors
from repro.core.metrics import feature_networks
from repro.core.results import write_table
from repro.core.stage import Stage, run

log = logging.getLogger(__name__)

SAMPLES_KIND = "agd_samples"  # written by repro.agd.evaluate.save_samples


def read_samples(path) -> list[tuple[dict, torch.Tensor]]:
    """(row key, images [n, C, H, W]) of every row of one samples file."""
    tensors, meta = load_tensors(path, kind=SAMPLES_KIND, required=("images",))
    rows = meta.get("rows")
    images = tensors["images"]
    if not isinstance(rows, list) or len(rows) != len(images):
        raise ReproInputError(
            f"{path}: metadata 'rows' does not list the {len(images)} image sets it holds"
        )
    return list(zip(rows, images, strict=True))


def pairwise_fidelity(images: torch.Tensor, cfg: torch.Tensor, features) -> dict:
    """Mean pixel MSE and mean feature L2 between paired samples (same index = same noise)."""
    if images.shape != cfg.shape:
        raise ReproInputError(
            f"samples of shape {tuple(images.shape)} cannot pair with CFG's {tuple(cfg.shape)}"
        )
    mse = float(((images.double() - cfg.double()) ** 2).mean())
    distance = (features(images).double() - features(cfg).double()).norm(dim=1).mean()
    return {"fidelity_mse": mse, "fidelity_feature": float(distance)}


def fidelity_table(samples: list[tuple[dict, torch.Tensor]], features) -> pd.DataFrame:
    """One row per non-CFG row that has a CFG counterpart (same checkpoint, seed, w);
    "none" is compared with CFG at every w of its checkpoint and seed."""
    cfg = {
        (key["checkpoint"], key["seed"], round(float(key["guidance_scale"]), 6)): images
        for key, images in samples
        if key["method"] == "cfg"
    }
    rows = []
    for key, images in samples:
        if key["method"] in ("cfg", "real"):
            continue
        if key["method"] == "none":
            targets = [
                (w, ref)
                for (ckpt, seed, w), ref in cfg.items()
                if ckpt == key["checkpoint"] and seed == key["seed"]
            ]
        else:
            w = round(float(key["guidance_scale"]), 6)
            ref = cfg.get((key["checkpoint"], key["seed"], w))
            targets = [] if ref is None else [(w, ref)]
        for w, ref in sorted(targets, key=lambda pair: pair[0]):
            rows.append({**key, "guidance_scale": w, **pairwise_fidelity(images, ref, features)})
    return pd.DataFrame(rows, columns=KEYS + FIDELITY_COLUMNS)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output table (CSV)")
    stage.parser.add_argument("--samples", nargs="+", required=True, help="samples files")
    stage.parser.add_argument("--classifier", required=True, help="feature network")
    args = stage.start(argv)
    params = {**stage.params, "classifier": args.classifier}
    features, _ = feature_networks(params, device=stage.device)
    samples = [row for path in args.samples for row in read_samples(path)]
    if not any(key["method"] == "cfg" for key, _ in samples):
        raise ReproInputError(f"--samples: no CFG samples among {args.samples}")
    table = fidelity_table(samples, torch.no_grad()(features))
    write_table(table, args.out)
    for (method, kind), g in table.groupby(["method", "adapter_type"]):
        log.info("%s (%s): mean fidelity MSE %.4f", method, kind, g.fidelity_mse.mean())
    stage.finish(
        {"rows": len(table), "mean_fidelity_mse": float(table.fidelity_mse.mean())},
        artifacts=[args.out],
    )


if __name__ == "__main__":
    run(main)

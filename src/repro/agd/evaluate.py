"""Stage agd_eval: FID and Inception Score of one method on one checkpoint, per seed,
over the grid of guidance scales, plus NFEs per image and images per second.

`--method real` scores real training digits against the test digits: the floor
any generator can reach with this feature network and sample count.

    python -m repro.agd.evaluate --method agd --checkpoint models/agd/base --checkpoint-name base \
        --seeds 0 1 --adapters models/agd/adapters/cfg_s0.safetensors models/agd/adapters/cfg_s1.safetensors \
        --reference data/digits/test.safetensors --validation data/digits/val.safetensors --classifier models/core/digit_classifier.safetensors \
        --out results/agd/eval/base/agd.csv --params '{...}'
"""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from repro.agd.methods import GUIDED, load_decoder, load_method
from repro.agd.table import COLUMNS
from repro.core.data import load_image_dataset
from repro.core.diffusion import sample, sample_generator, scheduler_from_params
from repro.core.errors import ReproInputError
from repro.core.metrics import build_scorer
from repro.core.results import write_table
from repro.core.stage import Stage, run

log = logging.getLogger(__name__)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def generate(method, scheduler, shape, labels, steps, scale, batch_size, seed, decode=None):
    """Sample len(labels) images in batches; returns (images, nfe per image, images/s).

    `decode` maps latents to images (paper scale); its time counts in images/s. The
    method samples on its own device; the images come back on the CPU, with `labels`.
    """
    images, nfe, seconds = [], 0, 0.0
    for i, start in enumerate(range(0, len(labels), batch_size)):
        gen = sample_generator(seed, i)
        tic = time.perf_counter()
        result = sample(
            method.denoiser,
            scheduler,
            labels=labels[start : start + batch_size],
            shape=shape,
            steps=steps,
            guidance=method.guidance(scale),
            generator=gen,
        )
        batch = result.images if decode is None else decode(result.images)
        seconds += time.perf_counter() - tic
        images.append(batch)
        nfe = result.nfe_per_image
    return torch.cat(images), nfe, len(labels) / seconds


def score(scorers: dict, images: torch.Tensor) -> dict:
    """FID against the test reference (reported) and the val reference (for selection)."""
    test = scorers["test"].score(images)
    return {
        "fid": test["fid"],
        "inception_score": test["inception_score"],
        "fid_val": scorers["val"].score(images)["fid"],
    }


def evaluate_seed(args, params, scorers, seed, adapters=None, gd=None, device=None) -> list[dict]:
    """Rows of one seed: each guidance scale of the grid (one row for unguided methods),
    the models on `device` (default: where they are loaded)."""
    n, steps = params["num_samples"], params["sampler"]["steps"]
    if args.method == "real":
        train = load_image_dataset(args.train, kind="digits")
        idx = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))[:n]
        scores = score(scorers, train.images[idx])
        return [
            dict(
                method="real",
                checkpoint="data",
                guidance_scale=float("nan"),
                steps=0,
                nfe=0,
                seed=seed,
                images_per_s=float("nan"),
                trainable_params=0,
                base_params=0,
                **scores,
            )
        ]
    method = load_method(args.method, args.checkpoint, adapters, gd, device=device)
    decode = load_decoder(
        params.get("vae"),
        params.get("local_files_only", True),
        params.get("cache_dir"),
        device=device,
    )
    labels = balanced_labels(n, method.num_classes)
    scheduler = scheduler_from_params(params["sampler"])
    scales = params["guidance_scales"] if args.method in GUIDED else [1.0]
    rows = []
    for scale in scales:
        images, nfe, speed = generate(
            method,
            scheduler,
            method.image_shape,
            labels,
            steps,
            scale,
            params["batch_size"],
            seed,
            decode,
        )
        scores = score(scorers, images.clamp(-1, 1))
        log.info(
            "%s w=%.2f seed=%d: fid %.3f, IS %.3f, %.0f img/s",
            args.method,
            scale,
            seed,
            scores["fid"],
            scores["inception_score"],
            speed,
        )
        rows.append(
            dict(
                method=args.method,
                checkpoint=args.checkpoint_name,
                guidance_scale=scale,
                steps=steps,
                nfe=nfe,
                seed=seed,
                images_per_s=speed,
                trainable_params=method.trainable_params,
                base_params=method.base_params,
                **scores,
            )
        )
    return rows


def per_seed(values: list[str] | None, seeds: list[int], flag: str) -> list:
    """One model file per seed (adapters and GD are trained per seed), or None for all."""
    if not values:
        return [None] * len(seeds)
    if len(values) != len(seeds):
        raise ReproInputError(f"{flag}: {len(values)} paths for {len(seeds)} seeds {seeds}")
    return values


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output table (CSV)")
    add = stage.parser.add_argument
    add("--method", required=True)
    add("--checkpoint", required=True, help="DiT directory to sample from")
    add("--checkpoint-name", required=True, help="label in the table")
    add("--seeds", type=int, nargs="+", required=True)
    add("--adapters", nargs="+", default=None, help="one file per seed")
    add("--gd", nargs="+", default=None, help="one directory per seed")
    add("--train", default=None, help="real training images (method real)")
    add("--reference", required=True, help="held-out test images (reported)")
    add("--validation", required=True, help="held-out val images (selection)")
    add("--classifier", required=True, help="feature network")
    args = stage.start(argv)
    params = stage.params

    scorer_params = {**params, "classifier": args.classifier}
    scorers = {
        split: build_scorer(scorer_params, load_image_dataset(path).images, device=stage.device)
        for split, path in (("test", args.reference), ("val", args.validation))
    }
    adapters = per_seed(args.adapters, args.seeds, "--adapters")
    gds = per_seed(args.gd, args.seeds, "--gd")
    rows = []
    for seed, adapter, gd in zip(args.seeds, adapters, gds, strict=True):
        rows += evaluate_seed(args, params, scorers, seed, adapter, gd, device=stage.device)
    table = pd.DataFrame(rows)[COLUMNS]
    write_table(table, args.out)
    summary = table.groupby("guidance_scale", dropna=False).fid.mean()
    metrics = {f"fid_w{w:g}": float(f) for w, f in summary.items()}
    stage.finish(
        metrics,
        artifacts=[args.out],
        params={
            **params,
            "method": args.method,
            "checkpoint": args.checkpoint_name,
            "seeds": args.seeds,
        },
    )


if __name__ == "__main__":
    run(main)

"""Stage agd_eval: FID and Inception Score of one method on one checkpoint, per seed
(and per adapter type), over the grid of guidance scales, plus NFEs per image and
images per second. The samples are kept (`--samples`): repro.agd.fidelity compares
each distilled sample with the CFG sample of the same noise, class and w.

Every method draws the same evaluation noise (the "eval" sampling stream of each
seed, disjoint from the trajectories' stream), in the same batches and class order,
so sample i of any method at (seed, w) starts from the same x_T as CFG's sample i.

`--method real` scores real training digits against the test digits: the floor
any generator can reach with this feature network and sample count.

    python -m repro.agd.evaluate --method agd --checkpoint models/agd/base --checkpoint-name base \
        --seeds 0 1 --adapters models/agd/adapters/base/cfg_offset_s0.safetensors \
        models/agd/adapters/base/cfg_offset_s1.safetensors \
        --reference data/digits/test.safetensors --validation data/digits/val.safetensors \
        --classifier models/core/digit_classifier.safetensors \
        --out results/agd/eval/base/agd.csv --samples data/agd/samples/base/agd.safetensors \
        --params '{...}'

`--adapters` holds one file per (adapter type, seed), each seed once per type:
file i belongs to seed i mod len(seeds); its type is read from the file.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from repro.agd.fidelity import SAMPLES_KIND
from repro.agd.methods import GUIDED, NO_ADAPTER, load_decoder, load_method
from repro.agd.model import load_adapters
from repro.agd.table import EVAL_COLUMNS
from repro.core.data import load_image_dataset
from repro.core.diffusion import sample, sample_generator, scheduler_from_params
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
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
        gen = sample_generator(seed, i, "eval")
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


def evaluate_seed(
    args, params, scorers, seed, adapters=None, gd=None, device=None
) -> tuple[list[dict], list[torch.Tensor]]:
    """Rows of one model of one seed: each guidance scale of the grid (one row for
    unguided methods), with the samples of each row; the models on `device`
    (default: where they are loaded)."""
    n, steps = params["num_samples"], params["sampler"]["steps"]
    if args.method == "real":
        train = load_image_dataset(args.train, kind="digits")
        idx = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))[:n]
        scores = score(scorers, train.images[idx])
        row = dict(
            method="real",
            adapter_type=NO_ADAPTER,
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
        return [row], [train.images[idx]]
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
    rows, samples = [], []
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
        images = images.clamp(-1, 1)
        scores = score(scorers, images)
        log.info(
            "%s (%s) w=%.2f seed=%d: fid %.3f, IS %.3f, %.0f img/s",
            args.method,
            method.adapter_type,
            scale,
            seed,
            scores["fid"],
            scores["inception_score"],
            speed,
        )
        rows.append(
            dict(
                method=args.method,
                adapter_type=method.adapter_type,
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
        samples.append(images)
    return rows, samples


def per_seed(values: list[str] | None, seeds: list[int], flag: str) -> list:
    """One model file per seed (GD is trained per seed), or None for all."""
    if not values:
        return [None] * len(seeds)
    if len(values) != len(seeds):
        raise ReproInputError(f"{flag}: {len(values)} paths for {len(seeds)} seeds {seeds}")
    return values


def adapter_jobs(paths: list[str], seeds: list[int]) -> list[tuple[int, str]]:
    """(seed, file) of each adapter file: file i belongs to seed i mod len(seeds), and
    every adapter type (read from the file) must come once per seed."""
    if len(paths) % len(seeds):
        raise ReproInputError(
            f"--adapters: {len(paths)} files do not split over the {len(seeds)} seeds {seeds}"
        )
    jobs, seen = [], set()
    for i, path in enumerate(paths):
        seed = seeds[i % len(seeds)]
        kind = load_adapters(path).config["kind"]
        if (kind, seed) in seen:
            raise ReproInputError(f"{path}: a second {kind} adapter file for seed {seed}")
        seen.add((kind, seed))
        jobs.append((seed, path))
    return jobs


def save_samples(path, rows: list[dict], samples: list[torch.Tensor]) -> None:
    """The images of every row, [rows, n, C, H, W], with the rows' keys in the metadata."""
    keys = [
        {k: row[k] for k in ("method", "adapter_type", "checkpoint", "guidance_scale", "seed")}
        for row in rows
    ]
    save_tensors(path, {"images": torch.stack(samples)}, kind=SAMPLES_KIND, metadata={"rows": keys})


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output table (CSV)")
    add = stage.parser.add_argument
    add("--method", required=True)
    add("--checkpoint", required=True, help="DiT directory to sample from")
    add("--checkpoint-name", required=True, help="label in the table")
    add("--seeds", type=int, nargs="+", required=True)
    add("--adapters", nargs="+", default=None, help="one file per (adapter type, seed)")
    add("--gd", nargs="+", default=None, help="one directory per seed")
    add("--train", default=None, help="real training images (method real)")
    add("--reference", required=True, help="held-out test images (reported)")
    add("--validation", required=True, help="held-out val images (selection)")
    add("--classifier", required=True, help="feature network")
    add("--samples", required=True, help="output: the samples of every row (safetensors)")
    args = stage.start(argv)
    params = stage.params

    scorer_params = {**params, "classifier": args.classifier}
    scorers = {
        split: build_scorer(scorer_params, load_image_dataset(path).images, device=stage.device)
        for split, path in (("test", args.reference), ("val", args.validation))
    }
    if args.adapters:
        jobs = [(seed, path, None) for seed, path in adapter_jobs(args.adapters, args.seeds)]
    else:
        gds = per_seed(args.gd, args.seeds, "--gd")
        jobs = [(seed, None, gd) for seed, gd in zip(args.seeds, gds, strict=True)]
    rows, samples = [], []
    for seed, adapter, gd in jobs:
        job_rows, job_samples = evaluate_seed(
            args, params, scorers, seed, adapter, gd, device=stage.device
        )
        rows += job_rows
        samples += job_samples
    table = pd.DataFrame(rows)[EVAL_COLUMNS]
    save_samples(args.samples, rows, samples)
    write_table(table, args.out)
    summary = table.groupby(["adapter_type", "guidance_scale"], dropna=False).fid.mean()
    metrics = {
        (f"fid_w{w:g}" if kind == NO_ADAPTER else f"fid_{kind}_w{w:g}"): float(f)
        for (kind, w), f in summary.items()
    }
    stage.finish(
        metrics,
        artifacts=[args.out, args.samples],
        params={
            **params,
            "method": args.method,
            "checkpoint": args.checkpoint_name,
            "seeds": args.seeds,
        },
    )


if __name__ == "__main__":
    run(main)

"""Stage agd_trajectories: the training data of the adapters.

`cfg` (the paper's fix of the train/inference mismatch): run the CFG sampler
with w ~ U[w_min, w_max] per trajectory, `per_class` trajectories per class, and
store EVERY step as (x_t, t, class, w, eps_cfg), eps_cfg = eps_u + w (eps_c - eps_u).

`standard` (earlier guidance distillation, the ablation and GD's data):
forward-noise real training images to the same timesteps, x_t = q(x_t | x_0),
with the same CFG targets computed by the base at those x_t.

Shards are safetensors files of `shard_size` samples plus a manifest.json.

    python -m repro.agd.trajectories --kind cfg --base models/agd/base \
        --train data/digits/train.safetensors --out data/agd/trajectories/cfg --params '{...}'
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from repro.agd.model import load_dit, null_label
from repro.core.cli import parse_stage_args, stage_parser
from repro.core.data import load_image_dataset
from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DiTDenoiser,
    q_sample,
    sample,
    scheduler_from_params,
)
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, read_json, save_tensors, sha256_file, write_json

log = logging.getLogger(__name__)

SHARD_KIND = "agd_trajectory_shard"
FIELDS = ("x_t", "t", "labels", "w", "eps")


def trajectory_plan(num_classes: int, per_class: int, w_min: float, w_max: float, seed: int):
    """Class and guidance scale of every trajectory, seeded."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    w = w_min + (w_max - w_min) * torch.rand(len(labels), generator=gen)
    return labels, w


@torch.no_grad()
def cfg_trajectories(denoiser, scheduler, labels, w, shape, steps, null, batch_size, seed):
    """Run the CFG sampler and keep every step of every trajectory."""
    out = {k: [] for k in FIELDS}
    batches = range(0, len(labels), batch_size)
    for i, start in enumerate(tqdm(batches, desc="cfg trajectories", disable=None)):
        y, wb = labels[start : start + batch_size], w[start : start + batch_size]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        result = sample(
            denoiser,
            scheduler,
            labels=y,
            shape=shape,
            steps=steps,
            guidance=ClassifierFreeGuidance(wb, null),
            generator=gen,
            record=True,
        )
        traj = result.trajectory
        n_steps = traj["t"].shape[0]
        out["x_t"].append(traj["x_t"].flatten(0, 1))
        out["eps"].append(traj["eps"].flatten(0, 1))
        out["t"].append(traj["t"].repeat_interleave(len(y)))
        out["labels"].append(y.repeat(n_steps))
        out["w"].append(wb.repeat(n_steps))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def standard_trajectories(
    denoiser, scheduler, images, image_labels, labels, w, steps, null, batch_size, seed
):
    """Forward-noised real images at the sampler's timesteps, with CFG targets."""
    gen = torch.Generator().manual_seed(seed)
    # One real image of the right class per trajectory.
    x0 = torch.empty(len(labels), *images.shape[1:])
    for c in labels.unique():
        pool = torch.nonzero(image_labels == c).flatten()
        if len(pool) == 0:
            raise ReproInputError(f"training data has no image of class {int(c)}")
        rows = torch.nonzero(labels == c).flatten()
        x0[rows] = images[pool[torch.randint(len(pool), (len(rows),), generator=gen)]]
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.long()
    out = {k: [] for k in FIELDS}
    for t in tqdm(timesteps, desc="standard trajectories", disable=None):
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            wb = w[start : start + batch_size]
            x0b = x0[start : start + batch_size]
            tb = torch.full((len(y),), int(t), dtype=torch.long)
            noise = torch.randn(x0b.shape, generator=gen)
            x_t = q_sample(scheduler, x0b, noise, tb)
            eps = ClassifierFreeGuidance(wb, null)(denoiser, x_t, tb, y)
            for key, value in zip(FIELDS, (x_t, tb, y, wb, eps), strict=True):
                out[key].append(value)
    return {k: torch.cat(v) for k, v in out.items()}


def write_shards(out_dir, data: dict, shard_size: int, meta: dict) -> None:
    """Write the samples as shards plus a manifest (written last: its presence means complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(data["t"])
    shards = []
    for i in range(math.ceil(n / shard_size)):
        path = out_dir / f"shard_{i:05d}.safetensors"
        chunk = {k: v[i * shard_size : (i + 1) * shard_size] for k, v in data.items()}
        save_tensors(path, chunk, kind=SHARD_KIND, metadata=meta)
        shards.append({"file": path.name, "samples": len(chunk["t"]), "sha256": sha256_file(path)})
    write_json(out_dir / "manifest.json", {**meta, "samples": n, "shards": shards})


def load_trajectories(directory) -> dict[str, torch.Tensor]:
    """All samples of a trajectory directory, checked against its manifest."""
    directory = Path(directory)
    manifest = read_json(directory / "manifest.json")
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ReproInputError(f"{directory / 'manifest.json'}: not a trajectory manifest")
    parts = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        tensors, _ = load_tensors(path, kind=SHARD_KIND, required=FIELDS)
        if len(tensors["t"]) != shard["samples"]:
            raise ReproInputError(
                f"{path}: holds {len(tensors['t'])} samples, manifest says {shard['samples']}"
            )
        parts.append(tensors)
    if not parts:
        raise ReproInputError(f"{directory}: the manifest lists no shards")
    return {k: torch.cat([p[k] for p in parts]) for k in FIELDS}


def main(argv=None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--kind", choices=["cfg", "standard"], required=True)
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--train", required=True, help="real training images (standard kind)")
    parser.add_argument("--out", required=True, help="output directory of shards")
    args = parse_stage_args(parser, argv)
    p = args.params

    model = load_dit(args.base).eval()
    denoiser = DiTDenoiser(model)
    null = null_label(model)
    scheduler = scheduler_from_params(p["sampler"])
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels, w = trajectory_plan(
        cfg.num_embeds_ada_norm, p["per_class"], p["w_min"], p["w_max"], p["seed"]
    )
    steps = p["sampler"]["steps"]
    if args.kind == "cfg":
        data = cfg_trajectories(
            denoiser, scheduler, labels, w, shape, steps, null, p["batch_size"], p["seed"]
        )
    else:
        real = load_image_dataset(args.train, kind="digits")
        data = standard_trajectories(
            denoiser,
            scheduler,
            real.images,
            real.labels,
            labels,
            w,
            steps,
            null,
            p["batch_size"],
            p["seed"],
        )
    meta = {"kind": args.kind, "trajectories": len(labels), "steps": steps, "params": p}
    write_shards(args.out, data, p["shard_size"], meta)
    log.info("%s trajectories: %d samples in %s", args.kind, len(data["t"]), args.out)


if __name__ == "__main__":
    main()

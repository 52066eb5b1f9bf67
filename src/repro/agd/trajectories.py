"""Stage agd_trajectories: the training data of the adapters.

`cfg` (the paper's fix of the train/inference mismatch): run the CFG sampler
with w ~ U[w_min, w_max] per trajectory, `per_class` trajectories per class, and
store EVERY step as (x_t, t, class, w, eps_cfg), eps_cfg = eps_u + w (eps_c - eps_u).

`standard` (earlier guidance distillation, the ablation and GD's data):
forward-noise real training images to the same timesteps, x_t = q(x_t | x_0),
with the same CFG targets computed by the base at those x_t. With
`standard_noise: per_path` (default) each path keeps one noise for all its
timesteps, so both kinds hold the same number of noise paths (equal diversity:
the ablation then compares where the states lie, not how many draws there are);
`per_step` draws fresh noise at every step (more diverse than the CFG set).

Both kinds draw from the pipeline seed's "trajectories" sampling stream
(repro.core.diffusion.sample_generator), disjoint from the evaluation's.

Shards are safetensors files of `shard_size` samples plus a manifest.json,
written as they fill (memory stays bounded by a shard and a batch of
trajectories) and read back memory-mapped (`TrajectoryStore`), so the paper
scale's ~1M stored steps (about 32 GB) never have to fit in memory.

    python -m repro.agd.trajectories --kind cfg --base models/agd/base \
        --train data/digits/train.safetensors --out data/agd/trajectories/base/cfg_s0 --params '{...}'
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from repro.core.data import load_image_dataset
from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DiTDenoiser,
    eps_of,
    module_device,
    q_sample,
    sample,
    sample_generator,
    scheduler_from_params,
)
from repro.core.errors import ReproInputError
from repro.core.io import map_tensors, read_json, save_tensors, sha256_file, write_json
from repro.core.modelio import load_dit, null_label
from repro.core.stage import Stage, run

log = logging.getLogger(__name__)

SHARD_KIND = "agd_trajectory_shard"
FIELDS = ("x_t", "t", "labels", "w", "eps")
STANDARD_NOISE = ("per_path", "per_step")


def trajectory_plan(num_classes: int, per_class: int, w_min: float, w_max: float, seed: int):
    """Class and guidance scale of every trajectory, seeded."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    w = w_min + (w_max - w_min) * torch.rand(len(labels), generator=gen)
    return labels, w


@torch.no_grad()
def cfg_trajectories(denoiser, scheduler, labels, w, shape, steps, null, batch_size, seed, out):
    """Run the CFG sampler and hand every step of every trajectory to `out` (a ShardWriter).

    The sampler runs on the denoiser's device; the trajectories come back on the CPU.
    """
    batches = range(0, len(labels), batch_size)
    for i, start in enumerate(tqdm(batches, desc="cfg trajectories", disable=None)):
        y, wb = labels[start : start + batch_size], w[start : start + batch_size]
        gen = sample_generator(seed, i, "trajectories")
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
        out.add(
            x_t=traj["x_t"].flatten(0, 1),
            t=traj["t"].repeat_interleave(len(y)),
            labels=y.repeat(n_steps),
            w=wb.repeat(n_steps),
            eps=traj["eps"].flatten(0, 1),
        )


@torch.no_grad()
def standard_trajectories(
    denoiser,
    scheduler,
    images,
    image_labels,
    labels,
    w,
    steps,
    null,
    batch_size,
    seed,
    out,
    noise: str = "per_path",
):
    """Forward-noised real images at the sampler's timesteps, with CFG targets, into `out`.

    `noise`: "per_path" (one noise per trajectory, reused at every timestep: as many
    noise paths as the CFG set) or "per_step" (fresh noise at every step). Images and
    noise are drawn on the CPU; the targets are computed on the denoiser's device.
    """
    if noise not in STANDARD_NOISE:
        raise ReproInputError(
            f"agd.trajectories.standard_noise: {noise!r} is not one of {STANDARD_NOISE}"
        )
    device = module_device(denoiser, images.device)
    gen = sample_generator(seed, 0, "trajectories")
    # One real image of the right class per trajectory.
    x0 = torch.empty(len(labels), *images.shape[1:])
    for c in labels.unique():
        pool = torch.nonzero(image_labels == c).flatten()
        if len(pool) == 0:
            raise ReproInputError(f"training data has no image of class {int(c)}")
        rows = torch.nonzero(labels == c).flatten()
        x0[rows] = images[pool[torch.randint(len(pool), (len(rows),), generator=gen)]]
    path_noise = torch.randn(x0.shape, generator=gen)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.long()
    for t in tqdm(timesteps, desc="standard trajectories", disable=None):
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            wb = w[start : start + batch_size]
            x0b = x0[start : start + batch_size]
            tb = torch.full((len(y),), int(t), dtype=torch.long)
            if noise == "per_path":
                eps = path_noise[start : start + batch_size]
            else:
                eps = torch.randn(x0b.shape, generator=gen)
            x_t = q_sample(scheduler, x0b, eps, tb)
            guided = ClassifierFreeGuidance(wb, null)(
                denoiser, x_t.to(device), tb.to(device), y.to(device)
            )
            out.add(x_t=x_t, t=tb, labels=y, w=wb, eps=eps_of(guided, x_t))


class ShardWriter:
    """Buffer samples and write a shard whenever `shard_size` of them are ready.

    The manifest is written last, by `close`: its presence means the set is complete.
    """

    def __init__(self, out_dir, shard_size: int, meta: dict):
        self.out_dir, self.shard_size, self.meta = Path(out_dir), shard_size, meta
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.buffer: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, **fields: torch.Tensor) -> None:
        if set(fields) != set(FIELDS):
            raise ValueError(f"a trajectory sample has fields {FIELDS}, got {sorted(fields)}")
        for key, value in fields.items():
            self.buffer[key].append(value.detach().cpu())
        self.buffered += len(fields["t"])
        while self.buffered >= self.shard_size:
            self._write(self.shard_size)

    def _write(self, n: int) -> None:
        data = {k: torch.cat(v) for k, v in self.buffer.items()}
        path = self.out_dir / f"shard_{len(self.shards):05d}.safetensors"
        chunk = {k: v[:n] for k, v in data.items()}
        save_tensors(path, chunk, kind=SHARD_KIND, metadata=self.meta)
        self.shards.append({"file": path.name, "samples": n, "sha256": sha256_file(path)})
        self.buffer = {k: [v[n:]] for k, v in data.items()}
        self.buffered -= n

    def close(self) -> int:
        """Write the last, partial shard and the manifest; the number of samples written."""
        if self.buffered:
            self._write(self.buffered)
        total = sum(s["samples"] for s in self.shards)
        manifest = {**self.meta, "samples": total, "shards": self.shards}
        write_json(self.out_dir / "manifest.json", manifest)
        return total


def write_shards(out_dir, data: dict, shard_size: int, meta: dict) -> None:
    """Write in-memory samples as shards plus a manifest."""
    writer = ShardWriter(out_dir, shard_size, meta)
    writer.add(**data)
    writer.close()


class TrajectoryStore:
    """The samples of a trajectory directory, memory-mapped, checked against its manifest.

    `store[rows]` gathers rows by global index (any order, repeats allowed) and reads
    only their pages, so a random minibatch costs memory for the batch, not the set.
    """

    def __init__(self, directory):
        directory = Path(directory)
        manifest = read_json(directory / "manifest.json")
        if not isinstance(manifest, dict) or "shards" not in manifest:
            raise ReproInputError(f"{directory / 'manifest.json'}: not a trajectory manifest")
        if not manifest["shards"]:
            raise ReproInputError(f"{directory}: the manifest lists no shards")
        self.shards = []
        for shard in manifest["shards"]:
            path = directory / shard["file"]
            tensors, _ = map_tensors(path, kind=SHARD_KIND, required=FIELDS)
            lengths = {len(tensors[k]) for k in FIELDS}
            if lengths != {shard["samples"]}:
                raise ReproInputError(
                    f"{path}: holds {sorted(lengths)} samples, manifest says {shard['samples']}"
                )
            self.shards.append(tensors)
        sizes = torch.tensor([s["samples"] for s in manifest["shards"]])
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)})")
        shard_of = torch.searchsorted(self.starts, rows, right=True) - 1
        first = self.shards[0]
        out = {k: first[k].new_empty((len(rows), *first[k].shape[1:])) for k in FIELDS}
        for s in shard_of.unique().tolist():
            pick = torch.nonzero(shard_of == s).flatten()
            local = rows[pick] - self.starts[s]
            for k in FIELDS:
                out[k][pick] = self.shards[s][k][local]
        return out

    def all(self) -> dict[str, torch.Tensor]:
        return self[torch.arange(len(self))]


def load_trajectories(directory) -> dict[str, torch.Tensor]:
    """All samples of a trajectory directory in memory (small scales, tests)."""
    return TrajectoryStore(directory).all()


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output directory of shards")
    stage.parser.add_argument("--kind", choices=["cfg", "standard"], required=True)
    stage.parser.add_argument("--base", required=True, help="base model directory")
    stage.parser.add_argument("--train", required=True, help="real training images (standard kind)")

    args = stage.start(argv)
    p = stage.params

    model = load_dit(args.base).eval().to(stage.device)
    denoiser = DiTDenoiser(model)
    null = null_label(model)
    scheduler = scheduler_from_params(p["sampler"])
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels, w = trajectory_plan(
        cfg.num_embeds_ada_norm, p["per_class"], p["w_min"], p["w_max"], p["seed"]
    )
    steps = p["sampler"]["steps"]
    meta = {"kind": args.kind, "trajectories": len(labels), "steps": steps, "params": p}
    out = ShardWriter(args.out, p["shard_size"], meta)
    if args.kind == "cfg":
        cfg_trajectories(
            denoiser, scheduler, labels, w, shape, steps, null, p["batch_size"], p["seed"], out
        )
    else:
        real = load_image_dataset(args.train, kind="digits")
        standard_trajectories(
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
            out,
            noise=p.get("standard_noise", "per_path"),
        )
    total = out.close()
    log.info("%s trajectories: %d samples in %s", args.kind, total, args.out)


if __name__ == "__main__":
    run(main)

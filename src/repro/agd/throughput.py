"""AGD vs CFG sampling throughput (images/s) at equal steps and batch, written to CSV.

AGD needs one forward pass per step, CFG two (batched), so the ceiling of the
speed-up is 2x; the adapters' own cost is what keeps it below. Run with every
core given to it (the Snakemake rule asks for all cores) and nothing else beside.

    python -m repro.agd.throughput --base models/agd/base \
        --adapters models/agd/adapters/base/cfg_offset_s0.safetensors --out results/agd_throughput.csv \
        --params '{"batch_size": 500, "steps": 25, "repeats": 3, "sampler": {...}}'
"""

from __future__ import annotations

import platform
import time

import pandas as pd
import torch

from repro.agd.methods import load_method
from repro.core.diffusion import sample, scheduler_from_params
from repro.core.results import write_table
from repro.core.stage import Stage, describe_device, run


@torch.no_grad()
def time_method(method, scheduler, batch_size: int, steps: int, scale: float, seed: int) -> float:
    labels = torch.arange(batch_size) % method.num_classes
    gen = torch.Generator().manual_seed(seed)
    tic = time.perf_counter()
    # sample() returns the images on the labels' device (the CPU): that copy waits for
    # a GPU to finish, so the clock stops after the work, not after its launch.
    sample(
        method.denoiser,
        scheduler,
        labels=labels,
        shape=method.image_shape,
        steps=steps,
        guidance=method.guidance(scale),
        generator=gen,
    )
    return time.perf_counter() - tic


def measure_pairs(
    methods: dict, scheduler, batch_size: int, steps: int, scale: float, pairs: int, device: str
) -> pd.DataFrame:
    """Time `pairs` pairs: in each, CFG and AGD back to back, CFG first in even pairs.

    One row per method and pair (`repeat` is the pair), with `position` (0: timed
    first in its pair) and `speedup`, the pair's AGD / CFG images/s, on both rows;
    `device` says where the methods ran.
    A pair's two timings are seconds apart, so a change in the machine's load hits
    both; alternating the order cancels what being first (or second) does.
    """
    rows = []
    for pair in range(pairs):
        order = ["cfg", "agd"] if pair % 2 == 0 else ["agd", "cfg"]
        for position, name in enumerate(order):
            m = methods[name]
            seconds = time_method(m, scheduler, batch_size, steps, scale, pair)
            rows.append(
                dict(
                    method=name,
                    repeat=pair,
                    position=position,
                    batch_size=batch_size,
                    steps=steps,
                    nfe=steps * m.guidance(scale).nfe_per_step,
                    seconds=seconds,
                    images_per_s=batch_size / seconds,
                    threads=torch.get_num_threads(),
                    device=device,
                    machine=platform.processor() or platform.machine(),
                )
            )
            print(f"pair {pair}, {name}: {batch_size / seconds:.1f} images/s", flush=True)
        agd, cfg = (r["images_per_s"] for r in sorted(rows[-2:], key=lambda r: r["method"]))
        for row in rows[-2:]:
            row["speedup"] = agd / cfg
        print(f"pair {pair}: AGD / CFG = {agd / cfg:.3f}", flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output table (CSV)")
    stage.parser.add_argument("--base", required=True)
    stage.parser.add_argument("--adapters", required=True)
    stage.parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = stage.start(argv)
    p = stage.params
    scheduler = scheduler_from_params(p["sampler"])
    methods = {
        "cfg": load_method("cfg", args.base, device=stage.device),
        "agd": load_method("agd", args.base, adapters=args.adapters, device=stage.device),
    }
    # Warm-up: first calls allocate and pick kernels.
    for m in methods.values():
        time_method(m, scheduler, min(p["batch_size"], 32), 2, args.guidance_scale, 0)
    table = measure_pairs(
        methods,
        scheduler,
        p["batch_size"],
        p["steps"],
        args.guidance_scale,
        p["repeats"],
        device=describe_device(stage.device),
    )
    write_table(table, args.out)


if __name__ == "__main__":
    run(main)

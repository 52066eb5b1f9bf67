"""AGD vs CFG sampling throughput (images/s) at equal steps and batch, written to CSV.

AGD needs one forward pass per step, CFG two (batched), so the ceiling of the
speed-up is 2x; the adapters' own cost is what keeps it below. Run with every
core given to it (the Snakemake rule asks for all cores) and nothing else beside.

    python -m repro.agd.throughput --base models/agd/base \
        --adapters models/agd/adapters/cfg_s0.safetensors --out results/agd_throughput.csv \
        --params '{"batch_size": 500, "steps": 25, "repeats": 3, "sampler": {...}}'
"""

from __future__ import annotations

import platform
import time

import pandas as pd
import torch

from repro.agd.methods import load_method
from repro.core.cli import parse_stage_args, stage_parser
from repro.core.diffusion import sample, scheduler_from_params
from repro.core.results import write_table


@torch.no_grad()
def time_method(method, scheduler, batch_size: int, steps: int, scale: float, seed: int) -> float:
    labels = torch.arange(batch_size) % method.num_classes
    gen = torch.Generator().manual_seed(seed)
    tic = time.perf_counter()
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


def main(argv=None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = parse_stage_args(parser, argv)
    p = args.params
    scheduler = scheduler_from_params(p["sampler"])
    methods = {
        "cfg": load_method("cfg", args.base),
        "agd": load_method("agd", args.base, adapters=args.adapters),
    }
    # Warm-up: first calls allocate and pick kernels.
    for m in methods.values():
        time_method(m, scheduler, min(p["batch_size"], 32), 2, args.guidance_scale, 0)
    rows = []
    for repeat in range(p["repeats"]):
        # Alternate the order so drift in machine load hits both methods alike.
        order = ["cfg", "agd"] if repeat % 2 == 0 else ["agd", "cfg"]
        for name in order:
            m = methods[name]
            seconds = time_method(
                m, scheduler, p["batch_size"], p["steps"], args.guidance_scale, repeat
            )
            rows.append(
                dict(
                    method=name,
                    repeat=repeat,
                    batch_size=p["batch_size"],
                    steps=p["steps"],
                    nfe=p["steps"] * m.guidance(args.guidance_scale).nfe_per_step,
                    seconds=seconds,
                    images_per_s=p["batch_size"] / seconds,
                    threads=torch.get_num_threads(),
                    device="cpu",
                    machine=platform.processor() or platform.machine(),
                )
            )
            print(f"{name} repeat {repeat}: {p['batch_size'] / seconds:.1f} images/s")
    write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()

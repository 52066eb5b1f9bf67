"""Stage agd_gd: guidance distillation of the WHOLE model (Meng et al. 2023).

The baseline AGD is compared with: the same guidance-scale conditioning as AGD,
but every parameter of the base is trained, on standard trajectories: real
training images forward-noised to the sampler's timesteps, with the CFG target
of a frozen copy of the base (the teacher) at that x_t. As in Meng et al., the
noise, timesteps and w are drawn afresh every step (a fixed, stored set lets the
whole model memorise it: at tiny scale that baseline reached a train loss 8x
below the adapters' and sampled poorly).

    python -m repro.agd.gd --base models/agd/base --train data/digits/train.safetensors \
        --out models/agd/gd_s0 --metrics results/agd/gd/gd_s0.json \
        --checkpoint-dir checkpoints/agd_gd/s0 --params '{...}'
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from repro.agd.distill import adapter_counts, adapters_for
from repro.agd.model import AdaptedDiT, save_adapters
from repro.core.checkpoint import run_directory
from repro.core.cli import finish_stage, parse_stage_args, stage_parser
from repro.core.data import load_image_dataset
from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DiTDenoiser,
    eps_of,
    q_sample,
    scheduler_from_params,
)
from repro.core.modelio import load_dit, null_label, save_dit
from repro.core.training import fit, optimiser_settings, summary_metrics

log = logging.getLogger(__name__)

GD_ADAPTERS = "w_conditioning.safetensors"


def guidance_distillation(args, params: dict):
    """Train base + w-conditioning on online standard trajectories; returns (student, metrics)."""
    start = time.perf_counter()
    teacher = load_dit(args.base).eval().requires_grad_(False)
    null = null_label(teacher)
    teacher = DiTDenoiser(teacher)
    base = load_dit(args.base)
    student = AdaptedDiT(base, adapters_for(base, params), train_base=True).eval()
    data = load_image_dataset(args.train, kind="digits")
    scheduler = scheduler_from_params(params["sampler"])
    scheduler.set_timesteps(params["sampler"]["steps"])
    timesteps = scheduler.timesteps.long()
    seed, batch, (w_min, w_max) = params["seed"], params["batch_size"], params["w_range"]
    torch.manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(data.images), (batch,), generator=gen)
        x0, y = data.images[idx], data.labels[idx]
        t = timesteps[torch.randint(len(timesteps), (batch,), generator=gen)]
        w = w_min + (w_max - w_min) * torch.rand(batch, generator=gen)
        x_t = q_sample(scheduler, x0, torch.randn(x0.shape, generator=gen), t)
        with torch.no_grad():
            target = eps_of(ClassifierFreeGuidance(w, null)(teacher, x_t, t, y), x_t)
        return F.mse_loss(eps_of(student(x_t, t, y, w), x_t), target)

    summary = fit(
        modules={"adapters": student.adapters, "base": student.base},
        parameters=student.trainable_parameters(),
        loss_fn=loss_fn,
        checkpoint_dir=run_directory(args.checkpoint_dir, params, [args.base, args.train]),
        **optimiser_settings(params),
        desc="agd_gd",
    )
    metrics = summary_metrics(summary, start, **adapter_counts(student))
    return student, metrics


def main(argv=None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--train", required=True, help="real training images (safetensors)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metrics", required=True, help="output metrics JSON")
    parser.add_argument("--checkpoint-dir", required=True, help="resume checkpoints")
    args = parse_stage_args(parser, argv)
    student, metrics = guidance_distillation(args, args.params)
    student.detach()
    out = Path(args.out)
    save_dit(student.base, out / "transformer")
    save_adapters(out / GD_ADAPTERS, student.adapters, extra_meta={"metrics": metrics})
    finish_stage(args, paper="agd", metrics=metrics, metrics_path=args.metrics)


if __name__ == "__main__":
    main()

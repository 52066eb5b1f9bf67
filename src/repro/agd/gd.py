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
from pathlib import Path

import torch
import torch.nn.functional as F

from repro.agd.distill import adapter_counts, adapters_for
from repro.agd.model import AdaptedDiT, save_adapters
from repro.core.data import ImageDataset, load_image_dataset
from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DiTDenoiser,
    eps_of,
    q_sample,
    scheduler_from_params,
)
from repro.core.distributed import local_batch_size, step_generator
from repro.core.modelio import load_dit, null_label, save_dit
from repro.core.stage import Stage, run
from repro.core.training import fit, optimiser_settings

log = logging.getLogger(__name__)

GD_ADAPTERS = "w_conditioning.safetensors"


def guidance_distillation(
    teacher, student: AdaptedDiT, data: ImageDataset, params: dict, checkpoint_dir
) -> dict:
    """Train base + w-conditioning on online standard trajectories; returns fit's summary.

    Each step's draws (images, timesteps, w, noise) are made on the CPU and moved to
    the student's device.
    """
    null = null_label(teacher)
    teacher = DiTDenoiser(teacher)
    device = student.base.device
    scheduler = scheduler_from_params(params["sampler"])
    scheduler.set_timesteps(params["sampler"]["steps"])
    timesteps = scheduler.timesteps.long()
    seed, (w_min, w_max) = params["seed"], params["w_range"]
    batch = local_batch_size(params["batch_size"])
    torch.manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(data.images), (batch,), generator=gen)
        x0, y = data.images[idx], data.labels[idx]
        t = timesteps[torch.randint(len(timesteps), (batch,), generator=gen)]
        w = w_min + (w_max - w_min) * torch.rand(batch, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, y, t, w, noise = (v.to(device) for v in (x0, y, t, w, noise))
        x_t = q_sample(scheduler, x0, noise, t)
        with torch.no_grad():
            target = eps_of(ClassifierFreeGuidance(w, null)(teacher, x_t, t, y), x_t)
        return F.mse_loss(eps_of(student(x_t, t, y, w), x_t), target)

    return fit(
        modules={"adapters": student.adapters, "base": student.base},
        parameters=student.trainable_parameters(),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        **optimiser_settings(params),
        desc="agd_gd",
    )


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="agd", out="output directory", metrics=True, checkpoint_dir=True)
    stage.parser.add_argument("--base", required=True, help="base model directory")
    stage.parser.add_argument("--train", required=True, help="real training images (safetensors)")
    args = stage.start(argv)
    params = stage.params
    teacher = load_dit(args.base).eval().requires_grad_(False).to(stage.device)
    base = load_dit(args.base)
    student = AdaptedDiT(base, adapters_for(base, params), train_base=True).eval()
    student.to(stage.device)
    data = load_image_dataset(args.train, kind="digits")
    checkpoints = stage.checkpoints(args.base, args.train)
    summary = guidance_distillation(teacher, student, data, params, checkpoints)
    metrics = stage.summary(summary, **adapter_counts(student))
    student.detach()
    if stage.is_main:
        out = Path(args.out)
        save_dit(student.base, out / "transformer")
        save_adapters(out / GD_ADAPTERS, student.adapters, extra_meta={"metrics": metrics})
    stage.finish(metrics)


if __name__ == "__main__":
    run(main)

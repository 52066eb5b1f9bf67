"""Stage agd_base: the class-conditional base model that AGD distils.

Tiny scale: train a DiTTransformer2DModel on the digits with the standard
epsilon-prediction loss; the model's own label embedding drops 10% of labels to
the null class in training mode, which is what makes CFG possible later.
Paper scale: load DiT-XL/2 from the hub (`pretrained`) and save it unchanged, so
every later stage reads the base from the same place at every scale.

    python -m repro.agd.base --train data/digits/train.safetensors \
        --out models/agd/base --metrics results/agd/base_metrics.json \
        --checkpoint-dir checkpoints/agd_base --params '{...}'
"""

from __future__ import annotations

import logging

import torch

from repro.core.data import load_image_dataset
from repro.core.diffusion import DiTDenoiser, epsilon_loss, scheduler_from_params
from repro.core.distributed import local_batch_size, step_generator
from repro.core.modelio import build_dit, null_label, save_dit, set_label_dropout
from repro.core.stage import Stage, run
from repro.core.training import fit, optimiser_settings

log = logging.getLogger(__name__)


def train_denoiser(
    model, params: dict, images: torch.Tensor, labels: torch.Tensor, checkpoint_dir, desc: str
):
    """Train a DiT on (images, labels) with the epsilon loss; returns (model, fit summary).

    Used from scratch by agd_base and to derive a fine-tuned checkpoint by agd_transfer.
    The model trains where it is; each step's batch is drawn on the CPU (a pure
    function of seed, step and rank) and moved there.
    """
    # CFG needs the model to learn the unconditional (null-class) prediction too.
    # diffusers drops labels inside every block with the global RNG, independently
    # per block; one seeded mask per sample, drawn in the loss, is the textbook form.
    set_label_dropout(model, 0.0)
    model.train()
    denoiser = DiTDenoiser(model)
    null, p_uncond = null_label(model), params["label_dropout"]
    scheduler = scheduler_from_params(params["sampler"])
    seed, batch_size = params["seed"], local_batch_size(params["batch_size"])
    device = model.device
    torch.manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0, y = images[idx].to(device), labels[idx].to(device)
        return epsilon_loss(denoiser, scheduler, x0, y, gen, p_uncond=p_uncond, null_label=null)

    summary = fit(
        modules={"model": model},
        parameters=list(model.parameters()),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        **optimiser_settings(params),
        desc=desc,
    )
    model.eval()
    return model, summary


def main(argv=None) -> None:
    stage = Stage(
        __doc__,
        paper="agd",
        out="output directory (diffusers format)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--train", required=True, help="digits train split (safetensors)")
    args = stage.start(argv)
    params = stage.params

    if params.get("pretrained"):
        log.info("loading the pretrained base %s", params["pretrained"])
        model = build_dit(params)
        summary = {"steps": 0, "final_loss": float("nan")}
    else:
        data = load_image_dataset(args.train, kind="digits")
        # Seeded init: the same config gives the same base in every process (torch's
        # global RNG is not reliably at its default seed once the libraries are imported).
        model = build_dit({**params["model"], "seed": params["seed"]}).to(stage.device)
        model, summary = train_denoiser(
            model, params, data.images, data.labels, stage.checkpoints(args.train), "agd_base"
        )

    if stage.is_main:
        save_dit(model, args.out)
    parameters = sum(p.numel() for p in model.parameters())
    stage.finish(stage.summary(summary, parameters=parameters))


if __name__ == "__main__":
    run(main)

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
import time

import torch

from repro.core.checkpoint import run_directory
from repro.core.cli import finish_stage, parse_stage_args, stage_parser
from repro.core.data import load_image_dataset
from repro.core.diffusion import DiTDenoiser, epsilon_loss, scheduler_from_params
from repro.core.modelio import build_dit, null_label, save_dit, set_label_dropout
from repro.core.training import fit, optimiser_settings, summary_metrics

log = logging.getLogger(__name__)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """Batches are a pure function of (seed, step), so a resumed run sees the same data."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_denoiser(
    model, params: dict, images: torch.Tensor, labels: torch.Tensor, checkpoint_dir, desc: str
):
    """Train a DiT on (images, labels) with the epsilon loss; returns (model, fit summary).

    Used from scratch by agd_base and to derive a fine-tuned checkpoint by agd_transfer.
    """
    # CFG needs the model to learn the unconditional (null-class) prediction too.
    # diffusers drops labels inside every block with the global RNG, independently
    # per block; one seeded mask per sample, drawn in the loss, is the textbook form.
    set_label_dropout(model, 0.0)
    model.train()
    denoiser = DiTDenoiser(model)
    null, p_uncond = null_label(model), params["label_dropout"]
    scheduler = scheduler_from_params(params["sampler"])
    seed, batch_size = params["seed"], params["batch_size"]
    torch.manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        gen = batch_generator(seed, step)
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        return epsilon_loss(
            denoiser, scheduler, images[idx], labels[idx], gen, p_uncond=p_uncond, null_label=null
        )

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
    parser = stage_parser(__doc__)
    parser.add_argument("--train", required=True, help="digits train split (safetensors)")
    parser.add_argument("--out", required=True, help="output directory (diffusers format)")
    parser.add_argument("--metrics", required=True, help="output metrics JSON")
    parser.add_argument("--checkpoint-dir", required=True, help="resume checkpoints")
    args = parse_stage_args(parser, argv)
    params = args.params
    start = time.perf_counter()

    if params.get("pretrained"):
        log.info("loading the pretrained base %s", params["pretrained"])
        model = build_dit(params)
        summary = {"steps": 0, "final_loss": float("nan")}
    else:
        data = load_image_dataset(args.train, kind="digits")
        # Seeded init: the same config gives the same base in every process (torch's
        # global RNG is not reliably at its default seed once the libraries are imported).
        model = build_dit({**params["model"], "seed": params["seed"]})
        checkpoints = run_directory(args.checkpoint_dir, params, [args.train])
        model, summary = train_denoiser(
            model, params, data.images, data.labels, checkpoints, desc="agd_base"
        )

    save_dit(model, args.out)
    metrics = summary_metrics(summary, start, parameters=sum(p.numel() for p in model.parameters()))
    finish_stage(args, paper="agd", metrics=metrics, metrics_path=args.metrics)


if __name__ == "__main__":
    main()

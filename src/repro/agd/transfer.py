"""Stage agd_transfer: a checkpoint DERIVED from the base, for the transfer claim.

The base is fine-tuned briefly on glyph-rendered digits (another domain, same
architecture and classes). AGD's claim is that adapters trained on the base
work on such derived checkpoints without retraining; agd_eval then compares
them with CFG on this checkpoint.

    python -m repro.agd.transfer --base models/agd/base --data data/glyphs/train.safetensors \
        --out models/agd/derived --metrics results/agd/transfer_metrics.json --params '{...}'
"""

from __future__ import annotations

import logging

from repro.core.data import load_image_dataset
from repro.core.diffusion import train_denoiser
from repro.core.errors import ReproInputError
from repro.core.modelio import build_dit, load_dit, save_dit
from repro.core.stage import Stage, run

log = logging.getLogger(__name__)


def check_images_fit(model, images, path) -> None:
    """The fine-tuning images must have the base's shape (channels, size)."""
    expected = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    if tuple(images.shape[1:]) != expected:
        raise ReproInputError(
            f"{path}: images of shape {tuple(images.shape[1:])}, the base expects "
            f"{expected}; at paper scale set agd.transfer.pretrained to a derived checkpoint"
        )


def main(argv=None) -> None:
    stage = Stage(
        __doc__,
        paper="agd",
        out="output directory (diffusers format)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--base", required=True, help="base model directory")
    stage.parser.add_argument("--data", required=True, help="fine-tuning images (safetensors)")
    args = stage.start(argv)
    params = stage.params

    if params.get("pretrained"):
        # Paper scale: a checkpoint derived elsewhere from the same base (a fine-tune).
        model = build_dit(params)
        summary = {"steps": 0, "final_loss": float("nan")}
    else:
        # Derive a checkpoint: the base fine-tuned briefly on another image set.
        model = load_dit(args.base)
        data = load_image_dataset(args.data)
        check_images_fit(model, data.images, args.data)
        model, summary = train_denoiser(
            model.to(stage.device),
            params,
            data.images,
            data.labels,
            stage.checkpoints(args.base, args.data),
            desc="agd_transfer",
        )
    if stage.is_main:
        save_dit(model, args.out)
    stage.finish(stage.summary(summary))


if __name__ == "__main__":
    run(main)

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
import time

from repro.agd.base import train_denoiser
from repro.core.checkpoint import run_directory
from repro.core.cli import finish_stage, parse_stage_args, stage_parser
from repro.core.data import load_image_dataset
from repro.core.errors import ReproInputError
from repro.core.modelio import build_dit, load_dit, save_dit
from repro.core.training import summary_metrics

log = logging.getLogger(__name__)


def fine_tune(args, params: dict):
    """Derive a checkpoint: the base fine-tuned briefly on another image set."""
    model = load_dit(args.base)
    data = load_image_dataset(args.data)
    expected = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    if tuple(data.images.shape[1:]) != expected:
        raise ReproInputError(
            f"{args.data}: images of shape {tuple(data.images.shape[1:])}, the base expects "
            f"{expected}; at paper scale set agd.transfer.pretrained to a derived checkpoint"
        )
    checkpoints = run_directory(args.checkpoint_dir, params, [args.base, args.data])
    return train_denoiser(model, params, data.images, data.labels, checkpoints, desc="agd_transfer")


def main(argv=None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--data", required=True, help="fine-tuning images (safetensors)")
    parser.add_argument("--out", required=True, help="output directory (diffusers format)")
    parser.add_argument("--metrics", required=True, help="output metrics JSON")
    parser.add_argument("--checkpoint-dir", required=True, help="resume checkpoints")
    args = parse_stage_args(parser, argv)
    params = args.params
    start = time.perf_counter()

    if params.get("pretrained"):
        # Paper scale: a checkpoint derived elsewhere from the same base (a fine-tune).
        model = build_dit(params)
        summary = {"steps": 0, "final_loss": float("nan")}
    else:
        model, summary = fine_tune(args, params)
    save_dit(model, args.out)
    metrics = summary_metrics(summary, start)
    finish_stage(args, paper="agd", metrics=metrics, metrics_path=args.metrics)


if __name__ == "__main__":
    main()

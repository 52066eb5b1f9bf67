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

from repro.core.data import load_image_dataset
from repro.core.diffusion import train_denoiser
from repro.core.modelio import build_dit, save_dit
from repro.core.stage import Stage, run

log = logging.getLogger(__name__)


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

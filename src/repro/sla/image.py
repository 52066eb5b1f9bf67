"""Stages sla_image_base, sla_image_finetune, sla_image_eval: SLA's image experiment.

The paper fine-tunes LightningDiT on ImageNet-512 with SLA and reports FID at 87.5 %
sparsity against full attention. Here: a class-conditional DiTTransformer2DModel (the
diffusers class of AGD's base) on glyph digits drawn at 16 x 16 with 1 x 1 patches,
256 tokens, 16 key blocks of 16 a row, so 87.5 % keeps 2 critical blocks a row and
95 % keeps 1 (93.75 %).

- base: the DiT trained with full attention from scratch (epsilon loss, CFG label
  dropout: repro.core.diffusion.train_denoiser);
- finetune: one attention variant installed (repro.sla.processor.install_sla), every
  weight fine-tuned for the same steps with the same objective; full attention too;
- eval: `per_class` images of every class, DDIM with classifier-free guidance from the
  same noise for every variant, FID against the test glyphs with a classifier trained
  on 16 x 16 glyphs (rule sla_image_classifier: repro.core.classifier), and attention
  FLOPs per image from AttentionFlopsCounter -> one JSON row; `table` gathers them
  into results/sla_image.csv (IMAGE_COLUMNS).

    python -m repro.sla.image base --train data/sla/glyphs/train.safetensors \
        --out models/sla/image/base --metrics results/sla/image/base.json \
        --checkpoint-dir checkpoints/sla --params '{...}'
    python -m repro.sla.image finetune --base models/sla/image/base --train ... \
        --out models/sla/image/sla_95_s0 --metrics ... --checkpoint-dir ... --params '{...}'
    python -m repro.sla.image eval --model models/sla/image/sla_95_s0 \
        --finetune-metrics ... --classifier models/sla/image/classifier.safetensors \
        --test data/sla/glyphs/test.safetensors --out results/sla/image/rows/sla_95_s0.json
    python -m repro.sla.image table --rows results/sla/image/rows/*.json \
        --out results/sla_image.csv --params '{"order": [...]}'
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import pandas as pd
import torch

from repro.core.errors import ReproInputError

log = logging.getLogger("repro")

IMAGE_COLUMNS = [
    "variant",
    "attention",
    "k_h",
    "k_l",
    "sparsity",
    "seed",
    "steps",
    "final_train_loss",
    "fid",
    "block_sparsity",
    "attention_flops",
    "dense_attention_flops",
    "flops_reduction",
]


def load_finetuned_dit(model_dir: str | os.PathLike):
    """(DiT with SLA installed and its Proj weights loaded, sla.json's dict)."""
    from repro.core.modelio import load_dit
    from repro.sla.finetune import install_saved_sla, read_sla_file

    sla = read_sla_file(model_dir, "sla_image_finetune")
    model = load_dit(model_dir)
    install_saved_sla(model, sla, model_dir)
    return model.eval(), sla


def _tokens(model, size: int) -> int:
    patch = int(model.config.patch_size)
    return (size // patch) ** 2


def train_params(params: dict, section: str) -> dict:
    """train_denoiser's params from the stage's --params: `section` (base or finetune)
    plus the sampler."""
    if section not in params or "sampler" not in params:
        raise ReproInputError(f"sla.image: --params lacks {section!r} or 'sampler'")
    return {**params[section], "sampler": params["sampler"]}


def base_main(argv: Sequence[str] | None = None) -> None:
    from repro.core.data import load_image_dataset
    from repro.core.diffusion import train_denoiser
    from repro.core.modelio import build_dit, save_dit
    from repro.core.stage import Stage

    stage = Stage(__doc__, paper="sla", out="the DiT directory", metrics=True, checkpoint_dir=True)
    stage.parser.prog = "repro.sla.image"
    stage.parser.add_argument("command", choices=["base"])
    stage.parser.add_argument("--train", required=True, help="the glyph train split")
    args = stage.start(argv)
    data = load_image_dataset(args.train, kind="glyphs")
    params = stage.params
    if "model" not in params:
        raise ReproInputError("sla.image.model: missing from --params")
    model = build_dit(params["model"]).to(stage.device)
    model, summary = train_denoiser(
        model,
        train_params(params, "base"),
        data.images,
        data.labels,
        stage.checkpoints(args.train),
        desc="sla_image_base",
    )
    if stage.is_main:
        save_dit(model.cpu(), args.out)
    stage.finish(stage.summary(summary, loss_history=summary["loss_history"]))


def finetune_main(argv: Sequence[str] | None = None) -> None:
    from repro.core.data import load_image_dataset
    from repro.core.diffusion import train_denoiser
    from repro.core.modelio import DIT_KIND, load_dit, save_model
    from repro.core.stage import Stage
    from repro.sla.finetune import WithSLA, check_blocks
    from repro.sla.processor import install_sla

    stage = Stage(__doc__, paper="sla", out="the fine-tuned DiT", metrics=True, checkpoint_dir=True)
    stage.parser.prog = "repro.sla.image"
    stage.parser.add_argument("command", choices=["finetune"])
    stage.parser.add_argument("--base", required=True, help="the base DiT (sla_image_base)")
    stage.parser.add_argument("--train", required=True, help="the glyph train split")
    args = stage.start(argv)
    params = stage.params
    for key in ("variant", "seed", "settings"):
        if key not in params:
            raise ReproInputError(f"sla_image_finetune: --params lacks {key!r}")
    name, settings = params["variant"], dict(params["settings"])
    data = load_image_dataset(args.train, kind="glyphs")
    model = load_dit(args.base)
    blocks = check_blocks(settings, _tokens(model, data.images.shape[-1]), name)
    install_sla(model, **settings)
    model.to(stage.device)
    train = {**train_params(params, "finetune"), "seed": int(params["seed"])}
    model, summary = train_denoiser(
        model,
        train,
        data.images,
        data.labels,
        stage.checkpoints(args.train, args.base),
        desc=f"sla_image_finetune {name}",
    )
    sla = {"name": name, "seed": int(params["seed"]), "settings": settings, **blocks}
    if stage.is_main:
        save_model(WithSLA(model.cpu(), sla), args.out, DIT_KIND)
    stage.finish(
        stage.summary(
            summary, variant=name, seed=int(params["seed"]),
            loss_history=summary["loss_history"], **blocks,
        )
    )  # fmt: skip


@torch.no_grad()
def sample_images(model, params: dict, num_classes: int, size: int, channels: int):
    """`per_class` images of every class (class-major), DDIM with CFG `guidance`, the
    initial noise from Generator(seed): the same noise for every model."""
    from repro.core.diffusion import (
        ClassifierFreeGuidance,
        DiTDenoiser,
        sample,
        scheduler_from_params,
    )
    from repro.core.modelio import null_label

    evaluation = params["eval"]
    per_class = int(evaluation["per_class"])
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    result = sample(
        DiTDenoiser(model),
        scheduler_from_params(params["sampler"]),
        labels=labels,
        shape=(channels, size, size),
        steps=int(evaluation["steps"]),
        guidance=ClassifierFreeGuidance(float(evaluation["guidance"]), null_label(model)),
        generator=torch.Generator().manual_seed(int(evaluation["seed"])),
        clip=True,
    )
    return result.images, labels


def eval_main(argv: Sequence[str] | None = None) -> None:
    from repro.core.data import load_image_dataset
    from repro.core.io import read_json, write_json
    from repro.core.metrics import build_scorer
    from repro.core.stage import Stage
    from repro.kernels.attention_flops import AttentionFlopsCounter
    from repro.sla.workflow import nominal_sparsity

    stage = Stage(__doc__, paper="sla", out="the JSON row")
    stage.parser.prog = "repro.sla.image"
    stage.parser.add_argument("command", choices=["eval"])
    stage.parser.add_argument("--model", required=True)
    stage.parser.add_argument("--finetune-metrics", required=True)
    stage.parser.add_argument("--classifier", required=True, help="the 16 x 16 glyph classifier")
    stage.parser.add_argument("--test", required=True, help="the glyph test split")
    args = stage.start(argv)
    params = stage.params
    for key in ("eval", "sampler"):
        if key not in params:
            raise ReproInputError(f"sla.image.{key}: missing from --params")
    trained = read_json(args.finetune_metrics)
    test = load_image_dataset(args.test, kind="glyphs")
    model, sla = load_finetuned_dit(args.model)
    model.to(stage.device)
    num_classes = int(model.config.num_embeds_ada_norm)
    _, channels, size, _ = test.images.shape
    with AttentionFlopsCounter() as counter:
        images, _ = sample_images(model, params, num_classes, size, channels)
    scorer = build_scorer(
        {"feature_net": "digit_classifier", "classifier": args.classifier},
        test.images,
        stage.device,
    )
    scores = scorer.score(images)
    flops, settings = counter.flops, sla["settings"]
    row = {
        "variant": sla["name"],
        "attention": settings["variant"],
        "k_h": float(settings["k_h"]),
        "k_l": float(settings["k_l"]),
        "sparsity": nominal_sparsity(settings["variant"], settings["k_h"]),
        "seed": int(sla["seed"]),
        "steps": int(trained["steps"]),
        "final_train_loss": float(trained["final_loss"]),
        "fid": scores["fid"],
        "block_sparsity": flops.block_sparsity,
        "attention_flops": flops.total / len(images),
        "dense_attention_flops": flops.dense / len(images),
        "flops_reduction": flops.dense / flops.total if flops.total else math.nan,
    }
    write_json(args.out, row)
    log.info("%s seed %d: FID %.2f, %.1fx fewer attention FLOPs", row["variant"], row["seed"],
             row["fid"], row["flops_reduction"])  # fmt: skip
    stage.finish({k: v for k, v in row.items() if k not in ("variant", "attention")})


def build_image_table(rows: list[dict], order: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows as IMAGE_COLUMNS, sorted by `order` (then name) and seed; a row that lacks a
    column or repeats a (variant, seed) is refused naming it."""
    for row in rows:
        missing = [c for c in IMAGE_COLUMNS if c not in row]
        if missing:
            raise ReproInputError(
                f"sla_image row {row.get('variant')!r} seed {row.get('seed')!r}: missing {missing}"
            )
    table = pd.DataFrame(
        [{c: row[c] for c in IMAGE_COLUMNS} for row in rows], columns=IMAGE_COLUMNS
    )
    duplicated = table.duplicated(["variant", "seed"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise ReproInputError(f"sla_image: two rows for {first.variant!r} seed {first.seed}")
    rank = {name: i for i, name in enumerate(order or [])}
    key = table.variant.map(lambda v: (rank.get(v, len(rank)), v))
    return (
        table.assign(_key=key)
        .sort_values(["_key", "seed"])
        .drop(columns="_key")
        .reset_index(drop=True)
    )


def table_main(argv: Sequence[str] | None = None) -> None:
    from repro.core.io import read_json
    from repro.core.results import write_table
    from repro.core.stage import Stage

    stage = Stage(__doc__, paper="sla", out="results/sla_image.csv")
    stage.parser.prog = "repro.sla.image"
    stage.parser.add_argument("command", choices=["table"])
    stage.parser.add_argument("--rows", nargs="+", required=True)
    args = stage.start(argv)
    table = build_image_table([read_json(p) for p in args.rows], stage.params.get("order"))
    write_table(table, args.out)
    log.info("%s: %d rows", args.out, len(table))


COMMANDS = {"base": base_main, "finetune": finetune_main, "eval": eval_main, "table": table_main}


def main(argv: Sequence[str] | None = None) -> None:
    from repro.core.stage import dispatch

    dispatch(COMMANDS, argv, "repro.sla.image", __doc__)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

"""Stage datadream_lora: adapt the text-to-image model to the few real shots (DataDream).

LoRA (repro.datadream.generator) on the UNet's and the text encoder's attention,
trained with the plain denoising loss on the shots (no prior preservation), AdamW
with linear warm-up and cosine decay, gradient clipping, as in the paper:

- cls  (DataDream_cls): one LoRA per class, on that class's shots with its prompt;
- dset (DataDream_dset): one LoRA on all shots, each image with its class's prompt.

    python -m repro.datadream.lora --fewshot data/datadream/fewshot/16shot_s0.safetensors \
        --variant cls --out models/datadream/lora/cls_16shot_s0.safetensors \
        --metrics results/datadream/lora/cls_16shot_s0.json \
        --checkpoint-dir checkpoints/datadream/lora --params '{...datadream.lora, seed, ...}'

The model is loaded once; DataDream_cls resets the LoRA to the same seeded gaussian
init before each class (what one run per class with one seed would start from) and
checkpoints each class separately, so a killed run resumes inside the class it was
training and skips the classes already done.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from repro.core.cli import require
from repro.core.distributed import step_generator
from repro.core.errors import ReproInputError
from repro.core.stage import Stage, run
from repro.core.training import fit, optimiser_settings
from repro.datadream.fewshot import load_fewshot
from repro.datadream.generator import DSET_GROUP, GeneratorLora, lora_settings, save_lora

log = logging.getLogger(__name__)

VARIANTS = ("cls", "dset")
SECTION = "datadream"
# Denoising-loss draws (noise, t) per shot for the before / after evaluation.
EVAL_REPEATS = 8
EVAL_BATCH = 64


def class_prompts(template: str, classnames: list[str]) -> list[str]:
    """The prompt of every class: `template` with {classname} filled in."""
    if not isinstance(template, str) or "{classname}" not in template:
        raise ReproInputError(
            f"{SECTION}.prompt: must be a string with a {{classname}} field, got {template!r}"
        )
    try:
        return [template.format(classname=c) for c in classnames]
    except (KeyError, IndexError, ValueError) as err:
        raise ReproInputError(
            f"{SECTION}.prompt: {template!r} has fields other than {{classname}} ({err})"
        ) from err


def check_prompts(t2i, prompts: list[str]) -> None:
    """Refuse prompts the text encoder would truncate (the class name would be cut off)."""
    limit = int(t2i.tokenizer.model_max_length)
    for prompt in prompts:
        length = len(t2i.tokenizer(prompt).input_ids)
        if length > limit:
            raise ReproInputError(
                f"{SECTION}.prompt: {prompt!r} is {length} tokens, the text encoder reads "
                f"{limit} (template or class names too long)"
            )


def batch_rows(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` rows of n: whole shuffled passes over the shots, then part of one more
    (every shot once per pass, as epochs over a small set would)."""
    passes = -(-batch_size // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:batch_size]


def train_lora(
    lora: GeneratorLora,
    images: torch.Tensor,
    prompts: list[str],
    params: dict,
    checkpoint_dir: str | Path | None,
    stream: int = 0,
    desc: str = "datadream_lora",
) -> dict:
    """Fit the LoRA's weights to the denoising loss on `images` with their `prompts`.

    Batches, noise and timesteps of step s are drawn from step_generator(seed, stream + s):
    a pure function of the step (resume gives the same run) and, with a distinct `stream`
    per class, distinct draws per class. Returns fit's summary.
    """
    from repro.foundation.t2i import denoising_loss

    t2i = lora.t2i
    seed, batch_size, n = int(params["seed"]), int(params["batch_size"]), len(images)
    images = images.to(t2i.device)

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, stream + step)
        rows = batch_rows(n, batch_size, gen)
        return denoising_loss(t2i, images[rows], [prompts[i] for i in rows.tolist()], gen)

    return fit(
        modules={"lora": lora.module()},
        parameters=lora.parameters(),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        grad_clip=params.get("grad_clip", 1.0),
        **optimiser_settings(params),
        desc=desc,
    )


@torch.no_grad()
def shot_loss(t2i, images: torch.Tensor, prompts: list[str], seed: int) -> float:
    """The denoising loss on the shots, averaged over EVAL_REPEATS fixed draws of noise and
    timestep per shot (the same draws before and after training: a paired comparison)."""
    from repro.foundation.t2i import denoising_loss

    gen = torch.Generator().manual_seed(int(seed))
    images = images.to(t2i.device).repeat(EVAL_REPEATS, 1, 1, 1)
    prompts = list(prompts) * EVAL_REPEATS
    total = 0.0
    # In chunks: at paper scale the shots of every class at once would not fit in memory.
    for start in range(0, len(images), EVAL_BATCH):
        chunk = slice(start, start + EVAL_BATCH)
        loss = denoising_loss(t2i, images[chunk], prompts[chunk], gen)
        total += float(loss) * len(images[chunk])
    return total / len(images)


# Step s of group g draws from step_generator(seed, g * GROUP_STREAM_STRIDE + s): distinct
# draws per group, whatever each group's length.
GROUP_STREAM_STRIDE = 1_000_000


def group_steps(params: dict, num_images: int) -> int:
    """Optimizer steps of one LoRA: datadream.lora.epochs passes over its `num_images`
    images at batch_size (the last batch of a pass counts as a step)."""
    epochs, batch_size = int(params["epochs"]), int(params["batch_size"])
    return epochs * math.ceil(num_images / batch_size)


def group_data(variant: str, images, labels, classnames, prompts) -> dict[str, tuple]:
    """{group: (images, prompts)}: one group per class (cls) or one of all shots (dset)."""
    if variant == "dset":
        return {DSET_GROUP: (images, [prompts[int(y)] for y in labels])}
    return {
        name: (images[labels == k], [prompts[k]] * int((labels == k).sum()))
        for k, name in enumerate(classnames)
    }


def adapt(
    lora: GeneratorLora,
    groups: dict[str, tuple],
    params: dict,
    checkpoint_dir: Path | None,
) -> tuple[dict[str, dict], dict]:
    """Train one LoRA per group, each from the seeded init; returns (states, metrics).

    Each group trains for datadream.lora.epochs passes over its images (group_steps), so
    DataDream_cls (ten small groups) and DataDream_dset (one large one) spend the same
    compute on the same shots, as in the paper (200 epochs at batch 8 for both)."""
    seed = int(params["seed"])
    states, per_group = {}, {}
    outer = tqdm(
        groups.items(), desc="datadream_lora groups", disable=None if len(groups) > 1 else True
    )
    for index, (group, (images, prompts)) in enumerate(outer):
        lora.reset()
        steps = group_steps(params, len(images))
        before = shot_loss(lora.t2i, images, prompts, seed)
        started = time.perf_counter()
        summary = train_lora(
            lora,
            images,
            prompts,
            {**params, "steps": steps},
            None if checkpoint_dir is None else checkpoint_dir / f"group_{index:04d}",
            stream=index * GROUP_STREAM_STRIDE,
            desc=f"datadream_lora[{group}]",
        )
        seconds = time.perf_counter() - started
        after = shot_loss(lora.t2i, images, prompts, seed)
        trained = steps - summary["resumed_from"]
        log.info(
            "LoRA %s: %d shots, shot loss %.4f -> %.4f, %.1f s (%.1f ms per step)",
            group,
            len(images),
            before,
            after,
            seconds,
            1e3 * seconds / max(1, trained),
        )
        states[group] = lora.state()
        per_group[group] = {
            "shots": len(images),
            "steps": steps,
            "final_loss": summary["final_loss"],
            "shot_loss_before": before,
            "shot_loss_after": after,
            "resumed_from": summary["resumed_from"],
            "seconds": seconds,
            # None when the group was done before a resume: nothing was timed.
            "seconds_per_step": seconds / trained if trained else None,
        }
    mean = lambda key: sum(g[key] for g in per_group.values()) / len(per_group)  # noqa: E731
    timed = [g["seconds_per_step"] for g in per_group.values() if g["resumed_from"] < g["steps"]]
    metrics = {
        "final_loss": mean("final_loss"),
        "shot_loss_before": mean("shot_loss_before"),
        "shot_loss_after": mean("shot_loss_after"),
        "steps": sum(g["steps"] for g in per_group.values()),
        "resumed_from": min(g["resumed_from"] for g in per_group.values()),
        "seconds_per_step": sum(timed) / len(timed) if timed else None,
        "num_loras": len(per_group),
        "groups": per_group,
    }
    return states, metrics


def prepare(args, params: dict):
    """Everything checked before any training: the few-shot set, the prompts, the LoRA
    settings, the model (loaded) and the LoRA (attached). Returns (fewshot, prompts, lora)."""
    from repro.foundation.t2i import load_t2i

    if args.variant not in VARIANTS:
        raise ReproInputError(f"--variant: {args.variant!r} is not one of {list(VARIANTS)}")
    classnames = require(params, "classnames", SECTION)
    prompts = class_prompts(require(params, "prompt", SECTION), classnames)
    settings = lora_settings(params)
    require(params, "epochs", f"{SECTION}.lora")
    optimiser_settings({**params, "steps": 1})
    require(params, "batch_size", f"{SECTION}.lora")
    require(params, "seed", SECTION)
    fewshot = load_fewshot(args.fewshot, classnames)
    if "shots" in params and fewshot.meta.get("shots") != params["shots"]:
        raise ReproInputError(
            f"{args.fewshot}: a {fewshot.meta.get('shots')}-shot set, but {SECTION}.shots "
            f"is {params['shots']}"
        )
    foundation = require(require(params, "foundation", SECTION), "t2i", f"{SECTION}.foundation")
    t2i = load_t2i(foundation)
    check_prompts(t2i, prompts)
    lora = GeneratorLora(t2i, settings, seed=int(params["seed"]))
    return fewshot, prompts, lora


def main(argv=None) -> None:
    stage = Stage(
        __doc__,
        paper="datadream",
        out="the LoRA file (.safetensors)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--fewshot", required=True, help="the few-shot set (.safetensors)")
    stage.parser.add_argument("--variant", required=True, help="cls (one LoRA per class) | dset")
    args = stage.start(argv)
    params = stage.params
    fewshot, prompts, lora = prepare(args, params)
    lora.t2i.to(stage.device)
    classnames = list(params["classnames"])
    groups = group_data(args.variant, fewshot.images, fewshot.labels, classnames, prompts)
    model_dir = params["foundation"]["t2i"].get("pretrained")
    inputs = [args.fewshot] + ([model_dir] if model_dir and Path(model_dir).is_dir() else [])
    checkpoints = stage.checkpoints(*inputs) / args.variant
    states, metrics = adapt(lora, groups, params, checkpoints)
    metrics = {
        **stage.summary({"final_loss": metrics["final_loss"], "steps": metrics["steps"]}),
        **metrics,
        "variant": args.variant,
        "shots": fewshot.meta.get("shots"),
        "seed": int(params["seed"]),
        "trainable_params": lora.num_parameters,
        "lora_layers": lora.counts(),
    }
    if stage.is_main:
        save_lora(
            args.out,
            states,
            variant=args.variant,
            classes=classnames,
            settings=lora.settings,
            extra_meta={
                "shots": fewshot.meta.get("shots"),
                "seed": int(params["seed"]),
                "prompt": params["prompt"],
                "fewshot": str(args.fewshot),
                "foundation": params["foundation"]["t2i"],
                "metrics": {k: v for k, v in metrics.items() if k != "groups"},
            },
        )
    stage.finish(metrics)


if __name__ == "__main__":
    run(main)

"""Stage datadream_generate: a synthetic training set, N images per class, from the
text-to-image model: unadapted (no --lora: the baseline the official code cannot
produce) or adapted by a DataDream LoRA file (cls: each class from its own LoRA;
dset: every class from the one LoRA).

    python -m repro.datadream.generate [--lora models/datadream/lora/cls_16shot_s0.safetensors] \
        --out data/datadream/synthetic/cls_16shot_s0.safetensors \
        --metrics results/datadream/generate/cls_16shot_s0.json \
        --params '{...datadream.generate, n_per_class, seed, prompt, classnames, foundation}'

Class c's images come from the class prompt, classifier-free guidance and DDIM
(repro.foundation.t2i.generate) with noise drawn from a generator seeded by (seed, c)
alone: every generator (unadapted, cls, dset) starts class c from the same noise, and
the set is the same whatever the batch size. The file is class-major, so the first N
images of each class are the N-per-class subset the classifiers read.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from repro.core.cli import require
from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.stage import Stage, run
from repro.datadream.generator import GeneratorLora, load_lora, lora_group
from repro.datadream.lora import check_prompts, class_prompts

log = logging.getLogger(__name__)

KIND = "datadream_synthetic"
SECTION = "datadream"
UNADAPTED = "unadapted"
CLASS_STRIDE = 1_000_003  # seed * stride + class: one noise stream per (seed, class)


def class_generator(seed: int, label: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * CLASS_STRIDE + int(label))


def positive_int(params: dict, key: str, section: str) -> int:
    value = require(params, key, section)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReproInputError(f"{section}.{key}: must be an integer >= 1, got {value!r}")
    return value


def synthesize(
    t2i,
    prompts: list[str],
    params: dict,
    lora: GeneratorLora | None = None,
    states: dict[str, dict] | None = None,
    groups: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n_per_class images of every class, class-major: (images, labels, captions).

    With `lora`, class c is drawn with the LoRA state states[groups[c]] loaded (the
    same state for every class of a dset LoRA is loaded once).
    """
    n = positive_int(params, "n_per_class", SECTION)
    steps = positive_int(params, "steps", f"{SECTION}.generate")
    batch_size = positive_int(params, "batch_size", f"{SECTION}.generate")
    guidance = float(require(params, "guidance", f"{SECTION}.generate"))
    seed = int(require(params, "seed", SECTION))
    images, labels, captions = [], [], []
    loaded = None
    bar = tqdm(list(enumerate(prompts)), desc="datadream_generate classes", disable=None)
    for label, prompt in bar:
        if lora is not None and groups[label] != loaded:
            lora.load_state(states[groups[label]], f"LoRA group {groups[label]!r}")
            loaded = groups[label]
        images.append(
            _generate(t2i, [prompt] * n, guidance, steps, class_generator(seed, label), batch_size)
        )
        labels.append(torch.full((n,), label, dtype=torch.long))
        captions += [prompt] * n
    return torch.cat(images), torch.cat(labels), captions


def _generate(t2i, prompts, guidance, steps, generator, batch_size) -> torch.Tensor:
    from repro.foundation.t2i import generate

    return generate(
        t2i,
        prompts,
        guidance=guidance,
        steps=steps,
        generator=generator,
        batch_size=batch_size,
        progress=False,
    )


def attach_file(
    t2i, path, classnames: list[str], loaded: tuple[dict, dict] | None = None
) -> tuple[GeneratorLora, dict, list[str], dict]:
    """The LoRA of file `path` attached to `t2i`: (lora, states, group per class, meta).

    The file must be of the configured classes; its layers must fit the model.
    `loaded`: the file's (states, meta) if load_lora has read it already."""
    states, meta = load_lora(path) if loaded is None else loaded
    if meta["classes"] != list(classnames):
        raise ReproInputError(
            f"{path}: a LoRA for classes {meta['classes']}, but {SECTION}.classnames is "
            f"{list(classnames)}"
        )
    variant = meta["variant"]
    groups = [lora_group(variant, c) for c in classnames]
    missing = sorted(set(groups) - set(states))
    if missing:
        raise ReproInputError(f"{path}: no LoRA weights for {missing} (variant {variant!r})")
    try:
        lora = GeneratorLora(t2i, meta["lora"], seed=0)
    except ReproInputError as err:
        raise ReproInputError(f"{path}: its LoRA does not fit the model ({err})") from err
    # Every group is checked against the attached layers before anything is generated.
    for group in sorted(set(groups)):
        lora.load_state(states[group], f"{path} (group {group!r})")
    return lora, states, groups, meta


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="datadream", out="the synthetic set (.safetensors)", metrics=True)
    stage.parser.add_argument(
        "--lora", default=None, help="a DataDream LoRA file; none: the unadapted model"
    )
    args = stage.start(argv)
    params = stage.params
    from repro.foundation.t2i import load_t2i

    classnames = require(params, "classnames", SECTION)
    prompts = class_prompts(require(params, "prompt", SECTION), classnames)
    for key in ("n_per_class", "seed"):
        require(params, key, SECTION)
    foundation = require(require(params, "foundation", SECTION), "t2i", f"{SECTION}.foundation")
    # A LoRA file is read before the model is: a bad file fails at once.
    loaded = load_lora(args.lora) if args.lora is not None else None
    t2i = load_t2i(foundation)
    check_prompts(t2i, prompts)
    lora = states = groups = None
    generator, shots = UNADAPTED, 0
    if args.lora is not None:
        lora, states, groups, meta = attach_file(t2i, args.lora, classnames, loaded)
        generator, shots = meta["variant"], meta.get("shots")
    expected = params.get("generator")
    if expected is not None and expected != generator:
        raise ReproInputError(
            f"{args.lora or '--lora'}: generator {generator!r}, but params.generator is "
            f"{expected!r}"
        )
    if "shots" in params and params["shots"] != shots:
        raise ReproInputError(
            f"{args.lora or '--lora'}: a generator adapted on {shots} shots, but "
            f"{SECTION}.shots is {params['shots']}"
        )
    t2i.to(stage.device)
    started = time.perf_counter()
    images, labels, captions = synthesize(t2i, prompts, params, lora, states, groups)
    seconds = time.perf_counter() - started
    meta = {
        "generator": generator,
        "shots": shots,
        "seed": int(params["seed"]),
        "n_per_class": int(params["n_per_class"]),
        "guidance": float(params["guidance"]),
        "steps": int(params["steps"]),
        "classnames": list(classnames),
        "num_classes": len(classnames),
        "prompt": params["prompt"],
        "lora": None if args.lora is None else str(args.lora),
    }
    if stage.is_main:
        write_image_dataset(args.out, images, labels, KIND, meta, captions)
    stage.finish(
        {
            **meta,
            "num_images": len(labels),
            "seconds": seconds,
            "seconds_per_image": seconds / len(labels),
        }
    )


if __name__ == "__main__":
    run(main)

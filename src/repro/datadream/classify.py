"""Stage datadream_classify: CLIP LoRA classifiers on real, synthetic or both, and
zero-shot CLIP; the epoch chosen on VALIDATION, the test split scored once.

    python -m repro.datadream.classify --fewshot data/datadream/fewshot/16shot_s0.safetensors \
        --synthetic data/datadream/synthetic/dset_16shot_s0.safetensors \
        --val data/digits/val.safetensors --test data/digits/test.safetensors \
        --method real_synthetic --generator dset \
        --out results/datadream/runs/real_synthetic_dset_16shot_s0.csv \
        --metrics results/datadream/runs/real_synthetic_dset_16shot_s0.json \
        --checkpoint-dir checkpoints/datadream/classify --params '{...}'

Methods (the paper's and its baselines):
- zero_shot: CLIP with the class prompts, nothing trained (--generator none);
- real: the few real shots (--fewshot; --generator none);
- synthetic: N synthetic images per class (--synthetic; --generator unadapted|cls|dset);
- real_synthetic: both, the real shots replicated max(1, floor(N / shots)) times so that
  they weigh about as much as the synthetic images in a batch, and the loss
  real_weight x CE(real images of the batch) + synthetic_weight x CE(synthetic ones)
  (0.8 / 0.2 in the paper); a term whose images the batch lacks is dropped (the
  official code gets NaN there), the other keeps its weight.
The synthetic methods train one classifier per N of params.n_synthetic, on the first
N images of each class of the synthetic set. The table gets one row per N (N = 0 for
zero_shot and real).

Training (every method the same compute): AdamW on the LoRA weights only, linear
warm-up then cosine per step, gradient clipping; an "epoch" is steps_per_epoch steps
of batch_size images, drawn as successive seeded permutations of the training pool.
Augmentation: a random shift of up to 1 pixel (repro.core.classifier.random_shift),
a light stand-in suited to 8x8 digits for the paper's heavy RandAugment / crops /
flips / CutMix-MixUp, which would destroy 8x8 glyphs (a flipped 2 is no 2).
After every epoch the classifier is scored on the validation split; the best epoch's
LoRA weights (ties: the earliest) are scored on the test split, once. (The official
code picks the best epoch on the test set: not copied.) A checkpoint after each
epoch (classifier.checkpoint_every epochs) holds the LoRA weights, the optimiser and
the validation history with the best weights so far, so a killed run resumes to the
same numbers.

Every input is read and checked before anything trains; a bad one is a
ReproInputError naming the file or the config key, and nothing is written.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from repro.core.classifier import random_shift
from repro.core.data import CLASSIFICATION_KINDS, ImageDataset, load_image_dataset
from repro.core.errors import ReproInputError
from repro.core.results import write_table
from repro.core.stage import Stage, run
from repro.core.training import fit
from repro.datadream.table import METHOD_GENERATORS, METHODS, RUN_COLUMNS

log = logging.getLogger(__name__)

SECTION = "datadream"
CLASSIFIER = f"{SECTION}.classifier"
FEWSHOT_KIND = "datadream_fewshot"
SYNTHETIC_KIND = "datadream_synthetic"
# The classifier section's keys a trained method needs (the schema requires them too).
TRAINING_KEYS = (
    "rank",
    "alpha",
    "dropout",
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_fraction",
    "grad_clip",
    "real_weight",
    "synthetic_weight",
)
MAX_SHIFT = 1  # pixels of the random-shift augmentation


# ----------------------------------------------------------------------------- the loss


def mixed_loss(
    logits: Tensor,
    labels: Tensor,
    is_real: Tensor,
    real_weight: float,
    synthetic_weight: float,
) -> Tensor:
    """real_weight x CE(real rows) + synthetic_weight x CE(synthetic rows), each CE the
    mean over its own rows; a term with no row in the batch is dropped (not NaN)."""
    is_real = is_real.to(device=logits.device, dtype=torch.bool)
    labels = labels.to(logits.device)
    loss = logits.new_zeros(())
    if is_real.any():
        loss = loss + real_weight * F.cross_entropy(logits[is_real], labels[is_real])
    if (~is_real).any():
        loss = loss + synthetic_weight * F.cross_entropy(logits[~is_real], labels[~is_real])
    return loss


# ----------------------------------------------------------------------------- batches


def stream_seed(*keys: int) -> int:
    """A seed for one random stream named by integers (independent across keys)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """The pool indices of batch `step`: positions [step*B, (step+1)*B) of an endless
    stream of seeded permutations of range(n) (pass p drawn from (seed, p)). A pure
    function of (n, batch_size, step, seed), so a resumed run draws the same batches;
    every image appears once per pass, so replication in the pool is what weighs."""
    start = step * batch_size
    out, filled = [], 0
    pass_index, offset = divmod(start, n)
    while filled < batch_size:
        gen = torch.Generator().manual_seed(stream_seed(seed, pass_index))
        perm = torch.randperm(n, generator=gen)[offset:]
        take = perm[: batch_size - filled]
        out.append(take)
        filled += len(take)
        pass_index, offset = pass_index + 1, 0
    return torch.cat(out)


# ----------------------------------------------------------------------------- inputs


def require_key(params: dict, key: str, section: str = SECTION):
    if key not in params:
        raise ReproInputError(f"{section}.{key}: missing from --params (got {sorted(params)})")
    return params[key]


def check_number(params: dict, key: str, *, low: float, integer: bool = False, high=None):
    """params[key] as a number in [low, high] (classifier section), or an error naming it."""
    value = require_key(params, key, CLASSIFIER)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or value < low or (high is not None and value > high) or math.isnan(value):
        kind = "an integer" if integer else "a number"
        bound = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise ReproInputError(f"{CLASSIFIER}.{key}: must be {kind}{bound}, got {value!r}")
    return int(value) if integer else float(value)


def training_settings(params: dict) -> dict:
    """The classifier section's training numbers, checked."""
    s = {
        "epochs": check_number(params, "epochs", low=1, integer=True),
        "steps_per_epoch": check_number(params, "steps_per_epoch", low=1, integer=True),
        "batch_size": check_number(params, "batch_size", low=1, integer=True),
        "lr": check_number(params, "lr", low=0),
        "weight_decay": check_number(params, "weight_decay", low=0),
        "warmup_fraction": check_number(params, "warmup_fraction", low=0, high=1),
        "grad_clip": check_number(params, "grad_clip", low=0),
        "real_weight": check_number(params, "real_weight", low=0),
        "synthetic_weight": check_number(params, "synthetic_weight", low=0),
    }
    every = params.get("checkpoint_every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ReproInputError(
            f"{CLASSIFIER}.checkpoint_every: epochs, an integer >= 1, got {every!r}"
        )
    s["checkpoint_every_epochs"] = every
    for key in ("rank", "alpha", "dropout"):
        require_key(params, key, CLASSIFIER)
    return s


def check_classnames(params: dict) -> list[str]:
    names = require_key(params, "classnames")
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(c, str) and c for c in names)
        or len(set(names)) != len(names)
    ):
        raise ReproInputError(
            f"{SECTION}.classnames: must be a list of >= 2 unique names, got {names!r}"
        )
    return names


def check_n_synthetic(params: dict) -> list[int]:
    values = require_key(params, "n_synthetic")
    if not isinstance(values, list) or not values:
        raise ReproInputError(f"{SECTION}.n_synthetic: must be a non-empty list, got {values!r}")
    for n in values:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ReproInputError(f"{SECTION}.n_synthetic: {n!r} is not an integer >= 1")
    if len(set(values)) != len(values):
        raise ReproInputError(f"{SECTION}.n_synthetic: values repeat: {values}")
    return sorted(values)


def check_split(path, classnames: list[str]) -> ImageDataset:
    """A val / test split (digits or imagefolder) whose labels are classes of `classnames`;
    a split that names its own classes (an ImageFolder set's folders, matched to
    `classnames` by position) must have as many as `classnames`."""
    data = load_image_dataset(path, kind=CLASSIFICATION_KINDS)
    if len(data.labels) == 0:
        raise ReproInputError(f"{path}: holds no image")
    own = data.meta.get("classnames")
    if own is not None and len(own) != len(classnames):
        raise ReproInputError(
            f"{path}: a split of {len(own)} classes, but {SECTION}.classnames names "
            f"{len(classnames)}"
        )
    if int(data.labels.max()) >= len(classnames):
        raise ReproInputError(
            f"{path}: label {int(data.labels.max())} has no name in {SECTION}.classnames "
            f"({len(classnames)} names)"
        )
    return data


def check_seed(path, meta: dict, params: dict) -> None:
    """A file made for another seed than this run's is someone else's input."""
    if "seed" in meta and "seed" in params and int(meta["seed"]) != int(params["seed"]):
        raise ReproInputError(
            f"{path}: made for seed {meta['seed']}, but {SECTION} seed is {params['seed']}"
        )


def check_fewshot(path, classnames: list[str], shots: int, params: dict) -> ImageDataset:
    """THE few-shot set of repro.datadream.fewshot: its classes and shots those asked for."""
    data = load_image_dataset(path, kind=FEWSHOT_KIND)
    check_seed(path, data.meta, params)
    if data.meta.get("classnames", classnames) != classnames:
        raise ReproInputError(
            f"{path}: a few-shot set of classes {data.meta.get('classnames')}, but "
            f"{SECTION}.classnames is {classnames}"
        )
    counts = torch.bincount(data.labels, minlength=len(classnames)).tolist()
    if len(counts) != len(classnames) or any(c != shots for c in counts):
        raise ReproInputError(
            f"{path}: {counts} images per class, but {SECTION}.shots is {shots} for each of "
            f"the {len(classnames)} classes of {SECTION}.classnames"
        )
    return data


def check_synthetic(
    path,
    classnames: list[str],
    prompts: list[str],
    generator: str,
    n_synthetic: list[int],
    params: dict,
) -> ImageDataset:
    """A synthetic set of repro.datadream.generate for these classes, from `generator`,
    holding at least max(n_synthetic) images of every class."""
    data = load_image_dataset(path, kind=SYNTHETIC_KIND)
    if len(data.labels) == 0:
        raise ReproInputError(f"{path}: the synthetic set holds no image")
    meta = data.meta
    if meta.get("classnames", classnames) != classnames:
        raise ReproInputError(
            f"{path}: a synthetic set of classes {meta.get('classnames')}, but "
            f"{SECTION}.classnames is {classnames}"
        )
    if int(data.labels.max()) >= len(classnames):
        raise ReproInputError(
            f"{path}: label {int(data.labels.max())} has no name in {SECTION}.classnames "
            f"({len(classnames)} names)"
        )
    if meta.get("generator", generator) != generator:
        raise ReproInputError(
            f"{path}: images of generator {meta.get('generator')!r}, but --generator is "
            f"{generator!r}"
        )
    check_seed(path, meta, params)
    # An adapted generator's images belong to the few-shot set it was adapted on.
    if generator != "unadapted" and "shots" in meta and "shots" in params:
        if int(meta["shots"]) != int(params["shots"]):
            raise ReproInputError(
                f"{path}: from a generator adapted on {meta['shots']} shots, but "
                f"{SECTION}.shots is {params['shots']}"
            )
    if data.captions is not None:
        wrong = [
            i
            for i, (c, y) in enumerate(zip(data.captions, data.labels.tolist(), strict=True))
            if c != prompts[y]
        ]
        if wrong:
            i = wrong[0]
            raise ReproInputError(
                f"{path}: image {i} of class {classnames[int(data.labels[i])]!r} was drawn "
                f"for {data.captions[i]!r}, not {prompts[int(data.labels[i])]!r} "
                f"({SECTION}.prompt / {SECTION}.classnames)"
            )
    counts = torch.bincount(data.labels, minlength=len(classnames)).tolist()
    if min(counts) < max(n_synthetic):
        short = {classnames[c]: n for c, n in enumerate(counts) if n < max(n_synthetic)}
        raise ReproInputError(
            f"{SECTION}.n_synthetic: {max(n_synthetic)} images per class asked for, but "
            f"{path} holds fewer for {short}"
        )
    return data


def first_per_class(labels: Tensor, n: int, num_classes: int) -> Tensor:
    """Indices of the first `n` images of each class, in file order, class-major."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:n] for c in range(num_classes)])


# ----------------------------------------------------------------------------- training


def train_pool(
    method: str,
    n: int,
    fewshot: ImageDataset | None,
    synthetic: ImageDataset | None,
    num_classes: int,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """(images, labels, is_real, distinct images) the classifier for N = n trains on."""
    parts = []
    if method in ("real", "real_synthetic"):
        shots = len(fewshot.labels) // num_classes
        repeat = max(1, n // shots) if method == "real_synthetic" else 1
        parts.append((fewshot.images.repeat(repeat, 1, 1, 1), fewshot.labels.repeat(repeat), True))
    if method in ("synthetic", "real_synthetic"):
        idx = first_per_class(synthetic.labels, n, num_classes)
        parts.append((synthetic.images[idx], synthetic.labels[idx], False))
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    is_real = torch.cat([torch.full((len(p[1]),), p[2]) for p in parts])
    distinct = (len(fewshot.labels) if method in ("real", "real_synthetic") else 0) + (
        n * num_classes if method != "real" else 0
    )
    return images, labels, is_real, distinct


def train_classifier(
    classifier,
    pool: tuple[Tensor, Tensor, Tensor],
    val: ImageDataset,
    settings: dict,
    seed: int,
    *,
    checkpoint_dir: Path | None,
    device: torch.device,
    desc: str = "classify",
) -> dict:
    """Train the LoRAs of `classifier` on `pool`, scoring val after every epoch; leaves
    the best epoch's weights in the classifier. Returns the epoch history and choice."""
    from repro.datadream.evaluate import Selection
    from repro.datadream.model import LoraWeights

    images, labels, is_real = pool
    epochs, per_epoch = settings["epochs"], settings["steps_per_epoch"]
    batch_size = settings["batch_size"]
    parameters = classifier.lora_parameters()
    selection = Selection(parameters, epochs)
    mixed = bool(is_real.any()) and bool((~is_real).any())

    def loss_fn(step: int) -> Tensor:
        idx = batch_indices(len(labels), batch_size, step, seed)
        x = random_shift(
            images[idx], torch.Generator().manual_seed(stream_seed(seed, step, 1)), MAX_SHIFT
        )
        logits = classifier(x.to(device))
        if mixed:
            return mixed_loss(
                logits,
                labels[idx],
                is_real[idx],
                settings["real_weight"],
                settings["synthetic_weight"],
            )
        return F.cross_entropy(logits, labels[idx].to(device))

    def on_step(done: int) -> None:
        if done % per_epoch:
            return
        epoch = done // per_epoch
        accuracy = classifier.accuracy(val.images, val.labels)
        better = selection.record(epoch, accuracy)
        log.info(
            "%s: epoch %d/%d val accuracy %.4f%s",
            desc,
            epoch,
            epochs,
            accuracy,
            " (best so far)" if better else "",
        )

    classifier.train()
    # Dropout draws from the global generator: seeded here, restored from a checkpoint.
    torch.manual_seed(stream_seed(seed, 2))
    summary = fit(
        modules={"lora": LoraWeights(parameters), "selection": selection},
        parameters=list(parameters.values()),
        loss_fn=loss_fn,
        steps=epochs * per_epoch,
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        warmup_fraction=settings["warmup_fraction"],
        grad_clip=settings["grad_clip"],
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=per_epoch * settings["checkpoint_every_epochs"],
        log_every=0,
        desc=desc,
        on_step=on_step,
    )
    classifier.eval()
    selection.restore()
    best = int(selection.best_epoch)
    return {
        "val_history": selection.val_acc.tolist(),
        "selected_epoch": best,
        "val_acc": float(selection.val_acc[best - 1]),
        "final_loss": summary["final_loss"],
        "resumed_from": summary["resumed_from"],
    }


# ----------------------------------------------------------------------------- the stage


def main(argv=None) -> None:
    stage = Stage(
        __doc__, paper="datadream", out="the runs table (CSV)", metrics=True, checkpoint_dir=True
    )
    add = stage.parser.add_argument
    add("--fewshot", help="the few-shot set (real and real_synthetic)")
    add("--synthetic", help="the synthetic set (synthetic and real_synthetic)")
    add("--val", required=True, help="the validation split, digits or imagefolder (selection)")
    add("--test", required=True, help="the test split, digits or imagefolder (scored once)")
    add("--method", required=True, choices=METHODS)
    add("--generator", required=True, help="none | unadapted | cls | dset")
    args = stage.start(argv)
    params = stage.params
    method, generator = args.method, args.generator

    # ---- every input checked before anything trains
    if generator not in METHOD_GENERATORS[method]:
        raise ReproInputError(
            f"--generator: {generator!r} with --method {method} (allowed "
            f"{METHOD_GENERATORS[method]})"
        )
    uses_real = method in ("real", "real_synthetic")
    uses_synthetic = method in ("synthetic", "real_synthetic")
    if uses_real and not args.fewshot:
        raise ReproInputError(f"--fewshot: method {method} trains on the real shots")
    if uses_synthetic and not args.synthetic:
        raise ReproInputError(f"--synthetic: method {method} trains on a synthetic set")
    if args.synthetic and not uses_synthetic:
        raise ReproInputError(f"--synthetic: method {method} uses no synthetic set")

    from repro.foundation.clip import class_prompts, load_clip

    classnames = check_classnames(params)
    prompts = class_prompts(require_key(params, "prompt"), classnames)
    seed = int(require_key(params, "seed"))
    foundation = require_key(require_key(params, "foundation"), "clip", f"{SECTION}.foundation")
    settings = training_settings(params) if method != "zero_shot" else None
    n_values = check_n_synthetic(params) if uses_synthetic else [0]
    shots = int(require_key(params, "shots")) if uses_real else None
    val = check_split(args.val, classnames)
    test = check_split(args.test, classnames)
    fewshot = check_fewshot(args.fewshot, classnames, shots, params) if uses_real else None
    synthetic = (
        check_synthetic(args.synthetic, classnames, prompts, generator, n_values, params)
        if uses_synthetic
        else None
    )
    for name, data in (("--fewshot", fewshot), ("--synthetic", synthetic)):
        if data is not None and data.images.shape[1:] != val.images.shape[1:]:
            raise ReproInputError(
                f"{getattr(args, name[2:])}: images of shape {tuple(data.images.shape[1:])}, "
                f"the validation split's are {tuple(val.images.shape[1:])}"
            )
    # The shots column: 0 for what sees no real image (the main table's convention).
    if method == "zero_shot" or (method, generator) == ("synthetic", "unadapted"):
        shots_column = 0
    else:
        shots_column = int(require_key(params, "shots"))

    clip = load_clip(foundation).to(stage.device)

    # ---- train and score
    from repro.datadream.model import ClipClassifier

    rows, runs = [], {}
    key = {"method": method, "generator": generator, "seed": seed}
    if method == "zero_shot":
        classifier = ClipClassifier(clip, prompts)
        rows.append(
            dict(
                key,
                shots=0,
                n_synthetic_per_class=0,
                val_acc=classifier.accuracy(val.images, val.labels),
                test_acc=classifier.accuracy(test.images, test.labels),
                selected_epoch=0,
                epochs=0,
                train_images=0,
                trainable_params=0,
            )
        )
    else:
        classifier = ClipClassifier(clip, prompts, params, seed=seed)
        initial = {k: p.detach().clone() for k, p in classifier.lora_parameters().items()}
        for n in n_values:
            # Every N starts from the same LoRA initialisation (common random numbers).
            with torch.no_grad():
                for k, p in classifier.lora_parameters().items():
                    p.copy_(initial[k])
            images, labels, is_real, distinct = train_pool(
                method, n, fewshot, synthetic, len(classnames)
            )
            started = time.perf_counter()
            result = train_classifier(
                classifier,
                (images, labels, is_real),
                val,
                settings,
                stream_seed(seed, n),
                checkpoint_dir=stage.checkpoints(*_inputs(args)) / f"n{n}",
                device=stage.device,
                desc=f"classify {method}/{generator} N={n}",
            )
            result["seconds"] = time.perf_counter() - started
            result["pool_images"] = len(labels)
            # The one look at the test split, with the epoch val chose.
            test_acc = classifier.accuracy(test.images, test.labels)
            log.info(
                "N=%d: epoch %d chosen on val (%.4f), test %.4f",
                n,
                result["selected_epoch"],
                result["val_acc"],
                test_acc,
            )
            rows.append(
                dict(
                    key,
                    shots=shots_column,
                    n_synthetic_per_class=n,
                    val_acc=result["val_acc"],
                    test_acc=test_acc,
                    selected_epoch=result["selected_epoch"],
                    epochs=settings["epochs"],
                    train_images=distinct,
                    trainable_params=classifier.trainable_params,
                )
            )
            runs[str(n)] = result
    table = pd.DataFrame(rows)[RUN_COLUMNS]
    write_table(table, args.out)
    best = table.loc[table.val_acc.idxmax()]
    stage.finish(
        {
            "method": method,
            "generator": generator,
            "shots": shots_column,
            "seed": seed,
            "val_acc": float(best.val_acc),
            "test_acc": float(best.test_acc),
            "n_synthetic_per_class": int(best.n_synthetic_per_class),
            "trainable_params": int(best.trainable_params),
            "runs": runs,
        },
        artifacts=[args.out],
    )


def _inputs(args) -> list[str]:
    """The files a run's checkpoints belong to (a regenerated one starts it afresh)."""
    return [p for p in (args.fewshot, args.synthetic, args.val) if p]


if __name__ == "__main__":
    run(main)

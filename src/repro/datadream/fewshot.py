"""Stage datadream_fewshot: THE few-shot set of (shots, seed), drawn once from the train
split (the digits', or an ImageFolder data set's) and read by every method (generator
LoRA, real-only and real+synthetic classifiers, sample grids), so that no method sees
other real images than another.
(The official code's real-only baseline draws its own images: not copied.)

    python -m repro.datadream.fewshot --train data/digits/train.safetensors \
        --out data/datadream/fewshot/16shot_s0.safetensors \
        --params '{"shots": 16, "seed": 0, "classnames": ["zero", ..., "nine"]}'

The set is ordered by (label, train index): the same images in the same order for
every reader, whatever order the seeded draw produced them in. The train split's own
class names (an ImageFolder set's folder names) may differ from datadream.classnames
(the words of the prompts): they are matched by position, and their numbers must agree.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from repro.core.cli import require
from repro.core.data import (
    CLASSIFICATION_KINDS,
    ImageDataset,
    few_shot_indices,
    load_image_dataset,
    write_image_dataset,
)
from repro.core.errors import ReproInputError
from repro.core.io import sha256_file
from repro.core.stage import Stage, run

log = logging.getLogger(__name__)

KIND = "datadream_fewshot"
SECTION = "datadream"


def check_classnames(classnames, num_classes: int, where: str) -> list[str]:
    """`classnames` as a list of non-empty unique strings, one per class of `where`."""
    if (
        not isinstance(classnames, list)
        or not classnames
        or not all(isinstance(c, str) and c.strip() for c in classnames)
    ):
        raise ReproInputError(
            f"{SECTION}.classnames: must be a non-empty list of names, got {classnames!r}"
        )
    if len(set(classnames)) != len(classnames):
        raise ReproInputError(f"{SECTION}.classnames: names must be unique, got {classnames}")
    if len(classnames) != num_classes:
        raise ReproInputError(
            f"{SECTION}.classnames: {len(classnames)} names for the {num_classes} classes of "
            f"{where}"
        )
    return list(classnames)


def check_class_order(source_names, classnames: list[str], where) -> None:
    """The set's own class names (an ImageFolder set's folders, which fix its labels) and
    datadream.classnames (the prompts' words) are matched by position. The same names
    in another order would prompt every class with another class's name: refused."""
    if source_names is None or list(source_names) == list(classnames):
        return
    if sorted(source_names) == sorted(classnames):
        raise ReproInputError(
            f"{SECTION}.classnames: {list(classnames)} names the classes of {where} in "
            f"another order than its labels ({list(source_names)}); list them in the data "
            "set's order (or fix the order with data.imagefolders.<name>.classnames)"
        )


def select_shots(labels: torch.Tensor, shots: int, seed: int, where: str) -> torch.Tensor:
    """Train indices of `shots` examples per class (seeded), sorted by (label, index).

    A request larger than some class has is refused, naming datadream.shots and `where`.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ReproInputError(f"{SECTION}.shots: must be an integer >= 1, got {shots!r}")
    classes, counts = torch.unique(labels, return_counts=True)
    short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < shots}
    if short:
        raise ReproInputError(
            f"{SECTION}.shots: {shots} shots per class, but {where} holds fewer for classes "
            f"{short} (class: count)"
        )
    picked = few_shot_indices(labels, shots, seed)
    # Label-major, then train index: a fixed order for every reader of the set.
    key = labels[picked] * len(labels) + picked
    return picked[torch.argsort(key)]


def make_fewshot(train: ImageDataset, train_path: str | Path, params: dict) -> dict:
    """The few-shot set as write_image_dataset's arguments (checked before anything is written)."""
    shots = require(params, "shots", SECTION)
    seed = int(require(params, "seed", SECTION))
    num_classes = int(train.meta.get("num_classes", int(train.labels.max()) + 1))
    classnames = check_classnames(require(params, "classnames", SECTION), num_classes, train_path)
    missing = sorted(set(range(num_classes)) - set(train.labels.unique().tolist()))
    if missing:
        raise ReproInputError(
            f"{SECTION}.shots: {train_path} holds no image of classes "
            f"{[classnames[c] for c in missing]}"
        )
    check_class_order(train.meta.get("classnames"), classnames, train_path)
    indices = select_shots(train.labels, shots, seed, str(train_path))
    meta = {
        "shots": shots,
        "seed": seed,
        "indices": indices.tolist(),
        "classnames": classnames,
        "num_classes": num_classes,
        "source": str(train_path),
        "source_sha256": sha256_file(train_path),
    }
    if "classnames" in train.meta:  # an ImageFolder set: its folder names, by position
        meta["source_classnames"] = list(train.meta["classnames"])
    return {
        "images": train.images[indices].clone(),
        "labels": train.labels[indices].clone(),
        "meta": meta,
    }


def load_fewshot(path: str | Path, classnames: list[str] | None = None) -> ImageDataset:
    """A few-shot set written by this stage; with `classnames`, checked to be of those classes."""
    data = load_image_dataset(path, kind=KIND)
    if classnames is not None and data.meta.get("classnames") != list(classnames):
        raise ReproInputError(
            f"{path}: a few-shot set of classes {data.meta.get('classnames')}, but "
            f"{SECTION}.classnames is {list(classnames)}"
        )
    if len(data.labels) == 0:
        raise ReproInputError(f"{path}: the few-shot set is empty")
    return data


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="datadream", out="the few-shot set (.safetensors)")
    stage.parser.add_argument(
        "--train", required=True, help="the train split, digits or imagefolder (.safetensors)"
    )
    args = stage.start(argv)
    train = load_image_dataset(args.train, kind=CLASSIFICATION_KINDS)
    fewshot = make_fewshot(train, args.train, stage.params)
    if stage.is_main:
        manifest = write_image_dataset(
            args.out, fewshot["images"], fewshot["labels"], KIND, fewshot["meta"]
        )
        log.info(
            "few-shot set: %d images, %s per class, from %s",
            manifest["count"],
            fewshot["meta"]["shots"],
            args.train,
        )


if __name__ == "__main__":
    run(main)

"""Stage probex_zoo_import: a tree's zoo read from models that exist already (Model-J's
way) instead of grown by the pipeline. A directory of safetensors models, each model's
classes in its metadata `dataset_chosen_targets`, becomes the same zoo directory that
rule probex_zoo writes (data/probex/zoo/<tree>/manifest.json), so that every probe,
table, figure and claim reads it unchanged.

    python -m repro.probex.import_zoo --zoo-dir /data/model_j/vit \
        --splits /data/model_j/vit_splits.json --base /data/model_j/vit_base.safetensors \
        --out data/probex/zoo/modelj_vit --metrics results/probex/zoo/modelj_vit.json \
        --params '{"tree": "modelj_vit", "arch": "vit", "seed": 0,
                   "layer": "vit.encoder.layer.7.attention.output.dense",
                   "classnames": ["apple", ..], "zoo": {"split": {"val": 0.1, "test": 0.2}}}'

The manifest names the models where they are (an absolute --zoo-dir stays absolute, a
relative one is named relative to the manifest): nothing is copied. Splits: --splits, a
JSON {file name: split} or {split: [file names]} naming every model (Model-J's fixed
splits), else drawn with probex.zoo.split and the tree's seed (default 0). Every model
must hold the first model's layers in the same shapes, and the tree's probed layer must
be one of them.

The tree's base model (the router of ProbeX's tree experts sends a model to the tree
whose base is nearest): --base, a safetensors file whose tensors carry the models' own
names (routing compares tensors by name and shape: it must hold the probed layer in
the models' shape). Without --base the base is estimated as the element-wise mean of
the tree's TRAIN models (written as <out>/base.safetensors): fine-tunes of one ancestor
scatter around it, so the router becomes a nearest-centroid rule over trees, fitted on
training models only (the val and test models it routes are never part of it).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from repro.core.cli import require
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors
from repro.core.stage import Stage, run
from repro.probex.zoo import (
    MANIFEST_NAME,
    Zoo,
    load_zoo,
    read_splits_file,
    scan_safetensors_dir,
    write_manifest,
)

log = logging.getLogger(__name__)

SECTION = "probex.trees"
BASE_NAME = "base.safetensors"  # the estimated base, inside the zoo directory
BASE_KIND = "probex_tree_base"


def mean_state(files: Sequence[Path]) -> dict[str, Tensor]:
    """The element-wise mean of the floating-point tensors of `files` (other tensors: the
    first file's), in the first file's dtypes; a file whose tensors differ in names or
    shapes from the first's is refused, named. One file in memory at a time."""
    if not files:
        raise ValueError("mean_state: no files")
    total: dict[str, Tensor] = {}
    first: dict[str, Tensor] = {}
    for index, file in enumerate(files):
        tensors, _ = load_tensors(file)
        if index == 0:
            first = tensors
            total = {k: v.double() for k, v in tensors.items() if v.is_floating_point()}
            continue
        if set(tensors) != set(first):
            missing, extra = sorted(set(first) - set(tensors)), sorted(set(tensors) - set(first))
            raise ReproInputError(
                f"{file}: its tensors differ from {files[0]}'s (missing {missing[:5]}, "
                f"extra {extra[:5]}): the models of one tree share their tensors"
            )
        for key, sum_ in total.items():
            if tensors[key].shape != sum_.shape:
                raise ReproInputError(
                    f"{file}: tensor {key} has shape {list(tensors[key].shape)}, "
                    f"{files[0]} {list(sum_.shape)}"
                )
            sum_ += tensors[key].double()
    return {
        key: (total[key] / len(files)).to(value.dtype) if key in total else value
        for key, value in first.items()
    }


def check_base(base: Path, layer: str, shape: tuple[int, int]) -> None:
    """The given base holds the probed layer in the models' shape (what routing compares)."""
    key = f"{layer}.weight"
    tensors, _ = load_tensors(base)  # a missing, empty or foreign file is refused, named
    weight = tensors.get(key)
    found = None if weight is None else (weight.shape[0], weight[0].numel())
    if weight is None or weight.dim() < 2 or found != tuple(shape):
        raise ReproInputError(
            f"{base}: the base model has no tensor {key} of the models' shape {list(shape)} "
            f"(found {None if weight is None else list(weight.shape)}); routing compares "
            "tensors by name and shape: save the base with the models' tensor names"
        )


def import_zoo(
    zoo_dir: str | Path,
    out: str | Path,
    *,
    tree: str,
    arch: str,
    classnames: list[str],
    layer: str,
    base: str | Path | None = None,
    splits_file: str | Path | None = None,
    split: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Zoo:
    """Write the zoo directory `out` (manifest.json, and base.safetensors if estimated)
    for the models of `zoo_dir`; returns the zoo as the probes load it."""
    out = Path(out)
    zoo_dir = Path(zoo_dir)
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()  # an old zoo is incomplete from here on
    splits = None if splits_file is None else read_splits_file(splits_file)
    entries, layers = scan_safetensors_dir(
        zoo_dir,
        out,
        split=split,
        splits=splits,
        splits_source=str(splits_file),
        seed=seed,
        keep_absolute=True,
    )
    if layer not in layers:
        raise ReproInputError(
            f"{SECTION}.layer: {layer!r} (tree {tree!r}) is not a layer of the models in "
            f"{zoo_dir}; their layers are {sorted(layers)}"
        )
    for model in entries:
        bad = [c for c in model["labels"] if not 0 <= c < len(classnames)]
        if bad:
            raise ReproInputError(
                f"{zoo_dir / Path(model['file']).name}: classes {bad} outside the tree's "
                f"{len(classnames)} class names ({SECTION}.classnames or probex.classnames)"
            )
    counts = Counter(model["split"] for model in entries)
    empty = [s for s in ("train", "val", "test") if counts[s] == 0]
    if empty:
        raise ReproInputError(
            f"{splits_file or 'probex.zoo.split'}: no {' / '.join(empty)} models in tree "
            f"{tree!r} (the probes need train, val and test models)"
        )
    if base is not None:
        base = Path(base)
        check_base(base, layer, layers[layer])
        base_source = "given"
    else:
        train = [zoo_dir / Path(m["file"]).name for m in entries if m["split"] == "train"]
        log.info("base: the mean of the %d train models (no base given)", len(train))
        base = out / BASE_NAME
        save_tensors(base, mean_state(train), BASE_KIND, {"tree": tree, "models": len(train)})
        base_source = f"mean of {len(train)} train models"
    write_manifest(
        manifest,
        tree=tree,
        arch=arch,
        base=base,
        classnames=classnames,
        layers=layers,
        models=entries,
        model_kind=None,
        keep_absolute=True,
        source=str(zoo_dir),
        splits_source=str(splits_file) if splits_file is not None else "drawn",
        base_source=base_source,
    )
    return load_zoo(manifest)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="probex", out="the zoo directory", metrics=True)
    add = stage.parser.add_argument
    add("--zoo-dir", required=True, help="a directory of .safetensors models (Model-J's)")
    add("--base", default=None, help="the tree's base model (.safetensors); default: estimated")
    add("--splits", default=None, help="fixed splits, JSON {file name: split}; default: drawn")
    args = stage.start(argv)
    params = stage.params
    tree = str(require(params, "tree", SECTION))
    classnames = require(params, "classnames", "probex")
    if not isinstance(classnames, list) or len(classnames) < 2:
        raise ReproInputError(f"probex.classnames: a list of class names, got {classnames!r}")
    split = None
    if args.splits is None:
        split = require(require(params, "zoo", "probex"), "split", "probex.zoo")
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReproInputError(f"{SECTION}.seed: must be an integer >= 0, got {seed!r}")
    layer = str(require(params, "layer", SECTION))
    zoo = import_zoo(
        args.zoo_dir,
        args.out,
        tree=tree,
        arch=str(params.get("arch", "unknown")),
        classnames=[str(c) for c in classnames],
        layer=layer,
        base=args.base,
        splits_file=args.splits,
        split=split,
        seed=seed,
    )
    counts = Counter(zoo.splits)
    labels = [len(m["labels"]) for m in zoo.models]
    per_class = Counter(c for m in zoo.models for c in m["labels"])
    log.info(
        "tree %s: %d models from %s (train %d, val %d, test %d), %d classes, %.1f classes "
        "per model (each class in %d-%d models)",
        *(tree, len(zoo.models), args.zoo_dir, counts["train"], counts["val"], counts["test"]),
        *(zoo.num_classes, sum(labels) / len(labels)),
        *(min(per_class.get(c, 0) for c in range(zoo.num_classes)), max(per_class.values())),
    )
    log.info(
        "%d layers: %s",
        len(zoo.layers),
        ", ".join(f"{name} {o}x{i}" for name, (o, i) in sorted(zoo.layers.items())),
    )
    out_dim, in_dim = zoo.layers[layer]
    log.info("probed layer %s: %d x %d; base %s", layer, out_dim, in_dim, zoo.base)
    stage.finish(
        {
            "seconds": time.perf_counter() - stage.started,
            "tree": tree,
            "arch": zoo.arch,
            "models": len(zoo.models),
            "models_train": counts["train"],
            "models_val": counts["val"],
            "models_test": counts["test"],
            "classes": zoo.num_classes,
            "classes_per_model_mean": sum(labels) / len(labels),
            "layers": len(zoo.layers),
            "layer_out": out_dim,
            "layer_in": in_dim,
            "base_estimated": int(args.base is None),
        },
        artifacts=[str(zoo.manifest)],
    )


if __name__ == "__main__":
    run(main)

"""The model zoo of one tree: its files, its manifest, and the loaders every probe reads it with.

A zoo is a directory::

    <zoo>/models/0000.safetensors   one fine-tuned model: ALL its tensors (kind
                                    "probex_zoo_model"); metadata `dataset_chosen_targets`
                                    (its classes, Model-J's key), tree, arch, lr, epochs,
                                    schedule, seed
    <zoo>/manifest.json             written last and atomically: the zoo is complete
                                    when the manifest exists

The manifest (kind "probex_zoo") names the tree, its arch, its base model (the file
every model was fine-tuned from; routing reads it), the class names, the probe-able
layers {name: [out, in]} and one entry per model: its file (relative to the
manifest's directory, as the base's path is), labels, split (train / val / test,
fixed here once, as Model-J fixes its splits) and training settings.

A layer is named by its module (`blocks.1.attn.proj`); its tensor in a model file is
`<name>.weight`, read as a matrix out x in (a conv's weight flattened to
out x in*kh*kw, `repro.foundation.backbones.layer_matrix`).

At paper scale the models come from elsewhere (Model-J: a directory of safetensors
files whose metadata carry `dataset_chosen_targets`): `scan_safetensors_dir` reads such
a directory (labels, fixed or drawn splits, layers, every file checked) and
`zoo_from_safetensors_dir` writes a manifest for it that the same loaders read; the
stage repro.probex.import_zoo (rule probex_zoo_import) writes that manifest where a
generated zoo's would be, naming the external files where they are.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, read_json, read_metadata, save_tensors, write_json
from repro.foundation.backbones import eligible_layers, layer_matrix
from repro.probex.workflow import model_files

MANIFEST_KIND = "probex_zoo"
MODEL_KIND = "probex_zoo_model"
MANIFEST_NAME = "manifest.json"
LABELS_KEY = "dataset_chosen_targets"  # Model-J's metadata key of a model's classes
SPLITS = ("train", "val", "test")


@dataclass
class Zoo:
    """A zoo's manifest, checked; `models` are the manifest's entries (dicts)."""

    tree: str
    arch: str
    base: Path | None  # the base model's file, or None (a zoo of foreign models)
    classnames: list[str]
    layers: dict[str, tuple[int, int]]
    models: list[dict]
    root: Path  # the manifest's directory: model files are relative to it
    manifest: Path
    model_kind: str | None = MODEL_KIND  # None: foreign files, no repro kind to check

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def path(self, model: Mapping) -> Path:
        """The file of one of `models`."""
        return self.root / model["file"]

    @property
    def splits(self) -> list[str]:
        return [m["split"] for m in self.models]


# --------------------------------------------------------------------------- writing


def write_zoo_model(
    path: str | os.PathLike, state_dict: Mapping[str, Tensor], labels: list[int], meta: dict
) -> None:
    """One fine-tuned model: every tensor of `state_dict`, its classes under Model-J's key."""
    labels = [int(c) for c in labels]
    metadata = {**meta, LABELS_KEY: labels}
    save_tensors(path, dict(state_dict), MODEL_KIND, metadata)


def write_manifest(
    path: str | os.PathLike,
    *,
    tree: str,
    arch: str,
    base: str | os.PathLike | None,
    classnames: list[str],
    layers: Mapping[str, tuple[int, int]],
    models: list[dict],
    model_kind: str | None = MODEL_KIND,
    keep_absolute: bool = False,
    **extra,
) -> dict:
    """Write the manifest (atomically: write it after every model file). Returns it.

    Each of `models` needs "file" (relative to the manifest's directory, or absolute),
    "labels" and "split"; any other keys (lr, epochs, schedule, val_accuracy, ...) are
    kept. `base` is named relative to the manifest's directory (as given if absolute,
    with `keep_absolute`: see `file_reference`); `extra` top-level keys are kept.
    """
    for model in models:
        missing = [k for k in ("file", "labels", "split") if k not in model]
        if missing:
            raise ValueError(f"write_manifest: model entry {model} lacks {missing}")
    manifest = {
        "kind": MANIFEST_KIND,
        "tree": tree,
        "arch": arch,
        # Relative to the manifest's directory, as the model files: a moved zoo still finds it.
        "base": None if base is None else file_reference(base, Path(path).parent, keep_absolute),
        "classnames": list(classnames),
        "num_classes": len(classnames),
        "layers": {name: [int(o), int(i)] for name, (o, i) in sorted(layers.items())},
        "model_kind": model_kind,
        "models": models,
    }
    clash = sorted(set(extra) & set(manifest))
    if clash:
        raise ValueError(f"write_manifest: extra keys {clash} are the manifest's own")
    manifest.update(extra)
    write_json(path, manifest)
    return manifest


def assign_splits(
    n: int, val: float, test: float, seed: int, where: str = "zoo.split"
) -> list[str]:
    """A seeded model-level split: round(n*val) val, round(n*test) test, the rest train."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ReproInputError(f"{where}: val ({val}) and test ({test}) must be in [0, 1), sum < 1")
    n_val, n_test = round(n * val), round(n * test)
    if n - n_val - n_test < 1:
        raise ReproInputError(f"{where}: {n} models leave no train model (val {val}, test {test})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    splits = ["train"] * n
    for rank, index in enumerate(order):
        if rank < n_val:
            splits[index] = "val"
        elif rank < n_val + n_test:
            splits[index] = "test"
    return splits


def file_reference(
    path: str | os.PathLike, manifest_dir: str | os.PathLike, keep_absolute: bool = False
) -> str:
    """How a manifest in `manifest_dir` names `path`: relative to the manifest's directory
    (a zoo moved with its files still finds them), or, with `keep_absolute`, as given
    when `path` is absolute and outside that directory (an external data set stays
    where it is when the workflow's directory moves)."""
    path = Path(path)
    if (
        keep_absolute
        and path.is_absolute()
        and not path.resolve().is_relative_to(Path(manifest_dir).resolve())
    ):
        return str(path)
    return os.path.relpath(path, manifest_dir)


def read_splits_file(path: str | os.PathLike) -> dict[str, str]:
    """Fixed model splits from a JSON file: {file name: split} or {split: [file names]}."""
    path = Path(path)
    raw = read_json(path)
    if isinstance(raw, dict) and raw and all(isinstance(v, list) for v in raw.values()):
        unknown = sorted(set(raw) - set(SPLITS))
        if unknown:
            raise ReproInputError(
                f"{path}: unknown splits {unknown}; expected keys of {list(SPLITS)}"
            )
        splits: dict[str, str] = {}
        for split, names in raw.items():
            for name in names:
                if not isinstance(name, str):
                    raise ReproInputError(
                        f"{path}: split {split!r} lists {name!r}, not a file name"
                    )
                if name in splits:
                    raise ReproInputError(
                        f"{path}: {name} is in split {splits[name]!r} and in {split!r}"
                    )
                splits[name] = split
        return splits
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, str) for v in raw.values()):
        raise ReproInputError(
            f"{path}: expected a JSON object {{file name: split}} or {{split: [file names]}}"
        )
    return dict(raw)


def scan_safetensors_dir(
    directory: str | os.PathLike,
    manifest_dir: str | os.PathLike,
    *,
    split: Mapping[str, float] | None = None,
    splits: Mapping[str, str] | None = None,
    splits_source: str = "splits",
    seed: int = 0,
    exclude: tuple[str, ...] = ("head", "classifier"),
    keep_absolute: bool = False,
) -> tuple[list[dict], dict[str, tuple[int, int]]]:
    """The manifest entries and layers of a directory of safetensors models (Model-J's way).

    Every `*.safetensors` directly under `directory` (sorted by name) is a model whose
    metadata `dataset_chosen_targets` lists its classes (class indices). Splits:
    `splits` {file name: split} when given (Model-J's fixed splits; `splits_source`
    names where they came from in errors), every model named and no other file; else
    drawn by `assign_splits` with `split` {"val": .., "test": ..} and `seed`. Layers:
    every weight of >= 2 dims of the first file except the `exclude` modules' (the
    classifier heads); every other file must hold them in the same shapes. Files are
    named as `file_reference` names them from `manifest_dir`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ReproInputError(f"{directory}: not a directory (of .safetensors models)")
    files = model_files(directory)
    if not files:
        raise ReproInputError(f"{directory}: no .safetensors model files")
    entries, layers = [], None
    for file in files:
        meta = read_metadata(file)
        labels = meta.get(LABELS_KEY)
        if isinstance(labels, str):  # a JSON list inside a string, stored twice encoded
            try:
                labels = json.loads(labels)
            except json.JSONDecodeError:
                labels = None
        if not isinstance(labels, list):
            raise ReproInputError(f"{file}: metadata lacks a list '{LABELS_KEY}'")
        if not labels or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
            raise ReproInputError(f"{file}: '{LABELS_KEY}' must list class indices, got {labels!r}")
        shapes = _tensor_shapes(file)
        if layers is None:
            # Shapes only: meta tensors stand in for the first file's weights.
            layers = eligible_layers(
                {k: torch.empty(s, device="meta") for k, s in shapes.items()}, exclude=exclude
            )
            first = file
        else:
            _check_layers(file, shapes, layers, first)
        entries.append(
            {"file": file_reference(file, manifest_dir, keep_absolute), "labels": labels}
        )
    if splits is not None:
        names = {file.name for file in files}
        unknown = sorted(set(splits) - names)
        if unknown:
            raise ReproInputError(
                f"{splits_source}: names {unknown}, which are not model files of {directory}"
            )
        for entry, file in zip(entries, files, strict=True):
            if file.name not in splits:
                raise ReproInputError(f"{file}: no split given for this model in {splits_source}")
            if splits[file.name] not in SPLITS:
                raise ReproInputError(
                    f"{splits_source}: split {splits[file.name]!r} of {file.name} is not one "
                    f"of {list(SPLITS)}"
                )
            entry["split"] = splits[file.name]
    else:
        split = dict(split or {"val": 0.15, "test": 0.25})
        drawn = assign_splits(len(entries), float(split["val"]), float(split["test"]), seed)
        for entry, value in zip(entries, drawn, strict=True):
            entry["split"] = value
    return entries, layers


def zoo_from_safetensors_dir(
    directory: str | os.PathLike,
    classnames: list[str],
    *,
    tree: str,
    arch: str = "unknown",
    base: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    split: Mapping[str, float] | None = None,
    splits: Mapping[str, str] | None = None,
    seed: int = 0,
    exclude: tuple[str, ...] = ("head", "classifier"),
    keep_absolute: bool = False,
) -> Zoo:
    """Write a manifest for a directory of safetensors models (Model-J's way) and load it.

    The models, splits and layers as `scan_safetensors_dir` reads them; `base` the
    tree's base model (None: a zoo without one, which the router cannot use). The
    manifest goes to `manifest` (default `<directory>/manifest.json`); it names the
    files relative to its directory (absolute ones as given, with `keep_absolute`).
    """
    directory = Path(directory)
    out = Path(manifest) if manifest is not None else directory / MANIFEST_NAME
    entries, layers = scan_safetensors_dir(
        directory,
        out.parent,
        split=split,
        splits=splits,
        seed=seed,
        exclude=exclude,
        keep_absolute=keep_absolute,
    )
    write_manifest(
        out,
        tree=tree,
        arch=arch,
        base=base,
        classnames=classnames,
        layers=layers,
        models=entries,
        model_kind=None,
        keep_absolute=keep_absolute,
    )
    return load_zoo(out)


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header (no tensor is read)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ReproInputError(f"{file}: truncated or corrupt safetensors file ({err})") from err


def _check_layers(
    file: Path, shapes: Mapping[str, tuple], layers: Mapping[str, tuple[int, int]], first: Path
) -> None:
    """Every layer of the zoo's first model is in `file`, in the same shape."""
    for name, shape in layers.items():
        key = f"{name}.weight"
        if key not in shapes:
            raise ReproInputError(
                f"{file}: no tensor {key}, which {first} has (the models of one tree share "
                "their layers)"
            )
        found = shapes[key]
        if len(found) < 2 or (found[0], math.prod(found[1:])) != tuple(shape):
            raise ReproInputError(
                f"{file}: tensor {key} has shape {list(found)}, but {first} has it as "
                f"{list(shape)} (the models of one tree share their layers)"
            )


# --------------------------------------------------------------------------- reading


def load_zoo(manifest_path: str | os.PathLike) -> Zoo:
    """The manifest, checked: kind, splits, labels in range(num_classes), files present."""
    manifest_path = Path(manifest_path)
    raw = read_json(manifest_path)
    if not isinstance(raw, dict) or raw.get("kind") != MANIFEST_KIND:
        kind = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
        raise ReproInputError(
            f"{manifest_path}: expected a '{MANIFEST_KIND}' manifest, found {kind!r}"
        )
    missing = [
        k for k in ("tree", "arch", "base", "classnames", "layers", "models") if k not in raw
    ]
    if missing:
        raise ReproInputError(f"{manifest_path}: manifest lacks {missing}")
    classnames = raw["classnames"]
    if not isinstance(classnames, list) or not classnames:
        raise ReproInputError(f"{manifest_path}: classnames must be a non-empty list")
    num_classes = len(classnames)
    if raw.get("num_classes", num_classes) != num_classes:
        raise ReproInputError(
            f"{manifest_path}: num_classes {raw['num_classes']} but {num_classes} classnames"
        )
    layers = {}
    for name, shape in (raw["layers"] or {}).items():
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) for s in shape)
        ):
            raise ReproInputError(
                f"{manifest_path}: layer {name!r} shape must be [out, in], got {shape}"
            )
        layers[name] = (shape[0], shape[1])
    root = manifest_path.parent
    models = raw["models"]
    if not isinstance(models, list) or not models:
        raise ReproInputError(f"{manifest_path}: the zoo lists no models")
    for index, model in enumerate(models):
        if not isinstance(model, dict) or not all(k in model for k in ("file", "labels", "split")):
            raise ReproInputError(
                f"{manifest_path}: model {index} needs file, labels and split, got {model}"
            )
        file = root / model["file"]
        if not file.is_file():
            raise ReproInputError(f"{file}: model file not found (listed in {manifest_path})")
        labels = model["labels"]
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(c, int) and 0 <= c < num_classes for c in labels)
        ):
            raise ReproInputError(
                f"{file}: labels {labels} must be class indices in range({num_classes}) "
                f"(classnames of {manifest_path})"
            )
        if model["split"] not in SPLITS:
            raise ReproInputError(
                f"{file}: unknown split {model['split']!r} in {manifest_path}; "
                f"expected one of {list(SPLITS)}"
            )
    base = raw["base"]
    if base is not None:
        base = root / base
        if not base.is_file():
            raise ReproInputError(f"{base}: base model not found (listed in {manifest_path})")
    return Zoo(
        tree=str(raw["tree"]),
        arch=str(raw["arch"]),
        base=base,
        classnames=list(classnames),
        layers=layers,
        models=models,
        root=root,
        manifest=manifest_path,
        model_kind=raw.get("model_kind", MODEL_KIND),
    )


def labels_matrix(zoo: Zoo) -> Tensor:
    """Multi-hot labels, float32 [N models, num_classes]."""
    targets = torch.zeros(len(zoo.models), zoo.num_classes)
    for row, model in enumerate(zoo.models):
        targets[row, model["labels"]] = 1.0
    return targets


def load_layer(zoo: Zoo, layer: str) -> tuple[Tensor, Tensor, list[str]]:
    """One layer of every model: X float32 [N, out, in], Y multi-hot [N, C], splits.

    An unknown layer, or a file whose tensor has another shape than the manifest says,
    is refused naming the layer / file.
    """
    if layer not in zoo.layers:
        raise ReproInputError(
            f"layer {layer!r}: not a layer of the zoo {zoo.manifest}; "
            f"its layers are {sorted(zoo.layers)}"
        )
    shape = zoo.layers[layer]
    key = f"{layer}.weight"
    X = torch.empty(len(zoo.models), *shape)
    for row, model in enumerate(zoo.models):
        file = zoo.path(model)
        weight = _read_tensor(zoo, file, key)
        if weight.dim() < 2 or tuple(layer_matrix(weight).shape) != shape:
            raise ReproInputError(
                f"{file}: tensor {key} has shape {tuple(weight.shape)}, but {zoo.manifest} "
                f"says layer {layer!r} is {list(shape)}"
            )
        X[row] = layer_matrix(weight).float()
    return X, labels_matrix(zoo), zoo.splits


def load_state(zoo: Zoo, model: Mapping) -> dict[str, Tensor]:
    """Every tensor of one model of the zoo."""
    file = zoo.path(model)
    tensors, _ = load_tensors(file, kind=zoo.model_kind)
    return tensors


def load_states(zoo: Zoo) -> Iterator[dict[str, Tensor]]:
    """Every model's full state, in manifest order (one file in memory at a time)."""
    for model in zoo.models:
        yield load_state(zoo, model)


def load_base_state(zoo: Zoo) -> dict[str, Tensor]:
    """The base model's tensors (the file the manifest names as `base`)."""
    if zoo.base is None:
        raise ReproInputError(f"{zoo.manifest}: this zoo names no base model")
    tensors, _ = load_tensors(zoo.base)
    return tensors


def _read_tensor(zoo: Zoo, file: Path, key: str) -> Tensor:
    """One tensor of a model file (read alone: the rest of the file stays on disk)."""
    meta = read_metadata(file)  # refuses a missing, empty or non-safetensors file
    if zoo.model_kind is not None and meta.get("repro_kind") != zoo.model_kind:
        raise ReproInputError(
            f"{file}: expected a '{zoo.model_kind}' file, found "
            f"'{meta.get('repro_kind', 'no repro kind')}'"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            if key not in f.keys():
                raise ReproInputError(f"{file}: no tensor {key} (layer of {zoo.manifest})")
            return f.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise ReproInputError(f"{file}: truncated or corrupt safetensors file ({err})") from err

"""Checkpoint and resume a training run, without pickle.

A checkpoint is one directory per step::

    <directory>/step_00000200/
        checkpoint.json              step, module names, format version
        module.<name>.safetensors    each module's state_dict (kind "checkpoint_module")
        optimizer.json (+ .safetensors)   optimizer.state_dict(): structure + tensors
        scheduler.json (+ .safetensors)   lr_scheduler.state_dict(), when there is one
        rng.safetensors + rng.json   torch CPU/CUDA generator states, python and numpy
        rng.rank<r>.safetensors + .json   the same for rank r > 0 of a multi-process run
        extra.json                   whatever the caller wants back (e.g. the loss history)
    <directory>/latest               the name of the newest complete step directory

A step directory is written under a temporary name and renamed into place, and
`latest` is replaced atomically afterwards, so a job killed at any moment
leaves either the previous checkpoint or the new one, never half of one.
One run writes to a checkpoint directory at a time.

Under several processes (repro.core.distributed) every rank calls `save` and
`load_latest`: rank 0 writes the weights, optimizer and scheduler (the same on
every rank), each rank writes its own RNG state (dropout masks differ by rank and
each rank's GPU has its own generator), and every rank restores its own.

Optimizer and scheduler state dicts are nested dicts/lists of tensors and plain
values. They are stored as JSON in which every tensor is replaced by a
`{"__tensor__": key}` reference into a safetensors file; this works for any
torch optimizer (AdamW: step, exp_avg, exp_avg_sq per parameter; SGD: momentum).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from repro.core.distributed import process_count, process_index, wait_for_everyone
from repro.core.errors import ReproInputError
from repro.core.io import atomic_write, load_tensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# Markers used when a state dict is encoded as JSON.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class Checkpointer:
    """Save every `every` steps into `directory`, keeping the newest `keep` checkpoints.

    With `trainable_only=True` a module's frozen parameters are not written (its
    buffers and trainable parameters are); the caller must rebuild the frozen ones
    identically (same seed or same base weights) before `load_latest`.
    """

    def __init__(
        self, directory: str | os.PathLike, every: int, keep: int = 2, trainable_only: bool = False
    ):
        if every < 1 or keep < 1:
            raise ValueError(f"Checkpointer: every ({every}) and keep ({keep}) must be >= 1")
        self.directory = Path(directory)
        self.every = int(every)
        self.keep = int(keep)
        self.trainable_only = trainable_only

    # ------------------------------------------------------------------ save

    def maybe_save(
        self,
        step: int,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
        extra: dict | None = None,
    ) -> bool:
        """Save when `step` is a multiple of `every`; return whether it saved."""
        if step % self.every != 0:
            return False
        self.save(step, modules, optimizer, lr_scheduler, extra)
        return True

    def save(
        self,
        step: int,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
        extra: dict | None = None,
    ) -> Path:
        """Write the checkpoint for `step` and point `latest` at it (every rank calls this)."""
        final = self.directory / f"step_{step:08d}"
        # Every rank writes into this directory, so its name is the same on all of them.
        tmp = self.directory / f".tmp_{final.name}"
        if process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            self._save_shared(tmp, step, modules, optimizer, lr_scheduler, extra)
        wait_for_everyone()  # tmp exists
        _save_rng(tmp, process_index())
        wait_for_everyone()  # every rank's RNG state is in tmp
        if process_index() == 0:
            self._publish(tmp, final)
        return final

    def _save_shared(self, tmp: Path, step, modules, optimizer, lr_scheduler, extra) -> None:
        """What is the same on every rank: weights, optimizer, scheduler, extra, manifest."""
        for name, module in modules.items():
            if not _SAFE_NAME.match(name):
                raise ValueError(f"Checkpointer: module name {name!r} is not a safe file name")
            save_tensors(
                tmp / f"module.{name}.safetensors",
                self._module_state(module),
                kind="checkpoint_module",
                metadata={"step": step, "module": name},
            )
        _save_structure(tmp, "optimizer", optimizer.state_dict())
        if lr_scheduler is not None:
            _save_structure(tmp, "scheduler", lr_scheduler.state_dict())
        write_json(tmp / "extra.json", extra or {})
        write_json(
            tmp / "checkpoint.json",
            {
                "format_version": FORMAT_VERSION,
                "step": step,
                "modules": list(modules),
                "has_scheduler": lr_scheduler is not None,
                "processes": process_count(),
            },
        )

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished `tmp` into place and point `latest` at it."""
        # A directory cannot be renamed over a non-empty one: move an old copy of
        # the same step aside first (happens only when a step is saved twice).
        if final.exists():
            trash = self.directory / f".trash_{final.name}_{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        with atomic_write(self.directory / "latest") as pointer:
            pointer.write_text(final.name + "\n")
        self._cleanup()
        log.debug("saved checkpoint %s", final)

    def _module_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        state = module.state_dict()
        if self.trainable_only:
            frozen = {
                n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad
            }
            state = {k: v for k, v in state.items() if k not in frozen}
        # Clone so that tied weights (two names, one storage) do not upset safetensors.
        return {k: v.detach().clone() for k, v in state.items()}

    def _cleanup(self) -> None:
        """Remove step directories beyond `keep` and leftovers of killed saves."""
        for path in self.directory.iterdir():
            if path.is_dir() and path.name.startswith((".tmp_", ".trash_")):
                shutil.rmtree(path, ignore_errors=True)
        latest = self._latest_name()
        for path in self.step_dirs()[: -self.keep]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def step_dirs(self) -> list[Path]:
        """Complete step directories, oldest first."""
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def _latest_name(self) -> str | None:
        pointer = self.directory / "latest"
        if pointer.is_file():
            return pointer.read_text().strip() or None
        return None

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        name = self._latest_name()
        if name is not None:
            path = self.directory / name
            if not (_STEP_DIR.match(name) and path.is_dir()):
                raise ReproInputError(
                    f"{self.directory / 'latest'}: points at {name!r}, which is not a checkpoint"
                )
            return path
        # Killed between renaming the step directory and updating `latest`:
        # step directories only ever appear complete, so the newest one is good.
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def load_latest(
        self,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
    ) -> tuple[int, dict]:
        """Restore modules, optimizer, scheduler and this rank's RNG; return (step, extra).

        Returns (0, {}) when there is no checkpoint yet.
        """
        path = self.latest()
        if path is None:
            return 0, {}
        manifest = read_json(path / "checkpoint.json")
        if not isinstance(manifest, dict) or "step" not in manifest:
            raise ReproInputError(f"{path / 'checkpoint.json'}: not a checkpoint manifest")
        if sorted(manifest.get("modules", [])) != sorted(modules):
            raise ReproInputError(
                f"{path / 'checkpoint.json'}: holds modules {manifest.get('modules')}, "
                f"expected {sorted(modules)}"
            )

        for name, module in modules.items():
            self._load_module(path / f"module.{name}.safetensors", module)

        file = path / "optimizer.json"
        try:
            optimizer.load_state_dict(_load_structure(path, "optimizer"))
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ReproInputError(f"{file}: does not fit this optimizer ({err})") from err

        if lr_scheduler is not None:
            if not manifest.get("has_scheduler"):
                raise ReproInputError(f"{path}: checkpoint has no lr scheduler state")
            file = path / "scheduler.json"
            try:
                lr_scheduler.load_state_dict(_load_structure(path, "scheduler"))
            except (ValueError, KeyError, RuntimeError, TypeError) as err:
                raise ReproInputError(f"{file}: does not fit this lr scheduler ({err})") from err

        saved_by = int(manifest.get("processes", 1))
        if saved_by != process_count():
            log.warning(
                "%s: saved by %d processes, resumed by %d: the batches from here on "
                "differ from those of an uninterrupted run",
                path,
                saved_by,
                process_count(),
            )
        _load_rng(path, process_index())
        extra = read_json(path / "extra.json")
        if not isinstance(extra, dict):
            raise ReproInputError(f"{path / 'extra.json'}: expected a JSON object")
        step = int(manifest["step"])
        log.info("resumed from checkpoint %s (step %d)", path, step)
        return step, extra

    def _load_module(self, file: Path, module: nn.Module) -> None:
        state, _ = load_tensors(file, kind="checkpoint_module")
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ReproInputError(f"{file}: does not fit the module ({err})") from err
        frozen = {
            n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad
        }
        missing = [k for k in result.missing_keys if not (self.trainable_only and k in frozen)]
        if missing or result.unexpected_keys:
            raise ReproInputError(
                f"{file}: missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}"
            )


# ------------------------------------------------------------ state dicts as JSON


def _save_structure(directory: Path, name: str, state: dict) -> None:
    """Write a nested state dict as name.json, with its tensors in name.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, name)
    if tensors:
        save_tensors(directory / f"{name}.safetensors", tensors, kind="checkpoint_state")
    write_json(directory / f"{name}.json", encoded)


def _load_structure(directory: Path, name: str) -> dict:
    file = directory / f"{name}.json"
    encoded = read_json(file)
    tensors: dict[str, torch.Tensor] = {}
    if (directory / f"{name}.safetensors").exists():
        tensors, _ = load_tensors(directory / f"{name}.safetensors", kind="checkpoint_state")
    return _decode(encoded, tensors, file)


def _encode(obj, tensors: dict[str, torch.Tensor], key: str):
    """JSON-able copy of `obj`; tensors go into `tensors` under their path `key`."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        # Non-string keys (the optimizer's parameter ids): keep them as a list of pairs.
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"{key}: cannot store a {type(k).__name__} dict key")
        return {_ITEMS: [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj, tensors: dict[str, torch.Tensor], file: Path):
    if isinstance(obj, dict):
        if _TENSOR in obj:
            if obj[_TENSOR] not in tensors:
                raise ReproInputError(f"{file}: tensor {obj[_TENSOR]!r} missing from .safetensors")
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors, file) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors, file) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors, file) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, file) for v in obj]
    return obj


# ------------------------------------------------------------------------- RNG


def _rng_name(rank: int) -> str:
    return "rng" if rank == 0 else f"rng.rank{rank}"


def _save_rng(directory: Path, rank: int = 0) -> None:
    stem = _rng_name(rank)
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    save_tensors(directory / f"{stem}.safetensors", tensors, kind="checkpoint_rng")
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    write_json(
        directory / f"{stem}.json",
        {
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        },
    )


def _load_rng(directory: Path, rank: int = 0) -> None:
    stem = _rng_name(rank)
    if not (directory / f"{stem}.json").exists() and rank > 0:
        # Saved by fewer processes: this rank starts from rank 0's state.
        log.warning("%s: no RNG state of rank %d; rank 0's restored", directory, rank)
        stem = _rng_name(0)
    tensors, _ = load_tensors(
        directory / f"{stem}.safetensors", kind="checkpoint_rng", required=("torch_cpu",)
    )
    file = directory / f"{stem}.json"
    states = read_json(file)
    try:
        version, internal, gauss = states["python"]
        name, keys, pos, has_gauss, cached = states["numpy"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch_cpu"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ReproInputError(f"{file}: malformed RNG state ({err})") from err
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("%s: CUDA RNG state not restored (device count differs)", directory)


def run_directory(
    root: str | os.PathLike, params: Mapping, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """The checkpoint directory of one run: root/<fingerprint>.

    The fingerprint hashes the run's params and the identity of its input files
    (path, size, modification time; every file under a directory), so a rerun after
    a kill resumes, while a run with another config or regenerated inputs starts
    fresh instead of resuming someone else's weights.
    """
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for entry in sorted(str(p) for p in inputs):
        path = Path(entry)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                stat = f.stat()
                digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(root) / digest.hexdigest()[:16]

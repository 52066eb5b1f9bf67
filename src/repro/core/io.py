"""Atomic file writes and validated safetensors / JSON reads.

Every output of the pipeline goes through `atomic_write` so that a killed job
never leaves a half-written file behind under the final name. Every tensor file
carries a `repro_kind` in its safetensors metadata, so that a file of the wrong
kind (a "foreign" file) is refused with a message that names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from repro.core.errors import ReproInputError

FORMAT_VERSION = "1"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    kind: str,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """Write `tensors` to a safetensors file atomically, tagged with `kind`.

    `metadata` values are JSON-encoded so that numbers and lists round-trip.
    """
    meta = {"repro_kind": kind, "format_version": FORMAT_VERSION}
    for key, value in (metadata or {}).items():
        meta[key] = json.dumps(value)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The JSON-decoded metadata of a repro safetensors file (kind included)."""
    from safetensors import safe_open

    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ReproInputError(
            f"{path}: truncated, corrupt or not a safetensors file ({err})"
        ) from err
    meta: dict[str, object] = {}
    for key, value in raw.items():
        if key in ("repro_kind", "format_version"):
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def load_tensors(
    path: str | os.PathLike,
    kind: str | None = None,
    required: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a repro safetensors file, checking its kind and required keys.

    Raises ReproInputError naming the file if it is missing, truncated, of
    another kind, or lacks a required tensor.
    """
    path = Path(path)
    meta = read_metadata(path)
    if kind is not None and meta.get("repro_kind") != kind:
        raise ReproInputError(
            f"{path}: expected a '{kind}' file, found '{meta.get('repro_kind', 'no repro kind')}'"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ReproInputError(f"{path}: truncated or corrupt safetensors file ({err})") from err
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ReproInputError(f"{path}: missing tensors {missing}")
    return tensors, meta


def write_json(path: str | os.PathLike, obj: object) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> object:
    path = Path(path)
    _require_file(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReproInputError(f"{path}: not valid JSON ({err})") from err


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ReproInputError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ReproInputError(f"{path}: file is empty")


def _json_default(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

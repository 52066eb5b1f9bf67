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
from safetensors.torch import load_file, save

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
        tmp.write_bytes(canonical_header(save(tensors, metadata=meta)))


def canonical_header(blob: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: the same tensors and
    metadata give the same bytes. (safetensors writes the metadata in hash order, so
    two writes of one result would differ, and DVC would see a new version.) The
    header is padded with spaces to a multiple of 8 bytes, as safetensors pads it; the
    tensors' offsets are relative to the data, so they hold whatever the header's size."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


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


# safetensors dtype names -> torch dtypes, for memory-mapped reads.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_tensors(
    path: str | os.PathLike,
    kind: str | None = None,
    required: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Memory-mapped tensors of a repro safetensors file: pages are read when indexed.

    For data sets larger than memory (paper-scale trajectories): `tensors["x"][rows]`
    reads only those rows from disk. The file is checked as `load_tensors` checks it
    (kind, required keys) and against truncation (every tensor must lie inside the
    file). The map is copy-on-write, so writing to a tensor never changes the file.
    """
    import mmap

    path = Path(path)
    meta = read_metadata(path)  # refuses a missing, truncated-header or non-safetensors file
    if kind is not None and meta.get("repro_kind") != kind:
        raise ReproInputError(
            f"{path}: expected a '{kind}' file, found '{meta.get('repro_kind', 'no repro kind')}'"
        )
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        size = os.fstat(f.fileno()).st_size
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ReproInputError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if start + end > size:
            raise ReproInputError(f"{path}: truncated (tensor {name!r} ends past the file's end)")
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:  # frombuffer refuses an empty view
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = flat.view(entry["shape"])
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

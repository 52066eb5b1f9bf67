"""Atomic writes: a write that dies half-way leaves the old file whole under its name.

These tests fail if `atomic_write` writes the final path directly (checked by
planting exactly that bug): an exception, a full disk or a SIGKILL in the middle
of a write must leave the OLD file intact, and, short of SIGKILL, no temporary
file behind. After a SIGKILL nothing can clean up: the one thing left is the
hidden temporary file `.<name>.*.tmp`, never the final name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from repro.core.io import (
    atomic_write,
    load_tensors,
    map_tensors,
    read_json,
    save_tensors,
    write_json,
)

OLD = "old content, complete\n"


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_writes_beside_then_replaces(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path  # same filesystem: rename is atomic
        tmp.write_text("new\n")
        assert not path.exists()  # nothing under the final name until the write is done
    assert path.read_text() == "new\n"
    assert names(path.parent) == ["out.txt"]


def test_exception_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text(OLD)
    with pytest.raises(RuntimeError, match="killed half-way"):
        with atomic_write(path) as tmp:
            with open(tmp, "w") as f:
                f.write("new content, only the first ha")
                f.flush()
            raise RuntimeError("killed half-way")
    assert path.read_text() == OLD
    assert names(tmp_path) == ["out.txt"]  # no temporary file left


def test_exception_before_any_byte_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text(OLD)
    with pytest.raises(KeyError):
        with atomic_write(path):
            raise KeyError("failed before writing")
    assert path.read_text() == OLD
    assert names(tmp_path) == ["out.txt"]


def test_failed_first_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert names(tmp_path) == []


def test_save_tensors_failing_mid_write_keeps_the_old_tensors(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_tensors(path, {"w": torch.arange(4.0)}, kind="test_weights")

    real_write = Path.write_bytes

    def write_half(self, data):  # the disk fills after some bytes
        real_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)
    with pytest.raises(OSError, match="No space left"):
        save_tensors(path, {"w": torch.ones(4)}, kind="test_weights")
    tensors, meta = load_tensors(path, kind="test_weights", required=("w",))
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta["repro_kind"] == "test_weights"
    assert names(tmp_path) == ["weights.safetensors"]


def test_write_json_failing_mid_write_keeps_the_old_json(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"fid": 12.5})

    def write_half(self, text, *args, **kwargs):  # the disk fills half-way through
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"fid": 99.0, "is": 8.1})
    monkeypatch.undo()
    assert read_json(path) == {"fid": 12.5}
    assert names(tmp_path) == ["metrics.json"]


# A process that overwrites `path` through atomic_write, says so half-way, then waits
# to be killed.
WRITER = textwrap.dedent(
    """
    import sys, time
    from repro.core.io import atomic_write

    path, ready = sys.argv[1], sys.argv[2]
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new content, only the first ha")
            f.flush()
            open(ready, "w").close()
            time.sleep(60)
            f.write("lf\\n")
    """
)


def test_sigkill_mid_write_keeps_the_old_file(tmp_path):
    path, ready = tmp_path / "out" / "table.csv", tmp_path / "ready"
    path.parent.mkdir()
    path.write_text(OLD)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"the writer exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert path.read_text() == OLD
    # What SIGKILL leaves: only the hidden temporary file, beside, never the final name.
    leftovers = [n for n in names(path.parent) if n != "table.csv"]
    assert all(n.startswith(".table.csv.") and n.endswith(".tmp") for n in leftovers), leftovers


def test_json_round_trip_after_a_failed_write_is_still_valid_json(tmp_path):
    # The old file is complete JSON, not a prefix of the new one.
    path = tmp_path / "m.json"
    write_json(path, {"a": [1, 2, 3]})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serialisable
    assert json.loads(path.read_text()) == {"a": [1, 2, 3]}
    assert names(tmp_path) == ["m.json"]


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in hash order; save_tensors sorts the header, so two
    writes of one result are byte-identical (DVC sees one version), and the file still
    reads back (header padded to 8 bytes, offsets intact)."""
    tensors = {"b": torch.arange(5, dtype=torch.float32), "a": torch.ones(2, 3, dtype=torch.uint8)}
    meta = {f"key{i}": [i, "x" * i] for i in range(12)}
    files = []
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        save_tensors(path, tensors, "demo", meta)
        files.append(path.read_bytes())
    assert all(f == files[0] for f in files)
    assert int.from_bytes(files[0][:8], "little") % 8 == 0
    loaded, read_meta = load_tensors(tmp_path / "0.safetensors", kind="demo", required=("a", "b"))
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    assert read_meta["key11"] == [11, "x" * 11] and read_meta["repro_kind"] == "demo"
    mapped, _ = map_tensors(tmp_path / "0.safetensors", kind="demo")
    assert torch.equal(mapped["b"], tensors["b"])

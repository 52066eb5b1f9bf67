"""Command-line primitives the stages share (repro.core.stage builds the stage shape on them).

A Snakemake rule calls `python -m repro.<paper>.<stage>` with input/output paths
and `--params '<json>'` (its config section, quoted by Snakemake), plus
`--threads`, `--rule`, `--scale` and optionally `--device`. Running the same
command by hand runs the same stage: the rule's log starts with the exact command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence

import torch

from repro.core.errors import ReproInputError

log = logging.getLogger("repro")


def setup_logging() -> None:
    """INFO and up to stdout; stderr stays for a failure (one line, or a traceback).

    A rule sends both to its log (`> {log} 2>&1`), in order: every record is flushed.
    """
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


# The stage module that repro.core.each runs (several runs in one process), if it runs one.
STAGE_MODULE: str | None = None


def log_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> None:
    """Log the command line as it can be rerun: `python -m <module> <arguments>`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if STAGE_MODULE is not None:
        prog = f"-m {STAGE_MODULE}"
    else:
        prog = f"-m {spec.name}" if spec is not None else parser.prog
    log.info("command: python %s %s", prog, shlex.join(argv))


def json_object(text: str) -> dict:
    """--params: a JSON object, or @path/to/file.json."""
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


def require(params: dict, key: str, section: str = "params"):
    """params[key], or a ReproInputError naming the missing key."""
    if key not in params:
        raise ReproInputError(f"{section}.{key}: missing (got keys {sorted(params)})")
    return params[key]


def set_threads(threads: int) -> None:
    """Give torch exactly the cores Snakemake granted this job.

    Under torchrun the job's cores are shared by the processes of this node
    (LOCAL_WORLD_SIZE of them): each takes its share, so they do not oversubscribe.
    """
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, int(threads) // max(1, per_node))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MB in the heap instead of unmapping them.

    A sampling loop allocates and frees the same few MB-sized activations every
    step. With glibc's defaults these round-trip through mmap/munmap (and the heap
    top is trimmed), so every step page-faults fresh zeroed memory: measured on 2
    cores, an agd_eval job spent 4-6 s of its ~30 s in the kernel; with these two
    settings it takes ~23 s (training at batch 64 is unchanged). Up to 1 GB of
    freed memory then stays with the process, which reuses it. Returns True where
    it applied (Linux with glibc); REPRO_MALLOC_TUNING=0 turns it off.
    """
    if os.environ.get("REPRO_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: leave them be
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Fixing either threshold turns off glibc's adaptive one, so both are set.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )

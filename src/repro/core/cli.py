"""The command-line convention every stage shares.

A Snakemake rule calls `python -m repro.<paper>.<stage>` with input/output paths
and `--params '<json>'` (its config section, quoted by Snakemake), plus
`--threads`, `--rule` and `--scale`. Running the same command by hand runs the
same stage: the rule's log starts with the exact command line.
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


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the arguments every stage takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params",
        type=_json_arg,
        default={},
        help="the rule's config section as JSON, or @path/to/file.json",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rule", default="manual", help="Snakemake rule name (MLflow tag)")
    parser.add_argument("--scale", default="tiny", help="config scale (MLflow tag)")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """Parse, set up logging and torch threads, and echo the command line."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    set_threads(args.threads)
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    prog = f"-m {spec.name}" if spec is not None else parser.prog
    log.info("command: python %s %s", prog, shlex.join(argv))
    return args


def set_threads(threads: int) -> None:
    """Give torch exactly the cores Snakemake granted this job."""
    threads = max(1, int(threads))
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


def require(params: dict, key: str, section: str = "params"):
    """params[key], or a ReproInputError naming the missing key."""
    if key not in params:
        raise ReproInputError(f"{section}.{key}: missing (got keys {sorted(params)})")
    return params[key]


def _json_arg(text: str) -> dict:
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


def finish_stage(
    args, *, paper: str, metrics: dict, metrics_path=None, artifacts=(), params=None
) -> None:
    """How every training and evaluation stage ends: metrics JSON, a log line, one MLflow run.

    `params` (default: the stage's --params) is what the MLflow run records.
    """
    from repro.core.io import write_json
    from repro.core.tracking import log_run

    artifacts = list(artifacts)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
        artifacts.append(metrics_path)
    log.info("%s metrics: %s", args.rule, metrics)
    log_run(
        paper=paper,
        rule=args.rule,
        scale=args.scale,
        params=args.params if params is None else params,
        metrics=metrics,
        artifacts=artifacts,
    )

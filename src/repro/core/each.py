"""Several runs of one stage in one process: `python -m repro.core.each MODULE -- ARGS [-- ARGS]...`

Starting a job costs Python, torch and (for most stages) diffusers or transformers:
~5 s of CPU here, as much as a small stage's whole work. A rule whose runs are many
and small (DataDream's few-shot sets, its zero-shot and real-only classifiers) runs
them in one job instead, each run exactly the command

    python -m MODULE ARGS

with its own outputs, metrics, MLflow run and checkpoints. The stages draw from their
own seeded generators, never from the global ones (a fresh process seeds those at
random); to keep a run that did from depending on the runs before it, each run starts
from the global random states the process had before the first. tests/test_each.py
and tests/test_datadream_classify.py check runs in a group against the same runs alone.
The runs go in order and the first failure ends the job (Snakemake then removes all
its outputs; finished runs resume from their checkpoints on the rerun).
"""

from __future__ import annotations

import importlib
import logging
import random
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from repro.core import cli
from repro.core.errors import ReproInputError

log = logging.getLogger("repro")

SEPARATOR = "--"


def split_runs(argv: Sequence[str]) -> list[list[str]]:
    """["--", "a", "1", "--", "b"] -> [["a", "1"], ["b"]]; every run is led by "--"."""
    if not argv or argv[0] != SEPARATOR:
        raise ReproInputError(
            f"repro.core.each: each run's arguments must follow '{SEPARATOR}', got {list(argv)[:3]}"
        )
    runs: list[list[str]] = []
    for arg in argv:
        if arg == SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def run_each(main: Callable[[list[str]], object], runs: Sequence[Sequence[str]]) -> None:
    """Call `main(run)` for each run in order, each from the same global random states."""
    cuda = torch.cuda.is_available()
    states = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if cuda else None,
        np.random.get_state(),
        random.getstate(),
    )
    for number, argv in enumerate(runs, 1):
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state_all(states[1])
        np.random.set_state(states[2])
        random.setstate(states[3])
        log.info("run %d of %d", number, len(runs))
        main(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise ReproInputError("repro.core.each: usage: MODULE -- ARGS [-- ARGS]...")
    name, runs = argv[0], split_runs(argv[1:])
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ReproInputError(f"repro.core.each: no stage module {name!r} ({err})") from err
    if not callable(getattr(module, "main", None)):
        raise ReproInputError(f"repro.core.each: {name} has no main(argv)")
    cli.setup_logging()
    cli.STAGE_MODULE = name  # each run logs its command as `python -m <name> ...`
    run_each(module.main, runs)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)

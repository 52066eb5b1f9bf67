"""The shape every stage shares: one Snakemake rule runs one `python -m repro.<paper>.<stage>`.

A stage module keeps only what is its own; `Stage` and `run` give it the rest:

    def main(argv=None) -> None:
        stage = Stage(__doc__, paper="agd", out="model directory", metrics=True, checkpoint_dir=True)
        stage.parser.add_argument("--train", required=True, help="training images")
        args = stage.start(argv)  # logging, the command echoed, threads, malloc, device, clock
        model = build(stage.params).to(stage.device)
        summary = fit(..., checkpoint_dir=stage.checkpoints(args.train))
        save(model, args.out)
        stage.finish(stage.summary(summary))  # metrics JSON, a log line, one MLflow run

    if __name__ == "__main__":
        run(main)  # bad input: one line on stderr naming the file or key, exit status 2

Every stage takes --params (its config section as JSON), --threads, --rule, --scale
and --device (default "auto": this rank's GPU under torchrun, CUDA when present,
else the CPU); a stage with the standard outputs also takes --out, --metrics and
--checkpoint-dir. Called in-process (`main([...])`, as the tests do) a bad input
raises ReproInputError; only `run` turns it into the one-line exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from repro.core import distributed
from repro.core.checkpoint import run_directory
from repro.core.cli import json_object, keep_freed_memory, log_command, set_threads, setup_logging
from repro.core.errors import ReproInputError
from repro.core.io import write_json
from repro.core.training import summary_metrics

log = logging.getLogger("repro")

BAD_INPUT_STATUS = 2  # argparse's status for a bad command line, too


class Stage:
    """One run of a stage: its arguments, device and clock, and how it ends.

    `out`, if given, is the help text of a required --out; `metrics` and
    `checkpoint_dir` add the required --metrics (the metrics JSON that `finish`
    writes) and --checkpoint-dir (resume checkpoints, see `checkpoints`).
    """

    def __init__(
        self,
        description: str | None,
        *,
        paper: str,
        out: str | None = None,
        metrics: bool = False,
        checkpoint_dir: bool = False,
    ):
        self.paper = paper
        self.writes_metrics = metrics
        self.parser = argparse.ArgumentParser(
            description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add = self.parser.add_argument
        add(
            "--params",
            type=json_object,
            default={},
            help="the rule's config section as JSON, or @path/to/file.json",
        )
        add("--threads", type=int, default=1, help="torch intra-op threads")
        add("--rule", default="manual", help="Snakemake rule name (MLflow tag)")
        add("--scale", default="tiny", help="config scale (MLflow tag)")
        add(
            "--device",
            default="auto",
            help="torch device to run on; auto: this rank's GPU under torchrun / accelerate, "
            "else a CUDA device if there is one, else the CPU",
        )
        if out is not None:
            add("--out", required=True, help=out)
        if metrics:
            add("--metrics", required=True, help="output metrics JSON")
        if checkpoint_dir:
            add("--checkpoint-dir", required=True, help="resume checkpoints")
        self.args: argparse.Namespace | None = None
        self.device: torch.device | None = None
        self.started: float | None = None

    def start(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse the command line, set the process up and start the clock; returns the args."""
        args = self.parser.parse_args(argv)
        setup_logging()
        log_command(self.parser, argv)
        set_threads(args.threads)
        keep_freed_memory()
        self.device = distributed.resolve_device(args.device)
        log.info("device %s, %d torch threads", describe_device(self.device), args.threads)
        self.args, self.started = args, time.perf_counter()
        return args

    @property
    def params(self) -> dict:
        return self.args.params

    @property
    def is_main(self) -> bool:
        """Whether this process writes the outputs (the only one, or rank 0 of several)."""
        return distributed.is_main_process()

    def checkpoints(self, *inputs) -> Path:
        """This run's checkpoint directory under --checkpoint-dir: one per (job, params,
        inputs), so a changed config or a regenerated input never resumes a stale run.

        The job is named by its outputs (--out, --metrics): two jobs of one rule that
        share a --checkpoint-dir, params and inputs but differ in a flag (DataDream's
        classifiers on the same data with another --method) must not resume each other.
        """
        job = {key: str(getattr(self.args, key, None)) for key in ("out", "metrics")}
        return run_directory(
            self.args.checkpoint_dir, {"job": job, "params": self.params}, list(inputs)
        )

    def summary(self, fit_summary: dict, **extra) -> dict:
        """The metrics of a training stage: fit's summary, the seconds since `start`, `extra`."""
        return summary_metrics(fit_summary, self.started, **extra)

    def finish(self, metrics: dict, *, artifacts=(), params: dict | None = None) -> dict:
        """How a training or evaluation stage ends: the metrics JSON (with --metrics), a
        log line and one MLflow run of the numeric metrics, from the main process only.

        `params` (default: --params) is what the MLflow run records.
        """
        if not self.is_main:
            return metrics
        from repro.core.tracking import log_run  # imports mlflow: only where a stage ends

        artifacts = list(artifacts)
        if self.writes_metrics:
            write_json(self.args.metrics, metrics)
            artifacts.append(self.args.metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, numbers.Real)}
        seconds = time.perf_counter() - self.started
        log.info("%s done in %.1f s, metrics: %s", self.args.rule, seconds, scalars)
        log_run(
            paper=self.paper,
            rule=self.args.rule,
            scale=self.args.scale,
            params=self.params if params is None else params,
            metrics=scalars,
            artifacts=artifacts,
        )
        return metrics


def dispatch(
    commands: dict[str, Callable[[list[str]], object]],
    argv: Sequence[str] | None,
    prog: str,
    doc: str | None = None,
) -> None:
    """Run the subcommand named by argv[0] of a module with several stages
    (`python -m repro.x.evaluate judges ...`). The subcommand receives the WHOLE command
    line, its own name included (its Stage declares it as the positional `command`), so
    that the command it logs can be rerun as it is. An unknown or missing subcommand
    prints the usage and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(
            prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("command", choices=sorted(commands))
        parser.parse_args(argv[:1])  # prints the usage (help, or the error) and exits
    commands[argv[0]](argv)


def run(main: Callable[[], object]) -> None:
    """Run a stage's `main` as this process's command (`if __name__ == "__main__": run(main)`).

    A ReproInputError (a missing, truncated or foreign input, a bad config value) ends
    the process with its message, which names the file or key, as ONE line on stderr
    and exit status 2; any other exception keeps its traceback.
    """
    # Log records are flushed one by one; plain prints should not lag behind them.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)
    logging.captureWarnings(True)  # library warnings go to the log, not stderr
    try:
        main()
    except ReproInputError as err:
        sys.stdout.flush()
        message = " ".join(str(err).splitlines())
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(BAD_INPUT_STATUS) from None


def describe_device(device: torch.device) -> str:
    """`device` as a results table names it: cpu, or cuda:0 (NVIDIA H200) for a GPU."""
    # torch.cuda / torch.xpu say which model a device is; torch.cpu has nothing to add.
    name = getattr(getattr(torch, device.type, None), "get_device_name", None)
    return f"{device} ({name(device)})" if name is not None else str(device)

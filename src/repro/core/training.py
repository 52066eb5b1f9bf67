"""The one training loop every paper uses: AdamW, warm-up + cosine, checkpoints.

The caller supplies `loss_fn(step)`, which builds the batch for that step and
returns the scalar loss. Batches are a pure function of (seed, step), so a run
killed at any point and resumed from its last checkpoint (weights, optimizer,
scheduler, RNG and loss history) ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repro.core.checkpoint import Checkpointer
from repro.core.errors import ReproInputError

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_fraction * total_steps`, then cosine decay to 0.

    The multiplier is step / warmup during warm-up (0 at step 0, 1 at the end of
    warm-up) and 0.5 * (1 + cos(pi * progress)) afterwards (0 at `total_steps`).
    """
    warmup = int(round(warmup_fraction * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def fit(
    *,
    modules: dict[str, nn.Module],
    parameters: list[nn.Parameter],
    loss_fn: Callable[[int], Tensor],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.1,
    grad_clip: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    log_every: int = 50,
    desc: str = "train",
) -> dict:
    """Train `parameters` for `steps` steps of `loss_fn`, resuming from `checkpoint_dir`.

    `modules` are what a checkpoint saves and restores (their train/eval modes
    are left as the caller set them). Returns {"steps", "final_loss" (mean of
    the last min(50, steps) losses), "loss_history", "resumed_from"}.
    """
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, steps, warmup_fraction)

    checkpointer = None
    start, history = 0, []
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, every=checkpoint_every)
        start, extra = checkpointer.load_latest(modules, optimizer, scheduler)
        history = [float(x) for x in extra.get("loss_history", [])]
        # A checkpoint of a run with another length has another lr schedule.
        if start and (extra.get("total_steps") != steps or len(history) != start):
            raise ReproInputError(
                f"{checkpointer.latest()}: checkpoint of a {extra.get('total_steps')}-step run "
                f"at step {start}, but this run has steps={steps}; delete {checkpoint_dir} "
                "to start over"
            )

    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=None)
    for step in bar:
        loss = loss_fn(step)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"{desc}: loss is {value} at step {step}; training diverged. "
                f"Try a lower learning rate (lr={lr}) or set grad_clip."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        scheduler.step()
        history.append(value)

        done = step + 1
        recent = history[-50:]
        running = sum(recent) / len(recent)
        bar.set_postfix(loss=f"{running:.4g}", refresh=False)
        # The bar is off when stderr is not a terminal (Snakemake logs): log instead.
        if (log_every > 0 and done % log_every == 0) or done == steps:
            log.info(
                "%s: step %d/%d running loss %.4g lr %.3g",
                desc,
                done,
                steps,
                running,
                scheduler.get_last_lr()[0],
            )
        if checkpointer is not None and (done % checkpoint_every == 0 or done == steps):
            checkpointer.save(
                done,
                modules,
                optimizer,
                scheduler,
                extra={"loss_history": history, "total_steps": steps, "desc": desc},
            )
    bar.close()

    tail = history[-min(50, steps) :] if steps > 0 else []
    return {
        "steps": steps,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "loss_history": history,
        "resumed_from": start,
    }


def summary_metrics(summary: dict, started: float, **extra) -> dict:
    """The metrics every training stage reports: fit's summary, wall time and `extra`."""
    import time

    return {
        "final_loss": summary["final_loss"],
        "steps": summary["steps"],
        "resumed_from": summary.get("resumed_from", 0),
        "seconds": time.perf_counter() - started,
        **extra,
    }


OPTIMISER_KEYS = ("steps", "lr", "weight_decay", "warmup_fraction", "checkpoint_every")


def optimiser_settings(params: dict) -> dict:
    """fit's keyword arguments from a config section (the schema's `optimiser` block)."""
    missing = [k for k in OPTIMISER_KEYS if k not in params]
    if missing:
        raise ReproInputError(f"params: missing optimiser settings {missing}")
    return {k: params[k] for k in OPTIMISER_KEYS}

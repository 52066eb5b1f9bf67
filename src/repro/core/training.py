"""The one training loop every paper uses: AdamW, warm-up + cosine, checkpoints.

The caller supplies `loss_fn(step)`, which builds the batch for that step and
returns the scalar loss. Batches are a pure function of (seed, step), so a run
killed at any point and resumed from its last checkpoint (weights, optimizer,
scheduler, RNG and loss history) ends bit-identical to an uninterrupted run.

The same loop runs as one process (CPU or one GPU) or as several under torchrun /
accelerate launch (repro.core.distributed): each rank runs `loss_fn` on its own
share of the batch (`step_generator`, `local_batch_size`), the gradients and the
loss are averaged over the ranks every step, so every rank takes the same step and
keeps the same weights. With one process nothing is exchanged and the numbers are
those of a plain single-process loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repro.core import distributed
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
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train `parameters` for `steps` steps of `loss_fn`, resuming from `checkpoint_dir`.

    `modules` are what a checkpoint saves and restores (their train/eval modes
    are left as the caller set them). Every rank of a multi-process run calls
    `fit` with its own `loss_fn`; the losses reported are means over the ranks.
    `on_step(done)`, if given, is called after every optimizer step with the number
    of steps done, BEFORE that step's checkpoint is written: whatever it records in a
    module of `modules` (e.g. a validation score per epoch and the best weights so
    far) is saved with the step and restored on resume. It is not called again for
    the steps a resumed run skips.
    Returns {"steps", "final_loss" (mean of the last min(50, steps) losses),
    "loss_history", "resumed_from"}.
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

    # Ranks start from the main process's weights (as DDP does), whatever seed
    # each caller built its model with.
    _broadcast_from_main(parameters)

    main = distributed.is_main_process()
    bar = tqdm(
        range(start, steps), desc=desc, initial=start, total=steps, disable=None if main else True
    )
    for step in bar:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = _average_over_processes(loss, parameters)
        # Every rank sees the same mean loss, so all stop here together.
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"{desc}: loss is {value} at step {step}; training diverged. "
                f"Try a lower learning rate (lr={lr}) or set grad_clip."
            )
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        scheduler.step()
        history.append(value)

        done = step + 1
        if on_step is not None:
            on_step(done)
        recent = history[-50:]
        running = sum(recent) / len(recent)
        bar.set_postfix(loss=f"{running:.4g}", refresh=False)
        # The bar is off when stderr is not a terminal (Snakemake logs): log instead.
        if main and ((log_every > 0 and done % log_every == 0) or done == steps):
            log.info(
                "%s: step %d/%d running loss %.4g lr %.3g",
                desc,
                done,
                steps,
                running,
                scheduler.get_last_lr()[0],
            )
        # Every rank calls save: rank 0 writes the weights, each rank its RNG state.
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


def _average_over_processes(loss: Tensor, parameters: list[nn.Parameter]) -> float:
    """Replace each gradient by its mean over the processes; return the mean loss.

    Callers call their plain modules inside `loss_fn` (no DistributedDataParallel
    wrapper, which would also need every forward to go through the wrapper), so
    nothing has exchanged gradients yet: one flattened all-reduce does it here, the
    loss riding along, and every rank then takes the same optimizer step. A
    parameter that got no gradient on a rank counts as zero there (as in DDP); one
    that got none on any rank keeps `grad=None`, so AdamW skips it as it would alone.
    """
    if distributed.process_count() == 1:
        return loss.item()  # nothing to exchange: bit-identical to a plain loop
    dtype = _exchange_dtype(parameters)
    sizes = [p.numel() for p in parameters]
    with torch.no_grad():
        device = loss.device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        had_grad = torch.tensor([p.grad is not None for p in parameters], dtype=dtype)
        # [every gradient | per parameter: 1 if it had a gradient, else 0 | the loss]
        flat = torch.cat(
            [g.reshape(-1).to(device, dtype) for g in grads]
            + [had_grad.to(device), loss.detach().reshape(1).to(dtype)]
        )
        flat = distributed.mean_over_processes(flat)
        means = flat[: sum(sizes)].split(sizes)
        any_rank_had_grad = (flat[sum(sizes) : -1] > 0).tolist()
        for p, mean, any_rank in zip(parameters, means, any_rank_had_grad, strict=True):
            if p.grad is None and any_rank:
                p.grad = torch.empty_like(p)
            if p.grad is not None:
                p.grad.copy_(mean.view_as(p))
    return flat[-1].item()


def _broadcast_from_main(parameters: list[nn.Parameter]) -> None:
    """Overwrite every rank's `parameters` with the main process's (one broadcast)."""
    if distributed.process_count() == 1 or not parameters:
        return
    dtype = _exchange_dtype(parameters)
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in parameters])
        flat = distributed.broadcast_from_main(flat)
        for p, value in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
            p.copy_(value.view_as(p))


def _exchange_dtype(parameters: list[nn.Parameter]) -> torch.dtype:
    """float32 holds fp32/bf16/fp16 values exactly; float64 when a parameter needs it."""
    return torch.float64 if any(p.dtype == torch.float64 for p in parameters) else torch.float32


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

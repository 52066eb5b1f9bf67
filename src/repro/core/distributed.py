"""Where a stage runs: its device, and its share of the work when several processes train.

A stage runs as one process (CPU, or one GPU), or as several under `torchrun` /
`accelerate launch` (one per GPU of a Slurm job, or CPU ranks over gloo in the
tests). The same code serves every case:

- `resolve_device("auto")` is this process's device (its own GPU under a launcher,
  CUDA when present, else the CPU); nothing else names a device.
- Random draws of a training step come from `step_generator(seed, step)`, a pure
  function of (seed, step, rank): a resumed run sees the same batches, and ranks
  draw different ones. With one process it is the historical seed * 1_000_003 + step.
- `local_batch_size(batch_size)` is this process's share of the global batch.
- `wait_for_everyone`, `mean_over_processes` and `broadcast_from_main` are the
  collectives `fit` needs; with one process they do nothing (and start nothing).

Rank and world size are the launcher's RANK and WORLD_SIZE (torchrun and
`accelerate launch` set both; accelerate's PartialState reads the same two), so
they are known without joining the process group. accelerate's PartialState
joins it (nccl on GPUs, gloo on CPU ranks) on the first collective or on
`resolve_device("auto")`, and picks this rank's device.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, parse_flag_from_env, reduce

from repro.core.errors import ReproInputError

# Seeds of different steps never collide for steps < this stride.
STEP_STRIDE = 1_000_003
# Rank r draws from a stream offset by r * RANK_STRIDE (0 for the only process).
RANK_STRIDE = 7_919 * STEP_STRIDE


def process_index() -> int:
    """This process's rank (0 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """How many processes train together (1 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return process_index() == 0


def _state() -> PartialState:
    """accelerate's state of this process; the first call joins the process group."""
    # cpu=True where there is no GPU: with the default, accelerate takes each CPU
    # rank under torchrun for a lone process (world size 1 on every rank, measured).
    # `accelerate launch --cpu` asks for the CPU through ACCELERATE_USE_CPU.
    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu)
    if (state.num_processes, state.process_index) != (process_count(), process_index()):
        # Someone started accelerate before us with other settings: collectives
        # would then silently skip ranks.
        raise RuntimeError(
            f"accelerate sees process {state.process_index} of {state.num_processes}, "
            f"the launcher says RANK={process_index()} WORLD_SIZE={process_count()}"
        )
    return state


def resolve_device(name: str = "auto") -> torch.device:
    """The device a stage runs on: "auto" = this rank's GPU, else CUDA if present, else CPU."""
    if name == "auto":
        device = _state().device  # cuda:LOCAL_RANK under a launcher
        if device.type == "cpu":
            return torch.device("cpu")  # not accelerate's "cpu:0": compares equal to "cpu"
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ReproInputError(f"--device: {name!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReproInputError(f"--device: {name!r} asked for, but this machine has no CUDA device")
    return device


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training step's random draws on this process."""
    return torch.Generator().manual_seed(
        int(seed) * STEP_STRIDE + int(step) + process_index() * RANK_STRIDE
    )


def local_batch_size(batch_size: int) -> int:
    """This process's share of a global batch (the global batch is split evenly)."""
    count = process_count()
    if batch_size % count:
        raise ReproInputError(
            f"batch_size: {batch_size} does not split evenly over {count} processes"
        )
    return batch_size // count


def wait_for_everyone() -> None:
    """Barrier: return once every process has got here."""
    if process_count() > 1:
        _state().wait_for_everyone()


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `tensor` over the processes (a new tensor, same on all)."""
    if process_count() == 1:
        return tensor.clone()
    state = _state()
    # The collective runs on the process group's device (nccl cannot reduce CPU tensors).
    return reduce(tensor.to(state.device), "mean").to(tensor.device)


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """The main process's `tensor` on every process (a new tensor)."""
    if process_count() == 1:
        return tensor.clone()
    state = _state()
    return broadcast(tensor.to(state.device, copy=True), from_process=0).to(tensor.device)

"""Several processes: per-rank batches and, under torchrun, one training on two CPU ranks.

The two-process runs use torchrun (`accelerate launch --cpu --num_processes 2`
starts a single process here), with gloo between two CPU ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repro.core import distributed
from repro.core.errors import ReproInputError

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS, EVERY = 60, 10


# ------------------------------------------------------------------ unit tests


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _ranks(monkeypatch, rank: int, count: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(count))


def test_one_process_step_generator_is_the_historical_seed(one_process):
    assert distributed.process_index() == 0 and distributed.process_count() == 1
    assert distributed.is_main_process()
    generator = distributed.step_generator(5, 7)
    assert generator.initial_seed() == 5_000_022  # 5 * 1_000_003 + 7
    expected = torch.randn(4, generator=torch.Generator().manual_seed(5_000_022))
    assert torch.equal(torch.randn(4, generator=distributed.step_generator(5, 7)), expected)


def test_ranks_draw_different_batches(monkeypatch):
    _ranks(monkeypatch, 0, 2)
    rank0 = distributed.step_generator(5, 7)
    assert rank0.initial_seed() == 5_000_022  # rank 0 keeps the one-process stream
    seeds0 = {distributed.step_generator(s, t).initial_seed() for s in range(9) for t in range(99)}
    _ranks(monkeypatch, 1, 2)
    rank1 = distributed.step_generator(5, 7)
    assert rank1.initial_seed() != rank0.initial_seed()
    assert not torch.equal(torch.randn(8, generator=rank1), torch.randn(8, generator=rank0))
    # Nor is rank 1's stream rank 0's at another step or seed.
    seeds1 = {distributed.step_generator(s, t).initial_seed() for s in range(9) for t in range(99)}
    assert not seeds0 & seeds1


def test_local_batch_size_one_process(one_process):
    assert distributed.local_batch_size(7) == 7
    assert distributed.local_batch_size(1) == 1


@pytest.mark.parametrize(("batch", "local"), [(8, 2), (4, 1), (12, 3)])
def test_local_batch_size_splits_evenly(monkeypatch, batch, local):
    _ranks(monkeypatch, 3, 4)
    assert distributed.local_batch_size(batch) == local


@pytest.mark.parametrize("batch", [9, 7, 3, 2])
def test_local_batch_size_uneven_split_fails(monkeypatch, batch):
    _ranks(monkeypatch, 0, 4)
    with pytest.raises(ReproInputError, match=rf"batch_size: {batch} .*over 4 processes"):
        distributed.local_batch_size(batch)


def test_resolve_device_one_process(one_process):
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert distributed.resolve_device("auto") == distributed.resolve_device() == expected
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ReproInputError, match="not a device"):
        distributed.resolve_device("gpu7")


def test_collectives_alone_do_nothing(one_process):
    x = torch.arange(4.0)
    distributed.wait_for_everyone()
    for y in (distributed.mean_over_processes(x), distributed.broadcast_from_main(x)):
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


# ------------------------------------------------- two ranks under torchrun

# Each rank builds its model from its own seed (fit starts all from rank 0's
# weights), draws dropout masks from its own RNG (so a resume must restore each
# rank's RNG), and its own batches. `gate` is used on rank 1 only (its gradient
# counts as zero on rank 0); `unused` never gets a gradient (AdamW must skip it).
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from repro.core.distributed import (
        local_batch_size, process_count, process_index, resolve_device, step_generator,
    )
    from repro.core.training import fit

    out = sys.argv[1]
    torch.set_num_threads(1)
    sleep = float(os.environ.get("REPRO_TEST_STEP_SLEEP", "0"))
    rank = process_index()
    with open(os.path.join(out, f"pid.rank{rank}"), "w") as f:
        f.write(str(os.getpid()))
    device = resolve_device()  # joins the process group
    assert process_count() == 2 and device == torch.device("cpu"), (process_count(), device)

    torch.manual_seed(rank)
    model = nn.ModuleDict(
        {
            "net": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1)),
            "gate": nn.Linear(8, 1),
            "unused": nn.Linear(2, 2),
        }
    )
    unused_before = model["unused"].weight.detach().clone()
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
    batch = local_batch_size(32)

    def loss_fn(step):
        if sleep:
            time.sleep(sleep)
        x = torch.randn(batch, 8, generator=step_generator(7, step))
        y = model["net"](x)
        if rank == 1:
            y = y + 0.1 * model["gate"](x)
        return nn.functional.mse_loss(y, x @ w)

    result = fit(
        modules={"model": model},
        parameters=list(model.parameters()),
        loss_fn=loss_fn,
        steps=int(sys.argv[2]),
        lr=1e-2,
        weight_decay=0.01,
        grad_clip=1.0,
        checkpoint_dir=os.path.join(out, "ckpt"),
        checkpoint_every=int(sys.argv[3]),
        log_every=0,
        desc="toy",
    )
    # Rank 0 kept its own initial weights: `unused` must not have moved.
    result["unused_unchanged"] = rank > 0 or torch.equal(model["unused"].weight, unused_before)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"weights.rank{rank}.safetensors"))
    with open(os.path.join(out, f"result.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, out: Path, sleep: float = 0.0) -> subprocess.Popen:
    """Two CPU ranks of `script`, in a process group of their own (to kill them all)."""
    out.mkdir(parents=True, exist_ok=True)
    # CPU ranks even on a GPU machine (two ranks cannot share one GPU under nccl).
    env = dict(os.environ, REPRO_TEST_STEP_SLEEP=str(sleep), OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [str(script), str(out), str(STEPS), str(EVERY)]
    with open(out / "torchrun.log", "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)


def _finish(run: subprocess.Popen, out: Path) -> None:
    run.wait(timeout=120)
    assert run.returncode == 0, (out / "torchrun.log").read_text()[-4000:]


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie left for init to reap does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"weights.rank{rank}.safetensors")


def _result(out: Path, rank: int) -> dict:
    return json.loads((out / f"result.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "train_two_ranks.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def straight(script, tmp_path_factory) -> Path:
    """An uninterrupted two-rank run."""
    out = tmp_path_factory.mktemp("straight")
    _finish(_torchrun(script, out), out)
    return out


@pytest.mark.slow
def test_two_ranks_keep_identical_weights_and_learn(straight):
    a, b = _weights(straight, 0), _weights(straight, 1)
    assert a.keys() == b.keys() and {"gate.weight", "unused.weight"} <= a.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    r0, r1 = _result(straight, 0), _result(straight, 1)
    assert r0["unused_unchanged"] and r0["resumed_from"] == 0
    # The loss is the mean over the ranks: the same number on both.
    assert r0["loss_history"] == r1["loss_history"] and len(r0["loss_history"]) == STEPS
    history = r0["loss_history"]
    assert sum(history[-10:]) / 10 < 0.5 * sum(history[:10]) / 10


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_match_uninterrupted_run(script, straight, tmp_path):
    killed = tmp_path / "killed"
    victim = _torchrun(script, killed, sleep=0.05)  # 60 steps: 3 s or more
    deadline = time.monotonic() + 60
    while not (killed / "ckpt" / "latest").exists():
        assert victim.poll() is None, (killed / "torchrun.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # train on past the checkpoint, into the middle of the run
    assert victim.poll() is None, "the run ended before it could be killed"
    # torchrun starts each rank in a session of its own (its ranks outlive a kill of
    # torchrun's group alone), so kill every group, as Slurm kills a job's cgroup.
    ranks = [int((killed / f"pid.rank{rank}").read_text()) for rank in (0, 1)]
    for group in (*ranks, victim.pid):
        os.killpg(group, signal.SIGKILL)
    victim.wait()
    for rank, pid in enumerate(ranks):
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"rank {rank} (pid {pid}) survived the kill")
    assert not (killed / "result.rank0.json").exists()

    _finish(_torchrun(script, killed), killed)
    resumed, reference = _result(killed, 0), _result(straight, 0)
    assert 0 < resumed["resumed_from"] < STEPS and resumed["resumed_from"] % EVERY == 0
    assert resumed["loss_history"] == reference["loss_history"]
    expected = _weights(straight, 0)
    for rank in (0, 1):
        weights = _weights(killed, rank)
        assert weights.keys() == expected.keys()
        for key in expected:
            assert torch.equal(weights[key], expected[key]), (rank, key)

"""The training loop: schedule values, divergence, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from repro.core.errors import ReproInputError
from repro.core.training import TrainingDivergedError, fit, warmup_cosine

SRC = Path(__file__).resolve().parents[1] / "src"


def test_warmup_cosine_values():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=2.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_fraction=0.1)
    mult = sched.lr_lambdas[0]
    assert mult(0) == 0.0
    assert mult(5) == pytest.approx(0.5)
    assert mult(10) == pytest.approx(1.0)  # end of warm-up
    assert mult(55) == pytest.approx(0.5)  # half-way through the cosine
    assert mult(100) == pytest.approx(0.0, abs=1e-12)  # end
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(2.0)
    assert max(lrs) == pytest.approx(2.0) and 0 < lrs[-1] < 0.01
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # No warm-up: full lr at once.
    assert warmup_cosine(opt, 10, 0.0).lr_lambdas[0](0) == 1.0


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    w = torch.randn(4, 1)

    def loss_fn(step: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        return (model(x) - x @ w).pow(2).mean()

    return model, loss_fn


def test_fit_learns_and_reports():
    model, loss_fn = _toy()
    result = fit(
        modules={"model": model},
        parameters=list(model.parameters()),
        loss_fn=loss_fn,
        steps=120,
        lr=1e-2,
        grad_clip=1.0,
        log_every=0,
    )
    history = result["loss_history"]
    assert result["steps"] == 120 and len(history) == 120 and result["resumed_from"] == 0
    assert result["final_loss"] == pytest.approx(sum(history[-50:]) / 50)
    assert result["final_loss"] < 0.5 * sum(history[:10]) / 10


def test_fit_resume_in_process_and_step_mismatch(tmp_path):
    model, loss_fn = _toy()
    kwargs = dict(loss_fn=loss_fn, lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=10)
    first = fit(modules={"model": model}, parameters=list(model.parameters()), steps=30, **kwargs)
    again = fit(modules={"model": model}, parameters=list(model.parameters()), steps=30, **kwargs)
    assert again["resumed_from"] == 30 and again["loss_history"] == first["loss_history"]
    with pytest.raises(ReproInputError, match="steps=40"):
        fit(modules={"model": model}, parameters=list(model.parameters()), steps=40, **kwargs)


class _Record(nn.Module):
    """A module on_step writes into (as a per-epoch validation would)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(30))


def test_on_step_runs_after_each_step_and_is_saved_with_the_checkpoint(tmp_path):
    model, loss_fn = _toy()
    record = _Record()
    calls, weights_at_call = [], {}

    def on_step(done: int) -> None:
        calls.append(done)
        record.seen[done - 1] = done
        # Called after the optimizer step: the weights are those of `done` steps.
        weights_at_call[done] = model[0].weight.detach().clone()

    kwargs = dict(loss_fn=loss_fn, lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=10)
    modules = {"model": model, "record": record}
    fit(modules=modules, parameters=list(model.parameters()), steps=20, on_step=on_step, **kwargs)
    assert calls == list(range(1, 21))
    assert torch.equal(weights_at_call[20], model[0].weight)
    # The checkpoint at step 20 holds what on_step recorded up to step 20 (written before
    # the save); a fresh module resumed from it gets it back, and on_step is not called
    # again for the 20 steps a resumed run skips.
    calls.clear()
    fresh, _ = _toy()
    restored = _Record()
    again = fit(
        modules={"model": fresh, "record": restored},
        parameters=list(fresh.parameters()),
        steps=20,
        on_step=on_step,
        **kwargs,
    )
    assert again["resumed_from"] == 20 and calls == []
    assert restored.seen[:20].tolist() == [float(i) for i in range(1, 21)]
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_nan_loss_raises_training_diverged():
    model, loss_fn = _toy()

    def exploding(step: int):
        return loss_fn(step) * (float("nan") if step == 3 else 1.0)

    with pytest.raises(TrainingDivergedError, match=r"toy.*nan at step 3.*lower learning rate"):
        fit(
            modules={"model": model},
            parameters=list(model.parameters()),
            loss_fn=exploding,
            steps=10,
            lr=1e-2,
            desc="toy",
        )
    assert issubclass(TrainingDivergedError, RuntimeError)


# A toy regression with dropout (so the restored RNG matters), batches a pure
# function of the step. REPRO_TEST_STEP_SLEEP slows it down so a kill lands mid-run.
SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    import torch
    from torch import nn
    from repro.core.training import fit


    def main(out):
        torch.set_num_threads(1)
        sleep = float(os.environ.get("REPRO_TEST_STEP_SLEEP", "0"))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        w = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))

        def loss_fn(step):
            if sleep:
                time.sleep(sleep)
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1000 + step))
            return nn.functional.mse_loss(model(x), torch.sin(x @ w))

        result = fit(
            modules={"model": model},
            parameters=list(model.parameters()),
            loss_fn=loss_fn,
            steps=300,
            lr=3e-3,
            weight_decay=0.01,
            grad_clip=1.0,
            checkpoint_dir=os.path.join(out, "ckpt"),
            checkpoint_every=20,
            desc="toy",
        )
        digest = hashlib.sha256()
        for key, value in model.state_dict().items():
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
        result["weights_sha256"] = digest.hexdigest()
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)


    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def _run(script: Path, out: Path, sleep: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, REPRO_TEST_STEP_SLEEP=str(sleep))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    # The run to be killed starts first (a fresh process takes seconds to import torch);
    # meanwhile the uninterrupted reference runs here, in this process.
    victim = _run(script, killed, sleep=0.03)  # 300 steps: 9 s or more
    monkeypatch.delenv("REPRO_TEST_STEP_SLEEP", raising=False)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script))["main"](str(straight))
    finally:
        torch.set_num_threads(threads)

    deadline = time.monotonic() + 60
    while not (killed / "ckpt" / "latest").exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # let it train on past the checkpoint, into the middle of the run
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists()

    resumed = _run(script, killed)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((killed / "result.json").read_text())
    assert a["resumed_from"] == 0
    assert 0 < b["resumed_from"] < 300 and b["resumed_from"] % 20 == 0
    assert b["final_loss"] == a["final_loss"] and math.isfinite(a["final_loss"])
    assert b["loss_history"] == a["loss_history"]
    assert b["weights_sha256"] == a["weights_sha256"]

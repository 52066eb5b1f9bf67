"""Checkpoint round trips: weights, optimizer, scheduler and RNG come back bit-exact."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from repro.core.checkpoint import Checkpointer
from repro.core.errors import ReproInputError
from repro.core.training import warmup_cosine


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
    )


def _setup(seed: int):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = warmup_cosine(opt, total_steps=20, warmup_fraction=0.2)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 4)  # global RNG: resume must restore it
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_continues_bit_exact(tmp_path):
    model, opt, sched = _setup(seed=0)
    _train(model, opt, sched, 5)
    ckpt = Checkpointer(tmp_path / "ckpt", every=5)
    ckpt.save(5, {"model": model}, opt, sched, extra={"note": "hi", "losses": [1.5, 0.25]})

    # Path A: keep training without reloading.
    _train(model, opt, sched, 5)
    weights_a = {k: v.clone() for k, v in model.state_dict().items()}
    state_a = opt.state_dict()
    lr_a = sched.get_last_lr()
    rand_a = (torch.rand(3), random.random(), np.random.rand())

    # Path B: a differently initialised model, restored from the checkpoint.
    model_b, opt_b, sched_b = _setup(seed=123)
    step, extra = Checkpointer(tmp_path / "ckpt", every=5).load_latest(
        {"model": model_b}, opt_b, sched_b
    )
    assert (step, extra) == (5, {"note": "hi", "losses": [1.5, 0.25]})
    assert sched_b.last_epoch == 5
    _train(model_b, opt_b, sched_b, 5)

    for key, value in model_b.state_dict().items():
        assert torch.equal(value, weights_a[key]), key
    state_b = opt_b.state_dict()
    assert state_b["param_groups"] == state_a["param_groups"]
    for pid, slots in state_a["state"].items():
        assert set(slots) == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in slots.items():
            assert torch.equal(state_b["state"][pid][name], value), (pid, name)
    assert sched_b.get_last_lr() == lr_a
    assert torch.equal(torch.rand(3), rand_a[0])
    assert random.random() == rand_a[1]
    assert np.random.rand() == rand_a[2]


def test_rng_alone_is_restored(tmp_path):
    model, opt, _ = _setup(seed=0)
    ckpt = Checkpointer(tmp_path, every=1)
    torch.manual_seed(7)
    ckpt.save(1, {"m": model}, opt)
    expected = torch.rand(4)
    torch.manual_seed(99)
    ckpt.load_latest({"m": model}, opt)
    assert torch.equal(torch.rand(4), expected)


def test_generic_optimizer_state_sgd_momentum(tmp_path):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    Checkpointer(tmp_path, every=1).save(1, {"m": model}, opt)

    model_b = _model(1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.5, momentum=0.1)
    Checkpointer(tmp_path, every=1).load_latest({"m": model_b}, opt_b)
    assert opt_b.param_groups[0]["lr"] == 0.1 and opt_b.param_groups[0]["nesterov"]
    for pid, slots in opt.state_dict()["state"].items():
        assert torch.equal(
            opt_b.state_dict()["state"][pid]["momentum_buffer"], slots["momentum_buffer"]
        )


def test_no_checkpoint_returns_zero(tmp_path):
    model, opt, sched = _setup(0)
    assert Checkpointer(tmp_path / "none", every=1).load_latest({"m": model}, opt, sched) == (0, {})


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_removes_old_steps(tmp_path, keep):
    model, opt, sched = _setup(0)
    ckpt = Checkpointer(tmp_path, every=2, keep=keep)
    saved = [s for s in range(1, 11) if ckpt.maybe_save(s, {"m": model}, opt, sched)]
    assert saved == [2, 4, 6, 8, 10]
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"step_{s:08d}" for s in saved[-keep:]]
    assert names == sorted(expected + ["latest"])  # and no temp directories left behind
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    assert ckpt.load_latest({"m": model}, opt, sched)[0] == 10


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, opt, _ = _setup(0)
    ckpt = Checkpointer(tmp_path, every=1)
    ckpt.save(3, {"m": model}, opt, extra={"v": 1})
    ckpt.save(3, {"m": model}, opt, extra={"v": 2})
    assert ckpt.load_latest({"m": model}, opt) == (3, {"v": 2})


def test_missing_latest_pointer_falls_back_to_newest_step(tmp_path):
    model, opt, _ = _setup(0)
    ckpt = Checkpointer(tmp_path, every=1, keep=3)
    ckpt.save(1, {"m": model}, opt)
    ckpt.save(2, {"m": model}, opt)
    (tmp_path / "latest").unlink()  # killed between the rename and the pointer update
    assert ckpt.load_latest({"m": model}, opt)[0] == 2


@pytest.mark.parametrize(
    "name", ["module.m.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"]
)
def test_corrupt_checkpoint_names_the_file(tmp_path, name):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    ckpt = Checkpointer(tmp_path, every=1)
    step_dir = ckpt.save(1, {"m": model}, opt, sched)
    file = step_dir / name
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ReproInputError, match=str(file)):
        ckpt.load_latest({"m": model}, opt, sched)


def test_wrong_module_shape_names_the_file(tmp_path):
    model, opt, _ = _setup(0)
    step_dir = Checkpointer(tmp_path, every=1).save(1, {"m": model}, opt)
    other = nn.Linear(3, 3)
    opt_other = torch.optim.AdamW(other.parameters())
    with pytest.raises(ReproInputError, match=str(step_dir / "module.m.safetensors")):
        Checkpointer(tmp_path, every=1).load_latest({"m": other}, opt_other)


def test_trainable_only_skips_frozen_parameters(tmp_path):
    base = _model(0)
    head = nn.Linear(1, 1)
    model = nn.Sequential(base, head)
    base.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters())
    step_dir = Checkpointer(tmp_path, every=1, trainable_only=True).save(1, {"m": model}, opt)
    from safetensors import safe_open

    with safe_open(str(step_dir / "module.m.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"1.weight", "1.bias", "0.1.running_mean"} <= keys  # trainable + buffers
    assert "0.0.weight" not in keys  # frozen parameter

    model_b = nn.Sequential(_model(0), nn.Linear(1, 1))  # same frozen base, new head
    model_b[0].requires_grad_(False)
    opt_b = torch.optim.AdamW(model_b[1].parameters())
    Checkpointer(tmp_path, every=1, trainable_only=True).load_latest({"m": model_b}, opt_b)
    assert torch.equal(model_b[1].weight, head.weight)


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    opt = torch.optim.AdamW(model.parameters())
    Checkpointer(tmp_path, every=1).save(1, {"m": model}, opt)
    model_b = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model_b[1].weight = model_b[0].weight
    Checkpointer(tmp_path, every=1).load_latest(
        {"m": model_b}, torch.optim.AdamW(model_b.parameters())
    )
    assert torch.equal(model_b[0].weight, model[0].weight)
    assert model_b[1].weight is model_b[0].weight

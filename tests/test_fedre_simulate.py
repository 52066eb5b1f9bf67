"""The fedre_simulate stage through its CLI: tables, resume, bad input."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.fedre import simulate
from repro.fedre.table import COMM_COLUMNS, ROUND_COLUMNS

PARAMS = {
    "task": "toy",
    "partition": "dir",
    "partition_spec": {"kind": "dirichlet", "alpha": 0.5, "min_size": 4},
    "seed": 0,
    "num_clients": 3,
    "train_fraction": 0.75,
    "clients": ["mlp_narrow", "cnn_small", "vit_tiny"],
    "rep_dim": 8,
    "rounds": 2,
    "last_rounds": 1,
    "algorithms": ["local", "fedre"],
    "local": {"lr": 0.06, "epochs": 1, "batch_size": 8},
    "server": {"lr": 0.01, "batch_size": 8, "epochs": 2, "head_epochs": 1},
    "fedproto": {"lambda": 1.0},
    "fedtgp": {"lambda": 10.0, "hidden": 16, "margin_threshold": 100.0},
    "fedre": {"entangle": "random", "resample_weights": True},
}


@pytest.fixture
def task_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 4
    images = torch.randn(60, 1, 4, 4, generator=gen) + labels.view(-1, 1, 1, 1).float()
    path = tmp_path / "toy.safetensors"
    write_image_dataset(path, images, labels, "glyphs", {"num_classes": 4})
    return path


def args(tmp_path, task_file, params, name="run"):
    return [
        "--data", str(task_file),
        "--out", str(tmp_path / f"{name}.csv"),
        "--comm-out", str(tmp_path / f"{name}_comm.csv"),
        "--metrics", str(tmp_path / f"{name}.json"),
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--params", json.dumps(params),
        "--scale", "smoke",
    ]  # fmt: skip


def test_stage_writes_every_round_of_every_client_and_algorithm(tmp_path, task_file, monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")
    simulate.main(args(tmp_path, task_file, PARAMS))
    rounds = pd.read_csv(tmp_path / "run.csv")
    assert list(rounds.columns) == ROUND_COLUMNS
    # 2 algorithms x 2 rounds x (3 clients + the weighted row)
    assert len(rounds) == 2 * 2 * 4
    weighted = rounds[rounds.client == -1]
    per_client = rounds[rounds.client >= 0]
    for (algo, r), rows in per_client.groupby(["algorithm", "round"]):
        expected = (rows.accuracy * rows.test_samples).sum() / rows.test_samples.sum()
        got = weighted[(weighted.algorithm == algo) & (weighted["round"] == r)].accuracy
        assert got.item() == pytest.approx(expected)
    comm = pd.read_csv(tmp_path / "run_comm.csv")
    assert list(comm.columns) == COMM_COLUMNS
    assert (comm[comm.algorithm == "local"].scalars == 0).all()
    fedre_up = comm[(comm.algorithm == "fedre") & (comm.direction == "upload")]
    assert (fedre_up.messages == 3).all()
    metrics = json.loads((tmp_path / "run.json").read_text())
    assert set(metrics) >= {"final_accuracy_local", "final_accuracy_fedre", "seconds"}


def test_a_finished_algorithm_is_resumed_not_rerun(tmp_path, task_file, monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")
    simulate.main(args(tmp_path, task_file, PARAMS))
    first = pd.read_csv(tmp_path / "run.csv")
    # Mark the checkpointed rows of `local`: a rerun that reads them keeps the mark.
    (done,) = [p for p in (tmp_path / "ckpt").rglob("local.csv")]
    marked = pd.read_csv(done)
    marked["accuracy"] = 0.123
    marked.to_csv(done, index=False)
    (tmp_path / "run.csv").unlink()
    simulate.main(args(tmp_path, task_file, PARAMS))
    second = pd.read_csv(tmp_path / "run.csv")
    assert (second[second.algorithm == "local"].accuracy == 0.123).all()
    fedre = lambda t: t[t.algorithm == "fedre"].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(fedre(first), fedre(second))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithms": ["local", "fedavg"]}, "fedre.algorithms: unknown algorithm 'fedavg'"),
        ({"clients": ["mlp_narrow", "cnn_small", "resnet50"]}, "fedre.clients: unknown"),
        ({"partition_spec": {"kind": "dirichlet", "alpha": 0}}, "fedre.partitions.dir.alpha"),
        ({"num_clients": 20}, "fedre.num_clients"),
    ],
)
def test_bad_input_names_the_key_and_writes_nothing(tmp_path, task_file, change, message):
    with pytest.raises(ReproInputError, match=message):
        simulate.main(args(tmp_path, task_file, {**PARAMS, **change}))
    assert not (tmp_path / "run.csv").exists()


def test_cli_exits_2_on_a_foreign_file(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a safetensors file")
    proc = subprocess.run(
        [sys.executable, "-m", "repro.fedre.simulate", *args(tmp_path, foreign, PARAMS)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "foreign.safetensors" in proc.stderr
    assert not (tmp_path / "run.csv").exists()


def test_weighted_accuracy_weights_by_test_samples():
    """Two clients 1/1 and 1/3 right: 2/4 = 0.5 overall, not the clients' mean 0.667."""
    from repro.fedre.evaluate import weighted_accuracy

    assert weighted_accuracy([(1, 1), (1, 3)]) == (0.5, 4)
    with pytest.raises(ValueError, match="no test samples"):
        weighted_accuracy([(0, 0)])

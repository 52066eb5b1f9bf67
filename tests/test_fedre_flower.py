"""FedRE on Flower (repro.fedre.flower_run): through real SuperLink / SuperNode processes
on 127.0.0.1 the algorithms give the in-process simulation's head, accuracies and
communication counts; a failing client stops the run with its name and no table; no
process outlives a run.

The three runs (fedre, fedproto, a failing client) start together in one module fixture:
each is ~50 s of Flower's polling and fresh ClientApp processes, mostly waiting, so they
overlap well on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch

from repro.core.data import write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import load_tensors
from repro.fedre import flower_run, simulate
from repro.fedre.algorithms import Hyper, make_algorithm
from repro.fedre.flower.app import ClientFailedError, Roster
from repro.fedre.flower.deploy import Deployment, alive
from repro.fedre.flower.state import load_client_state, save_client_state
from repro.fedre.model import head_state
from repro.fedre.table import COMM_COLUMNS, ROUND_COLUMNS

pytestmark = pytest.mark.slow

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
    # Server batches of 2 over 3 uploads: the head depends on the uploads' order.
    "local": {"lr": 0.06, "epochs": 1, "batch_size": 8},
    "server": {"lr": 0.1, "batch_size": 2, "epochs": 2, "head_epochs": 1},
    "fedproto": {"lambda": 1.0},
    "fedtgp": {"lambda": 10.0, "hidden": 16, "margin_threshold": 100.0},
    "fedre": {"entangle": "random", "resample_weights": True},
}
RUNS = {
    "fedre": {**PARAMS, "algorithm": "fedre"},
    "fedproto": {**PARAMS, "algorithm": "fedproto"},
    "fail": {**PARAMS, "algorithm": "fedre", "fail": {"client": 1, "round": 2}},
}
RUN_LIMIT_S = 420


def make_task(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 4
    images = torch.randn(60, 1, 4, 4, generator=gen) + labels.view(-1, 1, 1, 1).float()
    write_image_dataset(path, images, labels, "glyphs", {"num_classes": 4})
    return path


def stage_args(run_dir: Path, task_file: Path, params: dict) -> list[str]:
    return [
        "--data", str(task_file),
        "--params", json.dumps(params),
        "--out", str(run_dir / "rounds.csv"),
        "--comm-out", str(run_dir / "comm.csv"),
        "--metrics", str(run_dir / "metrics.json"),
        "--final-out", str(run_dir / "final.safetensors"),
        "--workdir", str(run_dir / "work"),
        "--timeout-s", str(RUN_LIMIT_S - 60),
    ]  # fmt: skip


def simulation(params: dict, task_file: Path) -> dict:
    """The in-process simulation of params["algorithm"]: its tables (through CSV, as the
    stage writes them) and its last broadcast."""
    name, seed = params["algorithm"], params["seed"]
    images, labels, num_classes = simulate.load_task([str(task_file)], "toy")
    data = simulate.client_data(params, images, labels, seed)
    shape = dict(
        in_channels=images.shape[1],
        image_size=images.shape[-1],
        rep_dim=params["rep_dim"],
        num_classes=num_classes,
        seed=seed,
    )
    hp = Hyper.from_config(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage's Flower processes (--threads 1)
    try:
        keys = {"task": "toy", "partition": "dir", "seed": seed}
        rows, comm = simulate.simulate_algorithm(
            name, data, params["clients"], hp, rounds=params["rounds"], keys=keys, **shape
        )
        torch.manual_seed(seed)
        clients = simulate.make_clients(data, params["clients"], **shape)
        algorithm = make_algorithm(name, hp, num_classes, params["rep_dim"], seed)
        initial_head = head_state(clients[0].model)
        broadcast = simulate.run_rounds(algorithm, clients, params["rounds"])
    finally:
        torch.set_num_threads(threads)
    return {
        "rows": pd.DataFrame(rows, columns=ROUND_COLUMNS),
        "comm": pd.DataFrame(comm, columns=COMM_COLUMNS),
        "broadcast": broadcast,
        "initial_head": initial_head,
    }


def via_csv(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    df.to_csv(path, index=False)
    return pd.read_csv(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of RUNS through the stage's command line, started together; per run its
    directory, exit status, stderr and the simulation of the same params."""
    root = tmp_path_factory.mktemp("flower")
    task_file = make_task(root / "toy.safetensors")
    env = {**os.environ, "REPRO_MLFLOW": "0"}
    started = time.perf_counter()
    procs = {}
    for name, params in RUNS.items():
        run_dir = root / name
        run_dir.mkdir()
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "repro.fedre.flower_run",
                *stage_args(run_dir, task_file, params),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    try:
        # Meanwhile, the references.
        references = {name: simulation(params, task_file) for name, params in RUNS.items()}
        results = {}
        for name, proc in procs.items():
            _, stderr = proc.communicate(timeout=RUN_LIMIT_S)
            results[name] = {
                "dir": root / name,
                "status": proc.returncode,
                "stderr": stderr,
                "sim": references[name],
            }
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # SIGTERM: the stage then stops its own processes
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    print(f"three Flower runs together: {time.perf_counter() - started:.1f} s")
    return results


@pytest.mark.parametrize("name", ["fedre", "fedproto"])
def test_flower_run_equals_the_simulation(runs, name, tmp_path):
    run = runs[name]
    assert run["status"] == 0, run["stderr"][-3000:]
    sim = run["sim"]
    rounds = pd.read_csv(run["dir"] / "rounds.csv")
    comm = pd.read_csv(run["dir"] / "comm.csv")
    # Every client's accuracy in every round and the weighted row, exactly.
    pd.testing.assert_frame_equal(rounds, via_csv(sim["rows"], tmp_path / "r.csv"))
    assert len(rounds) == 2 * (3 + 1)
    # What crossed the wire: messages, tensors, scalars and safetensors bytes.
    pd.testing.assert_frame_equal(comm, via_csv(sim["comm"], tmp_path / "c.csv"))
    assert (comm.messages == 3).all()
    # The last broadcast, bit for bit: FedRE's head, FedProto's prototypes.
    final, meta = load_tensors(run["dir"] / "final.safetensors", "fedre_broadcast")
    assert meta["algorithm"] == name
    assert set(final) == set(sim["broadcast"])
    for key, tensor in sim["broadcast"].items():
        assert final[key].dtype == tensor.dtype
        assert torch.equal(final[key], tensor), key
    if name == "fedre":  # the head moved from client 0's initial head: it was trained
        assert not torch.equal(final["weight"], sim["initial_head"]["weight"])
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert metrics[f"final_accuracy_{name}"] == rounds.accuracy.iloc[-1]


def test_a_failing_client_names_itself_and_no_table_is_written(runs):
    run = runs["fail"]
    assert run["status"] != 0
    # The stage's error names the round and the client (partition-id, architecture).
    assert "round 2: client 1 (cnn_small) failed" in run["stderr"]
    assert "injected failure in round 2" in run["stderr"]
    for output in ("rounds.csv", "comm.csv", "metrics.json", "final.safetensors"):
        assert not (run["dir"] / output).exists(), output
    assert not (run["dir"] / "work" / "server" / "rounds.csv").exists()


@pytest.mark.parametrize("name", list(RUNS))
def test_no_process_of_a_run_survives_it(runs, name):
    workdir = runs[name]["dir"] / "work"
    pids = json.loads((workdir / "logs" / "pids.json").read_text())["pids"]
    # A SuperLink, 3 SuperNodes, `flwr run` (and `flwr list`) and what they started.
    assert len(pids) >= 1 + 3 + 1
    assert [pid for pid in pids if alive(pid)] == []
    # Nor any other process of this run: they all carry its FLWR_HOME.
    marker = f"FLWR_HOME={workdir / 'flwr_home'}".encode()
    survivors = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                survivors.append(int(entry.name))
        except OSError:
            continue
    assert survivors == []
    for log in ("superlink.log", "supernode0.log", "supernode2.log", "flwr_run.log"):
        assert (workdir / "logs" / log).stat().st_size > 0, log


# --- in-process parts -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedproto", "fedre"])
def test_a_client_restored_from_its_state_file_continues_as_if_never_stopped(tmp_path, name):
    """The ClientApp's state between messages: model (BatchNorm buffers too), generator
    and algorithm state; the restored client's next round equals the uninterrupted one."""
    task_file = make_task(tmp_path / "toy.safetensors")
    params = {**PARAMS, "clients": ["cnn_bn", "mlp_narrow", "vit_tiny"]}
    images, labels, num_classes = simulate.load_task([str(task_file)], "toy")
    data = simulate.client_data(params, images, labels, 0)
    shape = dict(in_channels=1, image_size=4, rep_dim=8, num_classes=num_classes, seed=0)
    algorithm = make_algorithm(name, Hyper.from_config(params), num_classes, 8, 0)

    def one_round(client):
        algorithm.local_train(client)
        return algorithm.upload(client)

    (client, *_) = simulate.make_clients(data, params["clients"], **shape)
    first = one_round(client)
    if name == "fedproto":  # a broadcast taken in: state of both kinds, tensor and dict
        algorithm.receive(client, algorithm.server_step([first]))
        assert set(client.state) == {"protos", "global_protos"}
    save_client_state(tmp_path / "client.safetensors", client, round=1)
    (restored, *_) = simulate.make_clients(data, params["clients"], **shape)
    load_client_state(tmp_path / "client.safetensors", restored, round=1)

    expected, got = one_round(client), one_round(restored)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    for key, value in client.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value), key
    assert any("running_mean" in key for key in client.model.state_dict())
    # A state of another round is refused, naming the file.
    with pytest.raises(ReproInputError, match=r"client\.safetensors: client state after round 1"):
        load_client_state(tmp_path / "client.safetensors", restored, round=2)


def test_stop_kills_by_pid_what_ignores_sigterm_and_what_left_the_group(tmp_path):
    """Deployment.stop: SIGTERM to each process group, SIGKILL after the grace period,
    and the descendants that started their own session (as the SuperLink's SuperExec)."""
    deployment = Deployment(tmp_path, partitions=0, stop_grace_s=1.0)
    deployment.logs.mkdir(parents=True)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    escaper = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {stubborn!r}], start_new_session=True); "
        "time.sleep(60)"
    )
    deployment._spawn("stubborn", [sys.executable, "-c", stubborn])
    parent = deployment._spawn("escaper", [sys.executable, "-c", escaper])
    deadline = time.monotonic() + 10
    while not (children := [p for p in _children(parent.process.pid)]):
        assert time.monotonic() < deadline, "the escaper never started its child"
        time.sleep(0.05)
    # Let the interpreters install their SIGTERM handler before stopping them.
    time.sleep(1.0)
    deployment.stop()
    assert set(children) <= set(deployment.pids)
    assert [pid for pid in deployment.pids if alive(pid)] == []


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "fedre.algorithm: missing"),
        ({"algorithm": "fedavg"}, "fedre.algorithm: unknown algorithm 'fedavg'"),
        ({"algorithm": "fedre", "fail": {"client": 3, "round": 1}}, "fedre.fail"),
        ({"algorithm": "fedre", "fail": {"client": 0, "round": 3}}, "fedre.fail"),
        ({"algorithm": "fedre", "clients": ["mlp_narrow", "foo", "vit_tiny"]}, "fedre.clients"),
    ],
)
def test_bad_params_fail_before_any_process_starts(tmp_path, change, message):
    task_file = make_task(tmp_path / "toy.safetensors")
    with pytest.raises(ReproInputError, match=message):
        flower_run.main(stage_args(tmp_path, task_file, {**PARAMS, **change}))
    assert not (tmp_path / "work").exists()
    assert not (tmp_path / "rounds.csv").exists()


class FakeReply:
    """What Roster.learn reads of a Flower reply: has_error() and content["client"]."""

    def __init__(self, partition_id=None):
        self.partition_id = partition_id
        shape = {"in-channels": 1, "image-size": 4, "num-classes": 4}
        self.content = {} if partition_id is None else {
            "client": {"partition-id": partition_id, "arch": "?", **shape}
        }  # fmt: skip

    def has_error(self):
        return self.partition_id is None


def test_the_server_names_a_client_that_failed_before_saying_who_it_is():
    archs = PARAMS["clients"]
    roster = Roster([701, 502, 903], archs)
    # Round 1: SuperNode 502 fails; the others say they run clients 0 and 2.
    roster.learn({701: FakeReply(2), 502: FakeReply(None), 903: FakeReply(0)})
    assert roster.name(502) == "client 1 (cnn_small)"  # the one client left
    assert roster.ordered() == [903, 502, 701]  # partition-id order
    # Two failures: the name says which clients they may be.
    roster = Roster([701, 502, 903], archs)
    roster.learn({701: FakeReply(2), 502: FakeReply(None), 903: FakeReply(None)})
    assert roster.name(903) == "SuperNode 903 (one of client 0 (mlp_narrow), client 1 (cnn_small))"
    # A node that claims another's client, or one out of range, stops the run.
    with pytest.raises(ClientFailedError, match="SuperNode 502 says it runs client 2"):
        Roster([701, 502], archs).learn({701: FakeReply(2), 502: FakeReply(2)})
    with pytest.raises(ClientFailedError, match="SuperNode 701 says it runs client 3"):
        Roster([701], archs).learn({701: FakeReply(3)})


def test_fail_param_just_inside_and_just_outside_its_range():
    inside = {**PARAMS, "algorithm": "fedre", "fail": {"client": 2, "round": 2}}
    assert flower_run.check_params(inside, 3) == "fedre"
    inside["fail"] = {"client": 0, "round": 1}
    assert flower_run.check_params(inside, 3) == "fedre"
    for fail in ({"client": -1, "round": 1}, {"client": 0, "round": 0}, {"client": 1}):
        with pytest.raises(ReproInputError, match="fedre.fail"):
            flower_run.check_params({**inside, "fail": fail}, 3)


def test_the_app_config_survives_toml():
    params = json.dumps({"quote": 'a"b\\c', "unicode": "h\u00e9llo\n", "tab": "\t"})
    config = {"params": params, "threads": 2, "reply-timeout-s": 1.5, "data": "[]"}
    parsed = tomllib.loads(flower_run.app_pyproject(config))
    assert parsed["tool"]["flwr"]["app"]["config"] == config
    assert parsed["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "repro.fedre.flower.app:server_app",
        "clientapp": "repro.fedre.flower.app:client_app",
    }
    assert parsed["project"]["dependencies"] == []  # nothing to install at run time

"""Stage fedre_flower: one algorithm on one task x partition x seed, on Flower in
deployment mode, with the server and every client in processes of their own.

The same rounds as repro.fedre.simulate (the apps of repro.fedre.flower.app call the
same client and server functions in the same order), so for the same --params the
tables equal the simulation's rows of that algorithm: only the transport differs.

On 127.0.0.1 it starts a SuperLink and one SuperNode per client (partition-id i runs
client i, fedre.clients[i]), writes the Flower app (pyproject.toml whose components are
repro.fedre.flower.app:server_app / :client_app and whose run config carries --params)
and runs it with `flwr run`. Nothing is installed at run time, telemetry and the
update check are off, and every process it started is stopped by its PID when it ends,
whatever happened (repro.fedre.flower.deploy).

Outputs:
- --out: the round table (repro.fedre.table ROUND_COLUMNS), --comm-out: the
  communication table (COMM_COLUMNS), as the simulation writes them for this algorithm;
- --final-out (optional): the last broadcast (FedRE's head, FedProto's prototypes) as
  safetensors (kind "fedre_broadcast");
- --metrics: final weighted accuracy, seconds, the clients' sample counts;
- --workdir: the app, the clients' state between rounds, the server's scratch tables,
  FLWR_HOME and a log per process (logs/superlink.log, logs/supernode<i>.log: the
  ClientApps' output, logs/flwr_run.log: the ServerApp's), logs/pids.json.
If a client fails or does not answer, the stage fails with an error that names the
client (partition-id and architecture) and the round, and writes no table.

--params: simulate's layout, with "algorithm" (one of repro.fedre.algorithms) instead
of "algorithms". For tests only, "fail": {"client": i, "round": r} makes client i raise
in round r's training.

    python -m repro.fedre.flower_run --data data/digits/train.safetensors \\
        data/digits/val.safetensors data/digits/test.safetensors \\
        --params '{"task": "digits", "partition": "dir", "seed": 0, "algorithm": "fedre",
        ...}' --out results/fedre/flower/digits_dir_s0.csv --comm-out ..._comm.csv \\
        --metrics ....json --workdir work/fedre_flower/digits_dir_s0
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from repro.core.errors import ReproInputError
from repro.core.io import atomic_write, write_json
from repro.core.results import read_table
from repro.core.stage import Stage, run
from repro.fedre.algorithms import ALGORITHM_CLASSES
from repro.fedre.flower.app import COMM_FILE, FAILURE_FILE, FINAL_FILE, ROUNDS_FILE
from repro.fedre.flower.deploy import COMPLETED, Deployment
from repro.fedre.model import build_clients
from repro.fedre.simulate import client_data, load_task
from repro.fedre.table import ALL_CLIENTS, COMM_COLUMNS, ROUND_COLUMNS

log = logging.getLogger("repro")

APP_REFS = {
    "serverapp": "repro.fedre.flower.app:server_app",
    "clientapp": "repro.fedre.flower.app:client_app",
}
NODE_WAIT_S = 120.0  # how long the ServerApp waits for every SuperNode to connect


class FlowerRunError(RuntimeError):
    """The Flower run did not complete (a client failed, a process died)."""


def _toml(value) -> str:
    """A TOML scalar: JSON's strings (ASCII, escaped) are TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=True)


def app_pyproject(run_config: Mapping) -> str:
    """The Flower app's pyproject.toml: its components (this package's apps, imported
    from the running environment: no dependencies to install) and its run config."""
    lines = [
        "[project]",
        'name = "fedre-flower"',
        'version = "1.0.0"',
        'description = "FedRE and its baselines (repro.fedre.algorithms) on Flower"',
        "dependencies = []  # everything comes from the environment that runs the stage",
        "",
        "[tool.flwr.app]",
        'publisher = "repro"',
        "",
        "[tool.flwr.app.components]",
        *(f"{key} = {_toml(ref)}" for key, ref in APP_REFS.items()),
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml(value)}" for key, value in run_config.items()),
    ]
    text = "\n".join(lines) + "\n"
    parsed = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert parsed == dict(run_config), "run config does not survive TOML"
    return text


def check_params(fr: Mapping, num_clients: int) -> str:
    """The algorithm; ReproInputError naming the key for a bad one or a bad "fail"."""
    name = fr.get("algorithm")
    if name is None:
        raise ReproInputError(
            f"fedre.algorithm: missing; a Flower run runs one (allowed: {list(ALGORITHM_CLASSES)})"
        )
    if name not in ALGORITHM_CLASSES:
        raise ReproInputError(
            f"fedre.algorithm: unknown algorithm {name!r} (allowed: {list(ALGORITHM_CLASSES)})"
        )
    archs = list(fr.get("clients", []))
    if len(archs) != num_clients:
        raise ReproInputError(
            f"fedre.clients: {len(archs)} architectures for {num_clients} clients "
            "(fedre.num_clients): one each"
        )
    fail = fr.get("fail")
    if fail is not None:
        rounds = int(fr["rounds"])
        ok = (
            isinstance(fail, Mapping)
            and set(fail) == {"client", "round"}
            and 0 <= int(fail["client"]) < num_clients
            and 1 <= int(fail["round"]) <= rounds
        )
        if not ok:
            raise ReproInputError(
                f"fedre.fail: must be {{'client': 0..{num_clients - 1}, 'round': 1..{rounds}}}, "
                f"got {fail!r}"
            )
    return str(name)


@contextlib.contextmanager
def stopped_by_sigterm():
    """SIGTERM (a cancelled Snakemake job, a timeout) raises SystemExit here, so that
    the deployment's `finally` stops its processes; Python's default would just die."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_flower(
    fr: Mapping,
    data_paths: Sequence[str],
    workdir: str | Path,
    *,
    threads: int = 1,
    timeout_s: float = 3600.0,
) -> Path:
    """One Flower run of `fr` (the stage's --params) in `workdir`; the ServerApp's output
    directory (rounds.csv, comm.csv, final.safetensors) once the run completed. Raises
    FlowerRunError, naming the failed client, when it did not."""
    workdir = Path(workdir).resolve()
    # This run's own: what an earlier run left would be read as this one's.
    for sub in ("app", "state", "server", "logs", "flwr_home"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    app_dir, server_dir = workdir / "app", workdir / "server"
    app_dir.mkdir(parents=True)
    run_config = {
        "algorithm": str(fr["algorithm"]),
        "params": json.dumps(fr, sort_keys=True),
        "data": json.dumps([str(Path(p).resolve()) for p in data_paths]),
        "out-dir": str(server_dir),
        "state-dir": str(workdir / "state"),
        "threads": int(threads),
        "node-wait-s": NODE_WAIT_S,
        "reply-timeout-s": float(timeout_s),
    }
    (app_dir / "pyproject.toml").write_text(app_pyproject(run_config))

    deployment = Deployment(workdir, partitions=len(fr["clients"]))
    try:
        with stopped_by_sigterm(), deployment:
            status = deployment.run_app(app_dir, timeout_s=timeout_s)
    finally:
        write_json(workdir / "logs" / "pids.json", {"pids": deployment.pids})
    if status != COMPLETED:
        failure = server_dir / FAILURE_FILE
        why = failure.read_text().strip() if failure.is_file() else "no error recorded"
        raise FlowerRunError(
            f"flower run of {fr['algorithm']}: {status}: {why} (logs: {workdir / 'logs'})"
        )
    return server_dir


def copy_file(src: Path, dst: str | Path) -> None:
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="fedre", out="round table (CSV)", metrics=True)
    stage.parser.add_argument("--data", nargs="+", required=True, help="the task's data files")
    stage.parser.add_argument("--comm-out", required=True, help="communication table (CSV)")
    stage.parser.add_argument(
        "--workdir", required=True, help="app, client state, FLWR_HOME and process logs"
    )
    stage.parser.add_argument("--final-out", help="the last broadcast (safetensors)")
    stage.parser.add_argument(
        "--timeout-s", type=float, default=3600.0, help="limit of the Flower run, seconds"
    )
    args = stage.start(argv)
    fr = stage.params
    seed, task = int(fr["seed"]), str(fr["task"])
    # Bad input fails here, before any process starts: the files, the partition, the
    # architectures (the clients repeat exactly this in their own processes).
    images, labels, num_classes = load_task(args.data, task)
    data = client_data(fr, images, labels, seed)
    name = check_params(fr, len(data))
    build_clients(
        list(fr["clients"]),
        in_channels=images.shape[1],
        image_size=images.shape[-1],
        rep_dim=int(fr["rep_dim"]),
        num_classes=num_classes,
        seed=seed,
    )

    server_dir = run_flower(
        fr, args.data, args.workdir, threads=args.threads, timeout_s=args.timeout_s
    )
    # The ServerApp's tables, checked, then copied as they are (each atomically).
    table = read_table(server_dir / ROUNDS_FILE, ROUND_COLUMNS)
    read_table(server_dir / COMM_FILE, COMM_COLUMNS)
    if args.final_out:
        copy_file(server_dir / FINAL_FILE, args.final_out)
    copy_file(server_dir / COMM_FILE, args.comm_out)
    copy_file(server_dir / ROUNDS_FILE, args.out)
    weighted = table[table.client == ALL_CLIENTS]
    final = float(weighted[weighted["round"] == weighted["round"].max()].accuracy.item())
    log.info("%s on Flower: %d rounds, final accuracy %.3f", name, fr["rounds"], final)
    stage.finish(
        {
            f"final_accuracy_{name}": final,
            "client_train_samples": [len(d.train_y) for d in data],
            "client_classes": [len(d.classes) for d in data],
            "seconds": time.perf_counter() - stage.started,
        }
    )


if __name__ == "__main__":
    run(main)

"""A Flower deployment on this machine: one SuperLink and one SuperNode per client, each
its own process (and process group) on 127.0.0.1, and `flwr run` of an app against it.

    with Deployment(workdir, partitions=3) as deployment:
        status = deployment.run_app(app_dir)   # "finished:completed" when it worked

What Flower 1.42 needs here (measured, ../shared/FLOWER.md):
- nothing installed at run time: `--disable-runtime-dependency-installation` on the
  SuperLink and FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 for every process
  (otherwise the SuperLink runs `uv sync` on the app's dependencies);
- telemetry and the update check off, the SuperExecs polling every 0.1 s; FLWR_HOME a directory of this run, whose
  config.toml names the SuperLink connection `flwr run` / `flwr list` use;
- this Python's bin directory first on PATH: the SuperLink and SuperNodes start
  flower-superexec, flwr-serverapp and flwr-clientapp by name;
- `flwr run` exits 0 even when the run failed: the status comes from `flwr list
  --format json`.

Stopping: every process started here is stopped by its PID, in a `finally`: SIGTERM to
its process group, then SIGKILL after a grace period. The SuperLink starts its
flower-superexec in a new session (outside the group), so the processes each started
one (descendants, read from /proc on Linux) are signalled by PID too. `pids` lists
every PID signalled, for the tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("repro")

CONNECTION = "fedre-local"  # the SuperLink connection's name in $FLWR_HOME/config.toml
HOST = "127.0.0.1"
COMPLETED = "finished:completed"
STOP_GRACE_S = 10.0
SUPEREXEC_POLL_S = 0.1


class FlowerDeployError(RuntimeError):
    """A process of the deployment did not start, or `flwr` failed."""


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def processes() -> dict[int, tuple[str, int, int]]:
    """Every process as {pid: (state, parent pid, process group)}, from /proc ({} where
    there is none)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def _running(state: str) -> bool:
    return state not in ("Z", "X")  # a zombie only waits for its parent to reap it


def descendants(pid: int) -> list[int]:
    """The PIDs of every running process under `pid`, children first."""
    table = processes()
    found, frontier = [], {pid}
    while frontier:
        children = [p for p, (state, parent, _) in table.items() if parent in frontier]
        found += [p for p in children if _running(table[p][0])]
        frontier = set(children)
    return found


def group_running(pgid: int) -> bool:
    """Whether a running process is left in process group `pgid`."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(g == pgid and _running(s) for s, _, g in processes().values())


def alive(pid: int) -> bool:
    """Whether `pid` is running (a zombie is not)."""
    if Path("/proc").is_dir():
        entry = processes().get(pid)
        return entry is not None and _running(entry[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment for Flower's processes: FLWR_HOME, no telemetry, no
    update check, no run-time installs, this Python's bin directory first on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # How often a SuperExec asks for work (Flower's default 1 s): every message
        # waits for it once, so it adds up over rounds.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPEREXEC_POLL_S),
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FlowerDeployError(
            f"{path}: not found; Flower is not installed in this environment "
            "(requirements.txt pins flwr)"
        )
    return str(path)


@dataclass
class Started:
    name: str
    process: subprocess.Popen
    log_path: Path


@dataclass
class Deployment:
    """A SuperLink and `partitions` SuperNodes (partition-id 0..partitions-1) under
    `workdir` (logs/, flwr_home/); a context manager that stops them all on exit."""

    workdir: Path
    partitions: int
    start_timeout_s: float = 60.0
    stop_grace_s: float = STOP_GRACE_S  # from SIGTERM to SIGKILL
    started: list[Started] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # every PID started or signalled

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr_home"
        self.env = flower_env(self.flwr_home)
        self.superlink_port: int | None = None

    # ---- starting
    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        link_port, *node_ports = free_ports(1 + self.partitions)
        self.superlink_port = link_port
        # The connection `flwr run` / `flwr list` name; FLWR_HOME is this run's own.
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{link_port}"\ninsecure = true\n'
        )
        command = [
            executable("flower-superlink"),
            "--insecure",
            "--host", HOST,
            "--port", str(link_port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        superlink = self._spawn("superlink", command)
        self._wait_for_port(superlink, link_port)
        nodes = []
        for i, port in enumerate(node_ports):
            command = [
                executable("flower-supernode"),
                "--insecure",
                "--superlink", f"{HOST}:{link_port}",
                "--host", HOST,
                "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={self.partitions}",
            ]  # fmt: skip
            nodes.append(self._spawn(f"supernode{i}", command))
        for node, port in zip(nodes, node_ports, strict=True):
            self._wait_for_port(node, port)
        log.info(
            "flower: SuperLink on %s:%d (pid %d), %d SuperNodes (pids %s)",
            HOST, link_port, superlink.process.pid, len(nodes),
            [n.process.pid for n in nodes],
        )  # fmt: skip

    def _spawn(self, name: str, command: Sequence[str]) -> Started:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as out:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,  # its own process group: stopped as one
            )
        started = Started(name, process, log_path)
        self.started.append(started)
        self.pids.append(process.pid)
        return started

    def _wait_for_port(self, started: Started, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not port_open(port):
            if started.process.poll() is not None:
                raise FlowerDeployError(
                    f"flower: {started.name} exited with status {started.process.returncode} "
                    f"before listening on {HOST}:{port}; its log: {started.log_path}\n"
                    + tail(started.log_path)
                )
            if time.monotonic() > deadline:
                raise FlowerDeployError(
                    f"flower: {started.name} not listening on {HOST}:{port} after "
                    f"{self.start_timeout_s:g} s; its log: {started.log_path}"
                )
            time.sleep(0.1)

    # ---- running an app
    def flwr(self, name: str, args: Sequence[str], timeout_s: float) -> tuple[int, str]:
        """Run the `flwr` CLI (its own process group, stopped on timeout); its exit status
        and output, which also goes to logs/<name>.log."""
        started = self._spawn(name, [executable("flwr"), *args])
        try:
            status = started.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._stop_one(started)
            raise FlowerDeployError(
                f"flower: `flwr {args[0]}` still running after {timeout_s:g} s; "
                f"its log: {started.log_path}"
            ) from None
        return status, started.log_path.read_text(errors="replace")

    def run_app(self, app_dir: Path, *, timeout_s: float) -> str:
        """`flwr run app_dir --stream` against the SuperLink; the run's final status as
        `flwr list` reports it ("finished:completed" when it worked)."""
        status, output = self.flwr(
            "flwr_run", ["run", str(app_dir), CONNECTION, "--stream"], timeout_s
        )
        if status != 0:
            raise FlowerDeployError(
                f"flower: `flwr run` exited with status {status}; its log: "
                f"{self.logs / 'flwr_run.log'}\n" + output[-2000:]
            )
        return self.run_status()

    def run_status(self) -> str:
        """The status of the one run on this SuperLink, from `flwr list --format json`."""
        code, output = self.flwr("flwr_list", ["list", CONNECTION, "--format", "json"], 60)
        try:
            listing = json.loads(output[output.index("{") :])
            runs = listing["runs"]
        except (ValueError, KeyError) as err:
            raise FlowerDeployError(
                f"flower: `flwr list` (status {code}) gave no run list: {output[-1000:]}"
            ) from err
        if len(runs) != 1:
            raise FlowerDeployError(f"flower: expected one run on the SuperLink, found {runs}")
        return str(runs[0]["status"])

    # ---- stopping
    def stop(self) -> None:
        """Stop every process started here, by PID, with everything it started."""
        # Descendants first seen now: the SuperLink's superexec lives in its own session.
        extra = []
        for started in self.started:
            if started.process.poll() is None:
                extra += descendants(started.process.pid)
        for started in reversed(self.started):
            self._stop_one(started)
        for pid in extra:
            self.pids.append(pid)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while any(alive(p) for p in extra) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in extra if alive(pid)]
        for pid in left:
            log.warning("flower: pid %d ignored SIGTERM: SIGKILL", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + self.stop_grace_s
        while any(alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _stop_one(self, started: Started) -> None:
        """SIGTERM to the process group of `started` (the group is named by its leader's
        PID: start_new_session), SIGKILL to what is left after the grace period."""
        pgid = started.process.pid
        if started.process.poll() is not None and not group_running(pgid):
            return  # ended, with everything of its group: nothing to signal
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.process.wait(timeout=self.stop_grace_s)
        while group_running(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if started.process.poll() is None or group_running(pgid):
            log.warning("flower: %s (pid %d) ignored SIGTERM: SIGKILL", started.name, pgid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            started.process.wait()


def tail(path: Path, chars: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""

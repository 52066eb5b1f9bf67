"""FedRE's algorithms as a Flower app: `server_app` (ServerApp) and `client_app`
(ClientApp), addressed as repro.fedre.flower.app:server_app / :client_app.

One implementation of each algorithm, two transports: both apps call the functions of
repro.fedre.algorithms (local_train, upload, server_step, receive, predict) exactly as
the in-process simulation's round loop (repro.fedre.simulate.run_rounds) does, so a
run gives the same head, accuracies and communication counts for the same seed.

Messages, per run of R rounds (one ClientApp process each, on the client's SuperNode):

- train, round r: carries round r-1's broadcast (none in round 1). The client takes it
  in (receive), is evaluated on its test split (round r-1's accuracy, r > 1), trains
  locally and answers its upload. In run_rounds a client receives, is evaluated, and
  trains in the next round in this same order. In round 1 the client first builds its
  data split and model (make_clients semantics, picked by the node config's
  partition-id); every reply says who sent it (partition-id, architecture, task shape).
- evaluate, after round R: carries round R's broadcast; receive, then evaluation.

The server steps on the uploads sorted by partition-id (server_step is order-dependent)
and counts what crosses the wire with repro.fedre.simulate.Wire, as the simulation.
A missing or failed reply stops the run with an error that names the client
(partition-id and architecture) and the round; the tables are written only after the
last round, into the run config's out-dir:

- rounds.csv (repro.fedre.table ROUND_COLUMNS), comm.csv (COMM_COLUMNS);
- final.safetensors: the last broadcast (FedRE's head, FedProto's prototypes; empty for
  an algorithm that broadcasts nothing), kind "fedre_broadcast";
- failure.txt instead, when the run failed: the error, for the stage to report.

Run config (pyproject.toml [tool.flwr.app.config], written by repro.fedre.flower_run):
algorithm, params (the stage's --params as JSON), data (the task files, JSON list of
absolute paths), out-dir, state-dir, threads, node-wait-s, reply-timeout-s.
Fault injection for tests: params {"fail": {"client": i, "round": r}} makes client i
raise in the train message of round r.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from repro.core.errors import ReproInputError
from repro.core.io import atomic_write, save_tensors
from repro.core.results import write_table
from repro.fedre.algorithms import Algorithm, Client, HeadServer, Hyper, Tensors, make_algorithm
from repro.fedre.evaluate import evaluate, round_rows
from repro.fedre.flower.state import load_client_state, save_client_state
from repro.fedre.model import build_clients
from repro.fedre.simulate import Wire, client_data, load_task, make_clients
from repro.fedre.table import COMM_COLUMNS, ROUND_COLUMNS

log = logging.getLogger("flwr")  # Flower's handlers stream it to `flwr run --stream`

ROUNDS_FILE, COMM_FILE = "rounds.csv", "comm.csv"
FINAL_FILE, FAILURE_FILE = "final.safetensors", "failure.txt"
BROADCAST_KIND = "fedre_broadcast"
REPLY_POLL_S = 0.1
RUN_CONFIG_KEYS = (
    "algorithm",
    "params",
    "data",
    "out-dir",
    "state-dir",
    "threads",
    "node-wait-s",
    "reply-timeout-s",
)


class ClientFailedError(RuntimeError):
    """A client's reply is an error or missing: names the client and the round."""


@dataclass(frozen=True)
class RunSetup:
    """The run config of one Flower run, parsed."""

    algorithm: str
    params: dict
    data: list[str]
    out_dir: Path
    state_dir: Path
    threads: int
    node_wait_s: float
    reply_timeout_s: float

    @classmethod
    def from_run_config(cls, config: Mapping) -> RunSetup:
        missing = [key for key in RUN_CONFIG_KEYS if key not in config]
        if missing:
            raise ReproInputError(f"flower run config: missing {missing}")
        return cls(
            algorithm=str(config["algorithm"]),
            params=json.loads(str(config["params"])),
            data=[str(p) for p in json.loads(str(config["data"]))],
            out_dir=Path(str(config["out-dir"])),
            state_dir=Path(str(config["state-dir"])),
            threads=int(config["threads"]),
            node_wait_s=float(config["node-wait-s"]),
            reply_timeout_s=float(config["reply-timeout-s"]),
        )

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    @property
    def archs(self) -> list[str]:
        return [str(a) for a in self.params["clients"]]

    @property
    def rounds(self) -> int:
        return int(self.params["rounds"])

    def make_algorithm(self, num_classes: int) -> Algorithm:
        """The algorithm as simulate_algorithm makes it (after seeding the global RNG)."""
        torch.manual_seed(self.seed)
        return make_algorithm(
            self.algorithm,
            Hyper.from_config(self.params),
            num_classes,
            int(self.params["rep_dim"]),
            self.seed,
        )


def to_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict(dict(tensors))


def from_record(record: ArrayRecord) -> Tensors:
    return dict(record.to_torch_state_dict())


# --- client side -------------------------------------------------------------------------


@dataclass
class Node:
    """One SuperNode's client: the run, its partition-id, its client and algorithm."""

    run: RunSetup
    partition_id: int
    client: Client
    algorithm: Algorithm
    task_shape: dict

    @classmethod
    def build(cls, context: Context) -> Node:
        """The client of this node, built as make_clients builds it for the simulation:
        the task files pooled, partitioned and split, every model from the seed; the
        node's partition-id picks one."""
        run = RunSetup.from_run_config(context.run_config)
        torch.set_num_threads(run.threads)
        if "partition-id" not in context.node_config:
            raise ReproInputError(
                "node config: no partition-id (start the SuperNode with --node-config "
                "'partition-id=I num-partitions=N')"
            )
        partition_id = int(context.node_config["partition-id"])
        archs = run.archs
        if not 0 <= partition_id < len(archs):
            raise ReproInputError(
                f"node config: partition-id {partition_id} is not a client of "
                f"fedre.clients ({len(archs)} clients)"
            )
        images, labels, num_classes = load_task(run.data, str(run.params["task"]))
        data = client_data(run.params, images, labels, run.seed)
        clients = make_clients(
            data,
            archs,
            in_channels=images.shape[1],
            image_size=images.shape[-1],
            rep_dim=int(run.params["rep_dim"]),
            num_classes=num_classes,
            seed=run.seed,
        )
        shape = {
            "in-channels": int(images.shape[1]),
            "image-size": int(images.shape[-1]),
            "num-classes": int(num_classes),
        }
        client = clients[partition_id]
        return cls(run, partition_id, client, run.make_algorithm(num_classes), shape)

    @property
    def arch(self) -> str:
        return self.run.archs[self.partition_id]

    @property
    def state_path(self) -> Path:
        return self.run.state_dir / f"client{self.partition_id}.safetensors"

    def save(self, round: int) -> None:
        save_client_state(self.state_path, self.client, round=round, arch=self.arch)

    def restore(self, round: int) -> None:
        load_client_state(self.state_path, self.client, round=round)

    def identity(self) -> ConfigRecord:
        """Who answers: the server sorts the replies and names failures by it."""
        return ConfigRecord(
            {"partition-id": self.partition_id, "arch": self.arch, **self.task_shape}
        )

    def receive(self, content: RecordDict) -> None:
        if "broadcast" in content:
            self.algorithm.receive(self.client, from_record(content["broadcast"]))

    def evaluation(self) -> MetricRecord:
        ((correct, samples),) = evaluate(self.algorithm, [self.client])
        return MetricRecord({"correct": correct, "test-samples": samples})

    def fail_if_asked(self, round: int) -> None:
        """Fault injection (tests): params "fail": {"client": i, "round": r}."""
        fail = self.run.params.get("fail") or {}
        if int(fail.get("client", -1)) == self.partition_id and int(fail.get("round", -1)) == round:
            raise RuntimeError(f"injected failure in round {round} (params 'fail')")


def message_round(message: Message) -> int:
    return int(message.content["config"]["round"])


def client_name(context: Context) -> str:
    """The client this node runs, as the errors name it (also when it cannot be built)."""
    pid = context.node_config.get("partition-id", "?")
    try:
        arch = json.loads(str(context.run_config["params"]))["clients"][int(pid)]
    except (KeyError, ValueError, IndexError, TypeError):
        arch = "?"
    return f"client {pid} ({arch})"


def named(handler):
    """A ClientApp handler whose exceptions name the client: Flower sends the server only
    the exception's type and message."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as err:
            raise RuntimeError(
                f"{client_name(context)}, {message.metadata.message_type} message: "
                f"{type(err).__name__}: {err}"
            ) from err

    return wrapper


client_app = ClientApp()


@client_app.train()
@named
def client_train(message: Message, context: Context) -> Message:
    """Round r: take round r-1's broadcast in, report round r-1's accuracy, train, upload.
    Round 1 starts from the client as built from the seed."""
    r = message_round(message)
    node = Node.build(context)
    if r > 1:
        node.restore(round=r - 1)
    node.receive(message.content)
    reply = RecordDict({"client": node.identity()})
    if r > 1:
        reply["evaluation"] = node.evaluation()
    node.fail_if_asked(r)
    node.algorithm.local_train(node.client)
    reply["upload"] = to_record(node.algorithm.upload(node.client))
    node.save(round=r)
    return Message(reply, reply_to=message)


@client_app.evaluate()
@named
def client_evaluate(message: Message, context: Context) -> Message:
    """After the last round: take its broadcast in, report the accuracy."""
    node = Node.build(context)
    node.restore(round=message_round(message))
    node.receive(message.content)
    reply = RecordDict({"client": node.identity(), "evaluation": node.evaluation()})
    return Message(reply, reply_to=message)


# --- server side -------------------------------------------------------------------------


class Roster:
    """The SuperNodes of the run and which client each runs, learnt from their replies
    (the first round's: the server has no other way to know a node's partition-id)."""

    def __init__(self, nodes: Sequence[int], archs: Sequence[str]):
        self.nodes = list(nodes)
        self.archs = list(archs)
        self.partition_of: dict[int, int] = {}
        self.shape: dict | None = None  # the task's shape, as the clients report it

    def client(self, partition_id: int) -> str:
        return f"client {partition_id} ({self.archs[partition_id]})"

    def name(self, node: int) -> str:
        if node in self.partition_of:
            return self.client(self.partition_of[node])
        unknown = sorted(set(range(len(self.archs))) - set(self.partition_of.values()))
        return f"SuperNode {node} (one of {', '.join(self.client(p) for p in unknown)})"

    def learn(self, replies: Mapping[int, Message]) -> None:
        """Read who sent each good reply; check it against what is known."""
        for node, reply in replies.items():
            if reply.has_error() or "client" not in reply.content:
                continue
            who = dict(reply.content["client"])
            partition_id = int(who["partition-id"])
            expected = self.partition_of.get(node, partition_id)
            owner = {p: n for n, p in self.partition_of.items()}.get(partition_id, node)
            if not 0 <= partition_id < len(self.archs) or expected != partition_id or owner != node:
                raise ClientFailedError(
                    f"SuperNode {node} says it runs client {partition_id}: the SuperNodes' "
                    f"partition-ids must be 0..{len(self.archs) - 1}, one each"
                )
            shape = {k: int(who[k]) for k in ("in-channels", "image-size", "num-classes")}
            if self.shape is not None and shape != self.shape:
                raise ClientFailedError(
                    f"{self.client(partition_id)} reports the task shape {shape}, "
                    f"another client {self.shape}"
                )
            self.shape = shape
            self.partition_of[node] = partition_id
        # One node left without a name and one client unclaimed: that node runs it.
        unnamed = [n for n in self.nodes if n not in self.partition_of]
        unclaimed = sorted(set(range(len(self.archs))) - set(self.partition_of.values()))
        if len(unnamed) == 1 and len(unclaimed) == 1:
            self.partition_of[unnamed[0]] = unclaimed[0]

    def ordered(self) -> list[int]:
        """The nodes in partition-id order (the server step is order-dependent)."""
        return sorted(self.nodes, key=lambda n: self.partition_of.get(n, len(self.archs) + n))


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    """The node ids once `count` SuperNodes are connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) == count:
            return nodes
        if len(nodes) > count:
            raise ClientFailedError(f"{len(nodes)} SuperNodes connected, expected {count}")
        if time.monotonic() > deadline:
            raise ClientFailedError(
                f"only {len(nodes)} of {count} SuperNodes connected within {timeout_s:g} s"
            )
        time.sleep(0.2)


def send_and_receive(
    grid: Grid, messages: Sequence[Message], timeout_s: float
) -> dict[int, Message]:
    """Grid.send_and_receive, keyed by the node each message went to, polling every
    REPLY_POLL_S rather than Grid's fixed 3 s (a wait every message would pay)."""
    message_ids = list(grid.push_messages(messages))
    node_of = {
        mid: msg.metadata.dst_node_id
        for mid, msg in zip(message_ids, messages, strict=True)
        if mid is not None  # Flower marks a message it could not push with None
    }
    pending, replies = set(node_of), {}
    deadline = time.monotonic() + timeout_s
    while pending:
        # A reply's src_node_id is the server's own when its content was lost: match
        # replies by the message they answer.
        for reply in grid.pull_messages(pending):
            message_id = reply.metadata.reply_to_message_id
            replies[node_of[message_id]] = reply
            pending.discard(message_id)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


def exchange(
    grid: Grid,
    roster: Roster,
    message_type: str,
    round: int,
    broadcasts: Sequence[Tensors] | None,
    *,
    timeout_s: float,
    what: str,
) -> list[Message]:
    """Send one message to every node (the i-th client with the i-th copy of the
    broadcast, if any) and return the replies in partition-id order; a missing or failed
    reply raises, naming the client."""
    nodes = roster.ordered()
    messages = []
    for i, node in enumerate(nodes):
        content = RecordDict({"config": ConfigRecord({"round": round})})
        if broadcasts is not None:
            content["broadcast"] = to_record(broadcasts[i])
        messages.append(
            Message(content, dst_node_id=node, message_type=message_type, group_id=str(round))
        )
    replies = send_and_receive(grid, messages, timeout_s)
    roster.learn(replies)
    for node in roster.ordered():
        reply = replies.get(node)
        if reply is None:
            raise ClientFailedError(
                f"{what}: {roster.name(node)} sent no reply within {timeout_s:g} s"
            )
        if reply.has_error():
            raise ClientFailedError(f"{what}: {roster.name(node)} failed: {reply.error.reason}")
    return [replies[node] for node in roster.ordered()]


def evaluations(replies: Sequence[Message]) -> list[tuple[int, int]]:
    """(correct, test samples) per client, as simulate.evaluate returns them."""
    out = []
    for reply in replies:
        metrics = reply.content["evaluation"]
        out.append((int(metrics["correct"]), int(metrics["test-samples"])))
    return out


def start_algorithm(run: RunSetup, shape: Mapping) -> Algorithm:
    """The server's algorithm, as run_rounds starts it: a head server's global head is
    client 0's initial head, built from the seed."""
    algorithm = run.make_algorithm(int(shape["num-classes"]))
    if isinstance(algorithm, HeadServer):
        (first,) = build_clients(
            run.archs[:1],
            in_channels=int(shape["in-channels"]),
            image_size=int(shape["image-size"]),
            rep_dim=int(run.params["rep_dim"]),
            num_classes=int(shape["num-classes"]),
            seed=run.seed,
        )
        algorithm.init_head(first)
    return algorithm


def serve(grid: Grid, run: RunSetup) -> None:
    """run_rounds over Flower messages; writes the tables and the last broadcast."""
    torch.set_num_threads(run.threads)
    roster = Roster(wait_for_nodes(grid, len(run.archs), run.node_wait_s), run.archs)
    algorithm: Algorithm | None = None  # made once the clients said the task's shape
    evaluated: dict[int, list[tuple[int, int]]] = {}
    counts: dict[int, tuple[dict, dict]] = {}
    outgoing: list[Tensors] | None = None  # what the next message carries
    last_broadcast: Tensors | None = None
    timeout = run.reply_timeout_s
    for r in range(1, run.rounds + 1):
        started = time.perf_counter()
        replies = exchange(
            grid, roster, MessageType.TRAIN, r, outgoing, timeout_s=timeout, what=f"round {r}"
        )
        if algorithm is None:
            algorithm = start_algorithm(run, roster.shape)
        if r > 1:
            evaluated[r - 1] = evaluations(replies)
        up_wire, down_wire = Wire(), Wire()
        uploads = []
        for reply in replies:
            received = up_wire.send(from_record(reply.content["upload"]))
            if received:
                uploads.append(received)
        sent = algorithm.server_step(uploads) if uploads else None
        outgoing = None
        if sent:
            last_broadcast = sent
            outgoing = [down_wire.send(sent) for _ in replies]
        counts[r] = (up_wire.counts(), down_wire.counts())
        log.info(
            "%s round %d/%d: %.1f s", run.algorithm, r, run.rounds, time.perf_counter() - started
        )
    replies = exchange(
        grid,
        roster,
        MessageType.EVALUATE,
        run.rounds,
        outgoing,
        timeout_s=timeout,
        what=f"final evaluation (after round {run.rounds})",
    )
    evaluated[run.rounds] = evaluations(replies)

    fr = run.params
    base = {"task": str(fr["task"]), "partition": fr["partition"], "seed": run.seed}
    base["algorithm"] = run.algorithm
    rows, comm = [], []
    for r in range(1, run.rounds + 1):
        rows += round_rows(base, r, run.archs, evaluated[r])
        up, down = counts[r]
        comm.append({**base, "round": r, "direction": "upload", **up})
        comm.append({**base, "round": r, "direction": "broadcast", **down})
    run.out_dir.mkdir(parents=True, exist_ok=True)
    write_table(pd.DataFrame(rows, columns=ROUND_COLUMNS), run.out_dir / ROUNDS_FILE)
    write_table(pd.DataFrame(comm, columns=COMM_COLUMNS), run.out_dir / COMM_FILE)
    save_tensors(
        run.out_dir / FINAL_FILE,
        last_broadcast or {},
        BROADCAST_KIND,
        {"algorithm": run.algorithm, "rounds": run.rounds},
    )
    log.info("%s: final accuracy %.4f", run.algorithm, rows[-1]["accuracy"])


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run = RunSetup.from_run_config(context.run_config)
    try:
        serve(grid, run)
    except Exception as err:
        # The stage reads why from here: `flwr run` exits 0 whatever happened.
        run.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.out_dir / FAILURE_FILE) as tmp:
            tmp.write_text(f"{type(err).__name__}: {err}\n")
        raise

"""Stage fedre_simulate: every algorithm on one task x partition x seed, in one process.

Each round, for every algorithm (repro.fedre.algorithms): every client trains locally,
uploads, the server steps and broadcasts, and every client is evaluated on its own test
split. What a client uploads and what the server broadcasts travel as safetensors bytes:
the server reads the uploads back from those bytes, and the communication table counts
exactly them (tensors, scalars, bytes), not a formula.

All algorithms start from the same clients (same architectures, initial weights and
data order for a seed), so they differ only in what they do.

Outputs:
- --out: the round table (repro.fedre.table ROUND_COLUMNS): every client's test
  accuracy after every round, plus the sample-weighted accuracy over clients
  (client -1, arch "all");
- --comm-out: the communication table (COMM_COLUMNS) per round and direction;
- --metrics: final weighted accuracies and seconds per algorithm.
A killed job resumes at the first algorithm it had not finished (each finished
algorithm's rows are kept under --checkpoint-dir).

    python -m repro.fedre.simulate --data data/digits/train.safetensors \
        data/digits/val.safetensors data/digits/test.safetensors \
        --params '{"task": "digits", "partition": "dir", "seed": 0, ...}' \
        --out results/fedre/runs/digits_dir_s0.csv --comm-out ..._comm.csv \
        --metrics ....json --checkpoint-dir checkpoints/fedre
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from repro.core.data import CLASSIFICATION_KINDS, load_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import atomic_write
from repro.core.results import read_table, write_table
from repro.core.stage import Stage, run
from repro.fedre.algorithms import Algorithm, Client, HeadServer, Hyper, Tensors, make_algorithm
from repro.fedre.data import ClientData, partition, split_clients
from repro.fedre.evaluate import evaluate, round_rows
from repro.fedre.model import build_clients
from repro.fedre.privacy import attack
from repro.fedre.table import ALL_CLIENTS, COMM_COLUMNS, PRIVACY_COLUMNS, ROUND_COLUMNS

log = logging.getLogger("repro")


class Wire:
    """Counts what crosses the network: a message is serialised with safetensors and the
    receiver reads it back from the bytes."""

    def __init__(self):
        self.messages = self.tensors = self.scalars = self.bytes = 0

    def send(self, tensors: Tensors) -> Tensors:
        if not tensors:
            return {}
        payload = save_bytes({k: v.detach().contiguous() for k, v in tensors.items()})
        self.messages += 1
        self.tensors += len(tensors)
        self.scalars += sum(int(v.numel()) for v in tensors.values())
        self.bytes += len(payload)
        return load_bytes(payload)

    def counts(self) -> dict:
        return {
            "messages": self.messages,
            "tensors": self.tensors,
            "scalars": self.scalars,
            "bytes": self.bytes,
        }


def make_clients(
    data: Sequence[ClientData],
    archs: Sequence[str],
    *,
    in_channels: int,
    image_size: int,
    rep_dim: int,
    num_classes: int,
    seed: int,
) -> list[Client]:
    models = build_clients(
        archs,
        in_channels=in_channels,
        image_size=image_size,
        rep_dim=rep_dim,
        num_classes=num_classes,
        seed=seed,
    )
    return [
        Client(i, model, d, torch.Generator().manual_seed(seed * 1000 + i))
        for i, (model, d) in enumerate(zip(models, data, strict=True))
    ]


def run_rounds(
    algorithm: Algorithm,
    clients: Sequence[Client],
    rounds: int,
    *,
    on_round: Callable[[int, list[tuple[int, int]], dict, dict], None] | None = None,
    progress: bool = False,
    last_uploads: list | None = None,
) -> Tensors | None:
    """`rounds` rounds of `algorithm` over `clients`; calls on_round(round, evaluation,
    upload counts, broadcast counts) after each. Returns the last broadcast; fills
    `last_uploads` (if given) with what each client uploaded in the last round, as
    (client index, tensors), for the inversion attack (repro.fedre.privacy)."""
    if isinstance(algorithm, HeadServer):
        algorithm.init_head(clients[0].model)
    broadcast = None
    for r in tqdm(range(1, rounds + 1), desc=algorithm.name, disable=not progress):
        up_wire, down_wire = Wire(), Wire()
        uploads, senders = [], []
        for client in clients:
            algorithm.local_train(client)
            received = up_wire.send(algorithm.upload(client))
            if received:
                uploads.append(received)
                senders.append(client.index)
        sent = algorithm.server_step(uploads) if uploads else None
        if sent:
            broadcast = sent
            for client in clients:
                algorithm.receive(client, down_wire.send(sent))
        if on_round is not None:
            on_round(r, evaluate(algorithm, clients), up_wire.counts(), down_wire.counts())
    if last_uploads is not None:
        last_uploads[:] = list(zip(senders, uploads, strict=True)) if rounds else []
    return broadcast


def simulate_algorithm(
    name: str,
    data: Sequence[ClientData],
    archs: Sequence[str],
    hp: Hyper,
    *,
    rounds: int,
    in_channels: int,
    image_size: int,
    rep_dim: int,
    num_classes: int,
    seed: int,
    keys: Mapping,
    progress: bool = False,
    final: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """One algorithm from fresh clients: its round rows and communication rows. `final`
    (if given) receives the clients at the end ("clients") and their last uploads
    ("uploads", see run_rounds)."""
    torch.manual_seed(seed)
    clients = make_clients(
        data,
        archs,
        in_channels=in_channels,
        image_size=image_size,
        rep_dim=rep_dim,
        num_classes=num_classes,
        seed=seed,
    )
    algorithm = make_algorithm(name, hp, num_classes, rep_dim, seed)
    rows, comm = [], []
    base = {**keys, "algorithm": name}

    def on_round(r, evaluation, up, down):
        rows.extend(round_rows(base, r, archs, evaluation))
        comm.append({**base, "round": r, "direction": "upload", **up})
        comm.append({**base, "round": r, "direction": "broadcast", **down})

    uploads: list = []
    run_rounds(
        algorithm, clients, rounds, on_round=on_round, progress=progress, last_uploads=uploads
    )
    if final is not None:
        final.update(clients=clients, uploads=uploads)
    return rows, comm


def load_task(paths: Sequence[str], task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The task's images pooled from its files (the digits' three splits, or one glyph
    set): FedRE spreads all of them over the clients, which cut their own splits."""
    if not paths:
        raise ReproInputError(f"fedre.tasks.{task}: no data files given (--data)")
    images, labels, num_classes = [], [], 0
    for path in paths:
        ds = load_image_dataset(path, kind=(*CLASSIFICATION_KINDS, "glyphs"))
        images.append(ds.images)
        labels.append(ds.labels)
        num_classes = max(num_classes, int(ds.meta.get("num_classes", int(ds.labels.max()) + 1)))
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) != 1:
        raise ReproInputError(f"{paths[0]}: the task's files disagree on image shape {shapes}")
    return torch.cat(images), torch.cat(labels), num_classes


def client_data(fr: Mapping, images, labels, seed: int) -> list[ClientData]:
    name = fr["partition"]
    parts = partition(
        labels,
        int(fr["num_clients"]),
        fr["partition_spec"],
        seed,
        key=f"fedre.partitions.{name}",
    )
    return split_clients(images, labels, parts, float(fr["train_fraction"]), seed)


def main(argv=None) -> None:
    stage = Stage(
        __doc__, paper="fedre", out="round table (CSV)", metrics=True, checkpoint_dir=True
    )
    stage.parser.add_argument("--data", nargs="+", required=True, help="the task's data files")
    stage.parser.add_argument("--comm-out", required=True, help="communication table (CSV)")
    stage.parser.add_argument(
        "--aux", help="auxiliary public images of the inversion attack (repro.fedre.privacy)"
    )
    stage.parser.add_argument("--privacy-out", help="the attack's rows (CSV); needs --aux")
    stage.parser.add_argument(
        "--privacy-examples", help="the first client's reconstructions (safetensors)"
    )
    stage.parser.add_argument(
        "--progress", action="store_true", help="a progress bar per algorithm"
    )
    args = stage.start(argv)
    fr = stage.params
    seed, task = int(fr["seed"]), str(fr["task"])
    images, labels, num_classes = load_task(args.data, task)
    data = client_data(fr, images, labels, seed)
    hp = Hyper.from_config(fr)
    archs = list(fr["clients"])
    keys = {"task": task, "partition": fr["partition"], "seed": seed}
    privacy_cfg = dict(fr.get("privacy") or {})
    attacked = set(privacy_cfg.get("algorithms", [])) if args.privacy_out else set()
    if attacked and not args.aux:
        raise ReproInputError("--privacy-out needs --aux (the attacker's public images)")
    aux = load_task([args.aux], task)[0] if attacked else None
    if aux is not None and aux.shape[1:] != images.shape[1:]:
        raise ReproInputError(
            f"{args.aux}: auxiliary images {tuple(aux.shape[1:])} do not match the task's "
            f"{tuple(images.shape[1:])}"
        )
    done_dir = stage.checkpoints(*args.data, *([args.aux] if attacked else []))

    rows, comm, privacy, examples, seconds = [], [], [], {}, {}
    for name in fr["algorithms"]:
        done_rows, done_comm = done_dir / f"{name}.csv", done_dir / f"{name}_comm.csv"
        done_privacy = done_dir / f"{name}_privacy.csv"
        done_examples = done_dir / f"{name}_examples.safetensors"
        if done_rows.is_file() and done_comm.is_file():
            log.info("%s: finished before, resumed from %s", name, done_rows)
            rows += read_table(done_rows, ROUND_COLUMNS).to_dict("records")
            comm += read_table(done_comm, COMM_COLUMNS).to_dict("records")
            if name in attacked:
                privacy += read_table(done_privacy, PRIVACY_COLUMNS).to_dict("records")
                examples.update(load_file(done_examples))
            continue
        final: dict = {}
        start = time.perf_counter()
        r, c = simulate_algorithm(
            name,
            data,
            archs,
            hp,
            rounds=int(fr["rounds"]),
            in_channels=images.shape[1],
            image_size=images.shape[-1],
            rep_dim=int(fr["rep_dim"]),
            num_classes=num_classes,
            seed=seed,
            keys=keys,
            progress=args.progress,
            final=final,
        )
        if name in attacked:
            mine: dict = {}
            attack_rows = attack(
                name,
                final["clients"],
                final["uploads"],
                aux,
                privacy_cfg,
                seed=seed,
                keys=keys,
                archs=archs,
                examples=mine,
            )
            write_table(pd.DataFrame(attack_rows, columns=PRIVACY_COLUMNS), done_privacy)
            save_file(mine, str(done_examples))
            privacy += attack_rows
            examples.update(mine)
        seconds[name] = time.perf_counter() - start
        final = r[-1]["accuracy"]
        log.info(
            "%s: %d rounds in %.1f s, final accuracy %.3f", name, fr["rounds"], seconds[name], final
        )
        write_table(pd.DataFrame(r, columns=ROUND_COLUMNS), done_rows)
        write_table(pd.DataFrame(c, columns=COMM_COLUMNS), done_comm)
        rows += r
        comm += c

    table = pd.DataFrame(rows, columns=ROUND_COLUMNS)
    write_table(table, args.out)
    write_table(pd.DataFrame(comm, columns=COMM_COLUMNS), args.comm_out)
    if args.privacy_out:
        write_table(pd.DataFrame(privacy, columns=PRIVACY_COLUMNS), args.privacy_out)
    if args.privacy_examples:
        with atomic_write(args.privacy_examples) as tmp:
            save_file(examples, str(tmp))
    weighted = table[table.client == ALL_CLIENTS]
    last = weighted[weighted["round"] == weighted["round"].max()]
    metrics = {
        f"final_accuracy_{a}": float(acc)
        for a, acc in zip(last.algorithm, last.accuracy, strict=True)
    }
    metrics.update({f"seconds_{a}": s for a, s in seconds.items()})
    metrics["client_train_samples"] = [len(d.train_y) for d in data]
    metrics["client_classes"] = [len(d.classes) for d in data]
    metrics["seconds"] = time.perf_counter() - stage.started
    stage.finish(metrics)


if __name__ == "__main__":
    run(main)

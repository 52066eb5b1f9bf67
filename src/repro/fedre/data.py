"""FedRE's federated data: one task's images spread over the clients, and each client's
own 75 / 25 train / test split.

Two partitions, as HtFLlib generates them (dataset/utils/dataset_utils.py):

- Dirichlet(alpha): for every class, the share each client gets is drawn from
  Dir(alpha, ..., alpha); a client that already holds its fair share (n / clients)
  gets no more of later classes (HtFLlib's balancing step); drawn again until every
  client holds at least `min_size` samples. alpha 0.1 leaves most clients with a few
  dominant classes.
- pathological: every client holds `classes_per_client` classes (consecutive in a
  seeded class order, so each class goes to about the same number of clients), each
  class's samples split evenly among the clients that hold it.

Each client's samples are then shuffled and cut 75 / 25 into its train and test split
(HtFLlib's train_test_split, not stratified). Every client is evaluated on its own
test split: that is the paper's accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from repro.core.errors import ReproInputError

MAX_DIRICHLET_TRIES = 1000


@dataclass
class ClientData:
    """One client's train and test split (images [n, C, H, W], labels [n])."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def classes(self) -> list[int]:
        """The classes in the train split, ascending: what the client can describe."""
        return sorted(int(c) for c in self.train_y.unique())


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes)


def _check_enough(labels: torch.Tensor, num_clients: int, key: str) -> None:
    """Every class must have at least one sample per client that may receive it."""
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if num_clients < 1:
        raise ReproInputError(f"{key}: must be >= 1, got {num_clients}")
    if len(present) and int(present.min()) < num_clients:
        rare = int(torch.nonzero(counts == present.min())[0])
        raise ReproInputError(
            f"{key}: {num_clients} clients but class {rare} has only {int(present.min())} "
            "samples: more clients than samples of a class"
        )


def dirichlet_partition(
    labels: torch.Tensor,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 10,
    key: str = "fedre.partition",
) -> list[torch.Tensor]:
    """Sample indices of each client (sorted), Dirichlet(alpha) over clients per class."""
    if not alpha > 0:
        raise ReproInputError(f"{key}.alpha: must be > 0, got {alpha}")
    _check_enough(labels, num_clients, "fedre.num_clients")
    n = len(labels)
    if n < num_clients * min_size:
        raise ReproInputError(
            f"fedre.num_clients: {num_clients} clients x at least {min_size} samples need "
            f"{num_clients * min_size}, the task has {n}"
        )
    # numpy's Dirichlet (torch.distributions takes no generator), seeded per call.
    rng = np.random.default_rng(seed)
    classes = [int(c) for c in labels.unique()]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
        sizes = torch.zeros(num_clients, dtype=torch.long)
        for c in classes:
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.from_numpy(rng.permutation(len(idx)))]
            share = torch.from_numpy(rng.dirichlet(np.full(num_clients, float(alpha))))
            # HtFLlib's balancing: a client at or over its fair share gets none of this class.
            share = share * (sizes < n / num_clients).double()
            share = (
                share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / num_clients)
            )
            cuts = (torch.cumsum(share, 0) * len(idx)).long()[:-1].tolist()
            for client, chunk in enumerate(torch.tensor_split(idx, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if int(sizes.min()) >= min_size:
            return [torch.sort(torch.cat(p)).values for p in parts]
    raise ReproInputError(
        f"{key}.alpha: {alpha} left a client with fewer than {min_size} samples in "
        f"{MAX_DIRICHLET_TRIES} draws ({n} samples, {num_clients} clients)"
    )


def pathological_partition(
    labels: torch.Tensor,
    num_clients: int,
    classes_per_client: int,
    seed: int,
    *,
    key: str = "fedre.partition",
) -> list[torch.Tensor]:
    """Sample indices of each client (sorted): `classes_per_client` classes each."""
    classes = labels.unique()
    if not 1 <= classes_per_client <= len(classes):
        raise ReproInputError(
            f"{key}.classes_per_client: must be between 1 and the {len(classes)} classes, "
            f"got {classes_per_client}"
        )
    gen = torch.Generator().manual_seed(seed)
    order = classes[torch.randperm(len(classes), generator=gen)]
    held = [
        [
            int(order[(client * classes_per_client + j) % len(order)])
            for j in range(classes_per_client)
        ]
        for client in range(num_clients)
    ]
    holders: dict[int, list[int]] = {}
    for client, cls in enumerate(held):
        for c in cls:
            holders.setdefault(c, []).append(client)
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < len(clients):
            raise ReproInputError(
                f"fedre.num_clients: class {c} has {len(idx)} samples for {len(clients)} "
                "clients that hold it: more clients than samples of a class"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for client, chunk in zip(clients, torch.tensor_split(idx, len(clients)), strict=True):
            parts[client].append(chunk)
    return [torch.sort(torch.cat(p)).values for p in parts]


def partition(
    labels: torch.Tensor, num_clients: int, spec: Mapping, seed: int, *, key: str
) -> list[torch.Tensor]:
    """The partition `spec` ({kind: dirichlet, alpha[, min_size]} or {kind: pathological,
    classes_per_client}) of config key `key`."""
    kind = spec.get("kind")
    if kind == "dirichlet":
        return dirichlet_partition(
            labels,
            num_clients,
            float(spec.get("alpha", 0)),
            seed,
            min_size=int(spec.get("min_size", 10)),
            key=key,
        )
    if kind == "pathological":
        return pathological_partition(
            labels, num_clients, int(spec.get("classes_per_client", 0)), seed, key=key
        )
    raise ReproInputError(f"{key}.kind: unknown {kind!r} (allowed: dirichlet, pathological)")


def split_clients(
    images: torch.Tensor,
    labels: torch.Tensor,
    parts: Sequence[torch.Tensor],
    train_fraction: float,
    seed: int,
) -> list[ClientData]:
    """Each client's samples shuffled and cut into train (`train_fraction`) and test;
    both splits keep at least one sample."""
    if not 0 < train_fraction < 1:
        raise ReproInputError(f"fedre.train_fraction: must be in (0, 1), got {train_fraction}")
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for client, idx in enumerate(parts):
        if len(idx) < 2:
            raise ReproInputError(
                f"fedre.num_clients: client {client} holds {len(idx)} sample(s): too few for "
                "a train and a test split"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_train = min(len(idx) - 1, max(1, round(train_fraction * len(idx))))
        train, test = idx[:n_train], idx[n_train:]
        clients.append(ClientData(images[train], labels[train], images[test], labels[test]))
    return clients

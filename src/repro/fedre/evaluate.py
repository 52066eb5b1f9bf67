"""FedRE's evaluation: every client's model on its OWN test split, after every round.

The paper's accuracy (HtFLlib's) is the sample-weighted accuracy over the clients: the
correct predictions of all clients over all their test samples. How a client predicts
is its algorithm's (`Algorithm.predict`: its head for most; the nearest global
prototype for FedProto and FedTGP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from repro.fedre.algorithms import Algorithm, Client
from repro.fedre.table import ALL_CLIENTS


@torch.no_grad()
def evaluate(algorithm: Algorithm, clients: Sequence[Client]) -> list[tuple[int, int]]:
    """(correct, test samples) of every client on its own test split."""
    out = []
    for client in clients:
        pred = algorithm.predict(client, client.data.test_x)
        out.append((int((pred == client.data.test_y).sum()), len(client.data.test_y)))
    return out


def weighted_accuracy(evaluation: Sequence[tuple[int, int]]) -> tuple[float, int]:
    """Sum of correct over sum of test samples (not the mean of the clients' accuracies),
    and that sum of test samples."""
    correct = sum(c for c, _ in evaluation)
    total = sum(n for _, n in evaluation)
    if total == 0:
        raise ValueError("no test samples to evaluate on")
    return correct / total, total


def round_rows(
    base: Mapping, r: int, archs: Sequence[str], evaluation: Sequence[tuple[int, int]]
) -> list[dict]:
    """The round table's rows (repro.fedre.table ROUND_COLUMNS) of one round: one per
    client, then the sample-weighted row (client -1, arch "all"). `base` holds the run's
    keys (task, partition, algorithm, seed)."""
    rows = [
        {**base, "round": r, "client": i, "arch": archs[i], "test_samples": n,
         "accuracy": correct / n}
        for i, (correct, n) in enumerate(evaluation)
    ]  # fmt: skip
    accuracy, total = weighted_accuracy(evaluation)
    rows.append(
        {**base, "round": r, "client": ALL_CLIENTS, "arch": "all", "test_samples": total,
         "accuracy": accuracy}
    )  # fmt: skip
    return rows

"""FedRE's evaluation: every client's model on its OWN test split, after every round.

The paper's accuracy (HtFLlib's) is the sample-weighted accuracy over the clients: the
correct predictions of all clients over all their test samples. How a client predicts
is its algorithm's (`Algorithm.predict`: its head for most; the nearest global
prototype for FedProto and FedTGP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from repro.fedre.algorithms import Algorithm, Client


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

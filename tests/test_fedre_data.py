"""FedRE's partitions and client splits: coverage, skew, seeds, bad input."""

import pytest
import torch

from repro.core.errors import ReproInputError
from repro.fedre.data import (
    dirichlet_partition,
    partition,
    pathological_partition,
    split_clients,
)


def labels_of(num_classes=10, per_class=100):
    return torch.arange(num_classes * per_class) % num_classes


def test_dirichlet_partition_covers_every_sample_once():
    y = labels_of()
    parts = dirichlet_partition(y, 10, 0.1, seed=0)
    joined = torch.sort(torch.cat(parts)).values
    assert torch.equal(joined, torch.arange(len(y)))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_alpha_controls_skew():
    """Small alpha: a client's largest class dominates; large alpha: near uniform."""
    y = labels_of()

    def top_share(alpha):
        parts = dirichlet_partition(y, 10, alpha, seed=1)
        shares = [torch.bincount(y[p], minlength=10).max() / len(p) for p in parts]
        return float(torch.stack(shares).mean())

    assert top_share(0.1) > 0.5
    assert top_share(100.0) < 0.25


def test_dirichlet_partition_is_seeded():
    y = labels_of()
    a = dirichlet_partition(y, 10, 0.1, seed=3)
    b = dirichlet_partition(y, 10, 0.1, seed=3)
    c = dirichlet_partition(y, 10, 0.1, seed=4)
    assert all(torch.equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("alpha", [0.0, -0.5])
def test_dirichlet_alpha_must_be_positive(alpha):
    with pytest.raises(ReproInputError, match=r"fedre.partitions.dir.alpha"):
        dirichlet_partition(labels_of(), 10, alpha, seed=0, key="fedre.partitions.dir")


def test_more_clients_than_samples_of_a_class():
    y = torch.tensor([0] * 30 + [1] * 4)
    with pytest.raises(ReproInputError, match="fedre.num_clients.*class 1 has only 4"):
        dirichlet_partition(y, 5, 0.5, seed=0, min_size=1)
    # Just enough: 4 samples of class 1 for 4 clients.
    dirichlet_partition(y, 4, 0.5, seed=0, min_size=1)


def test_pathological_gives_each_client_its_classes():
    y = labels_of()
    parts = pathological_partition(y, 10, 2, seed=0)
    held = [set(y[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    # 10 clients x 2 classes over 10 classes: each class held by exactly two clients,
    # its 100 samples split 50 / 50.
    for c in range(10):
        holders = [i for i, h in enumerate(held) if c in h]
        assert len(holders) == 2
        assert [int((y[parts[i]] == c).sum()) for i in holders] == [50, 50]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(len(y)))


def test_pathological_bad_classes_per_client():
    with pytest.raises(ReproInputError, match="classes_per_client"):
        pathological_partition(labels_of(), 10, 11, seed=0)
    with pytest.raises(ReproInputError, match="classes_per_client"):
        pathological_partition(labels_of(), 10, 0, seed=0)


def test_partition_dispatch_and_unknown_kind():
    y = labels_of()
    parts = partition(y, 10, {"kind": "pathological", "classes_per_client": 1}, 0, key="k")
    assert all(len(set(y[p].tolist())) == 1 for p in parts)
    with pytest.raises(ReproInputError, match=r"fedre.partitions.x.kind: unknown 'iid'"):
        partition(y, 10, {"kind": "iid"}, 0, key="fedre.partitions.x")


def test_split_clients_cuts_75_25_per_client():
    y = labels_of(4, 25)
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1)
    parts = [torch.arange(0, 40), torch.arange(40, 100)]
    clients = split_clients(x, y, parts, 0.75, seed=0)
    assert [len(c.train_y) for c in clients] == [30, 45]
    assert [len(c.test_y) for c in clients] == [10, 15]
    for client, part in zip(clients, parts, strict=True):
        seen = torch.cat([client.train_x, client.test_x]).flatten().long()
        assert torch.equal(torch.sort(seen).values, part)  # disjoint and complete
        assert torch.equal(y[client.train_x.flatten().long()], client.train_y)


def test_split_clients_bad_fraction_and_tiny_client():
    y = labels_of(2, 5)
    x = torch.zeros(len(y), 1, 2, 2)
    with pytest.raises(ReproInputError, match="fedre.train_fraction"):
        split_clients(x, y, [torch.arange(10)], 1.0, seed=0)
    with pytest.raises(ReproInputError, match="client 1 holds 1"):
        split_clients(x, y, [torch.arange(9), torch.tensor([9])], 0.75, seed=0)

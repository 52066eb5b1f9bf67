"""FedRE's algorithms: each server step on hand-made inputs, the entanglement arithmetic,
the head broadcast, and the communication counted from the serialised bytes."""

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_bytes

from repro.core.errors import ReproInputError
from repro.fedre.algorithms import (
    Client,
    FedAllRep,
    FedGH,
    FedProto,
    FedRE,
    FedTGP,
    Hyper,
    LGFedAvg,
    class_gap,
    entangle,
    entangle_weights,
    make_algorithm,
    soft_label_loss,
)
from repro.fedre.data import ClientData
from repro.fedre.model import build_client, head_state
from repro.fedre.simulate import Wire, make_clients, run_rounds, simulate_algorithm

HP = Hyper(server_epochs=3)


def toy_client(index=0, classes=(0, 1), n=12, rep_dim=8, num_classes=4, arch="mlp_narrow"):
    gen = torch.Generator().manual_seed(index)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    x = torch.randn(n, 1, 4, 4, generator=gen)
    data = ClientData(x, y, x[:4].clone(), y[:4].clone())
    model = build_client(
        arch, in_channels=1, image_size=4, rep_dim=rep_dim, num_classes=num_classes, seed=index
    )
    return Client(index, model, data, torch.Generator().manual_seed(100 + index))


def test_fedproto_server_averages_each_class_over_the_clients_that_have_it():
    algo = FedProto(HP, num_classes=4, rep_dim=2, seed=0)
    uploads = [
        {"protos": torch.tensor([[1.0, 0.0], [2.0, 2.0]]), "classes": torch.tensor([0, 1])},
        {"protos": torch.tensor([[4.0, 0.0], [0.0, 6.0]]), "classes": torch.tensor([1, 3])},
    ]
    out = algo.server_step(uploads)
    assert out["classes"].tolist() == [0, 1, 3]  # class 2: nobody has it
    # Unweighted: class 1 is (2,2) and (4,0) averaged, whatever the clients' sizes.
    assert torch.allclose(out["protos"], torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 6.0]]))


def test_fedproto_predicts_the_nearest_global_prototype_and_never_an_absent_class():
    algo = FedProto(HP, num_classes=3, rep_dim=8, seed=0)
    client = toy_client(num_classes=3)
    rep = client.model.features(client.data.test_x).detach()
    # Class 2's prototype sits on sample 0's representation, class 0's on sample 1's;
    # class 1 is absent (NaN) and must never be predicted.
    algo.receive(client, {"protos": torch.stack([rep[1], rep[0]]), "classes": torch.tensor([0, 2])})
    pred = algo.predict(client, client.data.test_x)
    assert pred[0] == 2 and pred[1] == 0
    assert (pred != 1).all()


def test_lg_fedavg_weights_the_heads_by_train_samples():
    algo = LGFedAvg(HP, num_classes=2, rep_dim=3, seed=0)
    a = {"weight": torch.ones(2, 3), "bias": torch.zeros(2), "samples": torch.tensor([30])}
    b = {"weight": torch.full((2, 3), 5.0), "bias": torch.ones(2), "samples": torch.tensor([10])}
    out = algo.server_step([a, b])
    assert torch.allclose(out["weight"], torch.full((2, 3), 2.0))  # 0.75 * 1 + 0.25 * 5
    assert torch.allclose(out["bias"], torch.full((2,), 0.25))


def test_entangled_representation_and_label_arithmetic():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    weights = torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(entangle(protos, weights), torch.tensor([[1.2, 1.3]]))
    gen = torch.Generator().manual_seed(0)
    for kind in ("random", "uniform", "onehot"):
        w = entangle_weights(5, kind, gen)
        assert w.shape == (5,) and torch.isclose(w.sum(), torch.tensor(1.0)) and (w >= 0).all()
    assert torch.allclose(entangle_weights(4, "uniform", gen), torch.full((4,), 0.25))
    assert (entangle_weights(4, "onehot", gen) == 1).sum() == 1
    with pytest.raises(ReproInputError, match="fedre.fedre.entangle"):
        entangle_weights(3, "softmax", gen)


def test_soft_label_loss_is_the_weighted_sum_of_cross_entropies():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    soft = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.5, 0.5]])
    expected = sum(
        soft[i, c] * F.cross_entropy(logits[i : i + 1], torch.tensor([c]))
        for i in range(2)
        for c in range(3)
    )
    assert torch.isclose(soft_label_loss(logits, soft), expected)


def test_fedre_upload_mixes_the_prototypes_of_the_classes_present():
    algo = FedRE(HP, num_classes=4, rep_dim=8, seed=0)
    client = toy_client(classes=(0, 2, 3))
    first = algo.upload(client)
    assert first["classes"].tolist() == [0, 2, 3]
    assert first["rep"].shape == (1, 8)
    assert torch.isclose(first["weights"].sum(), torch.tensor(1.0))
    client.model.eval()
    with torch.no_grad():
        rep = client.model.features(client.data.train_x)
    protos = torch.stack([rep[client.data.train_y == c].mean(0) for c in (0, 2, 3)])
    assert torch.allclose(first["rep"], entangle(protos, first["weights"]), atol=1e-6)
    # Redrawn every round; the ablation keeps them fixed.
    assert not torch.equal(algo.upload(client)["weights"], first["weights"])
    fixed = FedRE(Hyper(resample_weights=False), num_classes=4, rep_dim=8, seed=0)
    client2 = toy_client(classes=(0, 2, 3))
    assert torch.equal(fixed.upload(client2)["weights"], fixed.upload(client2)["weights"])


def test_fedre_server_soft_targets_put_each_weight_on_its_class():
    algo = FedRE(Hyper(server_lr=0.5, head_epochs=50), num_classes=3, rep_dim=2, seed=0)
    torch.nn.init.zeros_(algo.head.weight)
    torch.nn.init.zeros_(algo.head.bias)
    uploads = [
        {
            "rep": torch.tensor([[4.0, 0.0]]),
            "weights": torch.tensor([1.0]),
            "classes": torch.tensor([0]),
        },
        {
            "rep": torch.tensor([[0.0, 4.0]]),
            "weights": torch.tensor([0.9, 0.1]),
            "classes": torch.tensor([1, 2]),
        },
    ]
    out = algo.server_step(uploads)
    probs = F.softmax(torch.tensor([[4.0, 0.0], [0.0, 4.0]]) @ out["weight"].T + out["bias"], 1)
    assert probs[0].argmax() == 0 and probs[1].argmax() == 1
    assert probs[1, 2] > probs[0, 2]  # the 0.1 weight of class 2 went to the second rep


def test_fedgh_server_trains_the_head_on_the_prototypes():
    algo = FedGH(Hyper(server_epochs=200, server_lr=0.5), num_classes=2, rep_dim=2, seed=0)
    uploads = [
        {"protos": torch.tensor([[3.0, 0.0]]), "classes": torch.tensor([0])},
        {"protos": torch.tensor([[0.0, 3.0]]), "classes": torch.tensor([1])},
    ]
    out = algo.server_step(uploads)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]]) @ out["weight"].T + out["bias"]
    assert logits.argmax(1).tolist() == [0, 1]


def test_fedtgp_margin_is_the_largest_nearest_class_gap():
    protos = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    # Class means: 0 -> (0, 1), 1 -> (3, 0), 2 -> (10, 0). Nearest other class:
    # 0: sqrt(10); 1: sqrt(10); 2: 7. The largest of those: 7.
    assert class_gap(protos, labels) == pytest.approx(7.0)
    assert class_gap(protos[:1], labels[:1]) == 0.0


def test_fedtgp_server_returns_one_trained_prototype_per_uploaded_class():
    algo = FedTGP(Hyper(server_epochs=100, server_lr=0.05), num_classes=3, rep_dim=2, seed=0)
    uploads = [
        {"protos": torch.tensor([[5.0, 0.0]]), "classes": torch.tensor([0])},
        {"protos": torch.tensor([[0.0, 5.0], [-5.0, 0.0]]), "classes": torch.tensor([1, 2])},
    ]
    out = algo.server_step(uploads)
    assert out["classes"].tolist() == [0, 1, 2]
    targets = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0]])
    assert (torch.cdist(targets, out["protos"]).argmin(1) == torch.arange(3)).all()


@pytest.mark.parametrize("name", ["fedre", "fedgh", "lg_fedavg", "fedallrep"])
def test_the_head_is_broadcast_to_every_client(name):
    clients = [
        toy_client(i, classes=(i % 4, (i + 1) % 4), arch=a)
        for i, a in enumerate(["mlp_narrow", "cnn_small", "vit_tiny"])
    ]
    algo = make_algorithm(name, HP, num_classes=4, rep_dim=8, seed=0)
    last = run_rounds(algo, clients, rounds=2)
    for client in clients:
        state = head_state(client.model)
        assert torch.equal(state["weight"], algo.head.weight.detach())
        assert torch.equal(state["bias"], last["bias"])


def test_local_sends_nothing_and_unknown_algorithms_fail():
    clients = [toy_client(0), toy_client(1)]
    algo = make_algorithm("local", HP, num_classes=4, rep_dim=8, seed=0)
    assert run_rounds(algo, clients, rounds=1) is None
    with pytest.raises(ReproInputError, match="fedre.algorithms: unknown algorithm 'fedavg'"):
        make_algorithm("fedavg", HP, num_classes=4, rep_dim=8, seed=0)


def safetensors_size(tensors):
    """The safetensors file size by its format: 8-byte header length, JSON header padded to
    8 bytes, raw data. Computed apart from the library, as a reference."""
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(text) + (-len(text)) % 8 + offset


def test_wire_counts_the_serialised_message():
    message = {"rep": torch.ones(1, 64), "weights": torch.rand(7), "classes": torch.arange(7)}
    wire = Wire()
    received = wire.send(message)
    assert all(torch.equal(received[k], message[k]) for k in message)
    assert wire.counts() == {
        "messages": 1,
        "tensors": 3,
        "scalars": 64 + 7 + 7,
        "bytes": len(save_bytes(message)),
    }
    # The safetensors header is what its format says (within the header's JSON spelling).
    assert abs(wire.bytes - safetensors_size(message)) < 64
    assert struct.unpack("<Q", save_bytes(message)[:8])[0] + 8 + (64 + 14) * 4 + 7 * 4 == wire.bytes


def test_simulation_communication_equals_the_uploaded_tensors():
    """FedRE: per client one rep (D floats), and k weights and k classes for its k classes;
    FedProto: k prototypes of D and k classes. Broadcast: one head per client."""
    datas = [toy_client(i, classes=c).data for i, c in enumerate([(0, 1), (1, 2, 3)])]
    archs = ["mlp_narrow", "cnn_small"]
    kwargs = dict(
        rounds=2,
        in_channels=1,
        image_size=4,
        rep_dim=8,
        num_classes=4,
        seed=0,
        keys={"task": "t", "partition": "p", "seed": 0},
    )
    _, comm = simulate_algorithm("fedre", datas, archs, HP, **kwargs)
    up = [c for c in comm if c["direction"] == "upload"]
    assert [c["scalars"] for c in up] == [(8 + 2 * 2) + (8 + 2 * 3)] * 2
    assert [c["messages"] for c in up] == [2, 2]
    down = [c for c in comm if c["direction"] == "broadcast"]
    assert [c["scalars"] for c in down] == [2 * (4 * 8 + 4)] * 2
    _, comm = simulate_algorithm("fedproto", datas, archs, HP, **kwargs)
    up = [c for c in comm if c["direction"] == "upload"]
    assert [c["scalars"] for c in up] == [(2 * 8 + 2) + (3 * 8 + 3)] * 2


def test_same_seed_same_rounds_and_all_algorithms_start_from_the_same_clients():
    datas = [toy_client(i, classes=(i, i + 1)).data for i in range(2)]
    kwargs = dict(
        rounds=2,
        in_channels=1,
        image_size=4,
        rep_dim=8,
        num_classes=4,
        seed=3,
        keys={"task": "t", "partition": "p", "seed": 3},
    )
    a, _ = simulate_algorithm("fedre", datas, ["mlp_narrow", "cnn_bn"], HP, **kwargs)
    b, _ = simulate_algorithm("fedre", datas, ["mlp_narrow", "cnn_bn"], HP, **kwargs)
    assert a == b
    one = make_clients(
        datas,
        ["mlp_narrow", "cnn_bn"],
        in_channels=1,
        image_size=4,
        rep_dim=8,
        num_classes=4,
        seed=3,
    )
    two = make_clients(
        datas,
        ["mlp_narrow", "cnn_bn"],
        in_channels=1,
        image_size=4,
        rep_dim=8,
        num_classes=4,
        seed=3,
    )
    for c1, c2 in zip(one, two, strict=True):
        for p1, p2 in zip(c1.model.parameters(), c2.model.parameters(), strict=True):
            assert torch.equal(p1, p2)


def test_fedallrep_uploads_every_train_representation():
    algo = FedAllRep(HP, num_classes=4, rep_dim=8, seed=0)
    client = toy_client(n=12)
    up = algo.upload(client)
    assert up["reps"].shape == (12, 8) and torch.equal(up["labels"], client.data.train_y)


def test_fedallrep_server_trains_the_head_on_every_representation_with_fedres_schedule():
    """Hard labels as one-hot soft labels, the same summed loss and epochs as FedRE's
    server: the head separates the uploaded representations."""
    algo = FedAllRep(Hyper(server_lr=0.05, head_epochs=100), num_classes=2, rep_dim=2, seed=0)
    torch.nn.init.zeros_(algo.head.weight)
    torch.nn.init.zeros_(algo.head.bias)
    uploads = [
        {"reps": torch.tensor([[2.0, 0.0], [3.0, 0.5]]), "labels": torch.tensor([0, 0])},
        {"reps": torch.tensor([[0.0, 2.0]]), "labels": torch.tensor([1])},
    ]
    out = algo.server_step(uploads)
    reps = torch.tensor([[2.0, 0.0], [3.0, 0.5], [0.0, 2.0]])
    assert (reps @ out["weight"].T + out["bias"]).argmax(1).tolist() == [0, 0, 1]
    # One epoch with zero-initialised weights: the summed loss's gradient is the sum over
    # the three representations of (softmax - onehot) x rep, all at softmax = 1/2.
    one = FedAllRep(Hyper(server_lr=1.0, head_epochs=1), num_classes=2, rep_dim=2, seed=0)
    torch.nn.init.zeros_(one.head.weight)
    torch.nn.init.zeros_(one.head.bias)
    out = one.server_step(uploads)
    grad = torch.zeros(2, 2)
    for rep, y in zip(reps, [0, 0, 1], strict=True):
        grad += torch.outer(torch.tensor([0.5, 0.5]) - F.one_hot(torch.tensor(y), 2), rep)
    assert torch.allclose(out["weight"], -grad)

"""FedRE's client models and server prototype generator: shapes for every architecture,
the representation mapping against hand-computed averages, parameter counts by hand,
BatchNorm's train / eval difference, seeding, errors, and head sharing."""

from __future__ import annotations

import pytest
import torch

from repro.core.errors import ReproInputError
from repro.fedre.model import (
    ARCHITECTURES,
    ClientModel,
    PrototypeGenerator,
    RepresentationMapping,
    build_client,
    build_clients,
    count_parameters,
    head_state,
    load_head,
)

NAMES = [
    "mlp_narrow",
    "mlp_wide",
    "mlp_deep",
    "cnn_small",
    "cnn_wide",
    "cnn_deep",
    "cnn_bn",
    "resnet_tiny",
    "mobilenet_tiny",
    "vit_tiny",
]
# The flattened backbone output F at 8x8x1, as the builders' docstrings state it.
FEATURES_AT_8x8 = {
    "mlp_narrow": 64,
    "mlp_wide": 256,
    "mlp_deep": 128,
    "cnn_small": 32 * 4 * 4,
    "cnn_wide": 64 * 4 * 4,
    "cnn_deep": 64 * 2 * 2,
    "cnn_bn": 64 * 2 * 2,
    "resnet_tiny": 32 * 4 * 4,
    "mobilenet_tiny": 32 * 4 * 4,
    "vit_tiny": 128,
}
BATCH_NORM_ARCHS = {"cnn_bn", "resnet_tiny", "mobilenet_tiny"}
GELU_MIN = -0.1700  # min of x * Phi(x) is about -0.16997


def tiny(arch: str, seed: int = 0, **overrides) -> ClientModel:
    kwargs = dict(in_channels=1, image_size=8, rep_dim=64, num_classes=10, seed=seed)
    return build_client(arch, **{**kwargs, **overrides})


def images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator) * 2 - 1


def test_ten_distinct_architectures_in_order():
    assert list(ARCHITECTURES) == NAMES
    assert len(set(ARCHITECTURES)) == 10


@pytest.mark.parametrize("arch", NAMES)
@pytest.mark.parametrize("channels, size, rep_dim, classes", [(1, 8, 64, 10), (3, 16, 32, 7)])
def test_shapes_for_every_architecture(arch, channels, size, rep_dim, classes):
    model = build_client(
        arch, in_channels=channels, image_size=size, rep_dim=rep_dim, num_classes=classes, seed=1
    )
    model.eval()
    x = images(5, channels, size)
    features = model.features(x)
    logits = model(x)
    assert features.shape == (5, rep_dim)
    assert logits.shape == (5, classes)
    torch.testing.assert_close(logits, model.head(features))
    assert (model.arch, model.rep_dim, model.num_classes) == (arch, rep_dim, classes)
    # The head is what a broadcast replaces: the same shape whatever the backbone.
    assert model.head.weight.shape == (classes, rep_dim)
    assert model.head.bias.shape == (classes,)


@pytest.mark.parametrize("arch", NAMES)
def test_backbone_feature_size_and_activation_at_8x8(arch):
    model = tiny(arch).eval()
    out = model.base[0](images(16, 1, 8)).flatten(1)
    assert out.shape[1] == FEATURES_AT_8x8[arch]
    assert out.shape[1] >= 64
    # Ends in a ReLU / ReLU6 / GELU: a bare linear or conv output would go well below this.
    assert out.min().item() >= GELU_MIN


def test_architectures_differ_and_stay_small():
    counts = {arch: count_parameters(tiny(arch)) for arch in NAMES}
    assert len(set(counts.values())) == 10, counts
    assert sum(counts.values()) < 400_000, counts


def test_mapping_averages_pairs_when_rep_dim_halves_f():
    mapping = RepresentationMapping(4)
    x = torch.tensor([[1.0, 3.0, 0.0, 2.0, -4.0, 4.0, 5.0, 7.0]])
    torch.testing.assert_close(mapping(x), torch.tensor([[2.0, 1.0, 0.0, 6.0]]))
    # A [B, C, H, W] output is flattened channel-major: row pairs of each channel.
    grid = torch.arange(8.0).reshape(1, 2, 2, 2)
    torch.testing.assert_close(mapping(grid), torch.tensor([[0.5, 2.5, 4.5, 6.5]]))
    assert count_parameters(mapping) == 0


def test_mapping_uses_overlapping_bins_when_f_is_not_divisible():
    # F = 5 -> 3: bins [0, 2), [1, 4), [3, 5) (floor(i F / 3) .. ceil((i + 1) F / 3)).
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0, 3.0], [2.0, 4.0, 6.0, 8.0, 10.0]])
    expected = torch.tensor([[0.5, 0.0, 1.5], [3.0, 6.0, 9.0]])
    torch.testing.assert_close(RepresentationMapping(3)(x), expected)
    # F = 7 -> 3: bins [0, 3), [2, 5), [4, 7).
    y = torch.tensor([[3.0, 0.0, 6.0, 0.0, 0.0, 9.0, 0.0]])
    torch.testing.assert_close(RepresentationMapping(3)(y), torch.tensor([[3.0, 2.0, 3.0]]))
    # rep_dim == F is the identity.
    torch.testing.assert_close(RepresentationMapping(7)(y), y)


def test_mlp_narrow_parameter_count_by_hand():
    # Linear(64 -> 64) + head Linear(64 -> 10).
    assert count_parameters(tiny("mlp_narrow")) == (64 * 64 + 64) + (64 * 10 + 10)
    # 16x16x3 = 768 inputs, rep_dim 32, 5 classes.
    model = build_client(
        "mlp_narrow", in_channels=3, image_size=16, rep_dim=32, num_classes=5, seed=0
    )
    assert count_parameters(model) == (768 * 64 + 64) + (32 * 5 + 5)


@pytest.mark.parametrize("arch", NAMES)
def test_train_and_eval_features_differ_exactly_with_batch_norm(arch):
    model = tiny(arch, seed=3)
    x, y = images(32, 1, 8, seed=1), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    with torch.no_grad():
        train_features = model.train().features(x)
        eval_features = model.eval().features(x)
    same = torch.allclose(train_features, eval_features, atol=1e-5)
    assert same == (arch not in BATCH_NORM_ARCHS)
    if arch == "cnn_bn":
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_seeding_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = tiny("vit_tiny", seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the same weights all the same
    second = tiny("vit_tiny", seed=7)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    other = tiny("vit_tiny", seed=8)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_build_clients_seeds_each_client_by_index():
    clients = build_clients(
        ["cnn_small", "cnn_small", "mlp_wide"],
        in_channels=1,
        image_size=8,
        rep_dim=64,
        num_classes=10,
        seed=2,
    )
    assert [c.arch for c in clients] == ["cnn_small", "cnn_small", "mlp_wide"]
    weights = [c.base[0][0].weight for c in clients[:2]]
    assert not torch.equal(weights[0], weights[1])  # same architecture, different index
    for index, client in enumerate(clients):
        alone = tiny(client.arch, seed=2 * 1000 + index)
        for (name, a), (_, b) in zip(
            client.state_dict().items(), alone.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), (index, name)
    with pytest.raises(ReproInputError, match=r"^fedre\.clients"):
        build_clients([], in_channels=1, image_size=8, rep_dim=64, num_classes=10, seed=0)


def test_bad_configuration_names_the_key():
    with pytest.raises(ReproInputError, match=r"^fedre\.clients: unknown architecture 'foo'") as e:
        tiny("foo")
    assert "mlp_narrow" in str(e.value) and "vit_tiny" in str(e.value)
    with pytest.raises(ReproInputError, match=r"^fedre\.rep_dim"):
        tiny("cnn_small", rep_dim=0)
    assert tiny("cnn_small", rep_dim=1).features(images(2, 1, 8)).shape == (2, 1)
    with pytest.raises(ReproInputError, match=r"^fedre\.tasks: .*classes"):
        tiny("cnn_small", num_classes=1)
    assert tiny("cnn_small", num_classes=2)(images(2, 1, 8)).shape == (2, 2)
    for size in (2, 3, 9):
        with pytest.raises(ReproInputError, match=r"^fedre\.tasks: image size"):
            tiny("cnn_small", image_size=size)


@pytest.mark.parametrize("arch", NAMES)
def test_smallest_allowed_image_size_works(arch):
    model = tiny(arch, image_size=4).eval()
    assert model(images(3, 1, 4)).shape == (3, 10)


def test_head_state_round_trip_and_shape_check():
    a, b = tiny("cnn_wide", seed=1), tiny("vit_tiny", seed=2)
    state = head_state(a)
    assert set(state) == {"weight", "bias"}
    assert not torch.equal(a.head.weight, b.head.weight)
    load_head(b, state)
    assert torch.equal(b.head.weight, a.head.weight) and torch.equal(b.head.bias, a.head.bias)
    # Copies both ways: changing a's head or the state later leaves b alone.
    loaded_weight, loaded_bias = b.head.weight.detach().clone(), b.head.bias.detach().clone()
    with torch.no_grad():
        a.head.weight.add_(1.0)
        state["bias"].add_(1.0)
    assert torch.equal(b.head.weight, loaded_weight) and torch.equal(b.head.bias, loaded_bias)
    assert torch.equal(state["weight"], loaded_weight)  # the state did not follow a either

    with pytest.raises(ReproInputError, match="weight"):
        load_head(b, head_state(tiny("cnn_wide", num_classes=9)))
    with pytest.raises(ReproInputError, match="weight"):
        load_head(b, head_state(tiny("cnn_wide", rep_dim=32)))
    with pytest.raises(ReproInputError, match="bias"):
        load_head(b, {"weight": state["weight"], "bias": torch.zeros(11)})
    with pytest.raises(ReproInputError, match="missing"):
        load_head(b, {"weight": state["weight"]})


def test_prototype_generator_shape_parameters_and_training():
    torch.manual_seed(0)
    generator = PrototypeGenerator(num_classes=5, rep_dim=16, hidden=32)
    ids = torch.tensor([0, 3, 3, 1])
    assert generator(ids).shape == (4, 16)
    # Embedding C*d + Linear(d -> h) + Linear(h -> d).
    assert count_parameters(generator) == 5 * 16 + (16 * 32 + 32) + (32 * 16 + 16)

    # The written-out forward: Linear(h -> d)(relu(Linear(d -> h)(E[ids]))).
    embedded = generator.embedding.weight[ids]
    first, second = generator.middle[0], generator.out
    hidden = torch.relu(embedded @ first.weight.T + first.bias)
    torch.testing.assert_close(generator(ids), hidden @ second.weight.T + second.bias)

    targets = torch.randn(5, 16)
    all_ids = torch.arange(5)
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(generator(all_ids), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in generator.parameters())


def test_the_config_check_knows_exactly_the_models_architectures():
    """repro.fedre.workflow checks fedre.clients without importing torch: its list must be
    the model's, in order."""
    from repro.fedre.workflow import CLIENT_ARCHITECTURES

    assert tuple(ARCHITECTURES) == CLIENT_ARCHITECTURES

"""ProbeX's probe and its baselines: shapes, parameter counts by hand, the orientation of the
probes (input side of a PyTorch weight), and StatNN's weight statistics by hand."""

import numpy as np
import pytest
import torch

from repro.probex.model import (
    STATISTICS,
    DenseExpert,
    ProbeX,
    StatNN,
    count_parameters,
    statistic_names,
    weight_statistics,
)


def probex_parameters(d_out, d_in, c, r_u, r_v, r_t):
    """U in*r_U + V out*r_V + encoder (r_U r_V) r_T + r_T + head r_T C + C."""
    return d_in * r_u + d_out * r_v + r_u * r_v * r_t + r_t + r_t * c + c


@pytest.mark.parametrize(
    "d_out, d_in, c, r_u, r_v, r_t",
    [(32, 32, 10, 8, 8, 32), (24, 40, 7, 3, 5, 6)],
)
def test_probex_shapes_and_parameter_count(d_out, d_in, c, r_u, r_v, r_t):
    model = ProbeX(d_out, d_in, c, r_u, r_v, r_t)
    x = torch.randn(5, d_out, d_in)
    assert model(x).shape == (5, c)
    assert model.encode(x).shape == (5, r_t)
    assert model.probes.shape == (d_in, r_u)
    assert count_parameters(model) == probex_parameters(d_out, d_in, c, r_u, r_v, r_t)


def test_parameter_counts_at_the_example_config():
    # 32*8 + 32*8 + 64*32 + 32 + 32*10 + 10 and 1024*10 + 10.
    assert count_parameters(ProbeX(32, 32, 10, 8, 8, 32)) == 256 + 256 + 2048 + 32 + 320 + 10
    assert count_parameters(DenseExpert(32, 32, 10)) == 32 * 32 * 10 + 10
    dense = DenseExpert(24, 40, 7)
    assert count_parameters(dense) == 24 * 40 * 7 + 7
    assert dense(torch.randn(3, 24, 40)).shape == (3, 7)
    # Two hidden layers of 64: (n*64 + 64) + (64*64 + 64) + (64*10 + 10); buffers not counted.
    statnn = StatNN(21, 64, 10)
    assert count_parameters(statnn) == 21 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def reference_probex(model: ProbeX, x: torch.Tensor) -> torch.Tensor:
    """The official forward written out index by index: responses[b, o, u] = sum_i X[b, o, i]
    U[i, u]; projected[b, u, v] = relu(sum_o responses[b, o, u] V[v, o]); flattened u-major."""
    responses = torch.einsum("boi,iu->bou", x, model.probes)
    projected = torch.relu(torch.einsum("bou,vo->buv", responses, model.shared_projection.weight))
    flat = projected.reshape(len(x), model.rank_u * model.rank_v)
    representation = flat @ model.encoder.weight.T + model.encoder.bias
    return representation @ model.head.weight.T + model.head.bias


def test_probex_forward_matches_the_written_out_reference():
    torch.manual_seed(0)
    model = ProbeX(6, 9, 4, 3, 5, 7)
    x = torch.randn(8, 6, 9)
    torch.testing.assert_close(model(x), reference_probex(model, x))


def test_probes_act_on_the_input_side_of_the_weight():
    """A square layer: probing X^T instead of X (U on the output side) must change the output.
    And X's rows (outputs) are mixed only by V: a weight with a zero input column j gives
    the same responses whatever U's row j holds."""
    torch.manual_seed(1)
    model = ProbeX(6, 6, 4, 3, 5, 7)
    x = torch.randn(8, 6, 6)
    out = model(x)
    assert not torch.allclose(out, model(x.transpose(1, 2)), atol=1e-4)
    torch.testing.assert_close(out, reference_probex(model, x))

    x[:, :, 2] = 0.0  # input column 2 of every weight is zero
    before = model(x)
    with torch.no_grad():
        model.probes[2].normal_()  # U's row for input 2: must not matter
    torch.testing.assert_close(model(x), before)
    with torch.no_grad():
        model.probes[:, 0].normal_()  # probe 0 reads every input: must matter
    assert not torch.allclose(model(x), before, atol=1e-4)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[B, 6, 9\]"):
        ProbeX(6, 9, 4, 3, 5, 7)(torch.randn(2, 9, 6))
    with pytest.raises(ValueError, match=r"\[B, 6, 9\]"):
        DenseExpert(6, 9, 4)(torch.randn(2, 9, 6))
    with pytest.raises(ValueError, match="rank_u"):
        ProbeX(6, 9, 4, 0, 5, 7)


def test_weight_statistics_by_hand():
    state = {
        "b.weight": torch.tensor([[5.0, 1.0], [3.0, 2.0], [4.0, 0.0]]).reshape(3, 2, 1, 1),
        "a.bias": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
        "head.weight": torch.randn(10, 4),  # the fine-tune's classifier: left out
        "head.bias": torch.randn(10),
        "steps": torch.tensor(7),  # not floating point: left out
    }
    features = weight_statistics(state)
    # a.bias: mean 3, population std sqrt(2), quantiles 1 2 3 4 5.
    a = [3.0, 2**0.5, 1.0, 2.0, 3.0, 4.0, 5.0]
    # b.weight values 0..5: mean 2.5, std sqrt(35/12); quantiles at 0, 1.25, 2.5, 3.75, 5.
    b = [2.5, (35 / 12) ** 0.5, 0.0, 1.25, 2.5, 3.75, 5.0]
    torch.testing.assert_close(features, torch.tensor(a + b))
    assert statistic_names(state) == [f"a.bias:{s}" for s in STATISTICS] + [
        f"b.weight:{s}" for s in STATISTICS
    ]


def test_weight_statistics_quantiles_match_numpy():
    values = torch.randn(1000)
    features = weight_statistics({"w": values})
    expected = np.quantile(values.double().numpy(), [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(features[2:].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert features[1].item() == pytest.approx(values.double().std(unbiased=False).item(), rel=1e-5)


def test_statnn_standardises_with_the_training_features():
    torch.manual_seed(0)
    features = torch.randn(50, 3) * torch.tensor([1e-3, 1.0, 1e3]) + torch.tensor([5.0, 0.0, -2.0])
    features[:, 1] = 4.0  # a constant feature: deviation kept at 1, no division by 0
    model = StatNN(3, 8, 2)
    model.standardise_with(features)
    standardised = (features - model.feature_mean) / model.feature_std
    torch.testing.assert_close(standardised.mean(0), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(standardised[:, [0, 2]].std(0, unbiased=False), torch.ones(2))
    assert torch.isfinite(model(features)).all()
    assert "feature_mean" in model.state_dict()  # saved with the model

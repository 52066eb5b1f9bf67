"""What ProbeX trains: probes of one weight matrix, and the two baselines it is compared with.

    X [B, out, in] --U [in, r_U]--> X U [B, out, r_U] --transpose--> [B, r_U, out]
      --V: Linear(out -> r_V, no bias)--> ReLU --flatten (r_U * r_V)--> encoder Linear(-> r_T)
      --head Linear(r_T -> C)--> logits

as the official code's ProbeXClassification: X is a PyTorch weight (out x in), so the
probes U act on the input side (d_W = in) and the shared projection V on the output
side (d_H = out); there is no nonlinearity after the encoder, whose output `encode`
returns (the representation that zero-shot classification aligns with text). U is
drawn as the official code draws it (it is the weight of a Linear(r_U -> in), so
uniform within 1/sqrt(r_U)).

The baselines, built from the paper (the official code has neither):

- DenseExpert: y = sum_ij W_ij X_ij + b, one Linear(out * in -> C) on the flattened matrix.
- StatNN (Unterthiner et al., "Predicting Neural Network Accuracy from Weights"): an MLP
  on per-tensor statistics of the whole model (`weight_statistics`): mean, standard
  deviation and the 0, 25, 50, 75, 100 % quantiles of every weight and bias tensor but
  the classification head's, in sorted name order. The features are standardised with
  the training models' mean and deviation (`StatNN.standardise_with`), kept as buffers
  so that a saved StatNN carries them: the statistics of different tensors differ in
  scale by orders of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

STATISTICS = ("mean", "std", "q0", "q25", "q50", "q75", "q100")
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
HEAD_PREFIXES = ("head.",)  # the fine-tune's classifier: its own classes, not a learned feature


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module` (buffers such as StatNN's standardisation excluded)."""
    return sum(p.numel() for p in module.parameters())


class ProbeX(nn.Module):
    """ProbeX of one layer of shape (d_out, d_in): r_U probes, r_V-dim shared projection,
    an r_T-dim representation and a head over `num_classes` (multi-label logits)."""

    def __init__(
        self, d_out: int, d_in: int, num_classes: int, rank_u: int, rank_v: int, rank_t: int
    ):
        super().__init__()
        sizes = dict(d_out=d_out, d_in=d_in, num_classes=num_classes)
        for name, value in {**sizes, "rank_u": rank_u, "rank_v": rank_v, "rank_t": rank_t}.items():
            if int(value) < 1:
                raise ValueError(f"ProbeX: {name} must be >= 1, got {value}")
        self.d_out, self.d_in = int(d_out), int(d_in)
        self.rank_u, self.rank_v, self.rank_t = int(rank_u), int(rank_v), int(rank_t)
        bound = 1.0 / math.sqrt(self.rank_u)  # nn.Linear(r_U -> in)'s default init, as official
        self.probes = nn.Parameter(torch.empty(self.d_in, self.rank_u).uniform_(-bound, bound))
        self.shared_projection = nn.Linear(self.d_out, self.rank_v, bias=False)
        self.encoder = nn.Linear(self.rank_u * self.rank_v, self.rank_t)
        self.head = nn.Linear(self.rank_t, int(num_classes))

    def encode(self, x: Tensor) -> Tensor:
        """The representation [B, r_T] of weight matrices x [B, d_out, d_in]."""
        if x.dim() != 3 or x.shape[1:] != (self.d_out, self.d_in):
            raise ValueError(
                f"ProbeX expects weights [B, {self.d_out}, {self.d_in}], got {tuple(x.shape)}"
            )
        responses = x @ self.probes  # [B, out, r_U]
        projected = torch.relu(self.shared_projection(responses.transpose(1, 2)))  # [B, r_U, r_V]
        return self.encoder(projected.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encode(x))


class DenseExpert(nn.Module):
    """The Dense linear expert: one weight per entry of the (d_out, d_in) matrix and class."""

    def __init__(self, d_out: int, d_in: int, num_classes: int):
        super().__init__()
        self.d_out, self.d_in = int(d_out), int(d_in)
        self.linear = nn.Linear(self.d_out * self.d_in, int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.d_out, self.d_in):
            raise ValueError(
                f"DenseExpert expects weights [B, {self.d_out}, {self.d_in}], got {tuple(x.shape)}"
            )
        return self.linear(x.flatten(1))


class StatNN(nn.Module):
    """MLP (two hidden ReLU layers of `hidden` units) on standardised weight statistics."""

    def __init__(self, n_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.n_features = int(n_features)
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.mlp = nn.Sequential(
            nn.Linear(self.n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, int(num_classes)),
        )

    @torch.no_grad()
    def standardise_with(self, features: Tensor) -> None:
        """Set the standardisation from the training models' features [N, n_features]
        (a constant feature keeps deviation 1, so it maps to 0 instead of dividing by 0)."""
        features = features.double()
        std = features.std(0, unbiased=False) if len(features) > 1 else torch.ones_like(features[0])
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.n_features:
            raise ValueError(
                f"StatNN expects features [B, {self.n_features}], got {tuple(features.shape)}"
            )
        return self.mlp((features - self.feature_mean) / self.feature_std)


def statistic_tensors(
    state: Mapping[str, Tensor], exclude_prefixes: Sequence[str] = HEAD_PREFIXES
) -> list[str]:
    """Names of the tensors StatNN summarises: floating-point, not in the head, sorted."""
    return sorted(
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not name.startswith(tuple(exclude_prefixes))
    )


def weight_statistics(
    state: Mapping[str, Tensor], exclude_prefixes: Sequence[str] = HEAD_PREFIXES
) -> Tensor:
    """StatNN's features of one model: for every tensor of `statistic_tensors` (weights of
    any shape, flattened, and biases / norm scales), the 7 STATISTICS, concatenated in
    sorted name order -> float32 [7 * n_tensors]. Deviation is the population one (ddof 0),
    so a one-element tensor has deviation 0."""
    features = []
    for name in statistic_tensors(state, exclude_prefixes):
        values = state[name].detach().reshape(-1).double()
        quantiles = _quantiles(values, QUANTILES)
        features.append(
            torch.cat([values.mean()[None], values.std(unbiased=False)[None], quantiles])
        )
    if not features:
        return torch.zeros(0)
    return torch.cat(features).float()


def statistic_names(
    state: Mapping[str, Tensor], exclude_prefixes: Sequence[str] = HEAD_PREFIXES
) -> list[str]:
    """The name of every feature of `weight_statistics(state)`, e.g. 'blocks.0.attn.proj.weight:q50'."""
    return [
        f"{name}:{s}" for name in statistic_tensors(state, exclude_prefixes) for s in STATISTICS
    ]


def _quantiles(values: Tensor, levels: Sequence[float]) -> Tensor:
    """Quantiles with linear interpolation (numpy's default, torch.quantile's), by sorting:
    torch.quantile refuses inputs of more than 2**24 elements, which large layers exceed."""
    ordered = values.sort().values
    position = torch.tensor(levels, dtype=torch.float64) * (len(ordered) - 1)
    low = position.floor().long()
    high = position.ceil().long()
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

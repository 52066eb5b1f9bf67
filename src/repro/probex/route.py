"""Nearest-base routing: which tree's expert classifies a model (ProbeX's mixture of experts).

A model belongs to the tree whose base model it was fine-tuned from, and fine-tuning
moves weights little, so the tree is the one whose base is nearest. Distance is the
root mean squared difference over the tensors that the model and the base share
(same name, same shape): a mean, not a sum, so that a base of another architecture,
which shares only a few tensors with the model (a head of the same size, say), is not
made nearer by sharing less. A base that shares no tensor of equal shape is
infinitely far; a model that is infinitely far from every base is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from repro.core.errors import ReproInputError


def base_distance(state: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> float:
    """RMS difference over the floating-point tensors both hold with equal shapes (inf if none)."""
    squared, count = 0.0, 0
    for name, tensor in state.items():
        other = base.get(name)
        if other is None or other.shape != tensor.shape or not tensor.is_floating_point():
            continue
        difference = tensor.detach().double() - other.detach().to(tensor.device).double()
        squared += float(difference.square().sum())
        count += difference.numel()
    return math.sqrt(squared / count) if count else math.inf


def route(
    states: Iterable[Mapping[str, Tensor]],
    bases: Mapping[str, Mapping[str, Tensor]],
    names: Sequence[str] | None = None,
) -> list[str]:
    """For each model state, the name of the tree whose base is nearest (ties: the first
    tree in `bases` order). `names` label the states in the error for an unroutable one."""
    if not bases:
        raise ValueError("route: no base models to route to")
    trees = list(bases)
    routed = []
    for index, state in enumerate(states):
        distances = [base_distance(state, bases[tree]) for tree in trees]
        nearest = min(range(len(trees)), key=distances.__getitem__)
        if math.isinf(distances[nearest]):
            what = names[index] if names is not None else f"model {index}"
            raise ReproInputError(
                f"{what}: shares no tensor of equal shape with any base model "
                f"(trees {trees}): it cannot be routed"
            )
        routed.append(trees[nearest])
    return routed


def routing_accuracy(routed: Sequence[str], trees: Sequence[str]) -> float:
    """Fraction of models routed to their own tree (NaN for no models)."""
    if len(routed) != len(trees):
        raise ValueError(f"routing_accuracy: {len(routed)} routes for {len(trees)} models")
    if not routed:
        return math.nan
    return float(torch.tensor([r == t for r, t in zip(routed, trees, strict=True)]).float().mean())

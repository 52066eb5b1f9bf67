"""Scoring a probe: element-wise accuracy over the classes at threshold 0.5, as the
paper reports it (a model's label is multi-hot: was class c among its training
classes?). With half the classes in each label, chance is ~50 %.

The probe's epoch is chosen on the validation models (repro.probex.probe.fit_probe)
and only that state is scored on the test models, once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

THRESHOLD = 0.5  # on the sigmoid: a logit above 0 predicts the class


def elementwise_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of (model, class) entries predicted right at sigmoid threshold 0.5."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    if targets.numel() == 0:
        return math.nan
    predicted = (torch.sigmoid(logits) > THRESHOLD).to(targets.dtype)
    return float((predicted == targets).double().mean())


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
    """Logits of `model` on `inputs` (first dim: models), in batches, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [
        model(inputs[i : i + batch_size].to(device)).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    model.train(was_training)
    if not out:
        return torch.zeros(0)
    return torch.cat(out)


def evaluate(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int
) -> tuple[float, float]:
    """(mean BCE over all entries, element-wise accuracy) of `model` on `inputs`."""
    if len(inputs) == 0:
        return math.nan, math.nan
    logits = predict(model, inputs, batch_size)
    loss = float(F.binary_cross_entropy_with_logits(logits, targets.float()))
    return loss, elementwise_accuracy(logits, targets)

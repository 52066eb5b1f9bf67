"""Evaluation of DataDream's classifiers: selection on the validation split only.

After every epoch the classifier is scored on the validation split (Selection.record);
the best epoch's LoRA weights (ties: the earliest) are put back (Selection.restore)
and only then scored on the test split, once. The official code picks the best epoch
on the test set: not copied. The accuracy itself is ClipClassifier.accuracy (an exact
count of correct predictions over the split).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Selection(nn.Module):
    """Validation accuracy after each epoch and the best epoch's LoRA weights so far
    (ties: the earliest epoch), as buffers, so a checkpoint carries them."""

    def __init__(self, parameters: dict[str, nn.Parameter], epochs: int):
        super().__init__()
        self._params = list(parameters.values())
        self.register_buffer("val_acc", torch.full((epochs,), float("nan"), dtype=torch.float64))
        self.register_buffer("best_epoch", torch.zeros((), dtype=torch.int64))
        for i, p in enumerate(self._params):
            self.register_buffer(f"best_{i:05d}", p.detach().clone())

    def _best(self) -> list[Tensor]:
        return [getattr(self, f"best_{i:05d}") for i in range(len(self._params))]

    @torch.no_grad()
    def record(self, epoch: int, accuracy: float) -> bool:
        """Record epoch `epoch` (1-based); keep its weights if strictly better than every
        earlier epoch. Returns whether it is the new best."""
        self.val_acc[epoch - 1] = accuracy
        best = int(self.best_epoch)
        if best and not accuracy > float(self.val_acc[best - 1]):
            return False
        self.best_epoch.fill_(epoch)
        for saved, p in zip(self._best(), self._params, strict=True):
            saved.copy_(p.detach())
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the best epoch's weights back into the LoRA parameters."""
        if int(self.best_epoch) == 0:
            raise RuntimeError("Selection.restore: no epoch recorded")
        for saved, p in zip(self._best(), self._params, strict=True):
            p.copy_(saved)

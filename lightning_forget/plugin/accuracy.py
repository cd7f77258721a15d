"""Accuracy on the samples of some classes only: what the forgetting module logs and the evaluation reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

_IGNORE = -100


class SubsetAccuracy(MulticlassAccuracy):
    """Micro accuracy over the samples of some classes only (DDP-safe).

    Samples of other classes are ignored, so the figure is (correct samples of ``classes``) /
    (samples of ``classes``), not an average of per-class recalls.

    Args:
        num_classes: number of classes.
        classes: the classes whose samples count.
    """

    def __init__(self, num_classes: int, classes: Sequence[int], **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, average="micro", ignore_index=_IGNORE, **kwargs)
        self.register_buffer("classes", torch.tensor(list(classes), dtype=torch.long), persistent=False)

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds, torch.where(torch.isin(target, self.classes), target, _IGNORE))


def subset_accuracy(preds: Tensor, targets: Tensor, num_classes: int, classes: Sequence[int]) -> float:
    """:class:`SubsetAccuracy` of ``preds`` (logits or predicted classes) against ``targets``, at once."""
    metric = SubsetAccuracy(num_classes, classes)
    metric.update(preds, targets)
    return float(metric.compute())

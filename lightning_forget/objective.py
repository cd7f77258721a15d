"""The forgetting objective: keep the remaining classes, move predictions off the forgotten ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_forget.classes import check_forget_classes

ForgetLoss = Literal["renormalized", "uniform", "random_label", "ascent"]
FORGET_LOSSES: tuple[str, ...] = ("renormalized", "uniform", "random_label", "ascent")


class ForgettingObjective(nn.Module):
    """Loss of a student on a batch, given the original (teacher) model's logits.

    Remaining-class samples: ``retain_weight`` x cross-entropy to their labels plus
    ``distill_weight`` x KL divergence to the teacher at ``temperature`` (scaled by T^2).
    Forgotten-class samples: ``forget_weight`` x a forget loss:

    - ``renormalized``: cross-entropy to the teacher's distribution with the forgotten
      classes removed and renormalised, what a model that never saw them would answer;
    - ``uniform``: cross-entropy to the uniform distribution over the remaining classes;
    - ``random_label``: cross-entropy to a random remaining class;
    - ``ascent``: negative cross-entropy to the true label, bounded at ``2 log(num_classes)``.

    Each term is a mean over its own samples; a batch without such samples adds 0.

    Args:
        forget_classes: class indices to forget.
        num_classes: number of classes.
        forget_loss: one of ``FORGET_LOSSES``.
        retain_weight, distill_weight, forget_weight: non-negative weights of the terms.
        temperature: distillation temperature, > 0.

    Raises:
        ValueError: for invalid classes, unknown ``forget_loss``, negative weights or temperature <= 0.
    """

    def __init__(
        self,
        forget_classes: Sequence[int],
        num_classes: int,
        forget_loss: ForgetLoss = "renormalized",
        retain_weight: float = 1.0,
        distill_weight: float = 1.0,
        forget_weight: float = 1.0,
        temperature: float = 2.0,
    ) -> None:
        super().__init__()
        forgotten = check_forget_classes(forget_classes, num_classes)
        if forget_loss not in FORGET_LOSSES:
            raise ValueError(f"Unknown forget_loss {forget_loss!r}: choose one of {FORGET_LOSSES}.")
        weights = {"retain_weight": retain_weight, "distill_weight": distill_weight, "forget_weight": forget_weight}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"Loss weights must be >= 0, got {negative}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.forget_loss = forget_loss
        self.retain_weight, self.distill_weight, self.forget_weight = retain_weight, distill_weight, forget_weight
        self.temperature = temperature
        self.num_classes = num_classes
        is_forgotten = torch.zeros(num_classes, dtype=torch.bool)
        is_forgotten[forgotten] = True
        self.register_buffer("is_forgotten", is_forgotten, persistent=False)

    def forward(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Return the ``loss`` and its unweighted terms ``retain``, ``distill`` and ``forget``."""
        logits, teacher_logits = logits.float(), teacher_logits.float()
        forget_rows = self.is_forgotten[targets]
        retain_rows = ~forget_rows
        zero = logits.sum() * 0.0
        retain = distill = forget = zero
        if retain_rows.any():
            retain = F.cross_entropy(logits[retain_rows], targets[retain_rows])
            t = self.temperature
            distill = F.kl_div(
                F.log_softmax(logits[retain_rows] / t, dim=-1),
                F.log_softmax(teacher_logits[retain_rows] / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            ) * (t * t)
        if forget_rows.any():
            forget = self._forget_term(logits[forget_rows], teacher_logits[forget_rows], targets[forget_rows])
        loss = self.retain_weight * retain + self.distill_weight * distill + self.forget_weight * forget
        return {"loss": loss, "retain": retain.detach(), "distill": distill.detach(), "forget": forget.detach()}

    def _forget_term(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        if self.forget_loss == "ascent":
            bound = 2 * math.log(self.num_classes)
            return -F.cross_entropy(logits, targets, reduction="none").clamp(max=bound).mean()
        if self.forget_loss == "random_label":
            remaining = (~self.is_forgotten).nonzero().squeeze(1)
            picks = torch.randint(len(remaining), targets.shape, device=targets.device)
            return F.cross_entropy(logits, remaining[picks])
        if self.forget_loss == "uniform":
            target = (~self.is_forgotten).float().expand_as(logits)
        else:
            target = F.softmax(teacher_logits.masked_fill(self.is_forgotten, float("-inf")), dim=-1)
        return F.cross_entropy(logits, target / target.sum(-1, keepdim=True))

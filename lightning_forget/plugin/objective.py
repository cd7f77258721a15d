"""The forgetting objective: keep the remaining classes, move predictions off the forgotten ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ForgetLoss = Literal["renormalized", "uniform", "random_label", "ascent"]
FORGET_LOSSES: tuple[str, ...] = ("renormalized", "uniform", "random_label", "ascent")
DistillTarget = Literal["renormalized", "original"]
DISTILL_TARGETS: tuple[str, ...] = ("renormalized", "original")


@dataclass(frozen=True)
class ForgettingObjective:
    """Loss of a student on a batch, given the original (teacher) model's logits.

    Remaining-class samples: ``retain_weight`` x cross-entropy to their labels plus
    ``distill_weight`` x KL divergence to the teacher at ``temperature`` (scaled by T^2). With
    ``distill_target="renormalized"`` the teacher's distribution has the forgotten classes
    removed, as a model that never saw them would answer; ``"original"`` keeps them.
    Forgotten-class samples: ``forget_weight`` x a forget loss:

    - ``renormalized``: cross-entropy to the teacher's distribution with the forgotten
      classes removed and renormalised (the target of DELETE, Zhou et al., CVPR 2025);
    - ``uniform``: cross-entropy to the uniform distribution over the remaining classes;
    - ``random_label``: cross-entropy to a random remaining class;
    - ``ascent``: negative cross-entropy to the true label, bounded at ``2 log(num_classes)``.

    With ``feature_weight`` > 0 and penultimate features given, forgotten-class samples also
    pay the relative squared distance between their features and ``feature_targets`` (the
    callback passes the original model's mean feature of the remaining class each sample is
    renormalised to): their features move into a remaining class's cluster, so that no probe on
    the features finds the class, instead of only the output layer hiding it.

    With ``mix_weight`` > 0 and ``mixed`` logits given, the student also matches the renormalised
    teacher on mixtures of the batch's inputs (the callback draws them: mixup, Zhang et al., ICLR
    2018, used as in few-sample distillation): a few shots pin the student to the teacher only at
    those points, while mixtures cover the space between them, so the remaining classes are kept
    and the forgotten ones removed in their neighbourhood, not only on the samples.

    With ``relearn_weight`` > 0 and ``relearned`` logits given, forgotten-class samples also pay the
    forget loss at a point one simulated relearn step away: the callback moves every trainable entry
    down the gradient of their true-label cross-entropy, by ``relearn_radius`` times the entries'
    norm, and evaluates them there (first-order, as sharpness-aware minimisation evaluates its
    gradient at the worst point of a ball: Foret et al., ICLR 2021; for unlearning, Fan et al., ICML
    2025, arXiv 2502.05374). A class that one fine-tuning step would bring back pays for it, so the fit
    keeps going until the neighbourhood, not only the point, has forgotten it. Only samples whose class
    the step brings back to ``relearn_threshold`` probability or more pay (the term is their share of the
    forgotten rows times their forget loss): once the neighbourhood holds, the term stops pulling against
    the remaining classes.

    Each term is a mean over its own samples (a batch without such samples adds 0), and the
    loss is their weighted mean, so that its scale is that of one cross-entropy whatever the
    weights: an SGD learning rate that trains the model also forgets with it.

    Args:
        forget_loss: one of ``FORGET_LOSSES``.
        retain_weight, distill_weight, forget_weight, feature_weight, mix_weight, relearn_weight: non-negative weights
            of the terms, not all 0.
        relearn_radius: the simulated relearn step's length, as a fraction of the entries' norm; > 0.
        relearn_threshold: the relearned true-class probability from which a sample pays the relearn
            term, in [0, 1); 0: every forgotten-class sample pays.
        temperature: distillation temperature, > 0.
        distill_target: ``renormalized`` or ``original``.

    Raises:
        ValueError: for an unknown ``forget_loss`` or ``distill_target``, negative or all-zero
            weights, temperature <= 0, or a relearn radius or threshold out of range.
    """

    forget_loss: ForgetLoss = "renormalized"
    retain_weight: float = 1.0
    distill_weight: float = 1.0
    forget_weight: float = 1.0
    temperature: float = 2.0
    distill_target: DistillTarget = "renormalized"
    feature_weight: float = 0.0
    mix_weight: float = 0.0
    relearn_weight: float = 0.0
    relearn_radius: float = 0.05
    relearn_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"Unknown forget_loss {self.forget_loss!r}: choose one of {FORGET_LOSSES}.")
        if self.distill_target not in DISTILL_TARGETS:
            raise ValueError(f"Unknown distill_target {self.distill_target!r}: choose one of {DISTILL_TARGETS}.")
        weights = {"retain_weight": self.retain_weight, "distill_weight": self.distill_weight}
        weights["forget_weight"] = self.forget_weight
        weights["feature_weight"] = self.feature_weight
        weights["mix_weight"] = self.mix_weight
        weights["relearn_weight"] = self.relearn_weight
        bad = {k: v for k, v in weights.items() if not _is_number(v) or v < 0}
        if bad:
            raise ValueError(f"Loss weights must be numbers >= 0, got {bad}.")
        if not sum(weights.values()) > 0:
            raise ValueError("At least one loss weight must be > 0: all are 0.")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}.")
        if not _is_number(self.relearn_radius) or self.relearn_radius <= 0:
            raise ValueError(f"relearn_radius must be a number > 0, got {self.relearn_radius!r}.")
        if not _is_number(self.relearn_threshold) or not 0 <= self.relearn_threshold < 1:
            raise ValueError(f"relearn_threshold must be a number in [0, 1), got {self.relearn_threshold!r}.")

    def __call__(
        self,
        logits: Tensor,
        teacher_logits: Tensor,
        targets: Tensor,
        forget_classes: Sequence[int],
        features: Tensor | None = None,
        feature_targets: Tensor | None = None,
        mixed: tuple[Tensor, Tensor] | None = None,
        relearned: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Return the ``loss`` and its unweighted terms ``retain``, ``distill``, ``forget``, ``feature``, ``mix``
        and ``relearn``.

        ``features`` and ``feature_targets`` (``(batch, dim)``) are used only with ``feature_weight`` > 0;
        ``mixed`` (the student's and the teacher's logits on mixed inputs) only with ``mix_weight`` > 0;
        ``relearned`` (the student's logits on the forgotten-class rows, in batch order, one relearn step
        away) only with ``relearn_weight`` > 0.
        """
        logits, teacher_logits = logits.float(), teacher_logits.float()
        is_forgotten = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        is_forgotten[list(forget_classes)] = True
        forget_rows = is_forgotten[targets]
        retain_rows = ~forget_rows
        zero = logits.sum() * 0.0
        retain = distill = forget = feature = mix = relearn = zero
        if retain_rows.any():
            retain = F.cross_entropy(logits[retain_rows], targets[retain_rows])
            teacher = teacher_logits[retain_rows]
            if self.distill_target == "renormalized":
                teacher = teacher.masked_fill(is_forgotten, float("-inf"))
            distill = self._distill(logits[retain_rows], teacher)
        if self.mix_weight and mixed is not None:
            student, teacher = mixed
            mix = self._distill(student.float(), teacher.float().masked_fill(is_forgotten, float("-inf")))
        if forget_rows.any():
            rows = forget_rows
            forget = self._forget_term(logits[rows], teacher_logits[rows], targets[rows], is_forgotten)
            if self.feature_weight and features is not None and feature_targets is not None:
                f, t = features[rows].float(), feature_targets[rows].float()
                feature = ((f - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).mean()
            if self.relearn_weight and relearned is not None:
                relearn = self._relearn_term(relearned.float(), teacher_logits[rows], targets[rows], is_forgotten)
        weights = (
            self.retain_weight,
            self.distill_weight,
            self.forget_weight,
            self.feature_weight,
            self.mix_weight,
            self.relearn_weight,
        )
        terms = {
            "retain": retain,
            "distill": distill,
            "forget": forget,
            "feature": feature,
            "mix": mix,
            "relearn": relearn,
        }
        loss = sum(w * t for w, t in zip(weights, terms.values())) / sum(weights)
        return {"loss": loss, **{k: t.detach() for k, t in terms.items()}}

    def _distill(self, logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        return _kl_to(F.log_softmax(logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1)) * (t * t)

    def _relearn_term(self, relearned: Tensor, teacher_logits: Tensor, targets: Tensor, is_forgotten: Tensor) -> Tensor:
        back = relearned.detach().softmax(-1).gather(1, targets[:, None]).squeeze(1) >= self.relearn_threshold
        if not back.any():
            return relearned.sum() * 0.0
        share = back.float().mean()
        return share * self._forget_term(relearned[back], teacher_logits[back], targets[back], is_forgotten)

    def _forget_term(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor, is_forgotten: Tensor) -> Tensor:
        if self.forget_loss == "ascent":
            bound = 2 * math.log(logits.shape[-1])
            return -F.cross_entropy(logits, targets, reduction="none").clamp(max=bound).mean()
        if self.forget_loss == "random_label":
            remaining = (~is_forgotten).nonzero().squeeze(1)
            picks = torch.randint(len(remaining), targets.shape, device=targets.device)
            return F.cross_entropy(logits, remaining[picks])
        if self.forget_loss == "uniform":
            target = (~is_forgotten).float().expand_as(logits)
            return F.cross_entropy(logits, target / target.sum(-1, keepdim=True))
        return F.cross_entropy(logits, F.softmax(teacher_logits.masked_fill(is_forgotten, float("-inf")), dim=-1))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kl_to(log_student: Tensor, target: Tensor) -> Tensor:
    """KL(target || student) per sample, batch mean; zero-probability target entries contribute 0."""
    return (torch.xlogy(target, target) - target * log_student).sum(-1).mean()

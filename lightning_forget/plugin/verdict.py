"""Whether the samples at hand say the classes are forgotten: the stop rule and the verdict of a fit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_forget.plugin.batches import BatchFormat, check_targets


@dataclass(frozen=True)
class Evidence:
    """A model's answers on the forgetting samples.

    Attributes:
        forget_acc: accuracy on the forgotten-class samples.
        retain_acc: accuracy on the remaining-class samples.
        forget_mass: mean probability the model gives the forgotten classes on their own samples.
        retain_confidence: mean probability the model gives each remaining-class sample's own class.
        forget_samples, retain_samples: how many samples of each kind were seen.
    """

    forget_acc: float
    retain_acc: float
    forget_mass: float
    retain_confidence: float
    forget_samples: int
    retain_samples: int


@dataclass(frozen=True)
class RetainAttack:
    """What a retain-only attack reached.

    Attributes:
        start: the forgotten-class accuracy before the fine-tuning.
        acc: the highest forgotten-class accuracy of the copy, before training and after every epoch.
        samples: forgotten-class samples it was measured on.
        steps: optimizer steps on remaining-class samples.
    """

    start: float
    acc: float
    samples: int
    steps: int


@dataclass(frozen=True)
class ForgetCriterion:
    """When the evidence says the classes are gone and the others are kept.

    A model retrained without the classes never predicts them and gives them almost no
    probability on their own samples. Accuracy alone is not enough on the few samples that
    were trained on: it reaches 0 long before unseen samples of the class stop being
    recognised, so the probability mass must fall too. Likewise the remaining classes are
    judged by the probability of each sample's own class, which falls with the first
    disruptive steps and comes back as training repairs them, while the accuracy on trained
    samples hardly moves.

    Samples the fit did not train on (the verdict's) are judged as a test set is: they were
    never pushed down, so ``max_unseen_forget_mass`` bounds their forgotten-class probability,
    and their remaining-class accuracy may fall by one sample's worth (one of 9 held-back samples
    is 0.11), since their own-class probability, a finer measure, still may fall by
    ``max_retain_drop`` only. Measured on the robustness matrix (``bench/results/robustness``).

    A class that is removed does not come back when a copy is fine-tuned on the other classes'
    samples alone (the retain-only attack, :mod:`~lightning_forget.plugin.attack`); a class hidden by
    a fragile balance of weights does. A retrained model stays at 0 there: ``max_attack_acc`` bounds it.

    Args:
        max_forget_acc: highest accuracy allowed on the forgotten-class samples.
        max_forget_mass: highest mean probability of the forgotten classes on their samples.
        max_retain_drop: largest allowed fall, from the start of the fit, of the remaining-class
            accuracy and of their mean own-class probability.
        max_unseen_forget_mass: ``max_forget_mass`` for samples the fit did not train on.
        max_attack_acc: highest forgotten-class accuracy the retain-only attack may bring back.

    Raises:
        ValueError: for a value outside [0, 1].
    """

    max_forget_acc: float = 0.0
    max_forget_mass: float = 0.01
    max_retain_drop: float = 0.03
    max_unseen_forget_mass: float = 0.05
    max_attack_acc: float = 0.1

    def __post_init__(self) -> None:
        names = ("max_forget_acc", "max_forget_mass", "max_retain_drop", "max_unseen_forget_mass", "max_attack_acc")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")

    def shortfalls(self, before: Evidence, now: Evidence, unseen: bool = False) -> list[str]:
        """What is not met yet, in words; empty when forgotten.

        Args:
            before, now: the evidence at the start of the fit and now, on the same samples.
            unseen: whether the fit did not train on those samples.
        """
        missing = []
        if now.forget_acc > self.max_forget_acc:
            missing.append(f"forgotten-class accuracy {now.forget_acc:.3f} > {self.max_forget_acc}")
        max_mass = self.max_unseen_forget_mass if unseen else self.max_forget_mass
        if now.forget_mass > max_mass:
            missing.append(f"forgotten-class probability {now.forget_mass:.4f} > {max_mass}")
        one_sample = 1 / now.retain_samples + 1e-9 if unseen and now.retain_samples else 0.0
        for what, start, end, allowed in (
            ("accuracy", before.retain_acc, now.retain_acc, max(self.max_retain_drop, one_sample)),
            ("own-class probability", before.retain_confidence, now.retain_confidence, self.max_retain_drop),
        ):
            if now.retain_samples and end < start - allowed:
                missing.append(f"remaining-class {what} fell from {start:.3f} to {end:.3f} (more than {allowed:.3g})")
        return missing

    def attack_shortfalls(self, attack: RetainAttack | None) -> list[str]:
        """What the retain-only attack shows, in words; empty when the classes did not come back, were not gone when
        it started (the other shortfalls say so), or no attack ran."""
        if attack is None or attack.start > self.max_attack_acc or attack.acc <= self.max_attack_acc:
            return []
        return [
            f"the forgotten classes came back to {attack.acc:.3f} accuracy on their {attack.samples} samples after "
            f"{attack.steps} fine-tuning steps on the remaining-class samples alone (retain-only attack; more than "
            f"{self.max_attack_acc}): they are hidden, not removed"
        ]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a forgetting fit, judged on samples it did not train on.

    Attributes:
        forgotten: whether the criterion was met at the end on the judged samples (``False`` when
            not judged).
        forget_classes: the classes.
        before, after: the evidence on the judged samples at the start and at the end of the fit;
            ``None`` when not judged.
        epochs: epochs trained.
        shortfalls: what was not met (empty when forgotten).
        judged_on: ``held-back`` (samples of the fit's data held back from training),
            ``verdict_data`` (given by the user), ``trained`` (a "no" that the trained samples
            already show: it needs no unseen sample), or ``""`` when not judged.
        not_judged: why the fit could not be judged on unseen samples (empty when judged).
        trained: the evidence on the samples the fit trained on, at the end.
        attack: what the retain-only attack on a copy reached (``None`` when not run).
    """

    forgotten: bool
    forget_classes: list[int]
    before: Evidence | None
    after: Evidence | None
    epochs: int
    shortfalls: list[str]
    judged_on: str = ""
    not_judged: str = ""
    trained: Evidence | None = None
    attack: RetainAttack | None = None

    @property
    def judged(self) -> bool:
        """Whether the verdict rests on samples the fit did not train on."""
        return not self.not_judged

    def __str__(self) -> str:
        trained = self.trained
        seen = (
            f"on the {trained.forget_samples} + {trained.retain_samples} samples it trained on, forgotten-class "
            f"accuracy {trained.forget_acc:.3f}, remaining-class accuracy {trained.retain_acc:.3f}; "
            if trained is not None
            else ""
        )
        attack = self.attack
        attacked = (
            f"retain-only attack: forgotten-class accuracy at most {attack.acc:.3f} on {attack.samples} samples "
            f"over {attack.steps} steps; "
            if attack is not None
            else ""
        )
        if not self.judged:
            return (
                f"Classes {self.forget_classes} NOT JUDGED on unseen samples: {self.not_judged} ({seen}{attacked}"
                f"{self.epochs} epochs)."
            )
        b, a = self.before, self.after
        assert b is not None and a is not None
        if self.judged_on == "trained":
            judged, seen = "samples it trained on", ""
        else:
            judged = f"{self.judged_on} samples it did not train on"
        figures = (
            f"on {a.forget_samples} forgotten-class / {a.retain_samples} remaining-class {judged}: forgotten-class "
            f"accuracy {b.forget_acc:.3f} -> {a.forget_acc:.3f}, probability {b.forget_mass:.3f} -> "
            f"{a.forget_mass:.4f}; remaining-class accuracy {b.retain_acc:.3f} -> {a.retain_acc:.3f}; {seen}"
            f"{attacked}{self.epochs} epochs"
        )
        if self.forgotten:
            return f"Classes {self.forget_classes} forgotten ({figures})."
        return f"Classes {self.forget_classes} NOT forgotten: {'; '.join(self.shortfalls)} ({figures})."


@torch.no_grad()
def measure(
    forward: Callable[[Any], Any],
    batches: Iterable[Any],
    forget_classes: Sequence[int],
    *,
    batch_format: BatchFormat | None = None,
    device: torch.device | str = "cpu",
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> Evidence:
    """Evidence of ``forward`` (a model in eval mode) on ``batches``.

    Args:
        forward: ``inputs -> output``.
        batches: batches that ``batch_format`` reads as ``(inputs, targets)``.
        forget_classes: the forgotten classes.
        batch_format: where inputs, targets and logits are; ``None`` for tuple batches and a
            logits output.
        device: where the inputs go.
        reduce: sums a tensor across processes; the identity in one process.
    """
    batch_format = batch_format or BatchFormat()
    forgotten = torch.tensor(list(forget_classes), device=device)
    # forget correct, forget mass, forget count, retain correct, retain own-class probability, retain count
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for batch in batches:
        inputs, targets = batch_format.split(batch)
        targets = targets.to(device)
        probs = batch_format.logits_of(forward(inputs.to(device))).float().softmax(-1)
        check_targets(targets, probs.shape[-1])
        is_forget = torch.isin(targets, forgotten)
        correct = probs.argmax(-1) == targets
        sums += torch.stack(
            [
                correct[is_forget].sum(),
                probs[is_forget][:, forgotten].sum(),
                is_forget.sum(),
                correct[~is_forget].sum(),
                probs[~is_forget].gather(1, targets[~is_forget, None]).sum(),
                (~is_forget).sum(),
            ]
        ).to(sums)
    f_correct, f_mass, n_forget, r_correct, r_confidence, n_retain = reduce(sums).tolist()
    return Evidence(
        forget_acc=f_correct / max(n_forget, 1),
        retain_acc=r_correct / max(n_retain, 1),
        forget_mass=f_mass / max(n_forget, 1),
        retain_confidence=r_confidence / max(n_retain, 1),
        forget_samples=int(n_forget),
        retain_samples=int(n_retain),
    )

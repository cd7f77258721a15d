"""What the evaluation needs of the data and the network, checked before any training.

The probe and relearn sets are drawn outside the few-shot samples. Where a class has fewer training images left
than ``eval.probe.per_class`` (``eval.relearn.per_class``) asks for, the set takes what every class has (the
setting is lowered, with a message); where a class has none left, that evidence is skipped with a message and its
figures are reported as not measured. What no evaluation can do without refuses the run before it trains: test
images of every forgotten class and of the remaining ones, training images of every forgotten class, and a final
linear layer the probe can read. The fit's verdict judges a few test images of every class, which the models are
then not measured on (:func:`split_verdict_images`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Subset

from lightning_forget.app.data import ClassificationData
from lightning_forget.app.settings import SettingError
from lightning_forget.evaluation.evidence import ProbeSettings, RelearnSettings, penultimate_features
from lightning_forget.evaluation.measurable import PROBE_FIGURES, RETAIN_ATTACK_FIGURES, relearn_figures
from lightning_forget.plugin.classes import remaining_classes
from lightning_forget.plugin.few_shot import dataset_labels, few_shot_subset

log = logging.getLogger(__name__)


@dataclass
class EvidencePlan:
    """The evidence settings a run's data allows, and what it skips.

    Attributes:
        probe: the probe's settings (``per_class`` lowered where the data is short), or ``None``.
        relearn: the relearn's settings (likewise), or ``None``.
        skipped: figure to why it will not be measured (the report says so).
        notes: the settings that were lowered, one sentence each (the report keeps them).
    """

    probe: ProbeSettings | None
    relearn: RelearnSettings | None
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def split_verdict_images(
    data: ClassificationData, per_class: int, seed: int
) -> tuple[ClassificationData, Subset | None, str]:
    """The fit's verdict: ``per_class`` test images of every class, out of the test set the models are measured on.

    Images the original never trained on judge the fit as the test set will: a held-back shot, like any training
    image, carries the original's membership (an overfit original loses accuracy on it while its test accuracy holds),
    and one per class is too few to find most forgettings (docs/results.md, "the verdict on a validation split").
    ``per_class`` is lowered to half of the smallest class's test images, and none are taken (the fit then judges a
    held-back shot) where that is 0.

    Returns:
        The data with the rest of the test set, the verdict's images (``None`` when none are taken), and a note of
        what was lowered or skipped (empty when nothing was).
    """
    if not per_class:
        return data, None, ""
    labels = dataset_labels(data.test)
    counts = {c: int((labels == c).sum()) for c in sorted(set(labels.tolist()))}
    least = min(counts, key=counts.__getitem__)
    taken, note = min(per_class, counts[least] // 2), ""
    if taken < per_class:
        why = f"class {_label(data, least)} has only {counts[least]} test images and half at most are taken"
        instead = f"lowered to {taken}" if taken else "skipped, the fit's verdict judges a held-back shot instead"
        note = f"forget.verdict_per_class={per_class} {instead}: {why}."
        log.warning(note)
    if not taken:
        return data, None, note
    drawn = few_shot_subset(data.test, taken, seed=seed)
    chosen = set(drawn.indices)
    rest = Subset(data.test, [i for i in range(len(data.test)) if i not in chosen])
    return dataclasses.replace(data, test=rest), drawn, note


def check_evaluable(data: ClassificationData, forget_classes: Sequence[int]) -> None:
    """Refuse classes whose forgetting no evaluation can measure.

    Raises:
        SettingError: if a forgotten class has no training or no test images, or the test set has none of the
            remaining classes.
    """
    train, test = dataset_labels(data.train_eval), dataset_labels(data.test)
    for c in forget_classes:
        if not bool((train == c).any()):
            raise SettingError(
                f"forget.classes: class {_label(data, c)} has no training images: the original never learns it, "
                "so there is nothing to forget. Forget another class."
            )
        if not bool((test == c).any()):
            raise SettingError(
                f"forget.classes: class {_label(data, c)} has no test images: its forgetting cannot be measured. "
                "Add test images of it, or forget another class."
            )
    kept = remaining_classes(list(forget_classes), data.num_classes)
    if not bool(torch.isin(test, torch.tensor(kept)).any()):
        raise SettingError(
            "the test set has no images of the classes that are not forgotten: what the model keeps cannot be "
            "measured. Add test images of them."
        )


def check_probe_layer(model: nn.Module, data: ClassificationData, probe: ProbeSettings) -> None:
    """Refuse a probe that cannot read ``model``'s penultimate features (tried on one training image).

    Raises:
        SettingError: if the final linear layer cannot be found, or does not run once per forward pass.
    """
    try:
        penultimate_features(model, Subset(data.train_eval, [0]), data.num_classes, layer=probe.layer)
    except (ValueError, RuntimeError) as err:
        message = str(err).replace("layer=", "eval.probe.layer=").rstrip(".")
        prefix = "" if message.startswith("eval.probe") else "eval.probe: "
        raise SettingError(f"{prefix}{message}; or turn the probe off: eval.probe=null.") from None


def plan_evidence(
    data: ClassificationData,
    forget_classes: Sequence[int],
    few_shot: Subset,
    model: nn.Module,
    probe: ProbeSettings | None,
    relearn: RelearnSettings | None,
) -> EvidencePlan:
    """The evidence the run can measure (see the module's description); checked before any training.

    Args:
        data: the dataset; the probe and relearn sets are drawn from ``data.train_eval``.
        forget_classes: the classes to forget.
        few_shot: the methods' samples, which those sets never use.
        model: a fresh network (left as it is), for the probe's layer.
        probe: the probe's settings, or ``None``.
        relearn: the relearn's settings, or ``None``.

    Raises:
        SettingError: for what no evaluation can do without (see :func:`check_evaluable`, :func:`check_probe_layer`).
    """
    check_evaluable(data, forget_classes)
    if probe is not None:
        check_probe_layer(model, data, probe)
    labels, drawn = dataset_labels(data.train_eval), dataset_labels(few_shot)
    left = {c: int((labels == c).sum() - (drawn == c).sum()) for c in sorted(set(labels.tolist()))}
    least = min(left, key=left.__getitem__)
    plan = EvidencePlan(probe, relearn)
    absent = [c for c in range(data.num_classes) if c not in left]
    if probe is not None and absent:  # the probe is fitted on every class
        reason = f"class {_label(data, absent[0])} has no training images, and the probe is fitted on every class"
        plan.probe = None
        plan.skipped.update(dict.fromkeys(PROBE_FIGURES, reason))
        log.warning("eval.probe skipped: %s.", reason)
    evidence = [("probe", plan.probe, PROBE_FIGURES)]
    if relearn is not None:
        evidence.append(("relearn", relearn, (*relearn_figures(relearn.epochs), *RETAIN_ATTACK_FIGURES)))
    for name, settings, figures in evidence:
        if settings is None or settings.per_class <= left[least]:
            continue
        shots = int((drawn == least).sum())
        if left[least] == 0:
            setattr(plan, name, None)
            reason = (
                f"class {_label(data, least)} has no training image left outside the few-shot set (forget.shots="
                f"{shots} takes all of them): lower forget.shots to measure it"
            )
            plan.skipped.update(dict.fromkeys(figures, reason))
            log.warning("eval.%s skipped: %s.", name, reason)
        else:
            setattr(plan, name, dataclasses.replace(settings, per_class=left[least]))
            plan.notes.append(
                f"eval.{name}.per_class={settings.per_class} lowered to {left[least]}: class {_label(data, least)} "
                f"has only {left[least]} training images besides its {shots} few-shot ones."
            )
            log.warning(plan.notes[-1])
    return plan


def _label(data: ClassificationData, c: int) -> str:
    return f"{c} ({data.class_names[c]})" if c < len(data.class_names) else str(c)


__all__ = ["EvidencePlan", "check_evaluable", "check_probe_layer", "plan_evidence"]

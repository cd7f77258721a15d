"""A model's full evaluation: accuracy on the forgotten and remaining classes, membership inference, evidence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lightning_forget.evaluation.evidence import (
    ProbeSettings,
    RelearnSettings,
    check_evidence_settings,
    features_and_logits,
    integrity_evidence,
)
from lightning_forget.evaluation.measurable import NotMeasured, add_figures, unmeasured
from lightning_forget.evaluation.metrics import membership_inference, predict_logits
from lightning_forget.plugin.accuracy import subset_accuracy
from lightning_forget.plugin.classes import check_forget_classes
from lightning_forget.plugin.few_shot import dataset_labels


def evaluate_forgetting(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    max_members: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    original: nn.Module | None = None,
    probe: ProbeSettings | None = None,
    relearn: RelearnSettings | None = None,
    exclude_indices: Sequence[int] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Forget/retain accuracy, forget-train accuracy, MIA and per-class accuracy of ``model``.

    Optionally also the integrity evidence of :mod:`lightning_forget.evaluation.evidence`: whether the
    forgotten classes left the features or are only hidden by the output layer.

    Args:
        model: classifier returning logits.
        train: training samples with evaluation transforms (no augmentation).
        test: test samples.
        forget_classes: the forgotten classes.
        num_classes: number of classes.
        max_members: the attack's members are at most this many remaining-class training
            samples, drawn with ``seed`` (default: as many as there are test samples).
        seed: seed of that draw.
        batch_size: evaluation batch size.
        device: where to run the model.
        original: the model before forgetting; adds ``distance_l2`` and ``changed_fraction``
            (see :func:`~lightning_forget.evaluation.evidence.weight_distance`) and gives the relearn target.
        probe: adds ``probe_forget_acc`` and ``probe_retain_acc`` (see
            :func:`~lightning_forget.evaluation.evidence.linear_probe`); ``None`` skips the probe.
        relearn: adds ``relearn_acc_1``, ``relearn_acc_<epochs>``, ``relearn_steps``,
            ``relearn_budget`` and ``relearn_target`` (see :func:`~lightning_forget.evaluation.evidence.relearn`);
            ``None`` skips relearning.
        exclude_indices: indices of ``train`` that the probe and relearn sets never use: the
            few-shot samples the forgetting saw.
        progress: show progress bars.

    Returns:
        ``forget_acc``, ``retain_acc``, ``forget_train_acc``, ``mia`` (fractions in [0, 1]) and
        ``per_class_acc`` (a list, one accuracy per class), then the evidence figures asked for. A figure
        that cannot be measured (a diverged model's ``mia``, a relearn whose original gets none of the
        forgotten classes right) is ``None``, and ``not_measured`` maps it to why.

    Raises:
        ValueError: for invalid classes, ``max_members < 1``, evidence settings of the wrong
            type, or ``relearn`` without a target nor ``original``.
    """
    forgotten = torch.tensor(check_forget_classes(forget_classes, num_classes))
    if max_members is not None and max_members < 1:
        raise ValueError(f"max_members must be >= 1 or None, got {max_members}.")
    check_evidence_settings(probe, relearn, original)
    desc = "Evaluating on test" if progress else ""
    test_features = None
    if probe is None:
        test_logits, test_targets = predict_logits(model, test, batch_size, device, desc=desc)
    else:  # one forward pass over the test set gives the probe's features too
        features, test_logits, test_targets = features_and_logits(
            model, test, num_classes, layer=probe.layer, batch_size=batch_size, device=device, desc=desc
        )
        test_features = (features, test_targets)
    train_targets = dataset_labels(train)
    is_forget_train = torch.isin(train_targets, forgotten)
    retain_idx = (~is_forget_train).nonzero().squeeze(1)
    n_members = min(len(retain_idx), len(test) if max_members is None else max_members)
    generator = torch.Generator().manual_seed(seed)
    members = retain_idx[torch.randperm(len(retain_idx), generator=generator)[:n_members]]
    forget_idx = is_forget_train.nonzero().squeeze(1)
    member_logits, _ = predict_logits(model, Subset(train, members.tolist()), batch_size, device)
    forget_logits, forget_targets = predict_logits(
        model,
        Subset(train, forget_idx.tolist()),
        batch_size,
        device,
        desc="Evaluating on forgotten train" if progress else "",
    )
    kept = [c for c in range(num_classes) if c not in set(forgotten.tolist())]
    preds = test_logits.argmax(-1)
    per_class = [
        float((preds[test_targets == c] == c).float().mean()) if (test_targets == c).any() else float("nan")
        for c in range(num_classes)
    ]
    figures: dict[str, Any] = {
        "forget_acc": subset_accuracy(test_logits, test_targets, num_classes, forgotten.tolist()),
        "retain_acc": subset_accuracy(test_logits, test_targets, num_classes, kept),
        "forget_train_acc": subset_accuracy(forget_logits, forget_targets, num_classes, forgotten.tolist()),
    }
    try:
        figures["mia"] = membership_inference(member_logits, test_logits, forget_logits)
    except NotMeasured as err:
        add_figures(figures, unmeasured(["mia"], str(err)))
    figures["per_class_acc"] = per_class
    evidence = integrity_evidence(
        model,
        train,
        test,
        forgotten.tolist(),
        num_classes,
        original=original,
        probe=probe,
        relearn_settings=relearn,
        exclude_indices=exclude_indices,
        batch_size=batch_size,
        device=device,
        progress=progress,
        test_features=test_features,
    )
    add_figures(figures, evidence)
    return figures

"""Peers at their best: every peer's own knobs searched on a validation split, never on the test set.

A peer run only at the settings its paper published for another network and data size may lose for that
reason alone. :func:`tune` runs every point of the peer's grid (its published setting among them) on the
forgetting task, scores each on validation images held apart from training and testing, and keeps the point
closest to the retrained model there: the smallest sum of the gaps in forget and in retain accuracy (the
"average gap" to retraining by which SalUn, Fan et al. ICLR 2024, compares methods, on its two accuracy terms).
Ties go to the earlier point of the grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
from torch import nn
from torch.utils.data import Dataset, Subset

from lightning_forget.app.data import ClassificationData
from lightning_forget.evaluation.evidence import draw_per_class
from lightning_forget.evaluation.metrics import predict_logits
from lightning_forget.methods import ForgettingMethod, ForgettingTask, Outcome, TrainerFactory
from lightning_forget.plugin.accuracy import subset_accuracy
from lightning_forget.plugin.classes import remaining_classes

log = logging.getLogger("bench")
LRS = (1e-4, 1e-3, 1e-2, 1e-1)
TUNABLE = ("delete", "gradient_ascent", "random_label", "salun", "ssd")  # the few-shot peers (see grids)


def grids(ours: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each tunable peer's grid, as ``KEY=VALUE[:KEY=VALUE]`` overrides of its ``conf/method`` settings.

    The full-data regimes (``ssd_full``, ``salun_full``) stay at their published settings: one point of their grid
    costs a pass over all training data (``salun_full``: ten epochs, as long as retraining).

    Args:
        ours: the recipe of ``conf/method/relevance.yaml``: DELETE also runs with its optimizer and learning rate,
            the like-for-like test of the relevance mask (same target, no mask).
    """
    lr_epochs = [f"recipe.lr={lr}:recipe.epochs={epochs}" for lr in LRS for epochs in (5, 10)]
    return {
        "delete": [f"recipe.lr={lr}" for lr in LRS] + [f"recipe.optimizer={ours['optimizer']}:recipe.lr={ours['lr']}"],
        "gradient_ascent": lr_epochs,
        "random_label": lr_epochs[2:],  # from 1e-3: 1e-4 for 10 epochs of SGD barely moves a trained network
        "salun": lr_epochs[2:],
        "ssd": [f"alpha={alpha}" for alpha in (1, 3, 10, 30, 100, 300)],
    }


def validation_split(data: ClassificationData, per_class: int, seed: int) -> Subset:
    """``per_class`` images of every class from the training folder that the models never train on.

    Raises:
        ValueError: if every training image is in use (``--train-per-class 0``) or too few are left.
    """
    kept = getattr(data.train_eval, "indices", None)
    if kept is None:
        raise ValueError(
            "Tuning needs training images that no model trains on: pass --train-per-class below the folder's "
            "images per class, or --tune-per-class 0 to run the peers at their published settings only."
        )
    return draw_per_class(data.train_eval.dataset, per_class, seed, exclude=kept)


def accuracies(model: nn.Module, dataset: Dataset, forget: Sequence[int], num_classes: int, device: str) -> dict:
    """Forget and retain accuracy of ``model`` on ``dataset``."""
    logits, targets = predict_logits(model, dataset, device=device)
    return {
        "forget_acc": subset_accuracy(logits, targets, num_classes, list(forget)),
        "retain_acc": subset_accuracy(logits, targets, num_classes, remaining_classes(list(forget), num_classes)),
    }


def tune(
    peer: str,
    points: Sequence[str],
    load: Callable[[str], ForgettingMethod],
    task: ForgettingTask,
    make_trainer: TrainerFactory,
    validation: Dataset,
    target: Mapping[str, float],
    *,
    seed: int,
    device: str,
) -> tuple[Outcome, dict[str, Any]]:
    """Run ``peer`` at every grid point and keep the one closest to ``target`` (retrain's validation figures).

    Args:
        peer: the method's name in ``conf/method``.
        points: its grid (see :func:`grids`).
        load: a ``NAME:KEY=VALUE...`` spec to its method.
        task: the forgetting task.
        make_trainer: the Trainer factory of the fits.
        validation: the images the points are scored on.
        target: ``forget_acc`` and ``retain_acc`` of the retrained model on ``validation``.
        seed: every point starts from this global seed.
        device: where the models are scored.

    Returns:
        The chosen point's outcome, and the record of the search (every point's figures, the choice, the seconds).
    """
    started = time.perf_counter()
    rows, outcomes = [], []
    for point in points:
        L.seed_everything(seed, verbose=False)
        outcome = load(f"{peer}:{point}").run(task, make_trainer)
        figures = accuracies(outcome.model, validation, task.forgotten_so_far, task.num_classes, device)
        gap = sum(abs(figures[k] - target[k]) for k in ("forget_acc", "retain_acc"))
        rows.append({"point": point, **figures, "gap": gap, "seconds": outcome.seconds})
        outcomes.append(outcome)
    best = min(range(len(rows)), key=lambda i: rows[i]["gap"])
    log.info("Tuned %s: %s (validation gap to retrain %.4f)", peer, rows[best]["point"], rows[best]["gap"])
    record = {"chosen": rows[best]["point"], "grid": rows, "seconds": time.perf_counter() - started}
    return outcomes[best], record

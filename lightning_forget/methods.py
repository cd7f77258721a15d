"""Ways to obtain a model without the forgotten classes, and the recipe that trains from scratch."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_forget.callback import ClassForgetting
from lightning_forget.classes import check_forget_classes, remaining_classes
from lightning_forget.data import dataset_labels
from lightning_forget.module import ClassifierModule, ForgettingModule, check_optimizer_settings

METHODS: tuple[str, ...] = ("relevance", "finetune", "retrain_few", "retrain")

# Called with ``max_epochs=`` and ``callbacks=``; returns a configured Trainer.
TrainerFactory = Callable[..., pl.Trainer]


@dataclass
class Recipe:
    """How long and how a model is trained.

    Attributes:
        epochs: passes over the data.
        batch_size: samples per optimizer step, over all processes.
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate.
        weight_decay: weight decay.
        scheduler: ``None`` or ``cosine``.
    """

    epochs: int
    batch_size: int
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        check_optimizer_settings(self.optimizer, self.lr, self.weight_decay, self.scheduler)

    def module_kwargs(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "scheduler": self.scheduler,
        }


@dataclass
class Outcome:
    """A produced model, the wall time it took and, for masked methods, its masks."""

    model: nn.Module
    seconds: float
    masks: dict[str, Tensor] = field(default_factory=dict)
    trainer: pl.Trainer | None = None


def fit_timed(trainer: pl.Trainer, module: pl.LightningModule, dataset: Dataset, batch_size: int) -> float:
    """Fit ``module`` on ``dataset`` and return the wall seconds; the batch is split over processes."""
    per_process = max(1, batch_size // trainer.world_size)
    loader = DataLoader(dataset, batch_size=per_process, shuffle=True, drop_last=len(dataset) > per_process)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def train_classifier(
    model: nn.Module, dataset: Dataset, num_classes: int, recipe: Recipe, make_trainer: TrainerFactory
) -> Outcome:
    """Train ``model`` in place with cross-entropy on ``dataset``."""
    trainer = make_trainer(max_epochs=recipe.epochs)
    seconds = fit_timed(
        trainer, ClassifierModule(model, num_classes, **recipe.module_kwargs()), dataset, recipe.batch_size
    )
    return Outcome(model, seconds, trainer=trainer)


def run_method(
    method: str,
    *,
    original: nn.Module,
    make_model: Callable[[], nn.Module],
    train_data: Dataset,
    few_shot: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    forget_recipe: Recipe,
    train_recipe: Recipe,
    make_trainer: TrainerFactory,
    relevance: dict[str, Any] | None = None,
    objective: dict[str, Any] | None = None,
) -> Outcome:
    """Produce a model that no longer knows ``forget_classes``.

    Args:
        method: ``relevance`` (masked forgetting on the few-shot data), ``finetune`` (the same
            objective on every parameter), ``retrain_few`` (from scratch on the remaining-class
            few-shot samples) or ``retrain`` (from scratch on all remaining-class training data).
        original: the trained model; never modified.
        make_model: builds a freshly initialised model of the same architecture.
        train_data: the full training set.
        few_shot: the few samples per class available for forgetting.
        forget_classes: classes to forget.
        num_classes: number of classes.
        forget_recipe: recipe of ``relevance`` and ``finetune``.
        train_recipe: recipe of the retrain methods (the original's recipe).
        make_trainer: builds the Trainer of each fit.
        relevance: keyword arguments of :class:`ClassForgetting`; ``finetune`` keeps only
            their BatchNorm setting and lets every entry change.
        objective: keyword arguments of the forgetting objective.

    Raises:
        ValueError: for an unknown method or invalid classes.
    """
    forget_classes = check_forget_classes(forget_classes, num_classes)
    check_method(method)
    if method in ("retrain", "retrain_few"):
        source = train_data if method == "retrain" else few_shot
        kept = Subset(source, _indices_of(source, remaining_classes(forget_classes, num_classes)))
        return train_classifier(make_model(), kept, num_classes, train_recipe, make_trainer)

    model = copy.deepcopy(original)
    module = ForgettingModule(model, forget_classes, num_classes, **(objective or {}), **forget_recipe.module_kwargs())
    callback = forgetting_callback(method, forget_classes, relevance)
    trainer = make_trainer(max_epochs=forget_recipe.epochs, callbacks=[callback])
    seconds = fit_timed(trainer, module, few_shot, forget_recipe.batch_size)
    return Outcome(model, seconds, masks=callback.masks if method == "relevance" else {}, trainer=trainer)


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of ``METHODS``."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {METHODS}.")


def forgetting_callback(
    method: str, forget_classes: Sequence[int], relevance: dict[str, Any] | None
) -> ClassForgetting:
    """The callback of ``relevance``; for ``finetune`` one that lets every entry change (BatchNorm alike)."""
    options = dict(relevance or {})
    if method == "finetune":
        options.update(fraction=1.0, score="random")
    return ClassForgetting(forget_classes, **options)


def _indices_of(dataset: Dataset, classes: Sequence[int]) -> list[int]:
    labels = dataset_labels(dataset)
    keep = set(classes)
    return [i for i, y in enumerate(labels.tolist()) if y in keep]

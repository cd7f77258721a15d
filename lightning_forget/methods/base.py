"""What every way of forgetting shares: the task, the recipe, the outcome and the interface."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_forget.plugin.classes import check_already_forgotten, check_forget_classes, remaining_classes
from lightning_forget.plugin.few_shot import dataset_labels
from lightning_forget.plugin.module import ClassifierModule, check_optimizer_settings
from lightning_forget.plugin.verdict import Verdict

# Called with ``max_epochs=`` and optionally ``callbacks=``; returns a configured Trainer.
TrainerFactory = Callable[..., pl.Trainer]
DataRegime = Literal["few_shot", "full"]
DATA_REGIMES: tuple[str, ...] = ("few_shot", "full")


@dataclass
class Recipe:
    """How long and how a model is trained.

    Attributes:
        epochs: passes over the data (for methods with a stop rule: the cap).
        batch_size: samples per optimizer step, over all processes.
        optimizer: ``sgd`` (momentum 0.9, Nesterov), ``adam`` or ``adamw``.
        lr: learning rate.
        weight_decay: weight decay.
        scheduler: ``None``, ``cosine`` (per epoch) or ``onecycle`` (per step, ``lr`` as the peak).

    Raises:
        ValueError: for epochs or batch_size < 1, or invalid optimizer settings.
    """

    epochs: int
    batch_size: int
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        check_optimizer_settings(self.optimizer, self.lr, self.weight_decay, self.scheduler)

    def module_kwargs(self) -> dict[str, Any]:
        """The optimizer settings, as :class:`~lightning_forget.ClassifierModule` takes them."""
        keys = ("optimizer", "lr", "weight_decay", "scheduler")
        return {k: getattr(self, k) for k in keys}


@dataclass
class ForgettingTask:
    """What a method is given: the trained model, the data it may use, the classes to forget.

    Attributes:
        original: the trained model; methods never modify it.
        make_model: builds a freshly initialised model of the same architecture.
        train_data: the full training set (the ``full`` data regime, and retraining).
        few_shot: the few samples per class still available (the ``few_shot`` regime).
        forget_classes: the classes to forget.
        num_classes: number of classes.
        train_recipe: the original's recipe, used to retrain.
        already_forgotten: classes an earlier request forgot (the original comes from a forgetting); every
            method keeps them forgotten: they are forgotten classes for its objective and its data
            (:meth:`of_classes`), and retraining leaves them out too.
        few_shot_eval: the samples of ``few_shot`` in the same order, with evaluation transforms (no random
            augmentation): a method that holds some back to judge itself judges them as a test set is seen.
        verdict_data: images of every class that no method trains on (a validation split, with evaluation
            transforms): a method that judges itself judges them, and trains on every few-shot sample.
    """

    original: nn.Module
    make_model: Callable[[], nn.Module]
    train_data: Dataset
    few_shot: Dataset
    forget_classes: list[int]
    num_classes: int
    train_recipe: Recipe
    already_forgotten: list[int] = field(default_factory=list)
    few_shot_eval: Dataset | None = None
    verdict_data: Dataset | None = None

    def __post_init__(self) -> None:
        self.forget_classes = check_forget_classes(self.forget_classes, self.num_classes)
        self.already_forgotten = check_already_forgotten(self.already_forgotten, self.forget_classes, self.num_classes)
        if self.few_shot_eval is not None and len(self.few_shot_eval) != len(self.few_shot):
            raise ValueError(
                f"few_shot_eval has {len(self.few_shot_eval)} samples and few_shot {len(self.few_shot)}: pass the same "
                "samples with evaluation transforms (e.g. Subset(train_eval, few_shot.indices))."
            )

    @property
    def forgotten_so_far(self) -> list[int]:
        """``forget_classes`` and ``already_forgotten``: the classes the produced model must not know."""
        return sorted([*self.forget_classes, *self.already_forgotten])

    def data(self, regime: DataRegime) -> Dataset:
        """The samples of a data regime: the few-shot set or the whole training set."""
        return self.few_shot if regime == "few_shot" else self.train_data

    def of_classes(self, dataset: Dataset, forgotten: bool) -> Subset:
        """The samples of ``dataset`` from the forgotten classes (earlier requests' included), or from the others."""
        so_far = self.forgotten_so_far
        keep = set(so_far if forgotten else remaining_classes(so_far, self.num_classes))
        return Subset(dataset, [i for i, y in enumerate(dataset_labels(dataset).tolist()) if y in keep])


@dataclass
class Outcome:
    """A produced model and how it was produced.

    Attributes:
        model: the model without the forgotten classes.
        seconds: wall time to produce it, scoring included.
        samples: training samples the method used.
        data: the data regime (``few_shot`` or ``full``).
        masks: for masked methods, where the model was allowed to change.
        verdict: the method's own check on its samples, where it makes one.
        trainer: the last Trainer used (``None`` for training-free methods).
    """

    model: nn.Module
    seconds: float
    samples: int
    data: str
    masks: dict[str, Tensor] = field(default_factory=dict)
    verdict: Verdict | None = None
    trainer: pl.Trainer | None = None


class ForgettingMethod(ABC):
    """A way to obtain, from a trained model, a model that no longer knows some classes.

    Subclasses take their hyperparameters in ``__init__`` (one yaml per method in the app's
    ``conf/method/``), validate them there, and implement :meth:`run`.

    Attributes:
        data: the data regime: ``few_shot`` (the few samples per class) or ``full`` (all of the
            training data, the regime some published methods assume).
        cacheable: the model depends only on the task, the seed and the trainer settings, and
            is worth keeping on disk (retraining).
    """

    data: DataRegime = "few_shot"
    cacheable: bool = False

    @abstractmethod
    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        """Produce the model; ``task.original`` is left unchanged."""

    def check_model(self, model: nn.Module, num_classes: int) -> None:
        """Refuse, before any work, a model this method cannot forget in (``ValueError`` naming the fix)."""
        del model, num_classes  # a method that does not override this takes every classifier

    def _check_data(self, data: str) -> None:
        if data not in DATA_REGIMES:
            raise ValueError(f"data must be one of {DATA_REGIMES}, got {data!r}.")
        self.data = data  # type: ignore[assignment]


def check_recipe(recipe: object) -> Recipe:
    """Return ``recipe``; raise ``TypeError`` unless it is a :class:`Recipe`."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}: build one, Recipe(epochs=..., ...).")
    return recipe


def fit_timed(trainer: pl.Trainer, module: pl.LightningModule, dataset: Dataset, batch_size: int) -> float:
    """Fit ``module`` on ``dataset`` (shuffled) and return the wall seconds; the batch is split over processes."""
    per_process = max(1, batch_size // trainer.world_size)
    loader = DataLoader(dataset, batch_size=per_process, shuffle=True, drop_last=len(dataset) > per_process)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def train_classifier(
    model: nn.Module, dataset: Dataset, num_classes: int, recipe: Recipe, make_trainer: TrainerFactory
) -> float:
    """Train ``model`` in place with cross-entropy on ``dataset``; return the wall seconds."""
    module = ClassifierModule(model, num_classes, **recipe.module_kwargs())
    return fit_timed(make_trainer(max_epochs=recipe.epochs), module, dataset, recipe.batch_size)


def check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")


class LossModule(ClassifierModule):
    """A classifier trained with a method's own loss of ``(module, inputs, targets)``.

    Args:
        model: the classifier; trained in place.
        num_classes: number of classes.
        loss: ``(module, inputs, targets) -> loss``.
        **optimizer: optimizer settings, as for :class:`~lightning_forget.ClassifierModule`.
    """

    def __init__(
        self, model: nn.Module, num_classes: int, loss: Callable[[nn.Module, Tensor, Tensor], Tensor], **optimizer: Any
    ) -> None:
        super().__init__(model, num_classes, **optimizer)
        self.loss = loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(self, batch[0], batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

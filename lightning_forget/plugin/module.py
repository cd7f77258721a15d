"""LightningModules: a plain classifier, and the forgetting wrapper around a trained one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_forget.plugin.accuracy import SubsetAccuracy
from lightning_forget.plugin.callback import ClassForgetting
from lightning_forget.plugin.classes import check_forget_classes

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
Optimizer = Literal["sgd", "adam", "adamw"]
SCHEDULERS: tuple[str | None, ...] = (None, "cosine", "onecycle")
Scheduler = Literal["cosine", "onecycle"]


def check_optimizer_settings(optimizer: str, lr: float, weight_decay: float, scheduler: str | None) -> None:
    """Raise ``ValueError`` for an unknown optimizer or scheduler, ``lr <= 0`` or ``weight_decay < 0``."""
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # True would be a learning rate of 1
            raise ValueError(f"{name} must be a number, got {value!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}: choose one of {OPTIMIZERS}.")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}: use one of {SCHEDULERS}.")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}.")


class ClassifierModule(pl.LightningModule):
    """Trains ``model`` with cross-entropy; validation and test log accuracy per class subset.

    With ``forget_classes`` set, ``val/forget_acc`` and ``val/retain_acc`` (``test/...`` likewise)
    are micro accuracies over the samples of the forgotten and of the remaining classes.

    Args:
        model: a classifier returning logits (an ``nn.Module`` or a ``LightningModule``).
        num_classes: number of classes.
        forget_classes: classes reported apart in validation and test; may be empty.
        optimizer: ``sgd`` (with momentum 0.9, nesterov), ``adam`` or ``adamw``.
        lr: learning rate.
        weight_decay: weight decay.
        scheduler: ``None``, ``cosine`` (annealed over ``trainer.max_epochs``) or ``onecycle``
            (``torch.optim.lr_scheduler.OneCycleLR`` with its defaults and ``lr`` as the peak,
            stepped every batch over the fit's estimated steps).

    Raises:
        ValueError: for an unknown optimizer or scheduler, ``lr <= 0``, ``weight_decay < 0``,
            or invalid ``forget_classes``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: Sequence[int] = (),
        optimizer: Optimizer = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_settings(optimizer, lr, weight_decay, scheduler)
        forgotten = check_forget_classes(forget_classes, num_classes) if forget_classes else []
        self.model = model
        self.num_classes = num_classes
        self.forget_classes = forgotten
        self.save_hyperparameters(
            {
                "num_classes": num_classes,
                "forget_classes": forgotten,
                "optimizer": optimizer,
                "lr": lr,
                "weight_decay": weight_decay,
                "scheduler": scheduler,
            }
        )
        kept = [c for c in range(num_classes) if c not in forgotten]
        stages = ("val", "test")
        self.accuracy = nn.ModuleDict({s: SubsetAccuracy(num_classes, range(num_classes)) for s in stages})
        self.forget_accuracy = nn.ModuleDict({s: SubsetAccuracy(num_classes, forgotten) for s in stages if forgotten})
        self.retain_accuracy = nn.ModuleDict({s: SubsetAccuracy(num_classes, kept) for s in stages if forgotten})

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: Sequence[Tensor]) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        metrics = {"acc": self.accuracy[stage]}
        if self.forget_classes:
            metrics.update(forget_acc=self.forget_accuracy[stage], retain_acc=self.retain_accuracy[stage])
        for name, metric in metrics.items():
            metric.update(logits, y)
            self.log(f"{stage}/{name}", metric, prog_bar=name != "acc")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            optimizer = cls(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return optimizer
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        # Warm-up then annealing within one fit (Smith & Topin 2018): the short schedules of fast CIFAR recipes.
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ForgettingModule(ClassifierModule):
    """A plain classifier ready to forget ``forget_classes`` from a few samples per class.

    The forgetting is done by the :class:`~lightning_forget.ClassForgetting` callback (scoring,
    masks, objective, stop rule and verdict); this module brings the model, the optimizer
    recipe that forgets well (Adam, lr 5e-3) and the forgotten/remaining accuracies of
    validation and test. When the trainer has no ``ClassForgetting`` callback, the module adds
    one with the default settings, so ``Trainer().fit(ForgettingModule(...), loader)`` forgets.

    Args:
        model: the trained classifier; it is trained in place.
        forget_classes: class indices to forget.
        num_classes: number of classes.
        optimizer, lr, weight_decay, scheduler: as for :class:`ClassifierModule`.

    Raises:
        ValueError: for invalid classes or optimizer settings.
    """

    def __init__(
        self,
        model: nn.Module,
        forget_classes: Sequence[int],
        num_classes: int,
        optimizer: Optimizer = "adam",
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        scheduler: Scheduler | None = None,
    ) -> None:
        forget_classes = check_forget_classes(forget_classes, num_classes)
        super().__init__(model, num_classes, forget_classes, optimizer, lr, weight_decay, scheduler)

    def configure_callbacks(self) -> list[pl.Callback]:
        if any(isinstance(c, ClassForgetting) for c in self.trainer.callbacks):
            return []
        return [ClassForgetting(self.forget_classes)]

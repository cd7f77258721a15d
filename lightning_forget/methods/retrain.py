"""Retraining from scratch without the forgotten classes: the gold standard, and its few-shot floor."""

from __future__ import annotations

from lightning_forget.methods.base import (
    DataRegime,
    ForgettingMethod,
    ForgettingTask,
    Outcome,
    TrainerFactory,
    train_classifier,
)


class Retrain(ForgettingMethod):
    """A fresh model trained on the remaining classes' samples with the original's recipe.

    With ``data="full"`` (``retrain``) it sees every remaining-class training sample: what
    forgetting should approach. With ``data="few_shot"`` (``retrain_few``) it sees only the
    few samples per class that the forgetting methods get.

    Args:
        data: ``full`` or ``few_shot``.

    Raises:
        ValueError: for an unknown data regime.
    """

    cacheable = True

    def __init__(self, data: DataRegime = "full") -> None:
        self._check_data(data)

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        kept = task.of_classes(task.data(self.data), forgotten=False)
        model = task.make_model()
        seconds = train_classifier(model, kept, task.num_classes, task.train_recipe, make_trainer)
        return Outcome(model, seconds, len(kept), self.data)

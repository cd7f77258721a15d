"""Gradient ascent: raise the loss of the forgotten classes' samples."""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_forget.methods.base import (
    DataRegime,
    ForgettingMethod,
    ForgettingTask,
    LossModule,
    Outcome,
    Recipe,
    TrainerFactory,
    check_recipe,
    fit_timed,
)

# As published in the SalUn benchmark (Fan et al., ICLR 2024): SGD, lr 1e-4, 5 epochs.
PUBLISHED = Recipe(epochs=5, batch_size=128, optimizer="sgd", lr=1e-4)


class GradientAscent(ForgettingMethod):
    """Gradient ascent on the forget samples (NegGrad; Thudi et al. 2022; SalUn, ICLR 2024, section 5 baseline "GA").

    Every parameter follows the gradient that *increases* cross-entropy on the forgotten
    classes' samples; no remaining-class data is used.

    Args:
        recipe: default the published one (SGD, lr 1e-4, 5 epochs; batch 128 is our choice).
        data: ``few_shot`` (default) or ``full``.

    Raises:
        ValueError: for an unknown data regime.
    """

    def __init__(self, recipe: Recipe = PUBLISHED, data: DataRegime = "few_shot") -> None:
        self._check_data(data)
        self.recipe = check_recipe(recipe)

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        model = copy.deepcopy(task.original)

        def loss(module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
            return -F.cross_entropy(module(inputs).float(), targets)

        data = task.of_classes(task.data(self.data), forgotten=True)
        module = LossModule(model, task.num_classes, loss, **self.recipe.module_kwargs())
        trainer = make_trainer(max_epochs=self.recipe.epochs)
        seconds = fit_timed(trainer, module, data, self.recipe.batch_size)
        return Outcome(model, seconds, len(data), self.data, trainer=trainer)

"""Random labels: fine-tune with the forgotten classes' samples relabelled at random, the others kept."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
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

# Our choice (no class-wise setting is published for the plain baseline): SGD, lr 0.01, 10 epochs, batch 256.
RECIPE = Recipe(epochs=10, batch_size=256, optimizer="sgd", lr=0.01)


def random_label_loss(forget_classes: Sequence[int], num_classes: int) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """Cross-entropy where every forgotten-class sample gets a random label other than its own."""
    forgotten = torch.zeros(num_classes, dtype=torch.bool)
    forgotten[list(forget_classes)] = True

    def loss(module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        shift = torch.randint(1, num_classes, targets.shape, device=targets.device)
        relabelled = torch.where(forgotten.to(targets.device)[targets], (targets + shift) % num_classes, targets)
        return F.cross_entropy(module(inputs).float(), relabelled)

    return loss


class RandomLabel(ForgettingMethod):
    """Random labelling (Graves et al., "Amnesiac Machine Learning", AAAI 2021; the "RL" baseline of SalUn).

    Every parameter is fine-tuned on the forgotten classes' samples with random wrong labels
    and on the remaining classes' samples with their own labels, mixed in one shuffled loader.

    Args:
        recipe: our choice by default (SGD, lr 0.01, 10 epochs, batch 256).
        data: ``few_shot`` (default) or ``full``.

    Raises:
        ValueError: for an unknown data regime.
    """

    def __init__(self, recipe: Recipe = RECIPE, data: DataRegime = "few_shot") -> None:
        self._check_data(data)
        self.recipe = check_recipe(recipe)

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        model = copy.deepcopy(task.original)
        loss = random_label_loss(task.forgotten_so_far, task.num_classes)
        module = LossModule(model, task.num_classes, loss, **self.recipe.module_kwargs())
        data = task.data(self.data)
        trainer = make_trainer(max_epochs=self.recipe.epochs)
        seconds = fit_timed(trainer, module, data, self.recipe.batch_size)
        return Outcome(model, seconds, len(data), self.data, trainer=trainer)

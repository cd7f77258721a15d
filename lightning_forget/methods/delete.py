"""DELETE: distillation to the original's answers with the forgotten classes masked out, on forget samples only."""

from __future__ import annotations

import copy

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

# Published for CIFAR-10 / ResNet-18: SGD (momentum 0.9), lr 1e-4, 20 epochs, batch 128.
PUBLISHED = Recipe(epochs=20, batch_size=128, optimizer="sgd", lr=1e-4)


class Delete(ForgettingMethod):
    """Decoupled Distillation to Erase (Zhou et al., CVPR 2025, arXiv 2503.23751, section 3.3).

    "Mask distillation": on the forgotten classes' samples only, every parameter is trained to
    match (KL divergence) the original model's softmax after the forgotten classes' logits are
    masked to -inf, so the forgetting term and the "dark knowledge" retention term are
    optimised together without any remaining-class data. BatchNorm stays in train mode, as
    published.

    Choices where the paper is silent for our setting: with several forgotten classes, all of
    their logits are masked (the paper masks the sample's own class); the optimizer is this
    project's SGD (momentum 0.9, Nesterov).

    Args:
        recipe: optimizer and schedule; default the published one (SGD, lr 1e-4, 20 epochs,
            batch 128).
        data: ``few_shot`` (default) or ``full`` (every forgotten-class training sample).

    Raises:
        ValueError: for an unknown data regime.
    """

    def __init__(self, recipe: Recipe = PUBLISHED, data: DataRegime = "few_shot") -> None:
        self._check_data(data)
        self.recipe = check_recipe(recipe)

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        model = copy.deepcopy(task.original)
        teacher = copy.deepcopy(task.original).eval().requires_grad_(False)
        forgotten = torch.zeros(task.num_classes, dtype=torch.bool)
        forgotten[task.forgotten_so_far] = True

        def loss(module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
            with torch.no_grad():
                target_logits = teacher.to(inputs.device)(inputs).float()
            target = F.softmax(target_logits.masked_fill(forgotten.to(inputs.device), float("-inf")), dim=-1)
            return F.kl_div(F.log_softmax(module(inputs).float(), dim=-1), target, reduction="batchmean")

        data = task.of_classes(task.data(self.data), forgotten=True)
        module = LossModule(model, task.num_classes, loss, **self.recipe.module_kwargs())
        trainer = make_trainer(max_epochs=self.recipe.epochs)
        seconds = fit_timed(trainer, module, data, self.recipe.batch_size)
        return Outcome(model, seconds, len(data), self.data, trainer=trainer)

"""SalUn: random-label fine-tuning restricted to the weights most salient to the forget loss."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

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
from lightning_forget.methods.random_label import random_label_loss
from lightning_forget.plugin.callback import ClassForgetting
from lightning_forget.plugin.masks import top_fraction_masks
from lightning_forget.plugin.relevance import eval_mode

# Published for CIFAR-10 / ResNet-18: SGD (momentum 0.9, weight decay 5e-4), lr 0.1, 10 epochs, batch 256.
PUBLISHED = Recipe(epochs=10, batch_size=256, optimizer="sgd", lr=0.1, weight_decay=5e-4)


class SalUn(ForgettingMethod):
    """Saliency Unlearning (Fan et al., ICLR 2024, arXiv 2310.12508, section 4).

    Weight saliency is the magnitude of the gradient of the forget loss (cross-entropy on the
    forgotten classes' samples, one gradient over all of them); the top ``fraction`` of entries
    (published: 50%) form the mask. The model is then fine-tuned with random labels on the
    forget samples and true labels on the remaining ones (eq. 6-7), and only masked entries
    change: the mask is enforced exactly by :class:`~lightning_forget.ClassForgetting` with
    the module's own loss, BatchNorm in train mode as published.

    Args:
        fraction: share of entries in the saliency mask; published 0.5.
        recipe: default the published one.
        data: ``few_shot`` (default) or ``full`` (all training data, the published regime).

    Raises:
        ValueError: for a fraction outside (0, 1] or an unknown data regime.
    """

    def __init__(self, fraction: float = 0.5, recipe: Recipe = PUBLISHED, data: DataRegime = "few_shot") -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
        self._check_data(data)
        self.fraction, self.recipe = fraction, check_recipe(recipe)

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        start = time.perf_counter()
        model = copy.deepcopy(task.original)
        data = task.data(self.data)
        saliency = self._saliency(model, task.of_classes(data, forgotten=True))
        masks = top_fraction_masks(saliency, self.fraction)
        module = LossModule(
            model,
            task.num_classes,
            random_label_loss(task.forgotten_so_far, task.num_classes),
            **self.recipe.module_kwargs(),
        )
        callback = ClassForgetting(
            task.forget_classes,
            already_forgotten=task.already_forgotten,
            masks={f"model.{n}": m for n, m in masks.items()},
            objective=None,
            impair=0.0,
            stop_when_forgotten=False,
            freeze_bn_stats=False,
        )
        trainer = make_trainer(max_epochs=self.recipe.epochs, callbacks=[callback])
        fit_timed(trainer, module, data, self.recipe.batch_size)
        seconds = time.perf_counter() - start
        return Outcome(model, seconds, len(data), self.data, masks=masks, verdict=callback.verdict, trainer=trainer)

    def _saliency(self, model: torch.nn.Module, forget: torch.utils.data.Dataset) -> dict[str, torch.Tensor]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        device = next(iter(params.values())).device
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        with eval_mode(model), torch.enable_grad():
            for inputs, targets in DataLoader(forget, batch_size=self.recipe.batch_size):
                inputs, targets = inputs.to(device), targets.to(device)
                loss = F.cross_entropy(model(inputs).float(), targets, reduction="sum") / len(forget)
                for g, d in zip(grads.values(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if d is not None:
                        g.add_(d)
        return {n: g.abs() for n, g in grads.items()}

"""Ours: forget on the few samples, changing only the parameter entries most relevant to the classes."""

from __future__ import annotations

import copy
from typing import Literal

import torch

from lightning_forget.methods.base import (
    DataRegime,
    ForgettingMethod,
    ForgettingTask,
    Outcome,
    Recipe,
    TrainerFactory,
    fit_timed,
)
from lightning_forget.plugin.callback import (
    DEFAULT_CRITERION,
    DEFAULT_FRACTION,
    DEFAULT_IMPAIR,
    DEFAULT_IMPAIR_KEEP,
    DEFAULT_OBJECTIVE,
    DEFAULT_PATIENCE,
    ClassForgetting,
)
from lightning_forget.plugin.features import final_linear
from lightning_forget.plugin.module import ForgettingModule
from lightning_forget.plugin.objective import ForgettingObjective
from lightning_forget.plugin.relevance import Score
from lightning_forget.plugin.verdict import ForgetCriterion

DEFAULT_RECIPE = Recipe(epochs=50, batch_size=32, optimizer="adam", lr=5e-3)
Layers = Literal["all", "head", "features"]
LAYERS: tuple[str, ...] = ("all", "head", "features")


class Relevance(ForgettingMethod):
    """Class-level forgetting from a few samples (Singh, Mazumder, Karim, ECCV 2022, arXiv 2210.10670).

    Scores every parameter entry for its relevance to the forgotten classes, lets only the top
    ``fraction`` change, and trains them with the forgetting objective until the samples say
    the classes are gone (:class:`~lightning_forget.ClassForgetting` +
    :class:`~lightning_forget.ForgettingModule`). With ``fraction=1`` it is plain fine-tuning
    with the same objective (``finetune``); with ``layers="head"`` only the final linear layer
    may change (``head_only``: the floor any forgetting of the features has to beat).

    Args:
        fraction, score, per_tensor, freeze_bn_stats, objective, criterion, stop_when_forgotten, patience,
            impair, impair_keep, holdout: as for :class:`~lightning_forget.ClassForgetting`.
        recipe: optimizer settings, batch size and the epoch cap.
        layers: ``all``, ``head`` (only the final linear layer may change) or ``features``
            (everything but the final linear layer, so that forgetting has to change the features).
        data: ``few_shot`` or ``full``.
        seed: seed of the ``random`` score.

    Raises:
        ValueError: for invalid settings.
    """

    def __init__(
        self,
        fraction: float = DEFAULT_FRACTION,
        score: Score = "ratio",
        per_tensor: bool = False,
        freeze_bn_stats: bool = True,
        objective: ForgettingObjective = DEFAULT_OBJECTIVE,
        criterion: ForgetCriterion = DEFAULT_CRITERION,
        stop_when_forgotten: bool = True,
        patience: int = DEFAULT_PATIENCE,
        impair: float = DEFAULT_IMPAIR,
        impair_keep: float = DEFAULT_IMPAIR_KEEP,
        holdout: int = 1,
        recipe: Recipe = DEFAULT_RECIPE,
        layers: Layers = "all",
        data: DataRegime = "few_shot",
        seed: int = 0,
    ) -> None:
        if layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}.")
        self._check_data(data)
        self.options = {
            "fraction": fraction,
            "score": score,
            "per_tensor": per_tensor,
            "freeze_bn_stats": freeze_bn_stats,
            "objective": objective,
            "criterion": criterion,
            "stop_when_forgotten": stop_when_forgotten,
            "patience": patience,
            "impair": impair,
            "impair_keep": impair_keep,
            "holdout": holdout,
            "seed": seed,
        }
        ClassForgetting([0], **self.options)  # validates every option now, before any work
        self.recipe = recipe
        self.layers = layers

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        model = copy.deepcopy(task.original)
        frozen = []
        if self.layers != "all":
            in_head = {id(p) for p in final_linear(model, task.num_classes)[1].parameters()}
            freeze_head = self.layers == "features"
            frozen = [p for p in model.parameters() if p.requires_grad and (id(p) in in_head) == freeze_head]
        for p in frozen:
            p.requires_grad_(False)
        module = ForgettingModule(model, task.forgotten_so_far, task.num_classes, **self.recipe.module_kwargs())
        callback = ClassForgetting(task.forget_classes, already_forgotten=task.already_forgotten, **self.options)
        data = task.data(self.data)
        trainer = make_trainer(max_epochs=self.recipe.epochs, callbacks=[callback])
        try:
            seconds = fit_timed(trainer, module, data, self.recipe.batch_size)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        masks = {n.removeprefix("model."): m for n, m in callback.masks.items()}
        masks |= {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n not in masks}
        return Outcome(model, seconds, len(data), self.data, masks=masks, verdict=callback.verdict, trainer=trainer)

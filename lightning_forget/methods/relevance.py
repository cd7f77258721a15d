"""Ours: forget on the few samples, changing only the parameter entries most relevant to the classes."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset

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
from lightning_forget.plugin.few_shot import dataset_labels
from lightning_forget.plugin.holdout import choose_held_back
from lightning_forget.plugin.module import ForgettingModule
from lightning_forget.plugin.objective import ForgettingObjective
from lightning_forget.plugin.projection import PROJECTIONS, Projection, fold_class_projection, foldable_layers
from lightning_forget.plugin.relevance import Score, eval_mode
from lightning_forget.plugin.verdict import ForgetCriterion, measure

log = logging.getLogger(__name__)

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
            impair, impair_keep, holdout: as for :class:`~lightning_forget.ClassForgetting`; the verdict judges the
            task's ``verdict_data`` where it has some (every shot is then trained on), else ``holdout`` shots.
        recipe: optimizer settings, batch size and the epoch cap.
        layers: ``all``, ``head`` (only the final linear layer may change) or ``features``
            (everything but the final linear layer, so that forgetting has to change the features).
        features_first: first a fit with the final linear layer frozen (the features must carry the
            forgetting), then the fit of ``layers="all"`` on its result, each with its own selection: a
            linear probe on the features finds the classes less often, for about twice the time and a
            little of the remaining classes' accuracy (figures in docs/results.md). The masks are the
            union of both selections; the verdict is the second fit's.
        project: ``orthogonal`` or ``full``: before the fit, each forgotten class's direction (from the
            remaining samples' mean to the class's, on the few shots) is taken out of the last BatchNorm's output
            by changing the convolution and BatchNorm before it
            (:func:`~lightning_forget.plugin.projection.fold_class_projection`; ``orthogonal`` keeps the remaining
            classes' own mean directions); those entries are added to the masks and do not train. Kept only where
            the remaining classes lose at most ``criterion.max_retain_drop`` on the samples the verdict judges, and
            the fit's verdict then allows only what is left of it. ``none``: no projection. Needs a model whose
            features come from a convolution and BatchNorm through ReLU and pooling alone (not ResNet).
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
        features_first: bool = False,
        project: Projection = "none",
        data: DataRegime = "few_shot",
        seed: int = 0,
    ) -> None:
        if layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}.")
        if not isinstance(features_first, bool):
            raise ValueError(f"features_first must be true or false, got {features_first!r}.")
        if features_first and layers != "all":
            raise ValueError(
                f"features_first fits the features, then every layer: it needs layers='all', not {layers!r}."
            )
        if project not in PROJECTIONS:
            raise ValueError(f"project must be one of {PROJECTIONS}, got {project!r}.")
        if project != "none" and layers == "head":
            raise ValueError("project changes the features, which layers='head' keeps: use layers='all'.")
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
        self.features_first = features_first
        self.project = project

    def check_model(self, model: torch.nn.Module, num_classes: int) -> None:
        if self.project != "none":
            foldable_layers(model, num_classes)

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        start = time.perf_counter()
        split = self._split(task)
        task, folded, criterion = self._projected(task, split[1])
        seconds = time.perf_counter() - start
        if not self.features_first:
            outcome = self._fit(task, make_trainer, self.layers, criterion, split)
        else:
            first = self._fit(task, make_trainer, "features", criterion, split)
            second = dataclasses.replace(task, original=first.model)
            outcome = self._fit(second, make_trainer, "all", criterion, split)
            outcome.masks = {n: m | first.masks[n] for n, m in outcome.masks.items()}
            outcome.seconds += first.seconds
        outcome.masks = {n: m | folded[n] for n, m in outcome.masks.items()} if folded else outcome.masks
        outcome.seconds += seconds
        return outcome

    def _projected(
        self, task: ForgettingTask, judged_set: Dataset | None
    ) -> tuple[ForgettingTask, dict[str, torch.Tensor], ForgetCriterion]:
        """The task with ``project`` folded into its original, the entries it changed, and the fit's criterion;
        ``judged_set``: the samples the fit's verdict judges (``None``: the few shots)."""
        criterion = self.options["criterion"]
        if self.project == "none":
            return task, {}, criterion
        shots = task.few_shot_eval if task.few_shot_eval is not None else task.few_shot
        kept = [i for i, c in enumerate(dataset_labels(shots)) if c not in task.already_forgotten]
        model = copy.deepcopy(task.original)
        folded = fold_class_projection(
            model, Subset(shots, kept), task.forget_classes, task.num_classes, self.project == "orthogonal"
        )
        judged = DataLoader(shots if judged_set is None else judged_set, batch_size=256)
        device = next(model.parameters()).device
        with eval_mode(task.original), eval_mode(model), torch.no_grad():
            before, after = (measure(m, judged, task.forgotten_so_far, device=device) for m in (task.original, model))
        cost = max(before.retain_acc - after.retain_acc, before.retain_confidence - after.retain_confidence, 0.0)
        if cost > criterion.max_retain_drop:
            log.warning(
                "project=%s not applied: it cost the remaining classes %.3f on the judged samples (more than "
                "criterion.max_retain_drop=%g).",
                self.project,
                cost,
                criterion.max_retain_drop,
            )
            return task, {}, criterion
        log.info("project=%s folded; it cost the remaining classes %.3f on the judged samples.", self.project, cost)
        remaining_budget = dataclasses.replace(criterion, max_retain_drop=criterion.max_retain_drop - cost)
        return dataclasses.replace(task, original=model), folded, remaining_budget

    def _fit(
        self,
        task: ForgettingTask,
        make_trainer: TrainerFactory,
        layers: Layers,
        criterion: ForgetCriterion,
        split: tuple[Dataset, Dataset | None],
    ) -> Outcome:
        """One fit on ``split`` (:meth:`_split`: what it trains on, what its verdict judges)."""
        model = copy.deepcopy(task.original)
        frozen = []
        if layers != "all":
            in_head = {id(p) for p in final_linear(model, task.num_classes)[1].parameters()}
            freeze_head = layers == "features"
            frozen = [p for p in model.parameters() if p.requires_grad and (id(p) in in_head) == freeze_head]
        for p in frozen:
            p.requires_grad_(False)
        module = ForgettingModule(model, task.forgotten_so_far, task.num_classes, **self.recipe.module_kwargs())
        data, judged = split
        options = self.options | {"criterion": criterion}
        if judged is not None:
            options |= {"holdout": 0, "verdict_data": DataLoader(judged, batch_size=self.recipe.batch_size)}
        callback = ClassForgetting(task.forget_classes, already_forgotten=task.already_forgotten, **options)
        trainer = make_trainer(max_epochs=self.recipe.epochs, callbacks=[callback])
        try:
            seconds = fit_timed(trainer, module, data, self.recipe.batch_size)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        masks = {n.removeprefix("model."): m for n, m in callback.masks.items()}
        masks |= {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n not in masks}
        samples = len(task.data(self.data))
        return Outcome(model, seconds, samples, self.data, masks=masks, verdict=callback.verdict, trainer=trainer)

    def _split(self, task: ForgettingTask) -> tuple[Dataset, Dataset | None]:
        """The data the fit trains on and the samples its verdict judges (``None``: the callback holds back itself)."""
        data = task.data(self.data)
        if task.verdict_data is not None:  # images no method trains on: every shot is trained on
            return data, task.verdict_data
        if self.data == "few_shot" and (held := self._held_back(task)) is not None:
            # Held back here rather than by the callback, which cannot tell randomly augmented samples apart:
            # the fit trains on the rest, the verdict judges the held-back ones without augmentation.
            return Subset(task.few_shot, held[0]), Subset(task.few_shot_eval, held[1])
        return data, None

    def _held_back(self, task: ForgettingTask) -> tuple[list[int], list[int]] | None:
        """Positions in ``task.few_shot`` to train on and to judge on: ``holdout`` of every class with more.

        ``None`` (the callback then holds back by itself, or says why it cannot) without ``few_shot_eval``, with
        ``holdout=0``, or where no class has more than ``holdout`` samples.
        """
        per_class = self.options["holdout"]
        if task.few_shot_eval is None or not per_class:
            return None
        labels = dataset_labels(task.few_shot)
        held = set(choose_held_back(labels, per_class, self.options["seed"]))
        if not held:
            return None
        return [i for i in range(len(labels)) if i not in held], sorted(held)

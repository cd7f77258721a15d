"""SSD: dampen the parameters far more important to the forgotten classes than to the data as a whole."""

from __future__ import annotations

import copy
import time

import torch
from torch.utils.data import DataLoader

from lightning_forget.methods.base import (
    DataRegime,
    ForgettingMethod,
    ForgettingTask,
    Outcome,
    TrainerFactory,
    check_positive,
)
from lightning_forget.relevance import gradient_moments


class SelectiveSynapticDampening(ForgettingMethod):
    """Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024, arXiv 2308.07707, section 3).

    Training-free. The importance of every parameter entry is the diagonal of the Fisher
    information, the mean squared gradient of the cross-entropy, on the forget samples
    (``I_f``) and on all samples (``I_d``). Entries with ``I_f > alpha * I_d`` are multiplied
    by ``min(lambda * I_d / I_f, 1)``; all others are left as they are.

    Published for ResNet-18: ``alpha`` (selection weighting) 10, ``lambda`` (dampening
    constant) 1. Our choice: importances from per-sample gradients (the exact empirical
    Fisher diagonal) with the model in eval mode, where the authors square mini-batch
    gradients.

    Args:
        alpha: selection weighting, > 0.
        dampening: the dampening constant lambda, > 0.
        data: ``few_shot`` (default: the few samples of every class) or ``full`` (all training
            data, the published regime).
        batch_size: batch size of the gradient pass.

    Raises:
        ValueError: for non-positive settings or an unknown data regime.
    """

    def __init__(
        self, alpha: float = 10.0, dampening: float = 1.0, data: DataRegime = "few_shot", batch_size: int = 64
    ) -> None:
        for name, value in (("alpha", alpha), ("dampening", dampening), ("batch_size", batch_size)):
            check_positive(name, value)
        self._check_data(data)
        self.alpha, self.dampening, self.batch_size = alpha, dampening, int(batch_size)

    @torch.no_grad()
    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        start = time.perf_counter()
        model = copy.deepcopy(task.original)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        data = task.data(self.data)
        forget_sum, retain_sum, counts = gradient_moments(
            model, params, DataLoader(data, batch_size=self.batch_size), task.forget_classes, power=2
        )
        n_forget, n_all = float(counts[0]), float(counts.sum())
        masks = {}
        for (name, p), f_sum, r_sum in zip(params.items(), forget_sum, retain_sum):
            forget_importance = f_sum / n_forget
            all_importance = (f_sum + r_sum) / n_all
            selected = forget_importance > self.alpha * all_importance
            factor = (self.dampening * all_importance / forget_importance.clamp_min(1e-30)).clamp(max=1.0)
            p.mul_(torch.where(selected, factor, torch.ones_like(factor)).to(p.dtype))
            masks[name] = selected
        return Outcome(model, time.perf_counter() - start, len(data), self.data, masks=masks)

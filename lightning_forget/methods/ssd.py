"""SSD: dampen the parameters far more important to the forgotten classes than to the data as a whole."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_forget.methods.base import (
    DataRegime,
    ForgettingMethod,
    ForgettingTask,
    Outcome,
    TrainerFactory,
    check_positive,
)
from lightning_forget.plugin.relevance import eval_mode


class SelectiveSynapticDampening(ForgettingMethod):
    """Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024, arXiv 2308.07707, section 3).

    Training-free. The importance of every parameter entry is the diagonal of the Fisher
    information, estimated as the squared gradient of the mean cross-entropy of a mini-batch,
    averaged over the mini-batches of the forget samples (``I_f``) and of all samples
    (``I_d``), with the model in eval mode. Entries with ``I_f > alpha * I_d`` are multiplied by
    ``min(lambda * I_d / I_f, 1)``; all others are left as they are.

    Published for ResNet-18 on CIFAR: ``alpha`` (selection weighting) 10, ``lambda`` (dampening
    constant) 1. The estimate is the published one on purpose: with exact per-sample Fisher
    values ``I_f <= I_d / p`` for a forget share ``p``, so ``alpha = 10`` could select nothing
    when the forgotten classes are a tenth of the data. Batch size 64 is our choice.

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

    def run(self, task: ForgettingTask, make_trainer: TrainerFactory) -> Outcome:
        start = time.perf_counter()
        model = copy.deepcopy(task.original)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        data = task.data(self.data)
        forget_importance = self._importance(model, params, task.of_classes(data, forgotten=True))
        all_importance = self._importance(model, params, data)
        masks = {}
        with torch.no_grad():
            for name, p in params.items():
                selected = forget_importance[name] > self.alpha * all_importance[name]
                ratio = self.dampening * all_importance[name] / forget_importance[name].clamp_min(1e-30)
                p.mul_(torch.where(selected, ratio.clamp(max=1.0), torch.ones_like(ratio)).to(p.dtype))
                masks[name] = selected
        return Outcome(model, time.perf_counter() - start, len(data), self.data, masks=masks)

    def _importance(self, model: nn.Module, params: dict[str, nn.Parameter], data: Dataset) -> dict[str, Tensor]:
        """Mean over mini-batches of the squared gradient of the batch's mean cross-entropy."""
        device = next(iter(params.values())).device
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        batches = 0
        with eval_mode(model), torch.enable_grad():
            for inputs, targets in DataLoader(data, batch_size=self.batch_size):
                loss = F.cross_entropy(model(inputs.to(device)).float(), targets.to(device))
                for total, g in zip(sums.values(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if g is not None:
                        total.add_(g.square())
                batches += 1
        return {n: total / max(batches, 1) for n, total in sums.items()}

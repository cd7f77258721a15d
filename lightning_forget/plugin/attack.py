"""The fit's relearn check: can a copy bring the classes back from the other classes' samples alone?"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_forget.plugin.batches import BatchFormat
from lightning_forget.plugin.relevance import eval_mode
from lightning_forget.plugin.verdict import RetainAttack, measure


def attack_on_batches(
    module: nn.Module,
    train: tuple[Iterable[Any], BatchFormat],
    judged: Sequence[tuple[Iterable[Any], BatchFormat]],
    forget_classes: Sequence[int],
    *,
    epochs: int,
    lr: float,
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    convert: Callable[[Tensor], Tensor] = lambda t: t,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> RetainAttack:
    """Fine-tune a copy of ``module``'s weights on the remaining-class samples of ``train`` (Adam, ``lr``), and
    measure its accuracy on the forgotten-class samples of ``judged`` before and after every epoch.

    A removed class does not come back from other classes' samples; one hidden by a fragile balance of weights
    does, once fine-tuning disturbs it. ``module`` is run with the copy (:func:`torch.func.functional_call`), in
    eval mode, so neither its weights nor its BatchNorm statistics change. The fit's own check on the batches at
    hand; the report's, on datasets, is :func:`lightning_forget.evaluation.evidence.retain_only_attack`.

    Args:
        module: the model.
        train: batches and how to read them; forgotten-class rows are left out.
        judged: batches and how to read them; only forgotten-class rows count.
        forget_classes: the forgotten classes.
        epochs: passes over ``train``.
        lr: Adam's learning rate.
        context: entered around every forward pass (the precision's autocast).
        convert: applied to the inputs (the precision's dtype).
        reduce: sums a tensor across processes; the identity in one process.
    """
    device = next(module.parameters()).device
    forgotten = torch.tensor(list(forget_classes), device=device)
    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}
    state = {**params, **{n: b.detach().clone() for n, b in module.named_buffers()}}
    trainable = [p for p in params.values() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr) if trainable else None

    def output(inputs: Tensor) -> Any:
        with context():
            return functional_call(module, state, (convert(inputs.to(device)),))

    def accuracy() -> tuple[float, int]:
        # The verdict's own measure, so that "forgotten-class accuracy" means the same in both.
        seen = [measure(output, b, forget_classes, batch_format=f, device=device, reduce=reduce) for b, f in judged]
        count = sum(e.forget_samples for e in seen)
        return sum(round(e.forget_acc * e.forget_samples) for e in seen) / max(count, 1), count

    steps = 0
    with eval_mode(module):
        start, samples = accuracy()
        best = start
        batches, fmt = train
        for _ in range(epochs if optimizer is not None else 0):
            for batch in batches:
                inputs, targets = fmt.split(batch)
                rows = ~torch.isin(targets.to(device), forgotten)
                if not rows.any():
                    continue
                logits = fmt.logits_of(output(inputs[rows.to(inputs.device)])).float()
                loss = F.cross_entropy(logits, targets.to(device)[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
            best = max(best, accuracy()[0])
    return RetainAttack(start=start, acc=best, samples=samples, steps=steps)

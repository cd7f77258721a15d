"""Relevance of every parameter entry to the classes being forgotten."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_forget.plugin.batches import BatchFormat, check_targets

Score = Literal["ratio", "forget_grad", "fisher_ratio", "random"]
SCORES: tuple[str, ...] = ("ratio", "forget_grad", "fisher_ratio", "random")

# Keeps the ratio finite where no remaining-class sample moves an entry.
_EPS = 1e-12


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (BatchNorm statistics untouched, no dropout), then restore each flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def relevance_scores(
    module: nn.Module,
    batches: Iterable[Any],
    forget_classes: Sequence[int],
    score: Score = "ratio",
    *,
    batch_format: BatchFormat | None = None,
    forward: Callable[[Any], Any] | None = None,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
    seed: int = 0,
    progress: bool = False,
    ignore_classes: Sequence[int] = (),
) -> dict[str, Tensor]:
    """Score every entry of every trainable parameter for its relevance to ``forget_classes``.

    Gradients are per-sample cross-entropy gradients taken with ``torch.autograd.grad`` on
    ``module`` in eval mode, so BatchNorm statistics, ``.grad`` and DDP hooks are untouched.

    Args:
        module: a classifier.
        batches: iterable of batches that ``batch_format`` reads as ``(inputs, class_targets)``.
        forget_classes: the classes to forget.
        score: ``ratio`` (mean |g| on forgotten-class samples over mean |g| on the others),
            ``forget_grad`` (mean |g| on forgotten-class samples), ``fisher_ratio`` (``ratio``
            with squared gradients) or ``random`` (uniform noise, for ablations).
        batch_format: where inputs, targets and logits are in batches and outputs; ``None``
            reads ``(inputs, targets, ...)`` batches and a logits output.
        forward: ``inputs -> output`` of ``module`` (e.g. under a precision context); ``None`` calls
            ``module(inputs)``.
        reduce: sums a tensor across processes; the identity in one process.
        seed: seed of the ``random`` score.
        progress: show a progress bar over the batches.
        ignore_classes: samples of these classes are left out of the scores (the classes an earlier
            request forgot: the model no longer predicts their labels, so their gradients locate
            nothing of the classes being forgotten now).

    Returns:
        Parameter name (as in ``named_parameters``) to a float tensor of its shape.

    Raises:
        ValueError: unknown ``score``; a class id outside the logits; targets that are not class
            ids; non-finite gradients; scoring data without forgotten-class samples, or (for the
            ratios) without remaining-class samples.
    """
    if score not in SCORES:
        raise ValueError(f"Unknown relevance score {score!r}: choose one of {SCORES}.")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if score == "random":
        generator = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=generator).to(p.device) for n, p in params.items()}

    power = 2 if score == "fisher_ratio" else 1
    forget_sum, retain_sum, counts = gradient_moments(
        module,
        params,
        batches,
        forget_classes,
        power,
        batch_format=batch_format,
        forward=forward,
        progress=progress,
        ignore_classes=ignore_classes,
    )
    flat = reduce(torch.cat([counts] + [t.flatten() for t in forget_sum + retain_sum]))
    counts, (forget_total, retain_total) = flat[:2], flat[2:].chunk(2)
    n_forget, n_retain = int(counts[0].item()), int(counts[1].item())
    if n_forget == 0:
        raise ValueError(
            "The scoring data holds no sample of the forgotten classes: pass scoring_data with a few "
            "samples of each forgotten class (and of the remaining ones)."
        )
    if n_retain == 0 and score != "forget_grad":
        raise ValueError(
            f"score={score!r} compares with the remaining classes, but the scoring data holds none of "
            "their samples: add some, or use score='forget_grad'."
        )
    relevance = forget_total / n_forget
    if score != "forget_grad":
        relevance = relevance / (retain_total / n_retain + _EPS)
    if not torch.isfinite(relevance).all():
        raise ValueError(
            "Relevance scores are not finite: the model's gradients on the scoring data hold NaN or inf. "
            "Check the model's weights and the data for NaN/inf values."
        )
    return {n: r.view_as(p) for (n, p), r in zip(params.items(), relevance.split([p.numel() for p in params.values()]))}


def gradient_moments(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Any],
    forget_classes: Sequence[int],
    power: int,
    *,
    batch_format: BatchFormat | None = None,
    forward: Callable[[Any], Any] | None = None,
    progress: bool = False,
    ignore_classes: Sequence[int] = (),
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Per-sample cross-entropy gradients of ``params``, with ``module`` in eval mode.

    Samples of ``ignore_classes`` are skipped.

    Returns:
        Sums of ``|g|**power`` per entry over the forgotten-class samples and over the
        remaining-class samples, and the two sample counts.
    """
    forward = forward or module
    batch_format = batch_format or BatchFormat()
    tensors = list(params.values())
    device = tensors[0].device
    forget_sum = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    retain_sum = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    counts = torch.zeros(2, device=device)
    forgotten = torch.tensor(list(forget_classes), device=device)
    ignored = {int(c) for c in ignore_classes}
    highest = max([*forget_classes, *ignored])
    with eval_mode(module), torch.enable_grad():
        for batch in tqdm(batches, desc="Relevance scoring", disable=not progress, leave=False):
            inputs, targets = batch_format.split(batch)
            check_targets(targets)
            inputs, targets = inputs.to(device), targets.to(device)
            for x, y in zip(inputs, targets):
                if ignored and int(y) in ignored:
                    continue
                logits = batch_format.logits_of(forward(x.unsqueeze(0)))
                check_targets(y.view(1), logits.shape[-1])
                if highest >= logits.shape[-1]:
                    raise ValueError(
                        f"Class id {highest} is outside the model's {logits.shape[-1]} output logits: "
                        "check forget_classes (and already_forgotten)."
                    )
                loss = F.cross_entropy(logits.float(), y.view(1))
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                is_forget = bool(torch.isin(y, forgotten))
                sums = forget_sum if is_forget else retain_sum
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.detach().float().abs().pow_(power))
                counts[0 if is_forget else 1] += 1
    return forget_sum, retain_sum, counts

"""Parameter masks, and the gate that lets only masked entries change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle


def top_fraction_masks(scores: Mapping[str, Tensor], fraction: float, per_tensor: bool = False) -> dict[str, Tensor]:
    """Select the highest-scoring ``fraction`` of entries.

    Args:
        scores: parameter name to a score tensor of the parameter's shape.
        fraction: share of entries to select, in (0, 1]; at least one entry is selected.
        per_tensor: select the fraction within every tensor instead of globally.

    Returns:
        Parameter name to a bool tensor, ``True`` where the entry may change.

    Raises:
        ValueError: if ``fraction`` is outside (0, 1] or there are no scores.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if not scores:
        raise ValueError("No parameter to mask: the module has no parameter that requires grad.")
    if per_tensor:
        return {name: _top_k_mask(s.flatten(), fraction).view_as(s) for name, s in scores.items()}
    flat = _top_k_mask(torch.cat([s.flatten().float() for s in scores.values()]), fraction)
    return {
        name: m.view_as(s) for (name, s), m in zip(scores.items(), flat.split([s.numel() for s in scores.values()]))
    }


def _top_k_mask(flat: Tensor, fraction: float) -> Tensor:
    k = max(1, round(fraction * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[flat.topk(k, sorted=False).indices] = True
    return mask


def mask_summary(masks: Mapping[str, Tensor]) -> list[dict[str, int | float | str]]:
    """Per parameter: ``name``, ``selected`` entries, ``total`` entries and their ``fraction``."""
    return [
        {"name": name, "selected": int(m.sum()), "total": m.numel(), "fraction": float(m.sum()) / m.numel()}
        for name, m in masks.items()
    ]


class StepGate:
    """Keeps every parameter entry outside its mask bit-identical through optimizer steps.

    Zeroing gradients is not enough: weight decay and momentum move entries whose gradient
    is zero. The gate therefore (1) drops the gradient of tensors with no masked entry, so
    optimizers skip them, (2) zeroes the other gradients outside the mask, so gradient
    clipping sees only masked entries, and (3) after every optimizer step puts unmasked
    entries back to the values they had when the gate was attached.

    Args:
        params: parameter name to parameter.
        masks: parameter name to a bool tensor of the same shape; every name of ``params``.

    Raises:
        ValueError: if names or shapes of ``masks`` and ``params`` differ.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        check_masks_fit(masks, params)
        self._partial: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        self._frozen: list[tuple[str, nn.Parameter, int]] = []
        for name, p in params.items():
            mask = masks[name].to(p.device)
            if mask.all():
                continue
            if mask.any():
                # One copy of each partly masked tensor: the values its unmasked entries keep.
                self._partial.append((p, mask, p.detach().clone()))
            else:
                self._frozen.append((name, p, p._version))
        self._handles: list[RemovableHandle] = []

    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Restore unmasked entries after every step of these optimizers."""
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Drop gradients of fully frozen tensors and zero the unmasked entries of the others."""
        for _, p, _ in self._frozen:
            p.grad = None
        for p, mask, _ in self._partial:
            if p.grad is not None:
                p.grad.mul_(mask)

    @torch.no_grad()
    def restore(self) -> None:
        """Put unmasked entries back to their kept values.

        Raises:
            RuntimeError: if the optimizer changed a tensor that had no gradient.
        """
        for p, mask, kept in self._partial:
            p.copy_(torch.where(mask, p, kept))
        for name, p, version in self._frozen:
            if p._version != version:
                raise RuntimeError(
                    f"The optimizer changed {name!r} although its gradient was dropped; this optimizer "
                    "does not skip parameters without gradient and cannot be gated."
                )


def check_masks_fit(masks: Mapping[str, Tensor], params: Mapping[str, nn.Parameter]) -> None:
    """Raise ``ValueError`` unless ``masks`` has exactly the names and shapes of ``params``."""
    missing, unknown = sorted(set(params) - set(masks)), sorted(set(masks) - set(params))
    if missing or unknown:
        raise ValueError(
            f"The masks do not fit this model: no mask for {missing[:5]}, masks for unknown {unknown[:5]}. "
            "They were computed for another model; start a new ClassForgetting callback to re-score."
        )
    wrong = [n for n, p in params.items() if masks[n].shape != p.shape]
    if wrong:
        raise ValueError(f"Mask shapes differ from the parameters {wrong[:5]}: the masks belong to another model.")

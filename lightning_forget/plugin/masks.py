"""Parameter masks, the gate that lets only masked entries change, and the check that proves it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
    """Keeps every parameter entry outside its mask bit-identical through optimizer steps, and proves it.

    Zeroing gradients is not enough: weight decay and momentum move entries whose gradient
    is zero. The gate therefore (1) drops the gradient of tensors with no masked entry, so
    optimizers skip them, (2) zeroes the other gradients outside the mask, so gradient
    clipping sees only masked entries, and (3) after every step of an attached optimizer puts
    the entries outside the mask of that optimizer's parameters back to the kept values, also
    where the optimizer wrote through ``p.data``. Whatever changes them outside an optimizer
    step (a hook, a callback, an ``optimizer_step`` override) is found and undone by
    :meth:`enforce`.

    Args:
        params: parameter name to parameter; every parameter to guard, trainable or not.
        masks: parameter name to a bool tensor of the same shape, ``True`` where the entry may
            change; every name of ``params``.
        kept: values to keep, by name; used where they equal the parameter outside its mask
            (e.g. a snapshot already taken), so no second copy is made. The parameters' current
            values are copied for every other name.

    Raises:
        ValueError: if names or shapes of ``masks`` and ``params`` differ.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        kept: Mapping[str, Tensor] | None = None,
    ) -> None:
        check_masks_fit(masks, params)
        self._masks: dict[str, Tensor] = {}
        self._kept: dict[str, Tensor] = {}
        self._guarded: list[Tensor] = []
        # id(parameter) -> (mask, or None for a tensor without masked entries; kept values).
        self._by_id: dict[int, tuple[Tensor | None, Tensor]] = {}
        for name, p in params.items():
            mask = masks[name].to(p.device)
            if mask.all():
                continue
            candidate = (kept or {}).get(name)
            if candidate is not None and candidate.shape == p.shape and candidate.dtype == p.dtype:
                candidate = candidate.detach().to(p.device)
                if _differs(p.detach(), mask, candidate).any():
                    candidate = None
            else:
                candidate = None
            value = p.detach().clone() if candidate is None else candidate
            self._masks[name], self._kept[name] = mask, value
            self._guarded.append(p)
            self._by_id[id(p)] = (mask if mask.any() else None, value)
        self._handles: list[RemovableHandle] = []

    @property
    def kept(self) -> dict[str, Tensor]:
        """Parameter name to the values kept for it, for every parameter with entries outside its mask."""
        return self._kept

    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Restore entries outside the masks after every step of these optimizers."""
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, *_: self.restore(opt)))

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Drop gradients of tensors without masked entries and zero the entries outside the mask of the others."""
        for p in self._guarded:
            mask = self._by_id[id(p)][0]
            if mask is None:
                p.grad = None
            elif p.grad is not None:
                p.grad.mul_(mask)

    @torch.no_grad()
    def restore(self, optimizer: Optimizer | None = None) -> None:
        """Put entries outside the masks back to their kept values, unconditionally (cheaper than comparing).

        Args:
            optimizer: restore only this optimizer's parameters (the ones its step may have
                changed); ``None`` restores every guarded parameter.
        """
        params = self._guarded if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            entry = self._by_id.get(id(p))
            if entry is not None:
                _put_back(p, *entry)

    @torch.no_grad()
    def enforce(self, params: Mapping[str, Tensor]) -> list[ParameterChange]:
        """Compare ``params`` bit for bit with the kept values outside the masks, and put back what changed.

        Args:
            params: parameter name to its current tensor (looked up again: a module may have moved
                to another device or replaced a parameter since the gate was made).

        Returns:
            The parameters that had changed, before they were put back.
        """
        present = {n: params[n] for n in self._masks if n in params}
        changes = _changes(present, self._masks, self._kept)
        for change in changes:
            p = present[change.name]
            mask = self._masks[change.name].to(p.device)
            _put_back(p, mask if mask.any() else None, self._kept[change.name].to(p.device))
        return changes


@dataclass(frozen=True)
class ParameterChange:
    """Entries of one parameter that differ, bit for bit, from the values kept outside its mask.

    Attributes:
        name: the parameter.
        changed: entries outside the mask whose bits differ from the kept values.
        outside: entries outside the mask.
        max_abs_diff: the largest absolute difference among them (NaN where a value is NaN).
    """

    name: str
    changed: int
    outside: int
    max_abs_diff: float

    def __str__(self) -> str:
        return f"{self.name!r} ({self.changed:,} of {self.outside:,} entries, max |diff| {self.max_abs_diff:.3g})"


@dataclass(frozen=True)
class GuaranteeReport:
    """What :func:`verify` found.

    Attributes:
        parameters: parameters checked.
        entries: entries outside the masks compared, bit for bit.
        changes: the parameters with changed entries outside their masks; empty when the guarantee holds.
    """

    parameters: int
    entries: int
    changes: tuple[ParameterChange, ...]

    @property
    def ok(self) -> bool:
        """Whether every entry outside the masks is bit-identical to the kept values."""
        return not self.changes

    def __str__(self) -> str:
        if self.ok:
            return (
                f"All {self.entries:,} entries outside the masks of {self.parameters} parameters are bit-identical "
                "to the kept values."
            )
        listed = "; ".join(str(c) for c in self.changes[:10])
        more = f" and {len(self.changes) - 10} more" if len(self.changes) > 10 else ""
        return f"{len(self.changes)} of {self.parameters} parameters changed outside their masks: {listed}{more}."


def verify(
    module: nn.Module | Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    kept: nn.Module | Mapping[str, Tensor],
) -> GuaranteeReport:
    """Check, bit for bit, that every entry outside ``masks`` still has its value in ``kept``.

    ``-0.0`` and ``0.0`` count as different, a NaN as equal to the same NaN: the bits are compared.

    Args:
        module: the model after forgetting, or its tensors by name (e.g. its ``state_dict``).
        masks: parameter name to a bool tensor, ``True`` where the entry was allowed to change;
            one for every parameter of ``module``.
        kept: the model before forgetting, or its values by name (a ``state_dict`` works); it
            needs every name whose mask is not all ``True``.

    Returns:
        A :class:`GuaranteeReport`; its ``ok`` says whether the guarantee holds.

    Raises:
        ValueError: if ``masks`` do not fit ``module``, or ``kept`` lacks a value or has another shape or dtype.
    """
    if isinstance(module, nn.Module):
        params: Mapping[str, Tensor] = dict(module.named_parameters())
        check_masks_fit(masks, params)
    else:
        params = module
        missing = sorted(set(masks) - set(params))
        if missing:
            raise ValueError(f"No tensor for the masked parameters {missing[:5]} in the module's tensors.")
    kept_values = dict(kept.named_parameters()) if isinstance(kept, nn.Module) else kept
    needed = {n: m for n, m in masks.items() if not m.all()}
    missing = sorted(set(needed) - set(kept_values))
    if missing:
        raise ValueError(f"No kept values for {missing[:5]}: pass the model before forgetting, or its state_dict.")
    wrong = [n for n in needed if kept_values[n].shape != params[n].shape]
    if wrong:
        raise ValueError(f"Kept values of {wrong[:5]} have other shapes than the parameters: another model?")
    cast = [n for n in needed if kept_values[n].dtype != params[n].dtype]
    if cast:
        name = cast[0]
        raise ValueError(
            f"Kept values of {cast[:5]} are {kept_values[name].dtype}, the parameters {params[name].dtype}: bits "
            "can only be compared in one dtype; convert the kept values as the fit did (e.g. .to(torch.bfloat16))."
        )
    changes = _changes({n: params[n] for n in needed}, needed, kept_values)
    return GuaranteeReport(
        parameters=len(masks), entries=sum(int((~m).sum()) for m in needed.values()), changes=tuple(changes)
    )


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """The tensor's bits as integers, so that -0.0 differs from 0.0 and a NaN equals the same NaN."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t
    return t.view(_INTEGER_OF_SIZE[t.element_size()])


def _differs(value: Tensor, mask: Tensor, kept: Tensor) -> Tensor:
    """Bool tensor: entries outside ``mask`` whose bits differ between ``value`` and ``kept``."""
    return (_bits(value) != _bits(kept)) & ~mask


@torch.no_grad()
def _changes(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], kept: Mapping[str, Tensor]
) -> list[ParameterChange]:
    changes = []
    for name, p in params.items():
        value = p.detach()
        mask, reference = masks[name].to(value.device), kept[name].detach().to(value.device)
        differ = _differs(value, mask, reference)
        count = int(differ.sum())
        if count:
            gap = (value != reference).float() if value.dtype == torch.bool else (value - reference).abs()
            changes.append(ParameterChange(name, count, int((~mask).sum()), float(gap[differ].max())))
    return changes


def _put_back(p: Tensor, mask: Tensor | None, kept: Tensor) -> None:
    """Entries outside ``mask`` (all of them for ``None``) of ``p`` back to ``kept``, in place and bit-exact."""
    if mask is None:
        p.copy_(kept)
    else:
        # Exact (also for -0.0, NaN and inf) and faster than p.copy_(torch.where(...)): NOTES section 7.
        torch.where(mask, p, kept, out=p)


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

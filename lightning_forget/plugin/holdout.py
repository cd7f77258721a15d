"""Samples held back from a forgetting fit, so that its verdict judges images the fit never trained on.

The callback does not own the user's training dataloader, so it cannot take samples out of it.
It recognises them instead: every sample is identified by a fingerprint of its input values, and
the forgetting objective leaves the held-back ones out of every batch. A dataset that hands out
different values for the same sample on every pass (random augmentation) cannot be held back from
this way; :func:`hold_back` says so and the verdict is then not judged on unseen images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_forget.plugin.batches import BatchFormat, check_targets


def fingerprints(inputs: Tensor) -> list[str]:
    """One digest per sample of ``inputs`` (first dimension), from its values in float64 (exact for float32/16)."""
    rows = inputs.detach().flatten(1).double().cpu().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in rows]


@dataclass
class HeldBack:
    """The samples kept out of the fit.

    Attributes:
        keys: fingerprints of the held-back samples.
        batches: the held-back samples as ``(inputs, targets)`` batches, for the verdict.
        excluded: how many training rows the objective has left out so far.
    """

    keys: set[str]
    batches: list[tuple[Tensor, Tensor]]
    excluded: int = field(default=0)


def hold_back(
    batches: Iterable[Any], batch_format: BatchFormat, per_class: int, seed: int
) -> tuple[HeldBack | None, str]:
    """Choose ``per_class`` samples of every class that has more than ``per_class``, to keep out of the fit.

    Args:
        batches: every sample of the fit, read twice (the two passes must give the same values).
        batch_format: where inputs and targets are in a batch.
        per_class: samples of each class to hold back, >= 1.
        seed: seed of the choice.

    Returns:
        The held-back samples and ``""``, or ``None`` and why none could be held back.

    Raises:
        ValueError: for targets that are not class ids (see :func:`~lightning_forget.plugin.batches.check_targets`).
    """
    first = _rows(batches, batch_format)
    if first is None:
        return None, "the inputs of a batch are not a tensor, so they cannot be told apart; pass verdict_data="
    keys, inputs, targets = first
    if _rows(batches, batch_format, keys_only=True) != keys:
        return None, (
            "the training data gives other values on every pass (random augmentation?), so its samples cannot be "
            "told apart; pass verdict_data= a few images of each class that the fit does not train on"
        )
    chosen = choose_held_back(targets, per_class, seed)
    # Duplicated samples share a fingerprint: hold back every copy, or the fit would train on it.
    held_keys = {keys[i] for i in chosen}
    rows = torch.tensor([i for i, k in enumerate(keys) if k in held_keys], dtype=torch.long)
    if not len(rows):
        return None, (
            f"no class has more than {per_class} sample(s) to hold one back; pass verdict_data= a few images of "
            "each class that the fit does not train on"
        )
    held = [(inputs[rows], targets[rows])]
    return HeldBack(held_keys, held), ""


def choose_held_back(targets: Tensor, per_class: int, seed: int) -> list[int]:
    """Positions of ``per_class`` samples of every class that has more than ``per_class``, drawn from ``seed``.

    Every class keeps at least one sample to train on; classes with too few samples give none.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in targets.unique().tolist():
        rows = (targets == c).nonzero().squeeze(1)
        if len(rows) > per_class:
            chosen += rows[torch.randperm(len(rows), generator=generator)[:per_class]].tolist()
    return chosen


class WithoutHeldBack:
    """Re-iterable ``(inputs, targets)`` batches of ``batches`` without the held-back samples."""

    def __init__(self, batches: Iterable[Any], batch_format: BatchFormat, held: HeldBack) -> None:
        self._batches, self._format, self._keys = batches, batch_format, held.keys

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self._batches:
            inputs, targets = self._format.split(batch)
            keep = keep_rows(inputs, self._keys)
            if keep.any():
                yield inputs[keep.to(inputs.device)], targets[keep.to(targets.device)]


def keep_rows(inputs: Tensor, keys: set[str]) -> Tensor:
    """A bool tensor (CPU): ``True`` for the rows of ``inputs`` that are not held back."""
    return torch.tensor([k not in keys for k in fingerprints(inputs)], dtype=torch.bool)


def _rows(
    batches: Iterable[Any], batch_format: BatchFormat, keys_only: bool = False
) -> tuple[list[str], Tensor, Tensor] | list[str] | None:
    keys: list[str] = []
    inputs: list[Tensor] = []
    targets: list[Tensor] = []
    for batch in batches:
        x, y = batch_format.split(batch)
        if not isinstance(x, Tensor):
            return None
        check_targets(y)
        keys += fingerprints(x)
        if not keys_only:
            inputs.append(x.detach().cpu())
            targets.append(torch.as_tensor(y).detach().cpu())
    if keys_only:
        return keys
    return keys, torch.cat(inputs), torch.cat(targets)

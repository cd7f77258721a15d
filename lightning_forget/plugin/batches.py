"""How a user's batches and model outputs map to ``(inputs, class targets)`` and class logits."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BatchFn = Callable[[Any], tuple[Tensor, Tensor]]
LogitsSpec = str | int | Callable[[Any], Tensor] | None


@dataclass(frozen=True)
class BatchFormat:
    """Reads inputs and class targets from a batch, and class logits from a model's output.

    Args:
        inputs_targets: ``batch -> (inputs, targets)``; ``None`` takes ``batch[0], batch[1]``
            of a tuple or list batch.
        logits: where the logits are in the model's output: ``None`` for a tensor output, a key
            (``str``) of a dict output or an attribute (``output.logits``), an index (``int``) of
            a tuple output, or a function ``output -> logits``.
    """

    inputs_targets: BatchFn | None = None
    logits: LogitsSpec = None

    def split(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of ``batch``.

        Raises:
            TypeError: for a batch that is not an ``(inputs, targets, ...)`` sequence and no
                ``inputs_targets`` function was given.
        """
        if self.inputs_targets is not None:
            return self.inputs_targets(batch)
        if isinstance(batch, Mapping):
            raise TypeError(
                f"The batches are dicts (keys {sorted(batch)[:6]}): pass inputs_targets=lambda b: "
                "(b['<inputs key>'], b['<targets key>']) to say where inputs and class targets are."
            )
        if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) < 2:
            raise TypeError(
                f"A batch must be (inputs, targets, ...), got {type(batch).__name__}: pass inputs_targets= "
                "a function that returns (inputs, targets) from your batch."
            )
        return batch[0], batch[1]

    def logits_of(self, output: Any) -> Tensor:
        """The class logits in a model's ``output``.

        Raises:
            TypeError: when the output holds no logits tensor where ``logits`` says.
        """
        spec = self.logits
        if callable(spec):
            found = spec(output)
        elif spec is None:
            found = output
        elif isinstance(spec, int):
            found = output[spec] if isinstance(output, Sequence) else None
        else:
            found = output.get(spec) if isinstance(output, Mapping) else getattr(output, spec, None)
        if not isinstance(found, Tensor) or found.dim() != 2:
            described = f"a {type(output).__name__}" if not isinstance(output, Tensor) else f"shape {output.shape}"
            raise TypeError(
                f"The model's output ({described}) gives no (batch, classes) logits tensor with logits={spec!r}: "
                "pass logits= a key or attribute (e.g. 'logits'), a tuple index, or a function output -> logits."
            )
        return found


def check_targets(targets: Tensor, num_classes: int | None = None) -> None:
    """Raise unless ``targets`` are integer class ids, one per sample, in ``[0, num_classes)``.

    Args:
        targets: the class targets of a batch.
        num_classes: the number of logits; ``None`` checks only the kind of targets.

    Raises:
        TypeError: for targets that are not a tensor.
        ValueError: for float, one-hot or multi-dimensional targets, and for ids outside ``[0, num_classes)``.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"Class targets must be a tensor of integer class ids, got {type(targets).__name__}: pass "
            "inputs_targets= a function that returns (inputs, targets) from your batch."
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool or targets.dim() != 1:
        raise ValueError(
            f"Class targets must be a 1-D tensor of integer class ids, got dtype {targets.dtype} and shape "
            f"{tuple(targets.shape)}: convert them in inputs_targets, with targets.argmax(-1) for one-hot or soft "
            "targets, targets.long() for class ids stored as floats."
        )
    if num_classes is not None and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)].unique()[:5].tolist()
        raise ValueError(
            f"Class targets {bad} are outside [0, {num_classes}) (an ignore label such as -100?): forgetting "
            "needs every sample's class; drop those samples from the data."
        )

"""Penultimate features: the input of a classifier's final linear layer, found and captured."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


def final_linear(model: nn.Module, num_classes: int, layer: str | None = None) -> tuple[str, nn.Linear]:
    """The layer that turns penultimate features into logits, and its name.

    Args:
        model: a classifier.
        num_classes: number of logits.
        layer: the layer's name in ``model.named_modules()``; ``None`` takes the only
            ``nn.Linear`` with ``out_features == num_classes``.

    Raises:
        ValueError: if ``layer`` is not an ``nn.Linear`` of ``model``, or when ``layer`` is
            ``None`` and no or several linear layers have ``num_classes`` outputs.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    described = ", ".join(f"{n!r} ({m.in_features}->{m.out_features})" for n, m in linears.items()) or "none"
    if layer is not None:
        if layer not in linears:
            raise ValueError(f"layer={layer!r} is not an nn.Linear of the model; its linear layers: {described}.")
        return layer, linears[layer]
    candidates = [name for name, m in linears.items() if m.out_features == num_classes]
    if len(candidates) != 1:
        problem = "No nn.Linear" if not candidates else f"{len(candidates)} nn.Linear layers ({candidates})"
        raise ValueError(
            f"{problem} with out_features={num_classes} found, so the final layer is unknown: name it with "
            f"layer=...; the model's linear layers: {described}."
        )
    return candidates[0], linears[candidates[0]]


@contextmanager
def captured_inputs(layer: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every call of ``layer`` appends its first input, flattened to ``(batch, features)``.

    Gradients flow through the captured tensors: a loss on them trains what comes before ``layer``.
    """
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].flatten(1)))
    try:
        yield captured
    finally:
        handle.remove()

"""A forgotten class's direction taken out of the features, folded into the convolution and BatchNorm that make them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils.data import DataLoader, Dataset

from lightning_forget.plugin.features import final_linear
from lightning_forget.plugin.relevance import eval_mode

Projection = Literal["none", "orthogonal", "full"]
PROJECTIONS: tuple[str, ...] = ("none", "orthogonal", "full")

# What may stand between the BatchNorm and the final linear layer: each maps one tensor elementwise or by pooling.
_PASS_MODULES = (
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_PASS_FUNCTIONS = (torch.flatten, torch.relu, F.relu, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d)
_PASS_METHODS = ("flatten", "view", "reshape", "relu")


def foldable_layers(model: nn.Module, num_classes: int) -> tuple[str, str]:
    """The convolution and BatchNorm whose output reaches the final linear layer through ReLU and pooling alone.

    Args:
        model: a classifier.
        num_classes: number of logits (finds the final linear layer).

    Returns:
        The convolution's and the BatchNorm's names in ``model.named_modules()``.

    Raises:
        ValueError: the model cannot be traced with ``torch.fx``, or anything else (a residual sum, a second
            linear layer, a BatchNorm without affine shift or running statistics) stands on that path.
    """
    head, _ = final_linear(model, num_classes)
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many kinds; all mean the same to the user
        raise ValueError(f"project needs a model torch.fx can trace; this one fails: {error}") from error
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == head]
    if len(calls) != 1:
        raise ValueError(_unfoldable(f"the final linear layer {head!r} is called {len(calls)} times, not once"))
    node = calls[0].args[0]
    while True:
        if len(node.users) != 1:
            raise ValueError(_unfoldable(f"{node.name} also feeds another part of the model"))
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.BatchNorm2d):
            break
        passes = (
            isinstance(module, _PASS_MODULES)
            or (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
            or (node.op == "call_method" and node.target in _PASS_METHODS)
        )
        if not passes:
            raise ValueError(_unfoldable(f"{node.name} ({node.op} {node.target}) stands between them"))
        node = node.args[0]
    bn, conv = node.target, node.args[0]
    if not (conv.op == "call_module" and isinstance(modules[conv.target], nn.Conv2d) and len(conv.users) == 1):
        raise ValueError(_unfoldable(f"BatchNorm {bn!r} does not follow a convolution used by it alone"))
    if modules[conv.target].groups != 1:  # a mix of output channels would need every group's inputs
        raise ValueError(_unfoldable(f"convolution {conv.target!r} is grouped"))
    norm = modules[bn]
    if not (norm.affine and norm.track_running_stats):
        raise ValueError(_unfoldable(f"BatchNorm {bn!r} needs affine=True and running statistics"))
    return conv.target, bn


@torch.no_grad()
def fold_class_projection(
    model: nn.Module,
    samples: Dataset,
    forget_classes: Sequence[int],
    num_classes: int,
    orthogonal: bool = True,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """Take each forgotten class's direction out of the last BatchNorm's output, by changing the weights before it.

    The direction is the one from the remaining samples' mean channel activation (spatial mean) to each forgotten
    class's; with ``orthogonal``, less its part along the remaining classes' own mean directions, so that every
    remaining class's mean stays where it was and only what sets the forgotten class apart goes. The projection
    ``z -> c + P (z - c)`` is folded into the convolution's weights, the BatchNorm's running mean and its shift:
    the model computes exactly the projected activations, with no new module.

    Args:
        model: a classifier :func:`foldable_layers` accepts; changed in place.
        samples: ``(input, class)`` samples of every forgotten class and of some remaining ones, without random
            augmentation (the directions are their means).
        forget_classes: the classes whose directions go.
        num_classes: number of logits.
        orthogonal: keep the remaining classes' mean directions (``False``: the whole direction goes).
        batch_size: samples per forward pass.

    Returns:
        Parameter name to a boolean mask of the entries that changed.

    Raises:
        ValueError: see :func:`foldable_layers`; a forgotten or no remaining class without samples; a BatchNorm
            scale of 0 (its channel cannot be projected).
    """
    conv_name, bn_name = foldable_layers(model, num_classes)
    modules = dict(model.named_modules())
    conv, norm = modules[conv_name], modules[bn_name]
    center, directions = class_directions(*_channel_means(model, norm, samples, batch_size), forget_classes, orthogonal)
    basis = _span(directions)
    projector = torch.eye(len(center), dtype=torch.float64) - basis @ basis.T
    if (norm.weight == 0).any():
        raise ValueError(f"project cannot fold into BatchNorm {bn_name!r}: a channel's scale is 0.")
    scale = (norm.running_var.double() + norm.eps).sqrt() / norm.weight.double()
    fold = scale[:, None] * projector / scale[None, :]  # S P S^-1: the convolution's outputs, before normalising
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    conv.weight.copy_((fold @ conv.weight.double().flatten(1)).view_as(conv.weight))
    if conv.bias is not None:
        conv.bias.copy_(fold @ conv.bias.double())
    norm.running_mean.copy_(fold @ norm.running_mean.double())
    norm.bias.copy_(projector @ (norm.bias.double() - center) + center)
    return {name: p.detach() != before[name] for name, p in model.named_parameters()}


def class_directions(
    means: Tensor, labels: Tensor, forget_classes: Sequence[int], orthogonal: bool = False
) -> tuple[Tensor, Tensor]:
    """The remaining samples' mean and, per forgotten class, the direction from it to the class's mean.

    Args:
        means: ``(samples, channels)`` activations, one row per sample.
        labels: ``(samples,)`` their classes.
        forget_classes: one direction (a column) per class.
        orthogonal: each direction less its part in the span of the remaining classes' own mean directions.

    Returns:
        The centre ``(channels,)`` and the directions ``(channels, len(forget_classes))``, in ``means``' dtype.

    Raises:
        ValueError: a forgotten class without samples, or no remaining-class sample.
    """
    forgotten = torch.isin(labels, torch.tensor(list(forget_classes)))
    missing = [c for c in forget_classes if not (labels == c).any()]
    if missing or forgotten.all():
        lacking = f"classes {missing}" if missing else "the remaining classes"
        raise ValueError(f"project needs samples of every forgotten class and of remaining ones; none of {lacking}.")
    center = means[~forgotten].mean(0)

    def offsets(classes: Sequence[int]) -> Tensor:
        return torch.stack([means[labels == c].mean(0) - center for c in classes], 1)

    directions = offsets(forget_classes)
    if orthogonal:
        span = _span(offsets(labels[~forgotten].unique().tolist()))
        directions = (directions.double() - span @ (span.T @ directions.double())).to(directions.dtype)
    return center, directions


def _channel_means(model: nn.Module, norm: nn.Module, samples: Dataset, batch_size: int) -> tuple[Tensor, Tensor]:
    seen: list[Tensor] = []
    labels: list[Tensor] = []
    handle = norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().double().mean((2, 3))))
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for inputs, targets in DataLoader(samples, batch_size=batch_size):
                model(inputs.to(device))
                labels.append(torch.as_tensor(targets))
    finally:
        handle.remove()
    return torch.cat(seen).cpu(), torch.cat(labels).cpu()


def _span(vectors: Tensor) -> Tensor:
    """An orthonormal basis of the columns' span (columns that add nothing left out)."""
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    return u[:, s > s.max().clamp_min(1e-12) * 1e-6]


def _unfoldable(why: str) -> str:
    return (
        f"project folds into the convolution and BatchNorm whose output reaches the final linear layer through ReLU "
        f"and pooling alone, and {why}; use project='none' for this model."
    )

"""Weights from the checkpoint formats users have, into their own network, safely and with clear mismatches.

Accepted: a plain ``state_dict`` (``torch.save(net.state_dict(), path)``), a Lightning ``.ckpt`` (whatever the
LightningModule calls the network: ``net.``, ``model.``, ``backbone.``... is found and stripped), and a
``torch.save``'d dict holding the weights under ``state_dict``, ``model_state_dict`` or ``model``. Files are read
with ``torch.load(weights_only=True)``, so a checkpoint cannot run code, and weights that are not finite are
refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Where the weights sit in a torch.save'd dict, in the order tried.
WEIGHT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
# Names listed in a mismatch message, at most.
_SHOWN = 5


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], key_prefix: str | None = None) -> nn.Module:
    """Load the weights of a checkpoint file into ``model`` (in place) and return ``model``.

    Args:
        model: the network; its ``state_dict`` keys are the names to match.
        path: a plain state_dict, a Lightning ``.ckpt``, or a dict with the weights under one of
            :data:`WEIGHT_KEYS`.
        key_prefix: the prefix of the network's keys in the checkpoint (e.g. ``"net."`` when the
            LightningModule holds it as ``self.net``); only keys that start with it are used. ``None``
            finds it: no prefix when the keys match as they are, else the one prefix under which every
            key of the model is found.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: if the file cannot be read with ``weights_only=True``, holds no weights, the keys or
            shapes do not match (the message lists missing and unexpected keys and the prefix to set), the
            prefix is ambiguous, or a weight is NaN or infinite.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"The checkpoint {file} does not exist.")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files it cannot read safely
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"The checkpoint {file} cannot be read with torch.load(weights_only=True) ({first}): save the weights "
            "alone, torch.save(net.state_dict(), path)."
        ) from None
    state = match_state_dict(extract_state_dict(saved, source=str(file)), model, key_prefix, source=str(file))
    check_finite(state, source=str(file))
    model.load_state_dict(state)
    return model


def extract_state_dict(saved: Any, source: str = "the checkpoint") -> dict[str, Tensor]:
    """The name-to-tensor mapping inside a loaded checkpoint: itself, or the first of :data:`WEIGHT_KEYS` it has.

    Raises:
        ValueError: if no mapping of tensors is found.
    """
    if _is_state_dict(saved):
        return dict(saved)
    if isinstance(saved, Mapping):
        for key in WEIGHT_KEYS:
            if _is_state_dict(saved.get(key)):
                return dict(saved[key])
        found = ", ".join(map(repr, list(saved)[:10]))
        raise ValueError(
            f"{source} holds no weights: expected a state_dict, or a dict with one under {list(WEIGHT_KEYS)}; "
            f"its keys are {found}."
        )
    raise ValueError(f"{source} holds a {type(saved).__name__}, not a state_dict.")


def match_state_dict(
    state: Mapping[str, Tensor], model: nn.Module, key_prefix: str | None = None, source: str = "the checkpoint"
) -> dict[str, Tensor]:
    """The entries of ``state`` that are ``model``'s, renamed to its keys, with their shapes checked.

    Args:
        state: a checkpoint's name-to-tensor mapping.
        model: the network to load into.
        key_prefix: see :func:`load_checkpoint`.
        source: what ``state`` came from, for messages.

    Raises:
        ValueError: for missing or unexpected keys, other shapes, or an ambiguous prefix; the message says
            what to set.
    """
    expected = model.state_dict()
    if key_prefix is None:
        key_prefix = _find_prefix(state, expected, source)
    mine = {k.removeprefix(key_prefix): v for k, v in state.items() if k.startswith(key_prefix)}
    missing = [k for k in expected if k not in mine]
    unexpected = [k for k in mine if k not in expected]
    if missing or unexpected:
        raise ValueError(_mismatch(source, key_prefix, missing, unexpected, state, expected))
    shapes = [
        f"{k}: {tuple(v.shape)} there, {tuple(expected[k].shape)} in the model"
        for k, v in mine.items()
        if v.shape != expected[k].shape
    ]
    if shapes:
        raise ValueError(
            f"{source} does not fit the model: {len(shapes)} tensors have other shapes ({'; '.join(shapes[:_SHOWN])})."
            " Build the model with the settings it was trained with (e.g. its number of classes)."
        )
    return mine


def check_finite(state: Mapping[str, Tensor], source: str = "the checkpoint") -> None:
    """Raise ``ValueError`` naming the floating-point tensors of ``state`` that hold NaN or infinite values."""
    bad = [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{source} has NaN or infinite values in {len(bad)} tensors ({', '.join(bad[:_SHOWN])}): it comes "
            "from a diverged or broken training; use a checkpoint of a model that trained properly."
        )


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _find_prefix(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str) -> str:
    """No prefix if every model key is there as it is, else the one prefix under which all of them are."""
    if all(k in state for k in expected):
        return ""
    first = next(iter(expected), None)
    if first is None:
        return ""
    candidates = {k[: -len(first)] for k in state if k.endswith("." + first)}
    covering = sorted(p for p in candidates if all(p + k in state for k in expected))
    if len(covering) > 1:
        raise ValueError(
            f"{source} holds the model's weights under several prefixes ({', '.join(covering)}): choose one with "
            f"key_prefix={covering[0]!r} (original.key_prefix={covering[0]} on the app's command line)."
        )
    return covering[0] if covering else ""


def _mismatch(
    source: str,
    prefix: str,
    missing: list[str],
    unexpected: list[str],
    state: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")

    parts = [f"{source} does not match the model's keys" + (f" under the prefix {prefix!r}" if prefix else "")]
    if missing:
        parts.append(f"missing {len(missing)} of {len(expected)} ({some(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({some(unexpected)})")
    heads = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
    hint = (
        f"The checkpoint's keys start with {', '.join(heads[:_SHOWN])}: if the network is under one of them, set "
        f"key_prefix={heads[0]!r} (original.key_prefix={heads[0]} on the app's command line); else build the model "
        "the checkpoint was saved from."
        if heads
        else "Build the model the checkpoint was saved from."
    )
    return "; ".join(parts) + ". " + hint

"""Figures that cannot be measured: reported as ``None`` with the reason, never the end of a finished run.

A figure of the evaluation can be out of reach for a run's data or models: no relearn target when the original
gets none of the forgotten classes right, no membership attack on a model whose outputs are not finite, no probe
or relearn set when the few-shot draw took every training image of a class. Such a figure is ``None`` in its row,
and the row's ``not_measured`` mapping says why (figure name to reason); the verdict lists the checks it could
not make (see :func:`not_checked`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

NOT_MEASURED = "not_measured"
PROBE_FIGURES = ("probe_forget_acc", "probe_retain_acc")
RETAIN_ATTACK_FIGURES = ("retain_attack_acc",)
DISTANCE_FIGURES = ("distance_l2", "changed_fraction")
# The checks of the verdict against retrain beyond forget_acc and retain_acc (which are always measured), and the
# rows each reads: the method's, retrain's and, for the probe, the original's.
VERDICT_ROWS = {
    "mia": ("method", "retrain"),
    "retain_attack_acc": ("method", "retrain"),
    "probe_forget_acc": ("method", "retrain", "original"),
    "anamnesis_index": ("method",),
}


class NotMeasured(ValueError):
    """A figure that the data or the models at hand cannot give (not a wrong setting): reported, not raised."""


def relearn_figures(epochs: int) -> tuple[str, ...]:
    """The figures :func:`~lightning_forget.evaluation.evidence.relearn` adds with ``epochs`` epochs."""
    return tuple(dict.fromkeys(("relearn_acc_1", f"relearn_acc_{epochs}", "relearn_steps", "relearn_target")))


def unmeasured(names: Iterable[str], reason: str) -> dict[str, Any]:
    """Figures ``names`` as not measured: each ``None``, and ``not_measured`` giving ``reason`` for each."""
    names = list(names)
    return {**dict.fromkeys(names), NOT_MEASURED: dict.fromkeys(names, reason)}


def add_figures(figures: dict[str, Any], added: Mapping[str, Any]) -> None:
    """``figures.update(added)``, the ``not_measured`` reasons of both kept."""
    reasons = {**figures.get(NOT_MEASURED, {}), **added.get(NOT_MEASURED, {})}
    figures.update({k: v for k, v in added.items() if k != NOT_MEASURED})
    if reasons:
        figures[NOT_MEASURED] = reasons


def check_finite(logits: Tensor, what: str) -> None:
    """Raise :class:`NotMeasured` if ``logits`` hold NaN or infinite values (a diverged model)."""
    if not bool(torch.isfinite(logits).all()):
        raise NotMeasured(f"the model's {what} are not finite (NaN or inf): its training diverged")


def evaluate_measured(model: Any, *, evaluate: Any, skipped: Mapping[str, str], **kwargs: Any) -> dict[str, Any]:
    """``evaluate(model, **kwargs)`` with the figures skipped before training (figure to reason) not measured."""
    figures = evaluate(model, **kwargs)
    for reason in dict.fromkeys(skipped.values()):
        add_figures(figures, unmeasured([k for k, r in skipped.items() if r == reason], reason))
    return figures


def not_checked(models: Mapping[str, Mapping[str, Any]], method: str) -> dict[str, str]:
    """The checks the verdict against retrain would make but could not, each with why (none without retrain).

    Args:
        models: the report's rows.
        method: the method under test (its row's name).
    """
    if "retrain" not in models:
        return {}
    names = {"method": method, "retrain": "retrain", "original": "original"}
    missing = {}
    for check, rows in VERDICT_ROWS.items():
        for row in rows:
            reason = models.get(names[row], {}).get(NOT_MEASURED, {}).get(check)
            if reason:
                missing[check] = reason if row == "method" else f"{names[row]} row: {reason}"
                break
    return missing


__all__ = [
    "NOT_MEASURED",
    "NotMeasured",
    "add_figures",
    "check_finite",
    "evaluate_measured",
    "not_checked",
    "relearn_figures",
    "unmeasured",
]

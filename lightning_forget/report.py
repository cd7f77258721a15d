"""The side-by-side report of a forgetting run: JSON, Markdown table, per-class plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

COLUMNS: tuple[str, ...] = ("forget_acc", "retain_acc", "forget_train_acc", "mia", "seconds", "changed_fraction")


def changed_fraction(model: nn.Module, original: nn.Module) -> float:
    """Fraction of parameter entries of ``model`` that differ from ``original``."""
    changed = total = 0
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters(), strict=True):
        if p.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(p.shape)} here and {tuple(q.shape)} in the original.")
        changed += int((p.detach().cpu() != q.detach().cpu()).sum())
        total += p.numel()
    return changed / total


def build_report(method: str, forget_classes: Sequence[int], models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report: method, forgotten classes, per-model figures and, with ``retrain``, the speed-up."""
    report: dict[str, Any] = {"method": method, "forget_classes": list(forget_classes), "models": models}
    if "retrain" in models and method in models and method != "retrain":
        report["speedup_vs_retrain"] = models["retrain"]["seconds"] / max(models[method]["seconds"], 1e-9)
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The models side by side, one row each."""
    lines = [
        "| model | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, figures in report["models"].items():
        cells = [f"{figures[c]:.1f}" if c == "seconds" else f"{figures[c]:.4f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if "speedup_vs_retrain" in report:
        text += f"\n\n{report['method']} took 1/{report['speedup_vs_retrain']:.1f} of the time of retraining."
    return text + f"\n\nForgotten classes: {report['forget_classes']}.\n"


def plot_per_class(report: dict[str, Any], class_names: Sequence[str], path: str | Path) -> None:
    """Bar chart of per-class test accuracy of every model, the forgotten classes shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(class_names) * len(models) / 2), 3.8))
    for c in report["forget_classes"]:
        ax.axvspan(c - 0.45, c + 0.45, color="0.9", zorder=0)
    for i, (name, figures) in enumerate(models.items()):
        positions = [c - 0.4 + width * (i + 0.5) for c in range(len(class_names))]
        ax.bar(positions, figures["per_class_acc"], width, label=name, zorder=2)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45 if len(class_names) > 10 else 0, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Per-class accuracy; shaded: forgotten classes {report['forget_classes']}")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | Path, class_names: Sequence[str]) -> Path:
    """Write ``report.md``, ``per_class_accuracy.png`` and, last, ``report.json`` into ``out_dir``.

    ``report.json`` appears only once everything else is written, so its presence marks a
    finished run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown_table(report))
    plot_per_class(report, class_names, out / "per_class_accuracy.png")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return out / "report.json"

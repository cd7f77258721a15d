"""The side-by-side report of a forgetting run: JSON, Markdown table, per-class plot, sweep summary."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_forget.app.settings import show

# Report columns in order, with their format; a column shows when some row has it.
COLUMNS: dict[str, str] = {
    "forget_acc": ".4f",
    "retain_acc": ".4f",
    "forget_train_acc": ".4f",
    "mia": ".4f",
    "probe_forget_acc": ".4f",
    "probe_retain_acc": ".4f",
    "relearn_acc_1": ".4f",
    "relearn_steps": "d",
    "anamnesis_index": ".2f",
    "retain_attack_acc": ".4f",
    "distance_l2": ".4f",
    "changed_fraction": ".4f",
    "seconds": ".1f",
    "speedup": ".1f",
    "samples": "d",
}


def columns(models: Iterable[dict[str, Any]]) -> list[str]:
    """The columns some row of ``models`` has, in report order."""
    rows = list(models)
    return [c for c in COLUMNS if any(c in r for r in rows)]


def cell(value: Any, column: str) -> str:
    """A figure as the table shows it; '-' where a row has none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    return format(int(value) if COLUMNS[column] == "d" else value, COLUMNS[column])


def markdown_table(report: dict[str, Any]) -> str:
    """The models side by side, one row each, then the speed-up and the verdict."""
    models = report["models"]
    cols = columns(models.values())
    lines = ["| model | data | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for name, figures in models.items():
        cells = [cell(figures.get(c), c) for c in cols]
        lines.append(f"| {name} | {figures.get('data', 'all')} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n" + describe_run(report)
    text += "".join(f"\n{line}" for line in [*report.get("eval_notes", []), *not_measured_lines(models)])
    if "speedup_vs_retrain" in report:
        text += f"\n{report['method']} took 1/{report['speedup_vs_retrain']:.1f} of the time of retraining"
        mine, retrain = models[report["method"]].get("samples"), models["retrain"].get("samples")
        if mine and retrain:
            # On small data the ratio says little: retraining's cost grows with the data, forgetting's with the shots.
            text += (
                f", on {mine:,} samples against {retrain:,} (retraining's time grows with the training data, "
                "forgetting's with the few shots)"
            )
        text += "."
    return text + "\n" + verdict_line(report) + "\n"


def describe_run(report: dict[str, Any]) -> str:
    """One line: what was forgotten, from what, with which settings."""
    classes = _class_labels(report)
    setting = report.get("setting", {})
    described = ", ".join(f"{k} {v}" for k, v in setting.items())
    earlier = report.get("already_forgotten")
    if earlier:  # a later request: the earlier classes are kept forgotten and evaluated as forgotten
        classes += f"; forgotten by earlier requests and kept forgotten: {_class_labels(report, earlier)}"
    return f"Forgotten classes: {classes}." + (f" {described}." if described else "")


def verdict_line(report: dict[str, Any]) -> str:
    """'Forgotten: yes/no', the checks and what they were compared with."""
    v = report["verdict"]
    checks = "; ".join(
        f"{name} {c['value']:.4f} {c['op']} {c['limit']:.4f} {'ok' if c['passed'] else 'FAILED'}"
        for name, c in v["checks"].items()
    )
    missing: dict[str, list[str]] = {}  # reason -> the checks it left out
    for name, reason in v.get("not_checked", {}).items():
        missing.setdefault(reason, []).append(name)
    checks += "".join(f"; {', '.join(names)} not checked ({reason})" for reason, names in missing.items())
    return f"Forgotten: {'yes' if v['forgotten'] else 'NO'} ({report['method']} against {v['against']}: {checks})."


def not_measured_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per reason some figures were not measured ('-' in the table): which figures, of which rows, why."""
    groups: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for row, figures in models.items():
        for figure, reason in figures.get("not_measured", {}).items():
            names, rows = groups.setdefault(reason, ({}, {}))
            names[figure] = rows[row] = None
    return [f"Not measured: {', '.join(n)} ({', '.join(r)}): {reason}." for reason, (n, r) in groups.items()]


def _class_labels(report: dict[str, Any], classes: Sequence[int] | None = None) -> str:
    names = report.get("class_names")
    chosen = report["forget_classes"] if classes is None else classes
    return ", ".join(f"{c} ({names[c]})" if names else str(c) for c in chosen)


def plot_per_class(report: dict[str, Any], class_names: Sequence[str], path: str | Path) -> None:
    """Bar chart of per-class test accuracy of every model, the forgotten classes shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(class_names) * max(2, len(models))), 4.2))
    forgotten_classes = report.get("forgotten_so_far", report["forget_classes"])
    for c in forgotten_classes:
        ax.axvspan(c - 0.45, c + 0.45, color="0.9", zorder=0)
    for i, (name, figures) in enumerate(models.items()):
        positions = [c - 0.4 + width * (i + 0.5) for c in range(len(class_names))]
        ax.bar(positions, figures["per_class_acc"], width, label=name, zorder=2)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    forgotten = ", ".join(class_names[c] for c in forgotten_classes)
    ax.set_title(f"Per-class test accuracy; shaded: forgotten ({forgotten})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    report: dict[str, Any], out_dir: str | Path, class_names: Sequence[str], notes: Sequence[str] = ()
) -> Path:
    """Write ``report.md``, ``per_class_accuracy.png`` and, last, ``report.json`` into ``out_dir``.

    ``report.json`` appears only once everything else is written, so its presence marks a
    finished run. ``notes`` are paragraphs added to ``report.md`` after the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown_table(report) + "".join(f"\n{note}\n" for note in notes))
    plot_per_class(report, class_names, out / "per_class_accuracy.png")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return out / "report.json"


def sweep_summary(reports: Sequence[dict[str, Any]], keys: Sequence[str] = ()) -> str:
    """One table across runs: every (setting, model) row with its data regime and mean ± std of each figure.

    Args:
        reports: the runs' ``report.json`` contents.
        keys: ``report["setting"]`` keys that tell settings apart (e.g. ``forget_classes``,
            ``shots``); runs that differ only in other keys (seeds) are averaged.
    """
    groups: dict[tuple[str, ...], dict[str, list[dict[str, Any]]]] = {}
    for report in reports:
        setting = tuple(f"{k}={report.get('setting', {}).get(k, report.get(k))}" for k in keys)
        for name, figures in report["models"].items():
            groups.setdefault(setting, {}).setdefault(name, []).append(figures)
    cols = columns(f for models in groups.values() for rows in models.values() for f in rows)
    head = "| setting | model | data | runs | " + " | ".join(cols) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * len(cols)]
    for setting, models in groups.items():
        for name, rows in models.items():
            data = "/".join(dict.fromkeys(str(r.get("data", "all")) for r in rows))
            cells = [", ".join(setting) or "all", name, data, str(len(rows))]
            cells += [_mean_std([r.get(c) for r in rows], c) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_sweep_summary(folder: str | Path) -> None:
    """Write ``sweep_summary.md`` across the runs below ``folder`` and print it; nothing when none finished.

    Rows are told apart by the settings that differ between the runs' configs (flattened to dotted keys,
    e.g. ``forget.classes``), seeds aside: runs that differ only in their seed are averaged.

    Args:
        folder: the sweep folder; every ``report.json`` below it is one run.
    """
    folder = Path(folder)
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("**/report.json"))]
    if not reports:
        return
    varying = _varying_settings([r["config"] for r in reports])
    rows = [r | {"setting": {k: show(v) for k, v in _flat(r["config"]).items() if k in varying}} for r in reports]
    table = sweep_summary(rows, keys=sorted(varying))
    (folder / "sweep_summary.md").write_text(table)
    print(f"\nSweep of {len(reports)} runs, mean ± std over seeds ({folder / 'sweep_summary.md'}):\n\n{table}")


def _varying_settings(configs: list[dict[str, Any]]) -> set[str]:
    """The settings that tell a sweep's runs apart; seeds are averaged over, not told apart."""
    flat = [_flat(c) for c in configs]
    keys = set().union(*flat)
    return {k for k in keys if k != "seed" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one mapping of dotted keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mean_std(values: list[Any], column: str) -> str:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    if len(set(numbers)) <= 1:  # one run, or the same figure in every run (e.g. samples seen)
        return cell(numbers[0] if numbers else None, column)
    fmt = ".1f" if COLUMNS[column] == "d" else COLUMNS[column]
    return f"{statistics.mean(numbers):{fmt}} ± {statistics.stdev(numbers):{fmt}}"

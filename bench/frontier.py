"""Every recorded CIFAR-10 row against issue 24's two conflicting targets: the probe and the remaining classes.

    python bench/frontier.py --out bench/results/probe_frontier bench/results/cifar10_*

Reads the ``results.json`` of ``bench/forgetting.py`` runs (already recorded: nothing is trained) and places
every row but the original and retraining by two figures, each against the original and retraining of its own
run and seed, then averaged over the seeds: the share of the original-to-retrain gap of the linear probe on the
forgotten classes that the row closes (target >= 0.5), and its remaining-class test accuracy minus
retraining's (target >= -0.03). A row counts once per run it appears in. Beside them, the same probe's change
on the remaining classes against the original: a row that closes the gap by damaging every class's features
lowers it too, where retraining keeps it. Writes ``results.md`` (every point, sorted by the probe share, and the
points inside both targets) and ``frontier.png`` (one panel per forget setting, the target corner shaded) to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROBE_TARGET = 0.5
RETAIN_TARGET = -0.03
REFERENCES = ("original", "retrain")


@dataclass(frozen=True)
class Point:
    """One row of one run, averaged over the seeds the run measured it on."""

    run: str
    setting: str
    row: str
    probe_share: float
    retain_gap: float
    seeds: int
    #: The probe's remaining-class accuracy minus the original's (``None``: not recorded).
    probe_retain_change: float | None = None

    @property
    def meets_both(self) -> bool:
        return self.probe_share >= PROBE_TARGET and self.retain_gap >= RETAIN_TARGET


def points_of(results: Path) -> list[Point]:
    """The rows of one run's ``results.json`` but the original (retraining's share is 1 by definition); rows or seeds
    without a probe, or with no probe gap, are left out."""
    reports = json.loads(results.read_text())["reports"]
    per_row: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {}
    for report in reports:
        models = report["models"]
        original, retrain = models.get("original", {}), models.get("retrain", {})
        if "probe_forget_acc" not in original or "probe_forget_acc" not in retrain:
            continue
        gap = original["probe_forget_acc"] - retrain["probe_forget_acc"]
        if gap <= 0:
            continue
        for name, figures in models.items():
            if name == "original" or "probe_forget_acc" not in figures:
                continue
            share = (original["probe_forget_acc"] - figures["probe_forget_acc"]) / gap
            both = "probe_retain_acc" in figures and "probe_retain_acc" in original
            change = figures["probe_retain_acc"] - original["probe_retain_acc"] if both else None
            cell = per_row.setdefault((_setting(report["setting"]), name), [])
            cell.append((share, figures["retain_acc"] - retrain["retain_acc"], change))
    return [
        Point(
            results.parent.name,
            setting,
            row,
            statistics.mean(s for s, _, _ in cells),
            statistics.mean(r for _, r, _ in cells),
            len(cells),
            None if any(c is None for _, _, c in cells) else statistics.mean(c for _, _, c in cells),
        )
        for (setting, row), cells in per_row.items()
    ]


def _setting(setting: dict) -> str:
    """The forget setting and, where recorded, its shots: rows of different shot counts are different protocols."""
    return f"{setting['forget']}, {setting['shots']} shots" if "shots" in setting else setting["forget"]


def render(points: Sequence[Point], runs: Sequence[str]) -> str:
    lines = [
        "# Every recorded row against the probe and remaining-class targets",
        "",
        f"Runs: {', '.join(f'`{r}`' for r in runs)}. Probe share: the share of the original-to-retrain gap of the",
        "linear probe on the forgotten classes the row closes (target >= 0.5); retain gap: remaining-class test",
        "accuracy minus retraining's (target >= -0.03); both against the run's own original and retraining, mean over",
        "its seeds. Remaining probe: the probe's accuracy on the remaining classes minus the original's.",
        "",
    ]
    for setting in dict.fromkeys(p.setting for p in points):
        here = [p for p in points if p.setting == setting and p.row not in REFERENCES]
        inside = [p for p in here if p.meets_both]
        lines += [
            f"## {setting}",
            "",
            f"Inside both targets: {len(inside)} of {len(here)} points"
            + (": " + ", ".join(f"`{p.run}` {p.row}" for p in inside) if inside else "."),
            "",
            *_remaining_probe_summary([p for p in points if p.setting == setting]),
        ]
        lines += [
            "| run | row | seeds | probe share | retain gap | remaining probe |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for p in sorted(here, key=lambda p: -p.probe_share):
            change = "-" if p.probe_retain_change is None else f"{p.probe_retain_change:+.3f}"
            lines.append(f"| {p.run} | {p.row} | {p.seeds} | {p.probe_share:.2f} | {p.retain_gap:+.3f} | {change} |")
        lines.append("")
    return "\n".join(lines)


def _remaining_probe_summary(points: Sequence[Point]) -> list[str]:
    """How the remaining classes' probe moved where the probe target is met, and where retraining sits."""

    def span(chosen: Sequence[Point]) -> str:
        changes = [p.probe_retain_change for p in chosen if p.probe_retain_change is not None]
        return f"{min(changes):+.3f} to {max(changes):+.3f}" if changes else "not recorded"

    closing = [p for p in points if p.row not in REFERENCES and p.probe_share >= PROBE_TARGET]
    if not closing:
        return []
    retrain = [p for p in points if p.row == "retrain"]
    return [
        f"Remaining-class probe where the probe share is {PROBE_TARGET} or more: {span(closing)} "
        f"({len(closing)} points); retraining: {span(retrain)}.",
        "",
    ]


def plot(points: Sequence[Point], path: Path, ours: str = "relevance") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if p.row not in REFERENCES]
    settings = list(dict.fromkeys(p.setting for p in points))
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 5.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        here = [p for p in points if p.setting == setting]
        top = max(1.0, max(p.probe_share for p in here)) + 0.05
        ax.fill_between([RETAIN_TARGET, 0.05], PROBE_TARGET, top, color="tab:green", alpha=0.15, label="both targets")
        families = (
            ("ours, defaults", lambda p: p.row == ours, {"marker": "s", "color": "black", "s": 60}),
            ("ours, a variant", lambda p: p.row.startswith(f"{ours}:"), {"marker": "o", "color": "tab:blue", "s": 25}),
            ("peers", lambda p: not p.row.startswith(ours), {"marker": "^", "color": "tab:gray", "s": 25}),
        )
        for label, member, style in families:
            chosen = [p for p in here if member(p)]
            if chosen:
                ax.scatter([p.retain_gap for p in chosen], [p.probe_share for p in chosen], label=label, **style)
        ax.set_xlim(max(-0.35, min(p.retain_gap for p in here) - 0.01), 0.05)
        ax.set_ylim(min(-0.1, min(p.probe_share for p in here) - 0.05), top)
        ax.axvline(RETAIN_TARGET, color="tab:green", linestyle="--", linewidth=1)
        ax.axhline(PROBE_TARGET, color="tab:green", linestyle="--", linewidth=1)
        ax.set_xlabel("remaining-class accuracy minus retraining's")
        ax.set_ylabel("share of the probe's original-to-retrain gap closed")
        ax.set_title(f"forget {setting}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders of bench/forgetting.py runs (with results.json)")
    parser.add_argument("--out", type=Path, required=True, help="where results.md and frontier.png go")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json of bench/forgetting.py in {', '.join(missing)}: name only its run folders")
    runs = args.runs
    points = [p for run in runs for p in points_of(run / "results.json")]
    if all(p.row in REFERENCES for p in points):
        parser.error("no run has the linear probe on the original, retraining and a method row")
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(points, [r.name for r in runs])
    (args.out / "results.md").write_text(text)
    plot(points, args.out / "frontier.png")
    print(text)


if __name__ == "__main__":
    main()

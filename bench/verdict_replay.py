"""Replay the fits' verdicts of a robustness matrix with other criteria, without running a model.

    python bench/verdict_replay.py bench/results/robustness/results.json --tolerances 0.03 0.05 0.1 1
    python bench/verdict_replay.py results.json --criteria '{"max_retain_drop": 0.05}' '{"max_attack_acc": 0.2}'

``--tolerances``: every row of ``bench/robustness.py`` records the verdict's shortfalls in words. A cell whose only
shortfalls are "remaining-class own-class probability fell from A to B" with ``A - B`` within the tolerance would
have been called forgotten.

``--criteria`` (JSON ``ForgetCriterion`` settings): rows that recorded the verdict's evidence (``verdict_evidence``:
before and after on the judged samples, and the retain-only attack) are judged again by that criterion, exactly as
the callback judges them at the end of the fit. The fits themselves do not change: the stop rule judges the trained
samples with the fit's own criterion, and only the end-of-fit verdict is replayed.

Prints, per stack, shot count and setting, the precision (called forgotten and passing on the test set / called
forgotten) and the recall (passing cells called forgotten / passing cells).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

from robustness import verdict_counts

from lightning_forget import ForgetCriterion
from lightning_forget.plugin.verdict import Evidence, RetainAttack

FALL = re.compile(r"remaining-class own-class probability fell from ([\d.]+) to ([\d.]+)")


def called_with_tolerance(row: dict, tolerance: float) -> bool:
    """Whether the verdict would say forgotten with that tolerance on the own-class probability's fall."""
    if row["verdict_forgotten"]:
        return True
    shortfalls = row["verdict_shortfalls"] or []
    if not row["verdict_judged"] or not shortfalls:
        return False
    falls = [FALL.match(s) for s in shortfalls]
    return all(m is not None and float(m[1]) - float(m[2]) <= tolerance for m in falls)


def called_by(row: dict, criterion: ForgetCriterion) -> bool:
    """Whether ``criterion`` says forgotten on the evidence the row's verdict judged."""
    evidence = row.get("verdict_evidence")
    if evidence is None or evidence["before"] is None or "judged_on" not in evidence:
        return bool(row["verdict_forgotten"])  # not judged, or evidence not (fully) recorded: as the fit said
    before, after = Evidence(**evidence["before"]), Evidence(**evidence["after"])
    attack = None if evidence["attack"] is None else RetainAttack(**evidence["attack"])
    unseen = evidence["judged_on"] != "trained"
    return unseen and not criterion.shortfalls(before, after, unseen=True) + criterion.attack_shortfalls(attack)


def quality(rows: list[dict], called: Callable[[dict], bool]) -> str:
    said, right, passing = verdict_counts(rows, called)
    precision = f"{right}/{said} ({right / said:.0%})" if said else "-"
    return f"{precision} | {right}/{passing} ({right / max(passing, 1):.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files of bench/robustness.py")
    parser.add_argument("--tolerances", type=float, nargs="*", default=[])
    parser.add_argument("--criteria", type=json.loads, nargs="*", default=[], help="ForgetCriterion settings")
    args = parser.parse_args()
    settings: list[tuple[str, Callable[[dict], bool]]] = [
        (f"own-class tolerance {t}", lambda r, t=t: called_with_tolerance(r, t)) for t in args.tolerances
    ]
    for kwargs in args.criteria:
        criterion = ForgetCriterion(**kwargs)
        settings.append((json.dumps(kwargs), lambda r, c=criterion: called_by(r, c)))
    if not settings:
        settings.append(("as the fits said", lambda r: bool(r["verdict_forgotten"])))
    print("| results | setting | stack | shots | precision | recall |\n|---|---|---|---:|---:|---:|")
    for path in args.results:
        rows = json.loads(Path(path).read_text())["rows"]
        for name, called in settings:
            for stack, shots in sorted({(r["stack"], r["shots"]) for r in rows}):
                cells = [r for r in rows if r["stack"] == stack and r["shots"] == shots]
                print(f"| {path} | {name} | {stack} | {shots} | {quality(cells, called)} |")


if __name__ == "__main__":
    main()

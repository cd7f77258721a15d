"""Replay the fit's verdict of a robustness matrix with a looser own-class probability check on held-back samples.

    python bench/verdict_replay.py bench/results/robustness/results.json --tolerances 0.03 0.05 0.1 1

No model runs: every row of ``bench/robustness.py`` records the verdict's shortfalls in words. A cell whose only
shortfalls are "remaining-class own-class probability fell from A to B" with ``A - B`` within the tolerance would
have been called forgotten. Prints, per stack and tolerance, the precision (called forgotten and passing on the test
set / called forgotten) and the recall (passing cells called forgotten / passing cells).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FALL = re.compile(r"remaining-class own-class probability fell from ([\d.]+) to ([\d.]+)")


def called_forgotten(row: dict, tolerance: float) -> bool:
    """Whether the verdict would say forgotten with that tolerance on the own-class probability's fall."""
    if row["verdict_forgotten"]:
        return True
    shortfalls = row["verdict_shortfalls"] or []
    if not row["verdict_judged"] or not shortfalls:
        return False
    falls = [FALL.match(s) for s in shortfalls]
    return all(m is not None and float(m[1]) - float(m[2]) <= tolerance for m in falls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files of bench/robustness.py")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.03, 0.05, 0.1, 0.15, 1.0])
    args = parser.parse_args()
    print("| results | tolerance | stack | precision | recall |\n|---|---:|---|---:|---:|")
    for path in args.results:
        rows = json.loads(Path(path).read_text())["rows"]
        for tolerance in args.tolerances:
            for stack in sorted({r["stack"] for r in rows}):
                cells = [r for r in rows if r["stack"] == stack]
                said = [r for r in cells if called_forgotten(r, tolerance)]
                passing = [r for r in cells if r["passed"]]
                right = sum(r["passed"] for r in said)
                recall = sum(called_forgotten(r, tolerance) for r in passing)
                precision = f"{right}/{len(said)} ({right / len(said):.0%})" if said else "-"
                print(
                    f"| {path} | {tolerance} | {stack} | {precision} | "
                    f"{recall}/{len(passing)} ({recall / max(len(passing), 1):.0%}) |"
                )


if __name__ == "__main__":
    main()

"""How far every training-result bound of the test suite sits from what the tests measure, over seeds and threads.

    python bench/ci_stability.py --out bench/results/ci_stability

Runs the test files that assert figures a training produced (``bound(...)`` in ``tests/conftest.py``)
with ``LF_TEST_SEED`` = each of ``--seeds`` and ``OMP_NUM_THREADS`` = each of ``--threads``, one run
at a time, collects every checked value, and prints each bound beside the spread it saw: the
smallest margin, in the bound's direction, is what a machine with other float kernels has to spare.
A bound whose margin is negative failed in some run. Writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_methods.py",
    "tests/test_end_to_end.py",
    "tests/test_readme.py",
    "tests/test_callback.py",
    "tests/test_evidence.py",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/ci_stability")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tests", nargs="+", default=TESTS)
    args = parser.parse_args()
    records, failures, start = [], [], time.perf_counter()
    for threads in args.threads:
        for seed in args.seeds:
            with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as log:
                path = log.name
            env = {**os.environ, "LF_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads), "LF_BOUNDS_LOG": path}
            command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *args.tests]
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
            print(f"seed {seed}, {threads} thread(s): {summary}", flush=True)
            if result.returncode:
                failed = [line.split(" - ")[0] for line in result.stdout.splitlines() if line.startswith("FAILED")]
                failures.append({"seed": seed, "threads": threads, "summary": summary, "failed": failed})
                print("\n".join(f"  {name}" for name in failed), flush=True)
            rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
            records += [{**r, "threads": threads} for r in rows]
            os.unlink(path)
    table = summarise(records)
    lines = [
        "# Training-result bounds of the test suite against their spread",
        "",
        f"`python {' '.join(sys.argv)}`: seeds {args.seeds}, OMP_NUM_THREADS {args.threads}; {platform.machine()} "
        f"CPU, {date.today()}, {(time.perf_counter() - start) / 60:.1f} min. Versions: `pip-freeze.txt` beside this.",
        "",
        "Margin: the smallest distance, in the bound's favour, between a measured value and the bound.",
        "",
        "| bound | op | limit | min | max | runs | margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['bound']} | {row['op']} | {row['limit']:g} | {row['min']:.4f} | {row['max']:.4f} "
            f"| {row['runs']} | {row['margin']:+.4f} |"
        )
    lines += ["", f"Failed runs: {failures or 'none'}"]
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"bounds": table, "records": records, "failures": failures}, indent=1))
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    (out / "pip-freeze.txt").write_text(freeze)
    print("\n".join(lines))


def summarise(records: list[dict]) -> list[dict]:
    table = []
    for name in sorted({r["bound"] for r in records}):
        mine = [r for r in records if r["bound"] == name]
        values = [r["value"] for r in mine]
        op, limit = mine[0]["op"], mine[0]["limit"]
        margin = min(limit - v for v in values) if op.startswith("<") else min(v - limit for v in values)
        table.append({"bound": name, "op": op, "limit": limit, "min": min(values), "max": max(values),
                      "runs": len(values), "margin": margin})  # fmt: skip
    return table


if __name__ == "__main__":
    main()

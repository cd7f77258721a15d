"""How robust the README quickstart is: its forgotten/remaining test accuracy over seeds and fractions.

    python bench/quickstart_seeds.py --seeds 0 1 2 3 --fractions 0.1 0.2

Runs the README's quickstart snippet as written, with only ``L.seed_everything(0)`` and the
callback's ``fraction`` replaced, and prints one line per run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2])
    args = parser.parse_args()
    snippet = re.search(r"## Quickstart\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    call = "ClassForgetting(forget_classes=[3, 7])"
    assert call in snippet and "L.seed_everything(0)" in snippet, "the quickstart changed: update this script"
    for fraction in args.fractions:
        for seed in args.seeds:
            code = snippet.replace("L.seed_everything(0)", f"L.seed_everything({seed})").replace(
                call, f"ClassForgetting(forget_classes=[3, 7], fraction={fraction})"
            )
            namespace: dict = {}
            with (
                tempfile.TemporaryDirectory() as tmp,
                contextlib.chdir(tmp),  # Python >= 3.11
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                exec(compile(code, "README quickstart", "exec"), namespace)
            metrics = namespace["trainer"].callback_metrics
            print(
                f"fraction {fraction} seed {seed}: test/forget_acc {float(metrics['test/forget_acc']):.3f} "
                f"test/retain_acc {float(metrics['test/retain_acc']):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

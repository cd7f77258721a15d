"""Where the linear probe finds a forgotten class: along one direction of the original's features?

    python bench/probe_projection.py --out bench/results/probe_projection

For each seed and forget setting of ``bench/forgetting.py``'s CPU protocol (the same originals, from the model
cache, trained and cached where missing; the same few shots, probe images and test set), the evidence's linear
probe on the original's penultimate features: as they are, and with the direction from the remaining classes' mean
feature to each forgotten class's projected out of every feature (one direction per class), estimated on the 10
few shots (what a method has) or on the probe's own training images (an oracle). No forgetting runs: this measures
how much of what the probe finds a single linear change of the features would remove, not what a method removes.
Prints a markdown table and writes it, with the figures as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from forgetting import load_data, original_of, recipe_of
from forgetting import parse_args as protocol_args
from torch import Tensor
from torch.utils.data import Subset

from lightning_forget import few_shot_subset
from lightning_forget.app.cache import ModelCache
from lightning_forget.evaluation.evidence import draw_per_class, penultimate_features, probe_on_features
from lightning_forget.plugin.classes import resolve_classes


def without_directions(features: Tensor, labels: Tensor, forgotten: list[int]) -> Tensor:
    """The projector that removes each forgotten class's mean-feature direction, as ``features`` show it."""
    is_forgotten = torch.isin(labels, torch.tensor(forgotten))
    center = features[~is_forgotten].double().mean(0)
    gaps = torch.stack([features[labels == c].double().mean(0) - center for c in forgotten], 1)
    basis = torch.linalg.qr(gaps).Q
    return torch.eye(len(center), dtype=torch.float64) - basis @ basis.T


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/probe_projection")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forget", nargs="+", default=["automobile", "airplane,ship"])
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--probe-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    protocol = protocol_args(["--out", args.out])  # bench/forgetting.py's defaults: data, recipe, model cache
    data = load_data(protocol)
    recipe, cache = recipe_of(protocol), ModelCache(protocol.cache_dir)
    rows = []
    for seed in args.seeds:
        original, _ = original_of(protocol, data, recipe, cache, seed)
        few_shot = few_shot_subset(data.train, args.shots, seed=seed)
        probe_train = draw_per_class(data.train_eval, args.probe_per_class, seed, few_shot.indices)
        x_shots, y_shots = penultimate_features(original, Subset(data.train_eval, few_shot.indices), data.num_classes)
        x_train, y_train = penultimate_features(original, probe_train, data.num_classes)
        x_test, y_test = penultimate_features(original, data.test, data.num_classes)
        for spec in args.forget:
            forgotten = resolve_classes(spec.split(","), data.class_names)
            row = {"seed": seed, "forget": spec}
            for name, projector in (
                ("as is", None),
                ("few shots", without_directions(x_shots, y_shots, forgotten)),
                ("oracle", without_directions(x_train, y_train, forgotten)),
            ):
                a, b = (
                    (x_train, x_test)
                    if projector is None
                    else (x_train.double() @ projector, x_test.double() @ projector)
                )
                row[name] = probe_on_features(a, y_train, b, y_test, forgotten, data.num_classes)
            rows.append(row)
            print(_row(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join([HEADER, *(_row(r) for r in rows)])
    command = " ".join(["python", *sys.argv])
    (out / "results.md").write_text(
        f"# Probe with the forgotten classes' directions projected out\n\n`{command}`\n\n{table}\n"
    )
    (out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(table)


HEADER = (
    "| seed | forget | probe, forgotten / remaining classes: as is | few-shot directions out | oracle ones out |\n"
    "|---:|---|---:|---:|---:|"
)


def _row(row: dict) -> str:
    cells = [
        f"{row[k]['probe_forget_acc']:.3f} / {row[k]['probe_retain_acc']:.3f}" for k in ("as is", "few shots", "oracle")
    ]
    return f"| {row['seed']} | {row['forget']} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()

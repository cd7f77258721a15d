"""Where the linear probe finds a forgotten class: along one direction of the original's features?

    python bench/probe_projection.py --out bench/results/probe_projection
    python bench/probe_projection.py --layer 11 --out bench/results/probe_projection_preactivation

For each seed and forget setting of ``bench/forgetting.py``'s CPU protocol (the same originals, from the model
cache, trained and cached where missing; the same few shots, probe images and test set), the evidence's linear
probe on the original's penultimate features: as they are, and with the direction from the remaining classes' mean
feature to each forgotten class's projected out of every feature (one direction per class), estimated on the 10
few shots (what a method has) or on the probe's own training images (an oracle). ``--layer NAME`` projects the
output of that module instead (channels on dim 1, directions from its spatial means): for the ``cnn``, ``11`` is
the last BatchNorm, before the ReLU and pooling that make the features, a change its convolution and shift could
absorb. ``--channels K`` keeps each direction on its K largest channels only (zero elsewhere): a change confined
to K channels, as a sparse mask would confine it. ``--orthogonal`` removes from each direction its part in the span
of the remaining classes' own mean directions, so that only what sets the forgotten class apart from all of them
is projected out and every remaining class's mean stays where it was. No forgetting runs: this measures how much
of what the probe finds one linear change would remove, not what a method removes; each cell also gives the
model's own test accuracy on the remaining classes. Any other option is ``bench/forgetting.py``'s (``--root``,
``--arch``, ``--epochs``...). Prints a markdown table and writes it, with the figures as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from forgetting import load_data, original_of, recipe_of
from forgetting import parse_args as protocol_args
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightning_forget import few_shot_subset
from lightning_forget.app.cache import ModelCache
from lightning_forget.evaluation.evidence import draw_per_class, features_and_logits, probe_on_features
from lightning_forget.plugin.accuracy import subset_accuracy
from lightning_forget.plugin.classes import remaining_classes, resolve_classes
from lightning_forget.plugin.features import final_linear
from lightning_forget.plugin.projection import class_directions

SOURCES = ("as is", "few shots", "oracle")


@contextmanager
def changed(model: nn.Module, num_classes: int, layer: str | None, change: nn.Module | None) -> Iterator[None]:
    """Within the block, ``change`` maps ``layer``'s output (``None``: the final linear layer's input)."""
    if change is None:
        yield
        return
    if layer is None:
        head = final_linear(model, num_classes)[1]
        handle = head.register_forward_pre_hook(lambda _m, inputs: (change(inputs[0]), *inputs[1:]))
    else:
        handle = dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, output: change(output))
    try:
        yield
    finally:
        handle.remove()


class Recorder(nn.Module):
    """Keeps the channel means (spatial means of dim 1) of what passes through, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().flatten(2).mean(-1) if x.dim() > 2 else x.detach())
        return x


class Projection(nn.Module):
    """``x -> center + P (x - center)`` on the channels (dim 1), P removing the span of ``directions``."""

    def __init__(self, directions: Tensor, center: Tensor) -> None:
        super().__init__()
        basis = torch.linalg.qr(directions.double()).Q
        self.projector = (torch.eye(len(center), dtype=torch.float64) - basis @ basis.T).float()
        self.center = center.float()

    def forward(self, x: Tensor) -> Tensor:
        moved = x.movedim(1, -1) - self.center
        return (moved @ self.projector.T + self.center).movedim(-1, 1)


def projection_from(
    means: Tensor, labels: Tensor, forgotten: list[int], channels: int | None = None, orthogonal: bool = False
) -> Projection:
    """Removes each forgotten class's direction from the remaining classes' mean, as ``means`` show them; with
    ``channels``, each direction on its ``channels`` largest entries only; with ``orthogonal``, each direction less
    its part in the span of the remaining classes' mean directions."""
    center, directions = class_directions(means, labels, forgotten, orthogonal)
    if channels is not None:
        smaller = directions.abs().argsort(0, descending=True)[channels:]
        directions = directions.scatter(0, smaller, 0.0)
    return Projection(directions, center)


def recorded(model: nn.Module, num_classes: int, layer: str | None, dataset: Dataset) -> tuple[Tensor, Tensor]:
    recorder = Recorder()
    with changed(model, num_classes, layer, recorder):
        _, _, labels = features_and_logits(model, dataset, num_classes)
    return torch.cat(recorder.seen), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/probe_projection")
    parser.add_argument("--layer", default=None, help="module whose output is projected (default: the features)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forget", nargs="+", default=["automobile", "airplane,ship"])
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--probe-per-class", type=int, default=50)
    parser.add_argument("--channels", type=int, default=None, help="each direction on its K largest channels only")
    parser.add_argument(
        "--orthogonal", action="store_true", help="each direction less its part along the remaining classes' means"
    )
    args, rest = parser.parse_known_args(argv)
    protocol = protocol_args(["--out", args.out, *rest])  # bench/forgetting.py's data, recipe and model cache
    data = load_data(protocol)
    recipe, cache, n = recipe_of(protocol), ModelCache(protocol.cache_dir), data.num_classes
    rows = []
    for seed in args.seeds:
        original, _ = original_of(protocol, data, recipe, cache, seed)
        few_shot = few_shot_subset(data.train, args.shots, seed=seed)
        probe_train = draw_per_class(data.train_eval, args.probe_per_class, seed, few_shot.indices)
        shots = recorded(original, n, args.layer, Subset(data.train_eval, few_shot.indices))
        oracle = recorded(original, n, args.layer, probe_train)
        for spec in args.forget:
            forgotten = resolve_classes(spec.split(","), data.class_names)
            row = {"seed": seed, "forget": spec}
            for source, seen in zip(SOURCES, (None, shots, oracle)):
                change = None if seen is None else projection_from(*seen, forgotten, args.channels, args.orthogonal)
                with changed(original, n, args.layer, change):
                    x_train, _, y_train = features_and_logits(original, probe_train, n)
                    x_test, logits, y_test = features_and_logits(original, data.test, n)
                row[source] = probe_on_features(x_train, y_train, x_test, y_test, forgotten, n)
                kept = remaining_classes(forgotten, n)
                row[source]["retain_acc"] = subset_accuracy(logits.argmax(-1), y_test, n, kept)
            rows.append(row)
            print(_row(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    table = "\n".join([HEADER, *(_row(r) for r in rows)])
    (out / "results.md").write_text(
        f"# The probe with forgotten classes' directions projected out\n\n`{command}`\n\n{table}\n"
    )
    (out / "results.json").write_text(
        json.dumps(
            {"command": command, "layer": args.layer, "channels": args.channels, "orthogonal": args.orthogonal}
            | {"rows": rows},
            indent=1,
        )
    )
    print(table)


HEADER = (
    "| seed | forget | probe on forgotten / remaining classes; model's remaining-class accuracy: as is "
    "| few-shot directions out | oracle directions out |\n|---:|---|---:|---:|---:|"
)


def _row(row: dict) -> str:
    cells = [
        f"{row[s]['probe_forget_acc']:.3f} / {row[s]['probe_retain_acc']:.3f}; {row[s]['retain_acc']:.3f}"
        for s in SOURCES
    ]
    return f"| {row['seed']} | {row['forget']} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()

"""Benchmark: forgetting vs retraining side by side on real CIFAR-10 images, plus ablations.

    python bench/forgetting.py --root ~/.cache/cifar10-jpg --out bench/results/cpu_1000

Trains one original model per seed, then for every forget setting, shot count and seed
produces each row (relevance, finetune, relevance with random scores, retrain_few, retrain)
from the same data, evaluates all of them on the same test set, and writes mean +- std over
seeds to ``<out>/results.md`` and every measured figure to ``<out>/results.json``. The
ablations (fraction, score, loss terms, BatchNorm) and the gating overhead run at one setting.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_forget import ClassForgetting, ForgettingModule, build_model, evaluate_forgetting, few_shot_subset
from lightning_forget.callback import DEFAULT_FRACTION
from lightning_forget.data import image_folder
from lightning_forget.methods import Recipe, run_method, train_classifier
from lightning_forget.report import changed_fraction

FIGURES = ("forget_acc", "retain_acc", "forget_train_acc", "mia", "seconds", "speedup", "changed_fraction")


def make_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="~/.cache/cifar10-jpg", help="folder with train/ and test/ (ImageFolder)")
    parser.add_argument("--out", default="bench/results/cpu_1000")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--train-per-class", type=int, default=1000, help="training images per class (0: all)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the original and retrain models")
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument("--train-optimizer", default="adam")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10, 50])
    parser.add_argument("--forget", nargs="+", default=["1", "0,8"], help="forget settings, comma-separated ids")
    parser.add_argument("--forget-lr", type=float, default=3e-3, help="learning rate of the forgetting fits")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION, help="ClassForgetting fraction")
    parser.add_argument("--skip-ablations", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = image_folder(args.root, train_per_class=args.train_per_class or None, in_memory=True)
    make_model = partial(build_model, args.arch, data.num_classes, data.in_channels)
    train_recipe = Recipe(epochs=args.epochs, batch_size=128, optimizer=args.train_optimizer, lr=args.train_lr)
    forget_recipe = Recipe(epochs=20, batch_size=32, lr=args.forget_lr)
    evaluate = partial(evaluate_forgetting, train=data.train_eval, test=data.test, num_classes=data.num_classes)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        original = make_model()
        orig_seconds = train_classifier(original, data.train, data.num_classes, train_recipe, make_trainer).seconds
        for spec in args.forget:
            forget = [int(c) for c in spec.split(",")]
            ev = partial(evaluate, forget_classes=forget, seed=seed)
            base = {"seed": seed, "forget": spec}
            rows.append(
                {
                    **base,
                    "shots": None,
                    "row": "original",
                    **ev(original),
                    "seconds": orig_seconds,
                    "changed_fraction": 0.0,
                }
            )
            common = dict(
                original=original,
                make_model=make_model,
                train_data=data.train,
                forget_classes=forget,
                num_classes=data.num_classes,
                forget_recipe=forget_recipe,
                train_recipe=train_recipe,
                make_trainer=make_trainer,
            )
            L.seed_everything(seed, verbose=False)
            retrain = run_method("retrain", few_shot=data.train, **common)
            rows.append(
                {
                    **base,
                    "shots": None,
                    "row": "retrain",
                    **ev(retrain.model),
                    "seconds": retrain.seconds,
                    "changed_fraction": 1.0,
                }
            )
            for shots in args.shots:
                few = few_shot_subset(data.train, shots, seed=seed)
                variants = {
                    "relevance": ("relevance", {"fraction": args.fraction}),
                    "finetune": ("finetune", {}),
                    "relevance_random": ("relevance", {"fraction": args.fraction, "score": "random", "seed": seed}),
                    "retrain_few": ("retrain_few", {}),
                }
                for row, (method, relevance) in variants.items():
                    L.seed_everything(seed, verbose=False)
                    outcome = run_method(method, few_shot=few, relevance=relevance, **common)
                    figures = ev(outcome.model)
                    rows.append(
                        {
                            **base,
                            "shots": shots,
                            "row": row,
                            **figures,
                            "seconds": outcome.seconds,
                            "changed_fraction": changed_fraction(outcome.model, original),
                        }
                    )
                    print(
                        f"seed {seed} forget {spec} shots {shots} {row}: "
                        f"forget {figures['forget_acc']:.3f} retain {figures['retain_acc']:.3f} "
                        f"mia {figures['mia']:.3f} {outcome.seconds:.1f}s",
                        flush=True,
                    )
        if seed == args.seeds[0] and not args.skip_ablations:
            first = [int(c) for c in args.forget[0].split(",")]
            ablations = run_ablations(original, data, forget_recipe, first, seed, evaluate)
    for r in rows:
        retrain_seconds = next(
            x["seconds"]
            for x in rows
            if x["row"] == "retrain" and x["seed"] == r["seed"] and x["forget"] == r["forget"]
        )
        r["speedup"] = retrain_seconds / r["seconds"] if r["seconds"] else float("nan")

    meta = {
        "command": "python bench/forgetting.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"),
        "date": date.today().isoformat(),
        "wall_seconds": time.perf_counter() - started,
        "train_images": len(data.train),
        "test_images": len(data.test),
    }
    overhead = gating_overhead(make_model, data, seed=args.seeds[0])
    result = {"meta": meta, "rows": rows, "overhead": overhead}
    if not args.skip_ablations:
        result["ablations"] = ablations
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render(result))
    print(render(result))


def run_ablations(original, data, recipe, forget, seed, evaluate) -> dict[str, list[dict[str, Any]]]:
    """One knob at a time around the defaults, 10 shots, first forget setting, one seed."""
    few = few_shot_subset(data.train, 10, seed=seed)
    ev = partial(evaluate, forget_classes=forget, seed=seed)

    def run(
        relevance: dict[str, Any] | None = None, objective: dict[str, Any] | None = None, recipe: Recipe = recipe
    ) -> dict[str, Any]:
        L.seed_everything(seed, verbose=False)
        model = copy.deepcopy(original)
        module = ForgettingModule(model, forget, data.num_classes, **(objective or {}), **recipe.module_kwargs())
        callback = ClassForgetting(forget, **(relevance or {}))
        trainer = make_trainer(max_epochs=recipe.epochs, callbacks=[callback])
        start = time.perf_counter()
        trainer.fit(module, DataLoader(few, batch_size=recipe.batch_size, shuffle=True))
        seconds = time.perf_counter() - start
        return {**ev(model), "seconds": seconds}

    results: dict[str, list[dict[str, Any]]] = {"fraction": [], "score": [], "loss": [], "batchnorm": [], "lr": []}
    for fraction in (0.001, 0.01, 0.05, 0.1, 0.2, 1.0):
        results["fraction"].append({"setting": fraction, **run({"fraction": fraction})})
    for score in ("ratio", "forget_grad", "fisher_ratio", "random"):
        results["score"].append({"setting": score, **run({"score": score})})
    for name, objective in {
        "all terms": {},
        "no retain CE": {"retain_weight": 0.0},
        "no distillation": {"distill_weight": 0.0},
        "no forget term": {"forget_weight": 0.0},
        "forget=uniform": {"forget_loss": "uniform"},
        "forget=random_label": {"forget_loss": "random_label"},
        "forget=ascent": {"forget_loss": "ascent"},
    }.items():
        results["loss"].append({"setting": name, **run(objective=objective)})
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        recipe_at_lr = dataclasses.replace(recipe, lr=lr)
        results["lr"].append({"setting": lr, **run(recipe=recipe_at_lr)})
    for freeze in (True, False):
        results["batchnorm"].append({"setting": "frozen" if freeze else "updated", **run({"freeze_bn_stats": freeze})})
    return results


def gating_overhead(make_model, data, seed: int, steps: int = 200, repeats: int = 5) -> dict[str, Any]:
    """Seconds per optimizer step with and without the callback, interleaved in one process."""
    few = few_shot_subset(data.train, 10, seed=seed)
    loader = DataLoader(few, batch_size=32, shuffle=True)
    epochs = max(1, steps // len(loader))
    times: dict[str, list[float]] = {"plain": [], "gated": []}
    kept_bytes = param_bytes = 0
    for _ in range(repeats):
        for variant in ("plain", "gated"):
            L.seed_everything(seed, verbose=False)
            model = make_model()
            module = ForgettingModule(model, [3], data.num_classes)
            callbacks = [ClassForgetting([3], score="random")] if variant == "gated" else []
            step_timer = _StepTimer()
            make_trainer(max_epochs=epochs, callbacks=[*callbacks, step_timer]).fit(module, loader)
            times[variant].append(statistics.median(step_timer.durations))
            if variant == "gated":
                params = dict(module.named_parameters())
                partly = [params[n] for n, m in callbacks[0].masks.items() if m.any() and not m.all()]
                kept_bytes = sum(p.numel() * p.element_size() for p in partly)
                param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plain, gated = statistics.median(times["plain"]), statistics.median(times["gated"])
    return {
        "plain_step_s": plain,
        "gated_step_s": gated,
        "overhead": gated / plain - 1,
        "kept_copy_bytes": kept_bytes,
        "param_bytes": param_bytes,
    }


class _StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimizer step and gating)."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.durations.append(time.perf_counter() - self._start)


def render(result: dict[str, Any]) -> str:
    """Markdown tables: mean +- std over seeds per setting, ablations, overhead."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Command: `{meta['command']}`",
        f"Machine: {meta['machine']}; date {meta['date']}; "
        f"{meta['train_images']} training / {meta['test_images']} test images; "
        f"total {meta['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    for spec in dict.fromkeys(r["forget"] for r in rows):
        shots_values = sorted({r["shots"] for r in rows if r["shots"] is not None})
        lines += [
            f"### Forget classes {spec}",
            "",
            "| row | shots | " + " | ".join(FIGURES) + " |",
            "|---|---:|" + "---:|" * len(FIGURES),
        ]
        groups = [("original", None), ("retrain", None)] + [
            (row, s) for s in shots_values for row in ("relevance", "finetune", "relevance_random", "retrain_few")
        ]
        for row, shots in groups:
            sel = [r for r in rows if r["forget"] == spec and r["row"] == row and r["shots"] == shots]
            if sel:
                cells = [_mean_std([r[f] for r in sel], f) for f in FIGURES]
                lines.append(f"| {row} | {shots or 'all'} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, table in result.get("ablations", {}).items():
        lines += [
            f"### Ablation: {name} (10 shots, seed {rows[0]['seed']}, forget {rows[0]['forget']})",
            "",
            "| setting | forget_acc | retain_acc | forget_train_acc | mia | seconds |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in table:
            lines.append(
                f"| {r['setting']} | {r['forget_acc']:.4f} | {r['retain_acc']:.4f} | "
                f"{r['forget_train_acc']:.4f} | {r['mia']:.4f} | {r['seconds']:.1f} |"
            )
        lines.append("")
    o = result["overhead"]
    lines += [
        "### Cost of gating",
        "",
        f"Median time per training step: {o['plain_step_s'] * 1e3:.2f} ms without the callback, "
        f"{o['gated_step_s'] * 1e3:.2f} ms with it ({o['overhead']:+.1%}). Kept copies of partly masked "
        f"tensors: {o['kept_copy_bytes'] / 1e6:.2f} MB for {o['param_bytes'] / 1e6:.2f} MB of parameters.",
        "",
    ]
    return "\n".join(lines)


def _mean_std(values: list[float], figure: str) -> str:
    fmt = ".1f" if figure in ("seconds", "speedup") else ".4f"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


if __name__ == "__main__":
    main()

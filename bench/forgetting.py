"""Benchmark: every forgetting method side by side with retraining, on real CIFAR-10 images.

    python bench/forgetting.py --out bench/results/cifar10_cpu                   # the CPU protocol
    python bench/forgetting.py --methods relevance retrain relevance:fraction=0.05 --seeds 0   # an ablation

For every seed the original model is trained once (or loaded from the model cache); then, for every
forget setting and shot count, one :class:`~lightning_forget.methods.ForgettingTask` goes to
:func:`lightning_forget.app.pipeline.compare` with the methods of ``--methods``. Those are the app's
``conf/method/<name>.yaml`` (composed and instantiated as ``python run.py method=<name>`` does, so both
use the same settings); ``NAME:KEY=VALUE[:KEY=VALUE...]`` changes settings of one row, e.g.
``relevance:fraction=0.05`` or ``relevance:recipe.lr=0.01``. The first method is the one under test.
Every row is evaluated alike (forget, retain and forget-train accuracy, MIA, linear probe, relearn,
retain-only attack, distance to the original). Every few-shot peer also gets a ``<peer>_tuned`` row: its
grid point closest to retraining on validation images that no model trains on (``bench/tuning.py``).
``<out>/results.md`` holds a headline table (mean ± std over seeds, bold only past both stds), the tuning
choices, where the time went and the mean ± std of every figure of every (setting, method) with its data
regime, samples seen, seconds and speed-up against retraining in the same run; ``<out>/results.json``
holds every comparison's report, ``<out>/tradeoff.png`` the remaining-class accuracy against relearn
resistance and the probe. All are rewritten after each comparison, so a run cut short keeps what it finished.

The CPU protocol (the defaults; 44 minutes cold on the 2-core development machine): the small ``cnn`` on 1000
training images per class (original and retraining: Adam, one-cycle peak 5e-3, 10 epochs, batch 128,
channels_last), the full test set, seeds 0 1 2, forgetting automobile (1), then airplane and ship (0,8), at 10
shots. Those classes were chosen because CIFAR-10 classifiers recognise them better than most (ResNet-18
reaches about 95-97% on each), so forgetting them is a large drop; the original row shows what this original
knew of them.
``bench/gpu.sh`` runs the paper-scale setting (ResNet-18 on 49,000 images, 100 a class kept for tuning).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, Subset
from tuning import TUNABLE, accuracies, grids, tune, validation_split

from lightning_forget import ProbeSettings, RelearnSettings, dataset_labels, evaluate_forgetting, few_shot_subset
from lightning_forget.app.cache import ModelCache
from lightning_forget.app.data import ClassificationData
from lightning_forget.app.evaluable import split_verdict_images
from lightning_forget.app.models import ARCHITECTURES, build_model
from lightning_forget.app.pipeline import Comparison, compare, obtain_original
from lightning_forget.app.report import COLUMNS, sweep_summary, verdict_line
from lightning_forget.evaluation.evidence import add_anamnesis_index
from lightning_forget.methods import ForgettingMethod, ForgettingTask, Recipe
from lightning_forget.plugin.classes import resolve_classes
from lightning_forget.plugin.module import OPTIMIZERS, SCHEDULERS

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
TIME_PARTS = (
    "original (trained or loaded)",
    "methods and retraining (trained or loaded)",
    "tuning grid",
    "evaluation",
)
# The headline table's figures and which way is better (+1: higher, -1: lower); the reference rows are not ranked.
HEADLINE = {
    "forget_acc": -1,
    "retain_acc": 1,
    "mia": -1,
    "probe_forget_acc": -1,
    "relearn_steps": 1,
    "anamnesis_index": 1,
    "retain_attack_acc": -1,
    "speedup": 1,
}
REFERENCES = ("original", "retrain")
DEFAULT_METHODS = [
    "relevance",
    "retrain",
    "retrain_few",
    "finetune",
    "head_only",
    "delete",
    "ssd",
    "ssd_full",
    "salun",
    "gradient_ascent",
    "random_label",
]  # salun_full trains 10 epochs on all data per setting, as long as retraining: add it where the time is there
log = logging.getLogger("bench")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="~/.cache/cifar10-jpg", help="folder with train/ and test/ (ImageFolder)")
    parser.add_argument("--out", default="bench/results/cifar10_cpu", help="where results.md and results.json go")
    parser.add_argument("--arch", default="cnn", choices=ARCHITECTURES)
    parser.add_argument("--train-per-class", type=int, default=1000, help="training images per class (0: all)")
    parser.add_argument("--test-per-class", type=int, default=0, help="class-balanced test subset (0: all)")
    parser.add_argument(
        "--verdict-per-class",
        type=int,
        default=10,
        help="test images per class that the fit's verdict judges and no row is measured on, drawn per seed as "
        "the app's forget.verdict_per_class (0: the fit holds back one shot per class)",
    )
    recipe = parser.add_argument_group("recipe of the original and of retraining")
    recipe.add_argument("--epochs", type=int, default=10)
    recipe.add_argument("--batch-size", type=int, default=128)
    recipe.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    recipe.add_argument("--lr", type=float, default=5e-3, help="learning rate (the peak with onecycle)")
    recipe.add_argument("--weight-decay", type=float, default=0.0)
    recipe.add_argument("--scheduler", default="onecycle", choices=["none", *filter(None, SCHEDULERS)])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[10], help="samples per class the methods get")
    parser.add_argument(
        "--forget", nargs="+", default=["1", "0,8"], help="forget settings: comma-separated class ids or names"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help=f"NAME or NAME:KEY=VALUE[:KEY=VALUE...], NAME one of {METHODS}; the first is the method under test",
    )
    parser.add_argument(
        "--tune-per-class",
        type=int,
        default=100,
        help="validation images per class, outside the training subset, that every peer's grid is scored on "
        "(0: published settings only)",
    )
    evidence = parser.add_argument_group("integrity evidence")
    evidence.add_argument("--probe-per-class", type=int, default=50, help="linear-probe images per class (0: off)")
    evidence.add_argument("--relearn-per-class", type=int, default=20, help="relearn images per class (0: off)")
    evidence.add_argument("--relearn-epochs", type=int, default=5)
    evidence.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="data, training, eval")
    parser.add_argument("--precision", default="32-true", help="Lightning Trainer precision, e.g. bf16-mixed")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="models in channels_last memory format (1.3x faster training, 1.9x inference on a 2-core CPU: "
        "bench/channels_last.py)",
    )
    parser.add_argument("--cache-dir", default="~/.cache/lightning-forget/models", help="trained models kept here")
    parser.add_argument(
        "--budget-minutes", type=float, help="start no further seed when the slowest seed so far would overrun this"
    )
    args = parser.parse_args(argv)
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods lists a method twice: {args.methods}")
    unknown = [spec for spec in args.methods if spec.split(":")[0] not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose among {METHODS}")
    for name in ("tune_per_class", "verdict_per_class"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.tune_per_class and "retrain" not in args.methods and set(args.methods) & set(TUNABLE):
        parser.error("the peers are tuned toward retraining: add retrain to --methods, or pass --tune-per-class 0")
    args.scheduler = None if args.scheduler == "none" else args.scheduler
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def composed(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<name>.yaml`` as the app composes it (``name`` is e.g. ``method/ssd``), with ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def load_method(spec: str) -> ForgettingMethod:
    """The method of one ``NAME[:KEY=VALUE...]`` spec."""
    return load_methods([spec])[0][spec]


def load_methods(specs: Sequence[str]) -> tuple[dict[str, ForgettingMethod], dict[str, Any]]:
    """The method of every spec (``NAME`` or ``NAME:KEY=VALUE...``) and its settings, keyed by the spec."""
    methods, settings = {}, {}
    for spec in specs:
        name, *overrides = spec.split(":")
        cfg = composed(f"method/{name}", [f"method.{o}" for o in overrides]).method
        methods[spec] = instantiate(cfg)
        settings[spec] = OmegaConf.to_container(cfg, resolve=True)
    return methods, settings


def load_data(args: argparse.Namespace) -> ClassificationData:
    """The app's CIFAR-10 image folder, decoded once into memory on ``args.device``."""
    cfg = composed("dataset/cifar10_jpg").dataset
    return instantiate(
        cfg,
        root=os.path.expanduser(args.root),
        train_per_class=args.train_per_class or None,
        in_memory=True,
        device=args.device,
    )


def recipe_of(args: argparse.Namespace) -> Recipe:
    """The recipe of the original and of retraining."""
    return Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
    )


def cache_key(args: argparse.Namespace, recipe: Recipe, seed: int) -> dict[str, Any]:
    """What an original (and its retraining) of this run depends on: its key in the model cache."""
    return {
        "dataset": {"root": os.path.expanduser(args.root), "train_per_class": args.train_per_class},
        "model": args.arch,
        "train": asdict(recipe),
        "seed": seed,
        "trainer": {"device": args.device, "precision": args.precision, "channels_last": args.channels_last},
    }


def original_of(
    args: argparse.Namespace, data: ClassificationData, recipe: Recipe, cache: ModelCache, seed: int
) -> tuple[nn.Module, float]:
    """The seed's original, from the model cache or trained (and cached) now, and its training seconds."""
    make_model = model_factory(args.arch, data.num_classes, data.in_channels, args.channels_last)
    L.seed_everything(seed, verbose=False)
    return obtain_original(
        make_model, data.train, data.num_classes, recipe, trainer_factory(args), cache, cache_key(args, recipe, seed),
        prefix=f"original-{args.arch}",
    )  # fmt: skip


def model_factory(arch: str, num_classes: int, in_channels: int, channels_last: bool) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = build_model(arch, num_classes, in_channels)
        # NHWC convolutions suit tensor cores; copies, caching and evaluation keep the format.
        return model.to(memory_format=torch.channels_last) if channels_last else model

    return make


def trainer_factory(args: argparse.Namespace) -> Callable[..., L.Trainer]:
    return partial(
        L.Trainer,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def evaluator(
    args: argparse.Namespace, data: ClassificationData, test: Dataset, task: ForgettingTask, seed: int
) -> Callable[[nn.Module], dict[str, Any]]:
    """Every row's evaluation: test figures, MIA, and the probe and relearn evidence unless turned off."""
    probe = ProbeSettings(per_class=args.probe_per_class, seed=seed) if args.probe_per_class else None
    relearn = None
    if args.relearn_per_class:
        relearn = RelearnSettings(per_class=args.relearn_per_class, epochs=args.relearn_epochs, seed=seed)
    return partial(
        evaluate_forgetting,
        train=data.train_eval,
        test=test,
        forget_classes=task.forget_classes,
        num_classes=data.num_classes,
        seed=seed,
        batch_size=args.eval_batch_size,
        device=args.device,
        original=task.original,
        probe=probe,
        relearn=relearn,
        exclude_indices=task.few_shot.indices,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods, settings = load_methods(args.methods)
    data = load_data(args)
    test = few_shot_subset(data.test, args.test_per_class) if args.test_per_class else data.test
    forget_settings = [resolve_classes(spec.split(","), data.class_names) for spec in args.forget]
    peers = [name for name in args.methods if name in TUNABLE] if args.tune_per_class else []
    # Drawn before any training, so that a folder with no images to spare stops the run at once.
    validation = validation_split(data, args.tune_per_class, seed=0) if peers else None
    make_model = model_factory(args.arch, data.num_classes, data.in_channels, args.channels_last)
    make_trainer = trainer_factory(args)
    recipe = recipe_of(args)
    grid = {peer: points for peer, points in grids(composed("method/relevance").method.recipe).items() if peer in peers}
    cache = ModelCache(args.cache_dir)
    meta = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "train_images": len(data.train),
        "test_images": len(test),
        "verdict_per_class": args.verdict_per_class,
        "validation_images": len(validation) if validation is not None else 0,
        "recipe": asdict(recipe),
        "methods": settings,
        "grids": grid,
        "seeds_asked": args.seeds,
        "time_spent": dict.fromkeys(TIME_PARTS, 0.0),
    }
    spent = meta["time_spent"]
    reports: list[dict[str, Any]] = []
    slowest = 0.0
    for seed in args.seeds:
        elapsed = time.perf_counter() - started
        if args.budget_minutes is not None and reports and elapsed + slowest > 60 * args.budget_minutes:
            log.info("Stopping before seed %d: %.0f s spent, a seed takes up to %.0f s.", seed, elapsed, slowest)
            break
        seed_start = time.perf_counter()
        key = cache_key(args, recipe, seed)
        clock = time.perf_counter()
        original, seconds = original_of(args, data, recipe, cache, seed)
        spent["original (trained or loaded)"] += time.perf_counter() - clock
        original.to(args.device)  # training-free methods and scoring run where the model is
        measured, verdict_images, _ = split_verdict_images(replace(data, test=test), args.verdict_per_class, seed)
        for forget in forget_settings:
            for shots in args.shots:
                few_shot = few_shot_subset(data.train, shots, seed=seed)
                few_shot_eval = Subset(data.train_eval, few_shot.indices)
                task = ForgettingTask(
                    original, make_model, data.train, few_shot, forget, data.num_classes, recipe,
                    few_shot_eval=few_shot_eval, verdict_data=verdict_images,
                )  # fmt: skip
                evaluate = timed(evaluator(args, data, measured.test, task, seed), spent, "evaluation")
                clock, evaluated = time.perf_counter(), spent["evaluation"]
                comparison = compare(
                    task,
                    methods,
                    lambda name: make_trainer,
                    evaluate,
                    seed=seed,
                    original_seconds=seconds,
                    cache=cache,
                    cache_key=key,
                )
                assert comparison is not None  # one process: no DDP rank is left out
                spent["methods and retraining (trained or loaded)"] += (
                    time.perf_counter() - clock - (spent["evaluation"] - evaluated)
                )
                report = comparison.report | {"class_names": data.class_names}
                if peers:
                    report["tuning"] = add_tuned_rows(
                        report["models"],
                        comparison,
                        grid,
                        task,
                        make_trainer,
                        validation,
                        evaluate,
                        seed=seed,
                        device=args.device,
                        spent=spent,
                    )
                report["setting"] = {"forget": _label(forget, data.class_names), "shots": shots, "seed": seed}
                report["original_test_acc"] = _overall_accuracy(report["models"]["original"], measured.test)
                _add_speedups(report["models"])
                reports.append(report)
                meta["wall_seconds"] = time.perf_counter() - started
                write_results(out, meta, reports)
                log.info("\n%s", sweep_summary([report], keys=("forget", "shots", "seed")))
        slowest = max(slowest, time.perf_counter() - seed_start)
    print(render(meta, reports))


def add_tuned_rows(
    models: dict[str, dict[str, Any]],
    comparison: Comparison,
    grid: dict[str, list[str]],
    task: ForgettingTask,
    make_trainer: Callable[..., L.Trainer],
    validation: Dataset,
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    device: str,
    spent: dict[str, float],
) -> dict[str, Any]:
    """Every peer of ``grid`` at its point closest to retraining on ``validation``, as a ``<peer>_tuned`` row.

    Returns:
        The search of every peer (see :func:`tuning.tune`) and retrain's validation figures it aimed at.
    """
    retrained = comparison.outcomes["retrain"].model
    target = accuracies(retrained, validation, task.forgotten_so_far, task.num_classes, device)
    records: dict[str, Any] = {"retrain_validation": target}
    for peer, points in grid.items():
        clock = time.perf_counter()
        outcome, records[peer] = tune(
            peer, points, load_method, task, make_trainer, validation, target, seed=seed, device=device
        )
        spent["tuning grid"] += time.perf_counter() - clock
        row = {**evaluate(outcome.model), "seconds": outcome.seconds, "samples": outcome.samples, "data": outcome.data}
        if "relearn_steps" in models["retrain"]:
            add_anamnesis_index(row, models["retrain"])
        models[f"{peer}_tuned"] = row
    side_by_side(models)
    return records


def side_by_side(models: dict[str, dict[str, Any]]) -> None:
    """Reorder ``models`` in place so that every ``<peer>_tuned`` row follows its published ``<peer>`` row."""
    ordered: dict[str, dict[str, Any]] = {}
    for name, row in models.items():
        if not name.endswith("_tuned") or name.removesuffix("_tuned") not in models:
            ordered[name] = row
            if f"{name}_tuned" in models:
                ordered[f"{name}_tuned"] = models[f"{name}_tuned"]
    models.clear()
    models.update(ordered)


def timed(function: Callable[..., Any], spent: dict[str, float], part: str) -> Callable[..., Any]:
    """``function``, adding the seconds of every call to ``spent[part]``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        clock = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - clock

    return run


def _overall_accuracy(figures: dict[str, Any], test: Dataset) -> float:
    counts = torch.bincount(dataset_labels(test), minlength=len(figures["per_class_acc"])).double()
    return float((torch.tensor(figures["per_class_acc"]).double().nan_to_num() * counts).sum() / counts.sum())


def _verdict_images(meta: dict[str, Any]) -> str:
    """What the fit's verdict judged, as the headline says it."""
    per_class = meta.get("verdict_per_class", 0)  # results written before the option held back a shot
    if not per_class:
        return "the fit's verdict judged one held-back shot per class"
    return f"{per_class} of each class, drawn per seed, judged the fit's verdict and no row is measured on them"


def _add_speedups(models: dict[str, dict[str, Any]]) -> None:
    """Every method row's speed-up: retraining's seconds over its own (same run, same machine)."""
    if "retrain" not in models:
        return
    for name, figures in models.items():
        if name != "original":
            figures["speedup"] = models["retrain"]["seconds"] / max(figures["seconds"], 1e-9)


def _label(classes: list[int], names: Sequence[str]) -> str:
    return ",".join(map(str, classes)) + f" ({', '.join(names[c] for c in classes)})"


def write_results(out: Path, meta: dict[str, Any], reports: list[dict[str, Any]]) -> None:
    """``results.json`` (every report) and ``results.md`` (the summary), each replaced whole."""
    texts = {
        "results.json": json.dumps({"meta": meta, "reports": reports}, indent=1),
        "results.md": render(meta, reports),
    }
    for name, text in texts.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    plot_tradeoff(reports, out / "tradeoff.png")


def _stats(reports: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Stat]]]:
    """Setting label to row name to figure to its :class:`Stat` over seeds; figures not measured left out.

    A relearn that never reached its target counts as the budget of steps: a lower bound (``Stat.censored``).
    """
    values: dict[str, dict[str, dict[str, list[tuple[float, bool]]]]] = {}
    for r in reports:
        setting = f"{r['setting']['forget']}, {r['setting']['shots']} shots"
        for name, figures in r["models"].items():
            for column in HEADLINE:
                value, censored = figures.get(column), False
                if column == "relearn_steps" and value is None and figures.get("relearn_budget"):
                    value, censored = figures["relearn_budget"], True
                if isinstance(value, (int, float)) and not math.isnan(value):
                    cell = values.setdefault(setting, {}).setdefault(name, {}).setdefault(column, [])
                    cell.append((float(value), censored))
    return {
        setting: {name: {c: Stat.of(v) for c, v in cols.items()} for name, cols in rows.items()}
        for setting, rows in values.items()
    }


@dataclass(frozen=True)
class Stat:
    """A figure over seeds: mean, standard deviation (0 for one seed), runs, and whether a run hit a bound."""

    mean: float
    std: float
    runs: int
    censored: bool

    @staticmethod
    def of(values: list[tuple[float, bool]]) -> Stat:
        numbers = [v for v, _ in values]
        spread = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
        return Stat(statistics.mean(numbers), spread, len(numbers), any(c for _, c in values))


def headline(reports: list[dict[str, Any]]) -> str:
    """Mean ± std of the headline figures; in each column the best method row in bold, only where its lead over
    the next row is larger than both rows' standard deviations (the reference rows are not ranked)."""
    lines = ["| setting | model | " + " | ".join(HEADLINE) + " |", "|---|---|" + "---:|" * len(HEADLINE)]
    for setting, rows in _stats(reports).items():
        bold = set()
        for column, sign in HEADLINE.items():
            ranked = sorted(
                (name for name, cols in rows.items() if name not in REFERENCES and column in cols),
                key=lambda name: -sign * rows[name][column].mean,
            )
            if len(ranked) > 1:
                best, second = rows[ranked[0]][column], rows[ranked[1]][column]
                if abs(best.mean - second.mean) > max(best.std, second.std):
                    bold.add((ranked[0], column))
        for name, cols in rows.items():
            cells = []
            for column in HEADLINE:
                if column not in cols:
                    cells.append("-")
                    continue
                stat = cols[column]
                fmt = {".4f": ".3f", "d": ".1f"}.get(COLUMNS[column], COLUMNS[column])
                text = (
                    ("≥ " if stat.censored else "")
                    + f"{stat.mean:{fmt}}"
                    + (f" ± {stat.std:{fmt}}" if stat.runs > 1 else "")
                )
                cells.append(f"**{text}**" if (name, column) in bold else text)
            lines.append(f"| {setting} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(reports: list[dict[str, Any]], path: Path) -> None:
    """Remaining-class accuracy against relearn resistance and against the probe, every row, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = _stats(reports)
    if not stats:
        return
    axes_of = (
        ("relearn_steps", "relearn steps (never: the budget; higher resists)"),
        ("probe_forget_acc", "probe accuracy on the forgotten classes (lower: removed)"),
    )
    fig, axes = plt.subplots(len(stats), 2, figsize=(13, 5.2 * len(stats)), squeeze=False)
    for row_axes, (setting, rows) in zip(axes, stats.items(), strict=True):
        for ax, (column, label) in zip(row_axes, axes_of, strict=True):
            for name, cols in rows.items():
                if column not in cols or "retain_acc" not in cols:
                    continue
                x, y = cols["retain_acc"], cols[column]
                style = {"marker": "o"}
                if name in (reports[0]["method"], "retrain"):  # ours and the gold standard stand out
                    style = {"marker": "s" if name != "retrain" else "*", "markersize": 12, "color": "black"}
                ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, capsize=2, **style)
                ax.annotate(name, (x.mean, y.mean), textcoords="offset points", xytext=(4, 4), fontsize="small")
            ax.set_xlabel("test accuracy on the remaining classes")
            ax.set_ylabel(label)
            ax.set_title(f"forget {setting} (star: retrain; square: {reports[0]['method']})")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(meta: dict[str, Any], reports: list[dict[str, Any]]) -> str:
    """The summary: how it was run, the originals, mean ± std per (setting, method), the verdicts."""
    seeds = list(dict.fromkeys(r["setting"]["seed"] for r in reports))
    originals = {r["setting"]["seed"]: r for r in reports}
    trained = "; ".join(
        f"seed {s}: test accuracy {r['original_test_acc']:.4f}, {r['models']['original']['seconds']:.1f} s"
        for s, r in originals.items()
    )
    recipe = ", ".join(f"{k} {v}" for k, v in meta["recipe"].items())
    lines = [
        "# Forgetting benchmark",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Date: {meta['date']}. {meta['train_images']} training and "
        f"{meta['test_images']} test images ({_verdict_images(meta)}). Seeds run: {seeds} of {meta['seeds_asked']}. "
        f"Total {meta.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        f"Original and retraining recipe: {recipe}. Originals: {trained}.",
        "",
        "Where the time went: "
        + ", ".join(f"{part} {seconds / 60:.1f} min" for part, seconds in meta["time_spent"].items())
        + ".",
        "",
        "Every row comes from the same original and data; `seconds` is the wall time of producing the model "
        "(scoring included; for the original and retrain: training), `speedup` is retrain's seconds over the "
        "row's, measured in the same run, `samples` the training samples the method used, `data` its regime. "
        "A `_tuned` row is the peer at the point of its grid closest to retraining on "
        f"{meta['validation_images']} validation images that no model trained on (`bench/tuning.py`); its "
        "`seconds` are the chosen point's run, the search's cost is in the tuning table.",
        "",
        "## Headline (mean ± std over seeds; bold: best method row, ahead of the next by more than both stds)",
        "",
        headline(reports),
        *tuning_table(reports),
        "## Every figure",
        "",
        sweep_summary(reports, keys=("forget", "shots")),
        f"Verdicts of {reports[0]['method']} against retraining:" if reports else "No comparison finished.",
        "",
    ]
    for r in reports:
        lines.append(
            f"- forget {r['setting']['forget']}, {r['setting']['shots']} shots, seed {r['setting']['seed']}: "
            + verdict_line(r)
        )
    return "\n".join(lines) + "\n"


def tuning_table(reports: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: every tuned peer's grid and its choice per (setting, seed), with the search's seconds."""
    searched = [r for r in reports if r.get("tuning")]
    if not searched:
        return []
    lines = [
        "## Tuning (validation split; gap: |forget - retrain's| + |retain - retrain's|)",
        "",
        "| setting | seed | peer | chosen | gap | grid (point: forget/retain, gap) | search s |",
        "|---|---:|---|---|---:|---|---:|",
    ]
    for r in searched:
        for peer, record in r["tuning"].items():
            if peer == "retrain_validation":
                continue
            chosen = next(row for row in record["grid"] if row["point"] == record["chosen"])
            grid = "; ".join(
                f"{row['point']}: {row['forget_acc']:.2f}/{row['retain_acc']:.2f}, {row['gap']:.2f}"
                for row in record["grid"]
            )
            lines.append(
                f"| {r['setting']['forget']} | {r['setting']['seed']} | {peer} | {record['chosen']} | "
                f"{chosen['gap']:.3f} | {grid} | {record['seconds']:.0f} |"
            )
    return [*lines, ""]


def _machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {device}, "
        f"torch {torch.__version__}, lightning {L.__version__}"
    )


def _quiet() -> None:
    """Progress lines of the benchmark only: every fit would repeat Lightning's device banner and data hints."""
    # On stdout with the results, apart from the progress bars of stderr.
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("bench", "lightning_forget"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


if __name__ == "__main__":
    main()

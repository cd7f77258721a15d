"""Robustness matrix: do the defaults forget on models, data and training stacks they were not tuned on?

    python bench/robustness.py --out bench/results/robustness

Every cell trains (or loads from the cache) an original model with its owner's recipe, draws
a few-shot set, forgets with the library's defaults exactly as a user would, and measures
on the test set:

- ``wrapper`` rows: ``ForgettingModule(net, classes, num_classes)`` + ``ClassForgetting(classes)``,
  ``Trainer(max_epochs=--max-epochs)`` on the few-shot loader (batch 32), as in the README quickstart;
- ``callback`` rows: ``ClassForgetting(classes)`` added to the owner's own LightningModule
  (plain cross-entropy ``training_step``, the owner's training optimizer), as in "add it to
  your own Trainer".

A cell passes when forget_acc <= 0.05 and retain_acc >= the original's - 0.03. The script
prints one line per cell and writes ``results.json`` and ``results.md`` (pass rate, every
failing cell) into ``--out``. ``--callback-kwargs``/``--module-kwargs`` (JSON) try other
settings on the same originals (cached in ``--cache``). ``--verdict-per-class K`` judges the fit's verdict on K
images per class outside the shots (``verdict_data=``) instead of a held-back shot: training images of the original,
or with ``--verdict-from test`` images of the test split it never trained on (the cell is measured on the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_forget import (
    ClassForgetting,
    ForgetCriterion,
    ForgettingModule,
    ForgettingObjective,
    build_model,
    evaluate_forgetting,
    few_shot_subset,
)
from lightning_forget.app.data import digits
from lightning_forget.evaluation.evidence import draw_per_class

PASS_FORGET, PASS_RETAIN_DROP = 0.05, 0.03
FIGURES = ("forget_acc", "retain_acc", "forget_train_acc", "seconds", "epochs", "verdict_forgotten")


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    name: str
    train: TensorDataset
    test: TensorDataset
    channels: int
    size: int
    num_classes: int = 10


class Labelled(TensorDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y


def load_digits(size: int) -> Data:
    d = digits()

    def resize(ds):
        x = ds.tensors[0] if size == 8 else F.interpolate(ds.tensors[0], size=size, mode="bilinear")
        return Labelled(x, ds.tensors[1])

    return Data(f"digits{size}", resize(d.train), resize(d.test), 1, size)


def load_cifar(root: Path, train_per_class: int, test_per_class: int, grey: bool, cache: Path) -> Data:
    """A class-balanced subset of the CIFAR-10 JPEGs, decoded once and cached as tensors."""
    from PIL import Image

    name = f"cifar{'grey' if grey else ''}-{train_per_class}-{test_per_class}"
    path = cache / f"{name}.pt"
    if not path.is_file():
        splits = {}
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            xs, ys = [], []
            for label, folder in enumerate(sorted(p for p in (root / split).iterdir() if p.is_dir())):
                for file in sorted(folder.iterdir())[:per_class]:
                    image = Image.open(file).convert("L" if grey else "RGB")
                    xs.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8))
                    ys.append(label)
            channels = 1 if grey else 3
            x = torch.stack(xs).view(-1, 32, 32, channels).permute(0, 3, 1, 2).float() / 255
            splits[split] = (x, torch.tensor(ys))
        mean = splits["train"][0].mean((0, 2, 3), keepdim=True)
        std = splits["train"][0].std((0, 2, 3), keepdim=True)
        splits = {k: ((x - mean) / std, y) for k, (x, y) in splits.items()}
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(splits, path)
    splits = torch.load(path, weights_only=True)
    return Data(name, Labelled(*splits["train"]), Labelled(*splits["test"]), 1 if grey else 3, 32)


# --------------------------------------------------------------------------- architectures


def user_cnn(channels: int, size: int, num_classes: int) -> nn.Module:
    """The issue's "user" CNN: two conv + BatchNorm blocks, max-pooling, a large fully connected layer."""
    flat = 32 * (size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )  # fmt: skip


def vgg_no_bn(channels: int, size: int, num_classes: int) -> nn.Module:
    """A VGG-style net without BatchNorm: 3x3 conv + ReLU stacks, max-pooling, two linear layers."""
    layers: list[nn.Module] = []
    cin = channels
    for width in (32, "M", 64, "M", 128, 128, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
    side = size
    for _ in range(3):  # ceil-mode halvings
        side = -(-side // 2)
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(128 * side * side, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes)
    )


def mlp_dropout(channels: int, size: int, num_classes: int) -> nn.Module:
    """An MLP with dropout and no BatchNorm."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(channels * size * size, 512), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, num_classes),
    )  # fmt: skip


ARCHS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn": lambda c, s, k: build_model("cnn", k, c),
    "resnet18": lambda c, s, k: build_model("resnet18", k, c),
    "vgg_no_bn": vgg_no_bn,
    "mlp_dropout": mlp_dropout,
    "user_cnn": user_cnn,
}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


class OwnerModule(L.LightningModule):
    """How a user trains a classifier: plain cross-entropy, their optimizer; knows nothing of forgetting."""

    def __init__(self, net: nn.Module, optimizer: str) -> None:
        super().__init__()
        self.net = net
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer](self.parameters())


# (arch, data, optimizer, epochs): weakly and strongly trained originals of every kind
ORIGINALS: list[tuple[str, str, str, int]] = [
    ("cnn", "digits8", "adam", 15),
    ("cnn", "digits8", "sgd", 3),
    ("resnet18", "digits8", "adam", 10),
    ("user_cnn", "digits28", "sgd", 3),
    ("user_cnn", "digits28", "adamw", 20),
    ("vgg_no_bn", "digits28", "sgd", 15),
    ("mlp_dropout", "digits28", "adamw", 30),
    ("cnn", "cifar", "adam", 15),
    ("vgg_no_bn", "cifar", "sgd", 15),
    ("user_cnn", "cifargrey", "sgd", 5),
    ("mlp_dropout", "cifargrey", "adamw", 15),
]


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def original_model(arch: str, data: Data, optimizer: str, epochs: int, cache: Path) -> tuple[nn.Module, float]:
    key = hashlib.sha256(f"{arch}|{data.name}|{optimizer}|{epochs}|v1".encode()).hexdigest()[:12]
    path = cache / f"original-{arch}-{data.name}-{optimizer}{epochs}-{key}.pt"
    net = ARCHS[arch](data.channels, data.size, data.num_classes)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        net.load_state_dict(saved["state_dict"])
        return net, saved["seconds"]
    L.seed_everything(0, verbose=False)
    net = ARCHS[arch](data.channels, data.size, data.num_classes)
    start = time.perf_counter()
    quiet_trainer(max_epochs=epochs).fit(OwnerModule(net, optimizer), DataLoader(data.train, 64, shuffle=True))
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "seconds": seconds}, path)
    return net, seconds


def callback_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``ClassForgetting`` keyword arguments from JSON settings: ``objective`` and ``criterion`` as dicts of theirs."""
    settings = dict(settings)
    if "objective" in settings:
        settings["objective"] = ForgettingObjective(**settings["objective"])
    if "criterion" in settings:
        settings["criterion"] = ForgetCriterion(**settings["criterion"])
    return settings


def verdict_split(data: Data, args: argparse.Namespace, seed: int) -> tuple[Dataset | None, Dataset]:
    """The verdict's images drawn from the test split (``--verdict-from test``) and the test set the cell is measured
    on without them; no verdict images and the whole test set otherwise."""
    if not args.verdict_per_class or args.verdict_from != "test":
        return None, data.test
    drawn = torch.zeros(len(data.test), dtype=torch.bool)
    drawn[draw_per_class(data.test, args.verdict_per_class, seed + 1).indices] = True
    x, y = data.test.tensors
    return Labelled(x[drawn], y[drawn]), Labelled(x[~drawn], y[~drawn])


def forget_classes_for(seed: int, count: int, num_classes: int) -> list[int]:
    return sorted(torch.randperm(num_classes, generator=torch.Generator().manual_seed(1000 + seed))[:count].tolist())


def forget(
    stack: str,
    original: nn.Module,
    data: Data,
    optimizer: str,
    classes: list[int],
    shots: int,
    seed: int,
    args: argparse.Namespace,
    test: Dataset,
    verdict_images: Dataset | None,
) -> dict[str, Any]:
    """One forgetting run as a user would write it; returns the figures on ``test`` and the fit's own verdict
    (judged on ``verdict_images`` where given, see :func:`verdict_split`)."""
    net = copy.deepcopy(original)
    few = few_shot_subset(data.train, shots, seed=seed)
    L.seed_everything(seed, verbose=False)
    extra: dict[str, Any] = {} if args.criterion_kwargs is None else {"criterion": args.criterion_kwargs}
    if args.verdict_per_class:  # a user's own unseen images: the fit trains on every shot
        unseen = (
            verdict_images
            if verdict_images is not None
            else draw_per_class(data.train, args.verdict_per_class, seed + 1, few.indices)
        )
        extra["verdict_data"] = DataLoader(unseen, batch_size=256)
    callback = ClassForgetting(classes, **callback_settings({**args.callback_kwargs, **extra}))
    if stack == "wrapper":
        module: L.LightningModule = ForgettingModule(net, classes, data.num_classes, **args.module_kwargs)
    else:
        module = OwnerModule(net, optimizer)
    trainer = quiet_trainer(max_epochs=args.max_epochs, callbacks=[callback])
    start = time.perf_counter()
    trainer.fit(module, DataLoader(few, batch_size=32, shuffle=True))
    seconds = time.perf_counter() - start
    with contextlib.redirect_stderr(io.StringIO()):
        figures = evaluate_forgetting(net, data.train, test, classes, data.num_classes, seed=seed)
    verdict = getattr(callback, "verdict", None)
    return {
        "forget_acc": figures["forget_acc"],
        "retain_acc": figures["retain_acc"],
        "forget_train_acc": figures["forget_train_acc"],
        "seconds": seconds,
        "epochs": trainer.current_epoch,
        "verdict_forgotten": None if verdict is None else verdict.forgotten,
        "verdict_judged": None if verdict is None else verdict.judged,
        "verdict_shortfalls": [] if verdict is None else list(verdict.shortfalls),
        "verdict_evidence": None if verdict is None else _evidence_of(verdict),
        "impair_trials": callback.impair_trials,
    }


def _evidence_of(verdict: Any) -> dict[str, Any]:
    """What the verdict judged, for replaying other tolerances on the same fits (``bench/verdict_replay.py``)."""
    return {"judged_on": verdict.judged_on} | {
        name: None if value is None else dataclasses.asdict(value)
        for name, value in (
            ("before", verdict.before),
            ("after", verdict.after),
            ("trained", verdict.trained),
            ("attack", verdict.attack),
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="~/.cache/cifar10-jpg", help="CIFAR-10 JPEGs (train/, test/)")
    parser.add_argument("--cache", default="~/.cache/lightning-forget/robustness", help="originals and decoded data")
    parser.add_argument("--out", default="bench/results/robustness")
    parser.add_argument("--cifar-train-per-class", type=int, default=500)
    parser.add_argument("--cifar-test-per-class", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3], help="numbers of forgotten classes")
    parser.add_argument("--stacks", nargs="+", default=["wrapper", "callback"], choices=["wrapper", "callback"])
    parser.add_argument("--callback-stack-shots", type=int, default=10, help="shots of the callback rows")
    parser.add_argument("--max-epochs", type=int, default=50, help="the Trainer's max_epochs (a cap)")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of original names to run")
    parser.add_argument("--callback-kwargs", type=json.loads, default={})
    parser.add_argument("--module-kwargs", type=json.loads, default={})
    parser.add_argument("--criterion-kwargs", type=json.loads, default=None, help="ForgetCriterion settings")
    parser.add_argument(
        "--verdict-per-class",
        type=int,
        default=0,
        help="judge the fit's verdict on this many images per class outside the shots (verdict_data=); "
        "0: on the shot the callback holds back",
    )
    parser.add_argument(
        "--verdict-from",
        choices=["train", "test"],
        default="train",
        help="draw them from the original's training images, or from the test split (never trained on; the cell is "
        "then measured on the rest of the test split)",
    )
    args = parser.parse_args()
    cache, out = Path(args.cache).expanduser(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    loaders = {
        "digits8": lambda: load_digits(8),
        "digits28": lambda: load_digits(28),
        "cifar": lambda: load_cifar(
            Path(args.root).expanduser(), args.cifar_train_per_class, args.cifar_test_per_class, False, cache
        ),
        "cifargrey": lambda: load_cifar(
            Path(args.root).expanduser(), args.cifar_train_per_class, args.cifar_test_per_class, True, cache
        ),
    }
    datasets: dict[str, Data] = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for arch, data_name, optimizer, epochs in ORIGINALS:
        name = f"{arch}/{data_name}/{optimizer}{epochs}"
        if args.only and not any(s in name for s in args.only):
            continue
        data = datasets.setdefault(data_name, loaders[data_name]())
        original, train_seconds = original_model(arch, data, optimizer, epochs, cache)
        for count in args.counts:
            for seed in args.seeds:
                classes = forget_classes_for(seed, count, data.num_classes)
                with contextlib.redirect_stderr(io.StringIO()):
                    verdict_images, test = verdict_split(data, args, seed)
                    before = evaluate_forgetting(original, data.train, test, classes, data.num_classes, seed=seed)
                for stack in args.stacks:
                    for shots in args.shots if stack == "wrapper" else [args.callback_stack_shots]:
                        try:
                            with contextlib.redirect_stderr(io.StringIO()):
                                after = forget(
                                    stack, original, data, optimizer, classes, shots, seed, args, test, verdict_images
                                )
                        except Exception as err:  # a cell that crashes is a failed cell, reported with its error
                            after = {**dict.fromkeys(FIGURES, float("nan")), "verdict_forgotten": None}
                            after["error"] = f"{type(err).__name__}: {err}"
                        row = {
                            "original": name,
                            "train_seconds": train_seconds,
                            "stack": stack,
                            "classes": classes,
                            "shots": shots,
                            "seed": seed,
                            "original_forget_acc": before["forget_acc"],
                            "original_retain_acc": before["retain_acc"],
                            **after,
                        }
                        row["passed"] = (
                            row["forget_acc"] <= PASS_FORGET
                            and row["retain_acc"] >= row["original_retain_acc"] - PASS_RETAIN_DROP
                        )
                        rows.append(row)
                        print(line(row), flush=True)
    meta = {
        "command": "python bench/robustness.py "
        + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "date": date.today().isoformat(),
        "wall_minutes": (time.perf_counter() - started) / 60,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(render(meta, rows))
    print(render(meta, rows))


def line(r: dict[str, Any]) -> str:
    if "error" in r:
        cell = f"{r['original']:<32} {r['stack']:<8} classes {r['classes']!s:<10} shots {r['shots']:>2}"
        cell += f" seed {r['seed']}"
        return f"FAIL {cell}: {r['error'][:300]}"
    verdict = {None: "-", True: "forgotten", False: "NOT forgotten"}[r["verdict_forgotten"]]
    if r.get("verdict_judged") is False:
        verdict = "not judged"
    return (
        f"{'PASS' if r['passed'] else 'FAIL'} {r['original']:<32} {r['stack']:<8} classes {r['classes']!s:<10} "
        f"shots {r['shots']:>2} seed {r['seed']}: forget {r['original_forget_acc']:.3f}->{r['forget_acc']:.3f} "
        f"retain {r['original_retain_acc']:.3f}->{r['retain_acc']:.3f} {r['epochs']:>3} ep {r['seconds']:5.1f}s "
        f"verdict {verdict}"
    )


def verdict_counts(
    cells: list[dict[str, Any]], called: Callable[[dict[str, Any]], bool] = lambda r: bool(r["verdict_forgotten"])
) -> tuple[int, int, int]:
    """The verdict against the test set: the cells ``called`` forgotten, those of them that pass (precision's and
    recall's numerator), and the cells that pass."""
    said = [r for r in cells if called(r)]
    return len(said), sum(r["passed"] for r in said), sum(r["passed"] for r in cells)


def verdict_quality(cells: list[dict[str, Any]]) -> str:
    """How far the fit's own verdict can be trusted: precision and recall of its "forgotten" against the test set."""
    said, right, passed = verdict_counts(cells)
    unjudged = sum(1 for r in cells if r.get("verdict_judged") is False)
    precision = f"{right}/{said} = {right / said:.0%}" if said else "- (never said forgotten)"
    recall = f"{right}/{passed} = {right / passed:.0%}" if passed else "- (no cell passed)"
    return f"Verdict precision {precision}, recall {recall}, not judged {unjudged}."


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Command: `{meta['command']}`",
        f"Machine: {meta['machine']}; date {meta['date']}; {meta['wall_minutes']:.1f} min.",
        f"Pass: forget_acc <= {PASS_FORGET} and retain_acc >= original - {PASS_RETAIN_DROP}.",
        "",
        "| original | stack | shots | cells | passed | forget_acc (mean, max) | retain drop (mean, max) "
        "| epochs (mean) | seconds (mean) | verdict 'forgotten' but failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["original"], r["stack"], r["shots"]), []).append(r)
    for (original, stack, shots), sel in groups.items():
        drops = [r["original_retain_acc"] - r["retain_acc"] for r in sel]
        lied = sum(1 for r in sel if r["verdict_forgotten"] and not r["passed"])
        lines.append(
            f"| {original} | {stack} | {shots} | {len(sel)} | {sum(r['passed'] for r in sel)} | "
            f"{statistics.mean(r['forget_acc'] for r in sel):.3f}, {max(r['forget_acc'] for r in sel):.3f} | "
            f"{statistics.mean(drops):+.3f}, {max(drops):+.3f} | {statistics.mean(r['epochs'] for r in sel):.1f} | "
            f"{statistics.mean(r['seconds'] for r in sel):.1f} | {lied} |"
        )
    lines.append("")
    for stack in dict.fromkeys(r["stack"] for r in rows):
        for shots in sorted({r["shots"] for r in rows if r["stack"] == stack}):
            sel = [r for r in rows if r["stack"] == stack and r["shots"] == shots]
            lines.append(
                f"**{stack}, {shots} shots: {sum(r['passed'] for r in sel)} of {len(sel)} cells pass "
                f"({sum(r['passed'] for r in sel) / len(sel):.0%}).** {verdict_quality(sel)}"
            )
    failing = [r for r in rows if not r["passed"]]
    lines += ["", f"Failing cells ({len(failing)}):", ""] + [f"- `{line(r)}`" for r in failing]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

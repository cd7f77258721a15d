"""Deletion requests one after the other: each forgets new classes from the previous request's model.

    python bench/requests.py --out bench/results/requests                 # cnn on CIFAR-10: 1, then 9, then 3
    python bench/requests.py --original cnn/digits8/adam15 --requests 3 7 0

Each request is a fit of ``ClassForgetting`` (the defaults, 10 shots of every class) with the earlier classes in
``already_forgotten`` and the earlier record in ``previous_record``, as ``docs/requests.md`` shows; the Lightning
checkpoint after each fit is checked with ``lightning_forget.check_record`` (hashes, every entry outside the masks
bit-identical, the chain). Every step is measured on the test set: each forgotten class's accuracy (each must stay
<= 0.05) and the remaining classes' against a model retrained without the classes forgotten so far (the original's
recipe; cached).
Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import lightning as L
import torch
from integrity import Case, retrained_model
from robustness import ORIGINALS, load_cifar, load_digits, original_model, quiet_trainer
from torch.utils.data import DataLoader, Dataset

from lightning_forget import (
    ClassForgetting,
    ForgettingModule,
    check_record,
    few_shot_subset,
    forgotten_before,
    write_record,
)
from lightning_forget.evaluation.metrics import predict_logits
from lightning_forget.plugin.record import RecordMismatch


@torch.no_grad()
def per_class_accuracy(net: torch.nn.Module, dataset: Dataset, num_classes: int) -> list[float]:
    logits, targets = predict_logits(net, dataset, batch_size=512)
    hit = logits.argmax(-1) == targets
    return [float(hit[targets == c].float().mean()) for c in range(num_classes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/requests")
    parser.add_argument("--original", default="cnn/cifar/adam15", help="an original of bench/robustness.py")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 9, 3], help="one class per request")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="~/.cache/lightning-forget/robustness")
    parser.add_argument("--root", default="~/.cache/cifar10-jpg")
    args = parser.parse_args()
    arch, data_name, recipe = args.original.split("/")
    optimizer, epochs = recipe.rstrip("0123456789"), int(recipe[len(recipe.rstrip("0123456789")) :])
    if (arch, data_name, optimizer, epochs) not in ORIGINALS:
        parser.error(f"--original {args.original} is not one of bench/robustness.py's originals")
    cache, out = Path(args.cache).expanduser(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if data_name.startswith("digits"):
        data = load_digits(int(data_name.removeprefix("digits")))
    else:
        data = load_cifar(Path(args.root).expanduser(), 500, 300, data_name == "cifargrey", cache)
    original, _ = original_model(arch, data, optimizer, epochs, cache)
    before = per_class_accuracy(original, data.test, data.num_classes)
    net, rows, started = copy.deepcopy(original), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        previous_ckpt = Path(tmp) / "original.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in original.state_dict().items()}}, previous_ckpt)
        previous_record: Path | None = None
        for step, cls in enumerate(args.requests, 1):
            earlier = forgotten_before(previous_ckpt) if step > 1 else None
            so_far = [*(earlier.classes if earlier else []), cls]
            callback = ClassForgetting(
                [cls],
                already_forgotten=earlier.classes if earlier else (),
                previous_record=earlier.record if earlier else None,
            )
            L.seed_everything(args.seed, verbose=False)
            trainer = quiet_trainer(max_epochs=50, callbacks=[callback])
            few = few_shot_subset(data.train, args.shots, seed=args.seed + step)
            start = time.perf_counter()
            trainer.fit(ForgettingModule(net, so_far, data.num_classes), DataLoader(few, batch_size=32, shuffle=True))
            seconds = time.perf_counter() - start
            ckpt, record = Path(tmp) / f"request{step}.ckpt", Path(tmp) / f"request{step}.json"
            trainer.save_checkpoint(ckpt)
            write_record(callback.record(), record)
            try:
                verified = check_record(record, previous_ckpt, ckpt, previous_record)
            except RecordMismatch as err:
                verified = f"NOT verified: {err}"
            after = per_class_accuracy(net, data.test, data.num_classes)
            remaining = [c for c in range(data.num_classes) if c not in so_far]
            retrain = retrained_model(Case(arch, data_name, optimizer, epochs, tuple(so_far)), data, cache)
            retrain_acc = per_class_accuracy(retrain, data.test, data.num_classes)
            rows.append(
                {
                    "step": step,
                    "request": cls,
                    "forgotten_so_far": so_far,
                    "forgotten_acc": {c: after[c] for c in so_far},
                    "retain_acc": sum(after[c] for c in remaining) / len(remaining),
                    "original_retain_acc": sum(before[c] for c in remaining) / len(remaining),
                    "retrain_retain_acc": sum(retrain_acc[c] for c in remaining) / len(remaining),
                    "seconds": seconds,
                    "epochs": trainer.current_epoch,
                    "impaired": callback.impaired,
                    "verdict": str(callback.verdict),
                    "verified": verified,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            previous_ckpt, previous_record = ckpt, record
    meta = {
        "command": "python bench/requests.py "
        + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "date": date.today().isoformat(),
        "minutes": (time.perf_counter() - started) / 60,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Deletion requests one after the other",
        "",
        f"`{meta['command']}`; {meta['machine']}; {meta['date']}; {meta['minutes']:.1f} min (requests and retraining).",
        "Retrain: the original's recipe on the classes not forgotten so far, at each step.",
        "",
        "| step | request | forgotten so far | test accuracy of each | remaining: ours | original | retrain "
        "| epochs | seconds | record |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        each = ", ".join(f"{c}: {a:.3f}" for c, a in r["forgotten_acc"].items())
        ok = "verifies, chained" if r["verified"].startswith("verified") else r["verified"]
        lines.append(
            f"| {r['step']} | {r['request']} | {r['forgotten_so_far']} | {each} | {r['retain_acc']:.3f} "
            f"| {r['original_retain_acc']:.3f} | {r['retrain_retain_acc']:.3f} | {r['epochs']} | {r['seconds']:.1f} "
            f"| {ok} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

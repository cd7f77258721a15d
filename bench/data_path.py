"""Benchmark: the PIL ImageFolder data path against the decoded in-memory one (no model, data loading only).

    nice -n 19 python bench/data_path.py --root ~/.cache/cifar10-jpg

Prints, for one training epoch of shuffled, augmented batches: images per second of the PIL path
(``image_folder(..., in_memory=False)``, for each ``--pil-workers``) and of the in-memory path
(``in_memory=True``, on ``--device``); and for the in-memory path the first decode time (into an empty
cache folder) and the load time from the cache. Every figure printed is measured in this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime

import torch
from torch.utils.data import DataLoader

from lightning_forget.app.data import image_folder
from lightning_forget.app.image_tensors import decode_image_folder


def epoch_rate(dataset: torch.utils.data.Dataset, batch_size: int, workers: int = 0) -> float:
    """Images per second of one shuffled epoch, every batch on the CPU or waited for on the GPU."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="~/.cache/cifar10-jpg", help="folder with train/ and test/ (ImageFolder)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--pil-workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers, PIL path")
    parser.add_argument("--device", default="cpu", help="where the in-memory images live (cpu, cuda, auto)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = os.path.expanduser(args.root)
    cifar = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "augment": True, "flip": True}
    options = {"root": root, **cifar}
    print(f"date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} torch thread(s), batch size {args.batch_size}"
    )

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        for split in ("train", "test"):
            decoded = decode_image_folder(os.path.join(root, split), 32, cache_dir=cache, progress=False)
            print(f"first decode of {split}/: {len(decoded.targets)} images")
        first = time.perf_counter() - start
        print(f"in-memory, first decode (train + test, cache written): {first:.1f} s")

        start = time.perf_counter()
        data = image_folder(**options, in_memory=True, device=args.device, cache_dir=cache)
        cached = time.perf_counter() - start
        print(f"in-memory, image_folder from the cache (scan + stat + load, train + test): {cached:.2f} s")
        rate = epoch_rate(data.train, args.batch_size)
        print(f"in-memory on {data.train.device}, augmented train epoch: {rate:,.0f} images/s")
        print(f"in-memory on {data.test.device}, test epoch: {epoch_rate(data.test, args.batch_size):,.0f} images/s")

    pil = image_folder(**options, in_memory=False)
    for workers in args.pil_workers:
        rate = epoch_rate(pil.train, args.batch_size, workers)
        print(f"PIL ImageFolder, {workers} workers, augmented train epoch: {rate:,.0f} images/s")


if __name__ == "__main__":
    main()

"""Benchmark: the small ``cnn`` on 3x32x32 images in the default (NCHW) and the channels_last memory format.

    python bench/channels_last.py --images 2560 --repeats 3

Prints, per format, the seconds of a training epoch of 10,000 images (Adam, batch 128, extrapolated from
``--images``) and the milliseconds of inference per image (batch 256), the median of ``--repeats`` timings, and
the ratio of the two formats measured side by side in one process. ``bench/forgetting.py`` trains and evaluates
in channels_last by default because of these figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_forget.app.models import build_model


def timings(channels_last: bool, images: int) -> tuple[float, float]:
    """Seconds per training epoch of 10,000 images, and inference milliseconds per image."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, 3)
    x, y = torch.randn(images, 3, 32, 32), torch.randint(0, 10, (images,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    batches = list(zip(x.split(128), y.split(128), strict=True))
    for i, (xb, yb) in enumerate(batches):
        if i == 2:  # the first steps warm up the kernels
            started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    epoch = (time.perf_counter() - started) / (images - 2 * 128) * 10_000
    model.eval()
    with torch.inference_mode():
        model(x[:256])
        started = time.perf_counter()
        for xb in x.split(256):
            model(xb)
    return epoch, (time.perf_counter() - started) / images * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2560, help="random images timed per repeat (> 256)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.images <= 256 or args.repeats < 1:
        parser.error("--images must exceed 256 (two warm-up batches) and --repeats be >= 1")
    medians = {}
    for channels_last in (False, True):
        runs = [timings(channels_last, args.images) for _ in range(args.repeats)]
        medians[channels_last] = [statistics.median(r[i] for r in runs) for i in (0, 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| format | training s per epoch of 10,000 images | inference ms per image |\n|---|---:|---:|")
    for channels_last, (epoch, infer) in medians.items():
        print(f"| {'channels_last' if channels_last else 'NCHW'} | {epoch:.1f} | {infer:.2f} |")
    (nchw_epoch, nchw_infer), (cl_epoch, cl_infer) = medians[False], medians[True]
    print(f"channels_last speed-up: training {nchw_epoch / cl_epoch:.2f}x, inference {nchw_infer / cl_infer:.2f}x")


if __name__ == "__main__":
    main()

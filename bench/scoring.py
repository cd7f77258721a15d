"""Per-sample gradient scoring: the library's autograd loop against a torch.func (vmap) candidate.

    python bench/scoring.py --samples 100 --threads 1 2

For each model (the small ``cnn`` on 8x8 digits and on 32x32 images, ResNet-18 on 32x32 images)
it times ``relevance_scores`` (one ``autograd.grad`` per sample) and a ``vmap(grad(functional_call))``
scorer on the same samples, interleaved in one process, and compares both masks at the default fraction
with masks from a float64 reference: how many selected entries differ. Prints one line per case.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lightning_forget import build_model, relevance_scores, top_fraction_masks
from lightning_forget.plugin.callback import DEFAULT_FRACTION
from lightning_forget.plugin.relevance import eval_mode


def vmap_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, forgotten: list[int], chunk: int = 32):
    """The ``ratio`` score from per-sample gradients computed with vmap, in chunks."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    is_forget = torch.isin(y, torch.tensor(forgotten))
    sums = {k: {n: torch.zeros_like(p) for n, p in params.items()} for k in (True, False)}
    with eval_mode(model):
        for start in range(0, len(x), chunk):
            grads = per_sample(params, x[start : start + chunk], y[start : start + chunk])
            rows = is_forget[start : start + chunk]
            for n, g in grads.items():
                sums[True][n] += g[rows].abs().sum(0)
                sums[False][n] += g[~rows].abs().sum(0)
    n_forget, n_retain = int(is_forget.sum()), int((~is_forget).sum())
    return {n: (sums[True][n] / n_forget) / (sums[False][n] / n_retain + 1e-12) for n in params}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int((a[n] != b[n]).sum()) for n in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = {"cnn, 1x8x8": ("cnn", 1, 8), "cnn, 3x32x32": ("cnn", 3, 32), "resnet18, 3x32x32": ("resnet18", 3, 32)}
    for name, (arch, channels, size) in cases.items():
        torch.manual_seed(0)
        model = build_model(arch, 10, channels)
        x, y = torch.randn(args.samples, channels, size, size), torch.arange(args.samples) % 10
        batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
        reference = relevance_scores(copy.deepcopy(model).double(), [(a.double(), b) for a, b in batches], [3])
        ref_masks = top_fraction_masks({n: s.float() for n, s in reference.items()}, DEFAULT_FRACTION)
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {"loop": [], "vmap": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                loop = relevance_scores(model, batches, [3])
                times["loop"].append(time.perf_counter() - start)
                start = time.perf_counter()
                vmapped = vmap_scores(model, x, y, [3])
                times["vmap"].append(time.perf_counter() - start)
            loop_t, vmap_t = statistics.median(times["loop"]), statistics.median(times["vmap"])
            selected = sum(int(m.sum()) for m in ref_masks.values())
            print(
                f"{name}, {threads} thread(s), {args.samples} samples: loop {loop_t:.2f} s, vmap {vmap_t:.2f} s "
                f"(vmap {loop_t / vmap_t:.2f}x as fast); selected entries that differ from the float64 reference "
                f"at fraction {DEFAULT_FRACTION} (of {selected:,}): "
                f"loop {differing(top_fraction_masks(loop, DEFAULT_FRACTION), ref_masks)}, "
                f"vmap {differing(top_fraction_masks(vmapped, DEFAULT_FRACTION), ref_masks)}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The few-shot data: a dataset's labels, and exactly ``shots`` samples of every class drawn from it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset


def dataset_labels(dataset: Dataset) -> Tensor:
    """Class labels of every sample, from ``targets``/``labels`` when present, else from the samples."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("targets", "labels"):  # torchvision datasets; SVHN says "labels"
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr), dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def few_shot_subset(dataset: Dataset, shots: int, seed: int = 0, classes: Sequence[int] | None = None) -> Subset:
    """Exactly ``shots`` samples of every class (or of ``classes``), drawn reproducibly from ``seed``.

    Args:
        dataset: a labelled dataset.
        shots: samples per class, >= 1.
        seed: seed of the draw.
        classes: the classes to draw from; ``None`` takes every class present.

    Returns:
        A ``Subset`` of ``dataset``, indices sorted.

    Raises:
        ValueError: if ``shots < 1`` or a class has fewer than ``shots`` samples.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}.")
    labels = dataset_labels(dataset)
    wanted = sorted(set(labels.tolist())) if classes is None else list(classes)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[Tensor] = []
    for c in wanted:
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < shots:
            raise ValueError(
                f"Class {c} has {len(members)} samples, fewer than shots={shots}: lower shots to at most "
                f"{len(members)}."
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return Subset(dataset, sorted(torch.cat(chosen).tolist()) if chosen else [])

"""Datasets: the image classification datasets the app composes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from lightning_forget.app.image_tensors import (
    DEFAULT_CACHE_DIR,
    ImageTensorDataset,
    check_image_folder,
    check_image_options,
    decode_image_folder,
    fits_in_memory,
    load_image,
)
from lightning_forget.plugin.few_shot import few_shot_subset


@dataclass
class ClassificationData:
    """An image classification dataset split for forgetting.

    Attributes:
        train: training samples, with training augmentation.
        train_eval: the same samples with evaluation transforms (for accuracy and MIA).
        test: test samples.
        num_classes: number of classes.
        in_channels: image channels.
        class_names: one name per class.
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    class_names: list[str]


class _LabelledTensors(TensorDataset):
    """A ``TensorDataset`` of ``(image, label)`` that exposes ``targets`` like torchvision's."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        super().__init__(images, targets)
        self.targets = targets


def digits(test_fraction: float = 0.25, seed: int = 0) -> ClassificationData:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), offline.

    Args:
        test_fraction: share of every class held out for testing.
        seed: seed of the stratified split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(targets)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    train = _LabelledTensors(images[train_idx], targets[train_idx])
    return ClassificationData(
        train=train,
        train_eval=train,
        test=_LabelledTensors(images[test_idx], targets[test_idx]),
        num_classes=10,
        in_channels=1,
        class_names=[str(d) for d in range(10)],
    )


# name: (torchvision class, channels, mean, std, random crops with augment)
_TORCHVISION = {
    "mnist": (tv_datasets.MNIST, 1, (0.1307,), (0.3081,), False),
    "fashion_mnist": (tv_datasets.FashionMNIST, 1, (0.2860,), (0.3530,), False),
    "cifar10": (tv_datasets.CIFAR10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": (tv_datasets.CIFAR100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "svhn": (tv_datasets.SVHN, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
}
TORCHVISION_DATASETS: tuple[str, ...] = tuple(_TORCHVISION)


def _transforms(
    mean: Sequence[float], std: Sequence[float], size: int, augment: bool, flip: bool
) -> tuple[T.Compose, T.Compose]:
    evaluation = [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    if not (augment or flip):
        return T.Compose(evaluation), T.Compose(evaluation)
    crop = T.RandomCrop(size, padding=size // 8) if augment else T.CenterCrop(size)
    training = [T.Resize(size), crop, *([T.RandomHorizontalFlip()] if flip else []), *evaluation[2:]]
    return T.Compose(training), T.Compose(evaluation)


def torchvision_dataset(
    name: str, root: str, download: bool = False, augment: bool = True, flip: bool = False
) -> ClassificationData:
    """A torchvision dataset (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``).

    Args:
        name: dataset name.
        root: folder holding (or to receive) the files.
        download: fetch the files when they are missing.
        augment: random crops for training, where the dataset calls for them (CIFAR).
        flip: random horizontal flips for training: for natural images (CIFAR), not for digits or house numbers.

    Raises:
        ValueError: for an unknown name.
        FileNotFoundError: if the files are missing and ``download`` is false.
    """
    if name not in _TORCHVISION:
        raise ValueError(f"Unknown torchvision dataset {name!r}: choose one of {TORCHVISION_DATASETS}.")
    cls, channels, mean, std, crops = _TORCHVISION[name]
    size = 28 if channels == 1 else 32
    train_tf, eval_tf = _transforms(mean, std, size, augment and crops, flip)

    def split(train: bool, transform: T.Compose) -> Dataset:
        kwargs = {"split": "train" if train else "test"} if cls is tv_datasets.SVHN else {"train": train}
        try:
            return cls(root, transform=transform, download=download, **kwargs)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{name} was not found under dataset.root={root!r} ({err}). Point dataset.root at the "
                "downloaded files, or set dataset.download=true when online."
            ) from None

    train = split(True, train_tf)
    classes = getattr(train, "classes", None) or [str(c) for c in range(10)]
    return ClassificationData(
        train=train,
        train_eval=split(True, eval_tf),
        test=split(False, eval_tf),
        num_classes=len(classes),
        in_channels=channels,
        class_names=list(classes),
    )


def image_folder(
    root: str,
    image_size: int = 32,
    channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    augment: bool = True,
    flip: bool = False,
    train_per_class: int | None = None,
    seed: int = 0,
    in_memory: bool | Literal["auto"] = "auto",
    device: str = "auto",
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> ClassificationData:
    """Images in ``root/train/<class>/*`` and ``root/test/<class>/*`` (torchvision ``ImageFolder``).

    Args:
        root: the folder holding ``train/`` and ``test/``.
        image_size: images are resized and centre-cropped to this size.
        channels: 1 (converted to grey) or 3.
        mean, std: per-channel normalisation, one value per channel.
        augment: random crops for training.
        flip: random horizontal flips for training: for natural photos, where a mirror image shows the same class;
            not for digits, letters or anything that a mirror makes into something else.
        train_per_class: keep only this many training images per class (drawn with ``seed``),
            for quick runs; ``None`` keeps all.
        seed: seed of that draw.
        in_memory: decode every split once into uint8 tensors (cached in ``cache_dir``) and serve them as
            :class:`~lightning_forget.app.image_tensors.ImageTensorDataset`, normalised and augmented a whole batch
            at a time; else decode every image at every epoch with PIL. ``"auto"``: decode once when the decoded
            images fit in a quarter of this machine's memory, and log which
            (:func:`~lightning_forget.app.image_tensors.fits_in_memory`).
        device: with ``in_memory``, where the images live: ``auto`` (the GPU when there is one and they fit
            in a quarter of its memory), ``cpu`` or ``cuda``.
        cache_dir: where decoded splits (``in_memory``) or the record of checked images are kept; ``None``
            decodes (checks) at every call.
        progress: show a progress bar while decoding (checking) the images.

    Every image is decoded once when the dataset is built (and remembered in ``cache_dir``), so a broken
    file stops the run before any training.

    Raises:
        FileNotFoundError: if ``root/train`` or ``root/test`` is missing.
        ValueError: for bad sizes, channels, statistics, device or ``in_memory``, or if train and test hold different
            classes.
        OSError: naming the file, for an image that cannot be decoded.
    """
    base = Path(root).expanduser()
    for part in ("train", "test"):
        if not (base / part).is_dir():
            raise FileNotFoundError(
                f"dataset.root={str(base)!r} has no {part}/ folder: point dataset.root at a folder holding "
                "train/<class>/* and test/<class>/*."
            )
    if not isinstance(in_memory, bool) and in_memory != "auto":
        raise ValueError(f"in_memory must be true, false or 'auto', got {in_memory!r}.")
    check_image_options(image_size, channels, mean, std, device=device if in_memory else None)
    if in_memory == "auto":
        in_memory = fits_in_memory([base / "train", base / "test"], image_size, channels)
    if in_memory:
        decoded = [
            decode_image_folder(base / part, image_size, channels, cache_dir, progress) for part in ("train", "test")
        ]
        (train_images, train_targets, train_classes), (test_images, test_targets, classes) = decoded
        train_eval = ImageTensorDataset(train_images, train_targets, mean, std, device=device)
        train = train_eval.with_augment(augment, flip)
        test = ImageTensorDataset(test_images, test_targets, mean, std, device=device)
    else:
        for part in ("train", "test"):
            check_image_folder(base / part, image_size, channels, cache_dir, progress)
        train_tf, eval_tf = _transforms(mean, std, image_size, augment, flip)
        loader = partial(load_image, channels=channels)
        train = tv_datasets.ImageFolder(str(base / "train"), transform=train_tf, loader=loader)
        train_eval = tv_datasets.ImageFolder(str(base / "train"), transform=eval_tf, loader=loader)
        test = tv_datasets.ImageFolder(str(base / "test"), transform=eval_tf, loader=loader)
        train_classes, classes = train.classes, test.classes
    if train_classes != classes:
        raise ValueError(f"train/ and test/ under {base} hold different classes: {train_classes} vs {classes}.")
    if train_per_class is not None:
        keep = few_shot_subset(train_eval, train_per_class, seed).indices
        train, train_eval = Subset(train, keep), Subset(train_eval, keep)
    return ClassificationData(
        train=train,
        train_eval=train_eval,
        test=test,
        num_classes=len(classes),
        in_channels=channels,
        class_names=classes,
    )

"""Image folders decoded once into uint8 tensors, cached on disk, and served whole batches at a time.

Decoding a JPEG costs far more than a training step of a small network on a 32x32 image, so a
CIFAR-sized dataset is decoded once (resized and centre-cropped exactly as the PIL transforms of
:mod:`lightning_forget.app.data` do), kept as one ``N x C x H x W`` uint8 tensor, and normalised and
augmented per batch on the tensor's device: on a GPU no per-sample Python work remains.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from torchvision import transforms as T
from torchvision.datasets import folder as tv_folder
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/lightning-forget/decoded"
# Bumped whenever decoding changes, so that older cache files are rebuilt rather than trusted.
_CACHE_FORMAT = 1
# "auto" keeps images on the GPU only while they take at most this share of its memory, leaving the rest to training.
_AUTO_GPU_SHARE = 0.25
# in_memory="auto" decodes a folder once only while its images take at most this share of the machine's memory.
_AUTO_MEMORY_SHARE = 0.25


class DecodedImages(NamedTuple):
    """One decoded split: ``images`` (uint8, N x C x H x W), ``targets`` (int64, N), ``classes`` (names)."""

    images: Tensor
    targets: Tensor
    classes: list[str]


def load_image(path: str, channels: int) -> Any:
    """The PIL image at ``path`` as RGB, or grey when ``channels`` is 1 (what the ImageFolder paths read)."""
    image = tv_folder.default_loader(path)
    return image.convert("L") if channels == 1 else image


def decode_image_folder(
    folder: str | Path,
    image_size: int,
    channels: int = 3,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> DecodedImages:
    """Every image of ``folder/<class>/*``, resized and centre-cropped to ``image_size``, as one uint8 tensor.

    Classes and sample order are torchvision ``ImageFolder``'s, so targets and indices agree with it. The
    result is cached in ``cache_dir`` under a name derived from the folder, ``image_size`` and ``channels``;
    the cache is rebuilt when the files change (names, sizes or modification times) and ignored with a
    warning when it cannot be read.

    Args:
        folder: a folder holding one sub-folder of images per class.
        image_size: side of the square images, >= 1.
        channels: 3 (RGB) or 1 (grey).
        cache_dir: where decoded splits are kept; ``None`` decodes every time.
        progress: show a progress bar while decoding.

    Raises:
        ValueError: for a bad ``image_size`` or ``channels``.
        FileNotFoundError: if ``folder`` holds no class folder or a class folder holds no image.
        OSError: naming the file, if an image cannot be decoded.
    """
    check_image_options(image_size, channels)
    folder = Path(folder).expanduser().resolve()
    classes, class_to_idx = tv_folder.find_classes(str(folder))
    samples = tv_folder.make_dataset(str(folder), class_to_idx, extensions=tv_folder.IMG_EXTENSIONS)
    summary = _files_summary(samples)
    cache = None if cache_dir is None else Path(cache_dir).expanduser() / _cache_name(folder, image_size, channels)
    if cache is not None and cache.is_file():
        cached = _load_cache(cache, summary, classes, image_size, channels)
        if cached is not None:
            return cached
    log.info("Decoding the %d images of %s", len(samples), folder)
    decoded = DecodedImages(
        _decode(samples, image_size, channels, progress, desc=f"Decoding {folder.name}/"),
        torch.tensor([target for _, target in samples], dtype=torch.long),
        classes,
    )
    if cache is not None:
        _save_cache(cache, decoded, summary)
    return decoded


def fits_in_memory(folders: Sequence[str | Path], image_size: int, channels: int) -> bool:
    """Whether the images of ``folders`` (each ``<class>/*``), decoded, fit in a quarter of this machine's memory.

    What ``in_memory="auto"`` decides by; the answer and its figures go to the log.

    Raises:
        FileNotFoundError: if a folder holds no class folder or a class folder holds no image.
    """
    count = 0
    for folder in folders:
        _, class_to_idx = tv_folder.find_classes(str(folder))
        count += len(tv_folder.make_dataset(str(folder), class_to_idx, extensions=tv_folder.IMG_EXTENSIONS))
    nbytes, memory = count * channels * image_size * image_size, _machine_memory()
    fits = nbytes <= _AUTO_MEMORY_SHARE * memory
    log.info(
        "in_memory=auto: the %d images take %.1f MB decoded, %s a quarter of this machine's memory (%s): %s.",
        count,
        nbytes / 1e6,
        "within" if fits else "more than",
        f"{memory / 1e9:.1f} GB" if memory else "unknown",
        "decoding them once into memory" if fits else "decoding them at every epoch (in_memory=true forces memory)",
    )
    return fits


def _machine_memory() -> int:
    """This machine's physical memory in bytes; 0 where the system does not tell (no ``os.sysconf``)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def check_image_folder(
    folder: str | Path,
    image_size: int,
    channels: int = 3,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> None:
    """Decode every image of ``folder/<class>/*`` once, so that a broken file is named before any training.

    JPEGs are decoded at the smallest scale that still covers ``image_size`` (fast for large photos). The
    files that passed (names, sizes, modification times) are remembered in ``cache_dir``, so a later call
    with unchanged files only lists them.

    Args:
        folder: a folder holding one sub-folder of images per class.
        image_size: side of the images the dataset makes.
        channels: 3 (RGB) or 1 (grey).
        cache_dir: where the record of checked files is kept; ``None`` checks every time.
        progress: show a progress bar while checking.

    Raises:
        FileNotFoundError: if ``folder`` holds no class folder or a class folder holds no image.
        OSError: naming the file, if an image cannot be decoded.
    """
    folder = Path(folder).expanduser().resolve()
    _, class_to_idx = tv_folder.find_classes(str(folder))
    samples = tv_folder.make_dataset(str(folder), class_to_idx, extensions=tv_folder.IMG_EXTENSIONS)
    summary = _files_summary(samples)
    record = None
    if cache_dir is not None:
        record = Path(cache_dir).expanduser() / _cache_name(folder, image_size, channels).replace(".pt", ".checked")
        if record.is_file() and record.read_text() == summary:
            return
    mode = "L" if channels == 1 else "RGB"
    log.info("Checking the %d images of %s", len(samples), folder)  # a phase of its own in a log without bars
    for path, _ in tqdm(samples, desc=f"Checking {folder.name}/", disable=not progress, leave=False, unit="img"):
        try:
            with Image.open(path) as image:
                image.draft(mode, (image_size, image_size))
                image.load()
        # PIL reports broken files with many exception types; all of them need the file's name.
        except Exception as err:
            raise OSError(f"Cannot decode the image {path}: {err}. Replace or delete that file.") from err
    if record is not None:
        temporary = record.with_name(f".{record.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(summary)
            os.replace(temporary, record)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            log.warning("Could not record the checked images in %s (%s); checking them again next time.", record, err)


def _files_summary(samples: Sequence[tuple[str, int]]) -> str:
    digest = hashlib.sha256(f"{len(samples)}\n".encode())
    for path, target in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_name(folder: Path, image_size: int, channels: int) -> str:
    key = hashlib.sha256(f"{folder}\0{image_size}\0{channels}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(folder.parts[-2:]))  # e.g. cifar10-jpg-train
    return f"{readable}-{image_size}px-{channels}ch-{key}.pt"


def _load_cache(path: Path, summary: str, classes: list[str], image_size: int, channels: int) -> DecodedImages | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if (payload["format"], payload["summary"]) != (_CACHE_FORMAT, summary):
            log.info("%s was written by another version or before the images changed; decoding again.", path)
            return None
        images, targets = payload["images"], payload["targets"]
        if images.dtype != torch.uint8 or images.shape != (len(targets), channels, image_size, image_size):
            raise ValueError(f"it holds {images.dtype} images of shape {tuple(images.shape)}")
        if targets.dtype != torch.long or targets.ndim != 1:
            raise ValueError(f"it holds {targets.dtype} targets of shape {tuple(targets.shape)}")
    # A cache is only a shortcut: whatever went wrong with it (truncated, corrupt, foreign), decode again.
    except Exception as err:
        warnings.warn(f"Ignoring the unreadable decoded-image cache {path} ({err}); decoding again.", stacklevel=3)
        return None
    return DecodedImages(images, targets, classes)


def _save_cache(path: Path, decoded: DecodedImages, summary: str) -> None:
    payload = {
        "format": _CACHE_FORMAT,
        "summary": summary,
        "images": decoded.images,
        "targets": decoded.targets,
    }
    # A unique temporary name and an atomic rename: concurrent writers (DDP ranks) and interrupted runs
    # never leave a half-written file under the final name.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        warnings.warn(f"Could not write the decoded-image cache {path} ({err}); continuing without it.", stacklevel=3)


def _decode(samples: Sequence[tuple[str, int]], image_size: int, channels: int, progress: bool, desc: str) -> Tensor:
    resize = T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])
    pixels = np.empty((len(samples), image_size, image_size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(samples, desc=desc, disable=not progress, leave=False, unit="img")):
        try:
            image = load_image(path, channels)
            if image.size != (image_size, image_size):  # resize and crop are identities at this size
                image = resize(image)
            pixels[i] = np.asarray(image).reshape(image_size, image_size, channels)
        # PIL reports broken files with many exception types; all of them need the file's name.
        except Exception as err:
            raise OSError(f"Cannot decode the image {path}: {err}. Replace or delete that file.") from err
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


class _Sample(tuple):
    """One ``(image, target)`` of a :class:`_Batch`; its type routes ``default_collate`` to the whole batch."""


class _Batch(Sequence):
    """The samples that ``ImageTensorDataset.__getitems__`` fetched at once, as whole batch tensors.

    It is a sequence of ``(image, target)`` samples for any collate function; the DataLoader's default
    collate returns ``[images, targets]`` as they are, without splitting and stacking them again.
    """

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> _Sample:  # type: ignore[override]
        return _Sample((self.images[index], self.targets[index]))


def _collate_samples(batch: Sequence[_Sample], *, collate_fn_map: dict | None = None) -> list[Any]:
    if isinstance(batch, _Batch):
        return [batch.images, batch.targets]
    # Samples gathered from several fetches: collate them like any tuples.
    return [collate(list(field), collate_fn_map=collate_fn_map) for field in zip(*batch)]


# The documented way to extend default_collate (see torch.utils.data._utils.collate.collate).
default_collate_fn_map[_Sample] = _collate_samples


class _Placement:
    """Images and their batch-side tensors, shared by the datasets ``with_augment`` makes: they move together."""

    def __init__(self, images: Tensor, targets: Tensor, mean: Tensor, std: Tensor, auto: bool) -> None:
        self.images, self.targets, self.mean, self.std, self.auto = images, targets, mean, std, auto

    def move(self, device: torch.device) -> None:
        self.images, self.targets = self.images.to(device), self.targets.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)


class ImageTensorDataset(Dataset):
    """Labelled uint8 images held in one tensor, normalised (and augmented) a whole batch at a time.

    Samples are ``(float image C x H x W, int target)`` as from torchvision's ``ToTensor`` + ``Normalize``.
    A ``DataLoader`` (also over a ``Subset`` or with a ``DistributedSampler``) fetches each batch with one
    ``__getitems__`` call, which indexes, augments and normalises on the images' device; batches come out
    on that device. Use ``num_workers=0`` with images on a GPU: the work is a few kernels per batch.

    Args:
        images: uint8 images, N x C x H x W, C being 1 or 3.
        targets: integer class labels, N.
        mean, std: per-channel normalisation, one value per channel, in [0, 1] pixel units.
        augment: random crops (zero padding of ``W // 8``), drawn from torch's global generator of the images'
            device, so ``torch.manual_seed`` makes them reproducible.
        device: where the images live: ``"cpu"``, ``"cuda"``, ``"cuda:1"``..., or ``"auto"``: the current
            CUDA device at the first fetch (so each DDP process uses its own GPU) when there is one and the
            images take at most a quarter of its memory, else the CPU. DataLoader workers keep them on the CPU.
        flip: random horizontal flips, drawn as the crops are.

    Attributes:
        targets: the labels, always on the CPU (read by ``dataset_labels`` and ``few_shot_subset``).
        augment: whether batches are randomly cropped.
        flip: whether batches are randomly flipped.

    Raises:
        ValueError: for images that are not uint8 N x C x H x W, mismatched targets, bad statistics, or an
            unknown or unavailable device.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        device: str | torch.device = "cpu",
        flip: bool = False,
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W, e.g. from decode_image_folder.")
        targets = torch.as_tensor(targets)
        if targets.shape != images.shape[:1] or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"targets must be {len(images)} integer labels, one per image; got {targets.dtype} of shape "
                f"{tuple(targets.shape)}."
            )
        check_image_options(images.shape[-1], images.shape[1], mean, std)
        auto = device == "auto"
        self.targets = targets.to("cpu", torch.long)
        self.augment, self.flip = augment, flip
        self._placement = _Placement(
            images,
            self.targets,
            torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
            auto,
        )
        self._placement.move(images.device if auto else _usable_device(device))

    @property
    def images(self) -> Tensor:
        """The uint8 images, N x C x H x W."""
        return self._placement.images

    @property
    def device(self) -> torch.device:
        """Where the images are now (with ``device="auto"``, that may change at the first fetch)."""
        return self._placement.images.device

    def to(self, device: str | torch.device) -> ImageTensorDataset:
        """Move the images (of this dataset and of those made by ``with_augment``) to ``device``; returns self.

        Raises:
            ValueError: for an unknown or unavailable device (``"auto"`` is for the constructor).
        """
        self._placement.auto = False
        self._placement.move(_usable_device(device))
        return self

    def with_augment(self, augment: bool, flip: bool = False) -> ImageTensorDataset:
        """The same images (same memory, moving together) with random crops and flips on or off."""
        twin = copy.copy(self)
        twin.augment, twin.flip = augment, flip
        return twin

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([index]).images[0], int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> _Batch:
        """A whole batch at once (called by ``DataLoader``, also through ``Subset``).

        Raises:
            IndexError: for an index out of range (checked here: on a GPU it would be a device-side assert).
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        if len(index):
            if not -len(self) <= int(index.min()) <= int(index.max()) < len(self):
                raise IndexError(
                    f"Indices {int(index.min())}..{int(index.max())} are out of range for {len(self)} images."
                )
            index = index.remainder(len(self))  # index_select takes no negative indices
        index = index.to(self._resolved_device())
        return _Batch(self._images_at(index), self._placement.targets.index_select(0, index))

    def _resolved_device(self) -> torch.device:
        placement = self._placement
        if placement.auto and get_worker_info() is None:
            placement.auto = False
            if placement.images.device.type == "cpu":
                placement.move(_auto_device(placement.images.nbytes))
        return placement.images.device

    def _images_at(self, index: Tensor) -> Tensor:
        placement = self._placement
        images = placement.images.index_select(0, index)  # far faster than images[index] on a CPU
        if self.augment or self.flip:
            images = _crop_and_flip(images, padding=images.shape[-1] // 8 if self.augment else 0, flip=self.flip)
        # The same operations as ToTensor + Normalize, so the results agree with the PIL path.
        return images.float().div_(255).sub_(placement.mean).div_(placement.std)


def _crop_and_flip(images: Tensor, padding: int, flip: bool) -> Tensor:
    """Random crops of the images zero-padded by ``padding`` (0: none), each flipped or not when ``flip``."""
    count, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)).flatten(2)
    offsets = torch.randint(0, 2 * padding + 1, (2, count, 1), device=device)
    rows = offsets[0] + torch.arange(height, device=device)
    columns = offsets[1] + torch.arange(width, device=device)
    if flip:
        columns = torch.where(torch.rand(count, 1, device=device) < 0.5, columns.flip(1), columns)
    # One gather does every sample's crop and flip (5x faster on a CPU than 4-way advanced indexing).
    source = rows.view(count, 1, height, 1) * (width + 2 * padding) + columns.view(count, 1, 1, width)
    return padded.gather(2, source.view(count, 1, -1).expand(-1, channels, -1)).view(count, channels, height, width)


def check_image_options(
    image_size: int,
    channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> None:
    """Refuse bad image options with a message naming the fix; ``mean``, ``std`` and ``device`` when given.

    Raises:
        ValueError: if ``image_size`` is not a positive integer, ``channels`` not 1 or 3, ``mean``/``std``
            do not hold one value per channel or a ``std`` is not positive, or ``device`` is neither
            ``"auto"`` nor a usable device.
    """
    if device is not None and device != "auto":
        _usable_device(device)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
    if mean is None or std is None:
        return
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel: channels={channels}, mean={list(mean)}, std={list(std)}."
        )
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}.")


def _usable_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r} ({err}): use 'auto', 'cpu' or 'cuda'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} needs a GPU and none is available: use 'auto' or 'cpu'.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}: there are only {torch.cuda.device_count()} GPUs; use 'cuda'.")
    return resolved


def _auto_device(nbytes: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpu = torch.device("cuda", torch.cuda.current_device())
    if nbytes <= _AUTO_GPU_SHARE * torch.cuda.get_device_properties(gpu).total_memory:
        return gpu
    log.info("Keeping %.1f GB of images on the CPU: over a quarter of %s's memory.", nbytes / 1e9, gpu)
    return torch.device("cpu")

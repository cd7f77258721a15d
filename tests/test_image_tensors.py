"""Decoded image folders: equal to the PIL path, cached safely, augmented per batch, served whole batches."""

import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_forget import dataset_labels, few_shot_subset
from lightning_forget.app import image_tensors as it
from lightning_forget.app.data import image_folder
from lightning_forget.app.image_tensors import ImageTensorDataset, decode_image_folder

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def make_image_folder(root: Path, per_class: int = 4, classes: tuple[str, ...] = ("cat", "dog", "ship")) -> Path:
    """Noise images of several sizes (larger, smaller, non-square, exact), PNG and JPEG, RGB and grey."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (45, 37), (20, 28), (64, 40)]
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                width, height = sizes[(j + c) % len(sizes)]
                pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
                image = Image.fromarray(pixels)
                if j % 3 == 2:
                    image = image.convert("L")
                image.save(folder / f"{j}.{'png' if j % 2 else 'jpg'}")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images")


def stacked(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def batch_of(dataset, batch_size=1000, **kwargs):
    return next(iter(DataLoader(dataset, batch_size=batch_size, **kwargs)))


# --------------------------------------------------------------------------- equality with the PIL path


@pytest.mark.parametrize(("channels", "image_size"), [(3, 32), (3, 24), (1, 16)])
def test_evaluation_images_equal_the_pil_transforms(folder, tmp_path, channels, image_size):
    mean, std = (MEAN, STD) if channels == 3 else ((0.45,), (0.25,))
    options = {"image_size": image_size, "channels": channels, "mean": mean, "std": std, "augment": False}
    pil = image_folder(str(folder), **options, in_memory=False)
    memory = image_folder(str(folder), **options, in_memory=True, cache_dir=str(tmp_path / "cache"))
    assert isinstance(memory.test, ImageTensorDataset) and isinstance(memory.train_eval, ImageTensorDataset)
    for reference, decoded in ((pil.train_eval, memory.train_eval), (pil.test, memory.test), (pil.train, memory.train)):
        expected = stacked(reference)
        assert expected.shape == (len(reference), channels, image_size, image_size)
        torch.testing.assert_close(stacked(decoded), expected, rtol=0, atol=1e-6)
        images, targets = batch_of(decoded)
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
        assert targets.tolist() == [label for _, label in reference.samples] == decoded.targets.tolist()
    assert memory.class_names == pil.class_names == ["cat", "dog", "ship"]


def test_grey_images_have_one_channel_converted_like_pil(folder, tmp_path):
    images, _, _ = decode_image_folder(folder / "train", 32, channels=1, cache_dir=None, progress=False)
    path = sorted((folder / "train" / "cat").iterdir())[0]  # 32 x 32: no resize, only the grey conversion
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB").convert("L")))
    assert images.shape == (12, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[0, 0], expected)


def test_dataset_labels_and_few_shot_subset_read_the_targets(folder):
    images, targets, _ = decode_image_folder(folder / "train", 16, cache_dir=None, progress=False)
    dataset = ImageTensorDataset(images, targets, MEAN, STD)
    assert dataset_labels(dataset).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    few = few_shot_subset(dataset, shots=2, seed=0)
    assert torch.bincount(dataset_labels(few)).tolist() == [2, 2, 2]
    images, labels = batch_of(few)
    assert labels.tolist() == dataset_labels(few).tolist() and images.shape == (6, 3, 16, 16)


# --------------------------------------------------------------------------- cache


def test_second_decode_comes_from_the_cache_without_decoding(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False)
    assert [p.suffix for p in cache.iterdir()] == [".pt"]  # no temporary file left behind

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(it, "_decode", refuse)
    second = decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False)
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    assert second.classes == first.classes == ["cat", "dog", "ship"]
    with pytest.raises(AssertionError, match="decoded again"):  # another size is another cache entry
        decode_image_folder(folder / "train", 16, cache_dir=cache, progress=False)


def test_changed_files_are_decoded_again(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False)
    changed = folder / "train" / "cat" / "0.jpg"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(changed, format="JPEG")
    os.utime(changed, ns=(1, 1))
    decoded = decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False)
    assert decoded.images[0, 0].float().mean() > 240  # the new red image, not the cached noise
    calls = []

    def fake_decode(samples, size, channels, *args, **kwargs):
        calls.append(len(samples))
        return torch.zeros(len(samples), channels, size, size, dtype=torch.uint8)

    monkeypatch.setattr(it, "_decode", fake_decode)
    Image.new("RGB", (32, 32)).save(folder / "train" / "dog" / "new.png")
    assert len(decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False).targets) == 13
    assert calls == [13]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong shape"])
def test_unreadable_cache_is_ignored_with_a_warning_and_rebuilt(folder, tmp_path, damage):
    cache = tmp_path / "cache"
    expected = decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False)
    (path,) = cache.iterdir()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "images": payload["images"][:, :, :8]}, path)
    with pytest.warns(UserWarning, match=f"Ignoring the unreadable decoded-image cache {re.escape(str(path))}"):
        rebuilt = decode_image_folder(folder / "train", 32, cache_dir=cache, progress=False)
    assert torch.equal(rebuilt.images, expected.images)
    assert torch.equal(torch.load(path, weights_only=True)["images"], expected.images)  # the file was rewritten


def test_cache_that_cannot_be_written_only_warns(folder, tmp_path, monkeypatch):
    def disk_full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="Could not write the decoded-image cache .*No space left"):
        decoded = decode_image_folder(folder / "test", 32, cache_dir=cache, progress=False)
    assert decoded.images.shape == (12, 3, 32, 32)
    assert list(cache.iterdir()) == []  # neither a final nor a temporary file


def test_corrupt_image_is_named_in_the_error(folder, tmp_path):
    broken = folder / "test" / "dog" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(OSError, match=f"Cannot decode the image {re.escape(str(broken))}"):
        decode_image_folder(folder / "test", 32, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- augmentation


def augmented_dataset(folder, image_size=32):
    images, targets, _ = decode_image_folder(folder / "train", image_size, cache_dir=None, progress=False)
    return ImageTensorDataset(images, targets, MEAN, STD, augment=True, flip=True)


def crops_and_flips(image, padding):
    """Every image that a crop of the zero-padded ``image`` and an optional flip can give."""
    size = image.shape[-1]
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + size, left : left + size]
            yield (top, left, False), crop
            yield (top, left, True), crop.flip(-1)


def test_augmentation_is_a_padded_crop_and_flip_of_each_image(folder):
    dataset = augmented_dataset(folder)
    torch.manual_seed(0)
    seen = set()
    for _ in range(10):
        images, _ = batch_of(dataset)
        assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
        raw = (images * dataset._placement.std + dataset._placement.mean) * 255
        for source, augmented in zip(dataset.images, raw.round().to(torch.uint8)):
            match = [key for key, candidate in crops_and_flips(source, padding=4) if torch.equal(candidate, augmented)]
            assert match, "an augmented image is no padded crop (+ flip) of its source"
            seen.add(match[0])
    assert len({key[:2] for key in seen}) > 30 and {key[2] for key in seen} == {False, True}


def test_augmentation_is_reproducible_under_the_seed_and_changes_images(folder):
    dataset = augmented_dataset(folder)
    L.seed_everything(3, verbose=False)
    first = batch_of(dataset)[0]
    L.seed_everything(3, verbose=False)
    assert torch.equal(first, batch_of(dataset)[0])
    torch.manual_seed(4)
    assert not torch.equal(first, batch_of(dataset)[0])
    plain = batch_of(dataset.with_augment(False))[0]
    changed = (first != plain).flatten(1).any(1)
    assert changed.sum() >= 10  # an image can draw the identity crop without a flip, rarely


def test_with_augment_shares_the_images(folder):
    dataset = augmented_dataset(folder)
    evaluation = dataset.with_augment(False)
    assert evaluation.images is dataset.images and evaluation.augment is False and dataset.augment is True
    assert evaluation.to("cpu") is evaluation and dataset.device == torch.device("cpu")


# --------------------------------------------------------------------------- batches


def test_dataloader_over_a_subset_fetches_whole_batches_without_per_sample_work(folder, monkeypatch):
    dataset = augmented_dataset(folder, image_size=16)
    picked = []
    sample_at = it._Batch.__getitem__
    monkeypatch.setattr(it._Batch, "__getitem__", lambda self, index: picked.append(index) or sample_at(self, index))
    subset = Subset(dataset, [1, 3, 4, 6, 9, 11, 2])
    torch.manual_seed(0)
    batches = list(DataLoader(subset, batch_size=3, shuffle=True))
    assert picked == [0, 0, 0]  # default_collate looks at the first sample's type only
    assert [tuple(images.shape) for images, _ in batches] == [(3, 3, 16, 16)] * 2 + [(1, 3, 16, 16)]
    labels = torch.cat([targets for _, targets in batches])
    assert sorted(labels.tolist()) == sorted(dataset_labels(subset).tolist()) and labels.dtype == torch.long


def test_distributed_sampler_and_workers_see_the_same_samples(folder):
    dataset = augmented_dataset(folder).with_augment(False)
    expected = stacked(dataset)
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=1)
        images, targets = batch_of(dataset, batch_size=6, sampler=sampler)
        indices = list(sampler)
        assert torch.equal(images, expected[indices]) and torch.equal(targets, dataset.targets[indices])
    images, targets = batch_of(dataset, num_workers=1)
    assert torch.equal(images, expected) and torch.equal(targets, dataset.targets)


def test_custom_collate_gets_image_target_pairs(folder):
    dataset = augmented_dataset(folder, image_size=8).with_augment(False)
    samples = batch_of(dataset, batch_size=4, collate_fn=list)
    assert len(samples) == 4 and all(len(sample) == 2 for sample in samples)
    assert torch.equal(samples[2][0], dataset[2][0]) and int(samples[2][1]) == dataset[2][1]
    images, targets = torch.utils.data.default_collate(samples[:2] + samples[3:])  # mixed samples, no batch
    assert torch.equal(images[2], dataset[3][0]) and targets.tolist() == [0, 0, 0]


def test_out_of_range_indices_raise_index_error(folder):
    dataset = augmented_dataset(folder, image_size=8)
    with pytest.raises(IndexError, match="out of range for 12 images"):
        dataset.__getitems__([0, 12])
    with pytest.raises(IndexError):
        dataset[12]
    assert torch.equal(dataset.with_augment(False)[-1][0], dataset.with_augment(False)[11][0])
    assert dataset[-12][1] == dataset.targets[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_resident_images_give_gpu_batches_equal_to_the_cpu_ones(folder):
    dataset = augmented_dataset(folder)
    evaluation = dataset.with_augment(False)
    expected = batch_of(evaluation)[0]
    dataset.to("cuda")
    assert evaluation.device.type == "cuda"
    images, targets = batch_of(evaluation)
    assert images.is_cuda and targets.is_cuda and dataset.targets.device.type == "cpu"
    torch.testing.assert_close(images.cpu(), expected, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    assert batch_of(dataset)[0].is_cuda


# --------------------------------------------------------------------------- options


def test_image_folder_in_memory_keeps_train_per_class_and_augments_only_training(folder, tmp_path):
    data = image_folder(str(folder), train_per_class=2, in_memory=True, cache_dir=str(tmp_path / "cache"))
    assert isinstance(data.train, Subset) and data.train.indices == data.train_eval.indices
    assert torch.bincount(dataset_labels(data.train)).tolist() == [2, 2, 2]
    assert data.train.dataset.augment and not data.train_eval.dataset.augment and not data.test.augment
    pil = image_folder(str(folder), train_per_class=2, in_memory=False)
    assert pil.train.indices == data.train.indices  # the same images drawn for the same seed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"channels": 1}, "mean and std need one value per channel"),
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"channels": 2, "mean": (0.5,) * 2, "std": (0.2,) * 2}, "channels must be 1"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"device": "gpu0"}, "Unknown device 'gpu0'"),
    ],
)
def test_bad_options_are_refused_before_decoding(folder, tmp_path, monkeypatch, options, message):
    monkeypatch.setattr(it, "_decode", lambda *a, **k: pytest.fail("decoded before the options were checked"))
    with pytest.raises(ValueError, match=message):
        image_folder(str(folder), in_memory=True, cache_dir=str(tmp_path / "cache"), **options)


def test_bad_dataset_inputs_are_refused():
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 tensor of shape N x C x H x W"):
        ImageTensorDataset(images.float(), torch.zeros(3), MEAN, STD)
    with pytest.raises(ValueError, match="3 integer labels"):
        ImageTensorDataset(images, torch.zeros(4, dtype=torch.long), MEAN, STD)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a GPU and none is available"):
            ImageTensorDataset(images, torch.zeros(3, dtype=torch.long), MEAN, STD, device="cuda")


def test_auto_device_stays_on_the_cpu_without_a_gpu(folder):
    images, targets, _ = decode_image_folder(folder / "test", 8, cache_dir=None, progress=False)
    dataset = ImageTensorDataset(images, targets, MEAN, STD, device="auto")
    batch_of(dataset)
    assert dataset.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_app_config_builds_in_memory_image_folders(folder, tmp_path):
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(
            config_name="config",
            overrides=[
                "dataset=cifar10_jpg",
                f"dataset.root={folder}",
                "dataset.in_memory=true",
                "dataset.device=cpu",
                f"dataset.cache_dir={tmp_path / 'cache'}",
            ],
        )
    data = instantiate(cfg.dataset)
    assert isinstance(data.train, ImageTensorDataset) and data.train.augment and data.train.device.type == "cpu"
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and test


# --------------------------------------------------------------------------- flips and in_memory


@pytest.mark.parametrize(
    ("option", "flip"),
    [
        ("imagefolder", False),
        ("cifar10_jpg", True),
        ("cifar10", True),
        ("cifar100", True),
        ("svhn", False),
        ("mnist", False),
        ("fashion_mnist", False),
    ],
)
def test_flip_is_off_for_an_image_folder_and_on_for_the_natural_image_presets(option, flip):
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="config", overrides=[f"dataset={option}", "dataset.root=/data"])
    assert cfg.dataset.flip is flip


@pytest.mark.parametrize("flip", [False, True])
def test_flip_is_its_own_option_on_both_paths(folder, tmp_path, flip):
    kinds = {"in_memory": True, "cache_dir": str(tmp_path / "cache")}
    memory = image_folder(str(folder), flip=flip, **kinds)
    assert memory.train.flip is flip and memory.train.augment and not memory.train_eval.flip
    pil = image_folder(str(folder), flip=flip, in_memory=False)
    steps = [type(step).__name__ for step in pil.train.transform.transforms]
    assert ("RandomHorizontalFlip" in steps) is flip and "RandomCrop" in steps
    evaluation = [type(step).__name__ for step in pil.train_eval.transform.transforms]
    assert "RandomHorizontalFlip" not in evaluation


def test_flip_without_augment_mirrors_whole_images_and_augment_without_flip_never_does(folder):
    images, targets, _ = decode_image_folder(folder / "train", 32, cache_dir=None, progress=False)
    for augment, flip in ((False, True), (True, False)):
        dataset = ImageTensorDataset(images, targets, MEAN, STD, augment=augment, flip=flip)
        torch.manual_seed(0)
        seen = set()
        for _ in range(5):
            raw = (batch_of(dataset)[0] * dataset._placement.std + dataset._placement.mean) * 255
            for source, augmented in zip(images, raw.round().to(torch.uint8)):
                seen |= {key for key, image in crops_and_flips(source, padding=4) if torch.equal(image, augmented)}
        crops = {key[:2] for key in seen}
        assert {key[2] for key in seen} == ({False, True} if flip else {False})
        assert (crops == {(4, 4)}) is not augment, "no crop without augment, crops with it"


def test_in_memory_auto_decodes_once_exactly_when_the_images_fit_a_quarter_of_the_memory(
    folder, tmp_path, monkeypatch, caplog
):
    decoded = 2 * 12 * 3 * 32 * 32  # train and test: 12 images each, 3 x 32 x 32 bytes decoded
    for memory, in_memory in ((4 * decoded, True), (4 * decoded - 4, False)):
        monkeypatch.setattr(it, "_machine_memory", lambda memory=memory: memory)
        caplog.clear()
        with caplog.at_level("INFO", logger=it.__name__):
            data = image_folder(str(folder), cache_dir=str(tmp_path / "cache"), progress=False)
        assert isinstance(data.test, ImageTensorDataset) is in_memory
        said = "within" if in_memory else "more than"
        assert f"in_memory=auto: the 24 images take 0.1 MB decoded, {said} a quarter of this machine's" in caplog.text


@pytest.mark.parametrize("in_memory", [False, True])
def test_in_memory_true_or_false_forces_it_whatever_the_memory(folder, tmp_path, monkeypatch, caplog, in_memory):
    monkeypatch.setattr(it, "_machine_memory", lambda: 0 if in_memory else 2**50)
    with caplog.at_level("INFO", logger=it.__name__):
        data = image_folder(str(folder), in_memory=in_memory, cache_dir=str(tmp_path / "cache"), progress=False)
    assert isinstance(data.test, ImageTensorDataset) is in_memory and "in_memory=auto" not in caplog.text


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_in_memory_value_is_refused_in_one_line(folder, value):
    with pytest.raises(ValueError, match=re.escape(f"in_memory must be true, false or 'auto', got {value!r}.")):
        image_folder(str(folder), in_memory=value)

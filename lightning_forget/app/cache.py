"""Trained models on disk, keyed by everything that shapes them, so an expensive fit happens once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_forget.app.data import ClassificationData
from lightning_forget.plugin.few_shot import dataset_labels

log = logging.getLogger(__name__)
# Trainer settings that do not change what a fit learns; every other one is part of a key.
DISPLAY_ONLY = frozenset({"enable_progress_bar", "enable_model_summary", "enable_checkpointing", "log_every_n_steps"})


class ModelCache:
    """A folder of trained weights, one file per key.

    The key must hold everything that shapes the trained model (data, architecture, recipe,
    seed, trainer settings); a file name is the hash of the key, and the key is stored beside
    the weights and compared on load. Writes go to a unique temporary file renamed into place,
    so runs sharing the folder never see a half-written file; a file that does not load is
    ignored with a warning.

    Args:
        directory: the folder; created on the first write.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: Mapping[str, Any], prefix: str = "model") -> Path:
        """Where the weights of ``key`` live; ``prefix`` (e.g. the architecture) starts the file name."""
        return self.directory / f"{prefix}-{digest(key)}.pt"

    def check_writable(self) -> None:
        """Raise ``PermissionError`` (naming the folder) unless files can be written there."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".write-check-"):
                pass
        except OSError as err:
            raise PermissionError(
                f"The cache folder {self.directory} is not writable ({err.strerror}): choose another folder."
            ) from None

    def load(self, key: Mapping[str, Any], model: nn.Module, prefix: str = "model") -> float | None:
        """Load the weights of ``key`` into ``model`` and return their training seconds; ``None`` on a miss."""
        path = self.path(key, prefix)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") != _canonical(key):
                raise ValueError("its key differs from this run's")
            model.load_state_dict(saved["state_dict"])
        except Exception as err:
            log.warning("Ignoring the cached model %s, which does not load (%s); training anew.", path, err)
            return None
        log.info("Model from the cache: %s", path)
        return float(saved["seconds"])

    def save(self, key: Mapping[str, Any], model: nn.Module, seconds: float, prefix: str = "model") -> Path:
        """Store ``model``'s weights under ``key``, atomically."""
        path = self.path(key, prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save({"state_dict": state, "seconds": seconds, "key": _canonical(key)}, file)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def training_keys(
    settings: Mapping[str, Any], data: ClassificationData, model: nn.Module, one_device: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys of a model the app trains: of a fit on one device, and of a fit with the configured trainer.

    A key holds what shapes the trained model: the data (settings and content), the architecture, the recipe,
    the seed and every trainer setting but the display-only ones (:data:`DISPLAY_ONLY`).

    Args:
        settings: the app's resolved settings (``dataset``, ``model``, ``train``, ``seed``, ``trainer``).
        data: the dataset they build.
        model: a network as they build it (the shapes of its parameters).
        one_device: the trainer settings of a fit on one device (devices, strategy, the accelerator used).
    """
    labels = [dataset_labels(split).tolist() for split in (data.train, data.test)]
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    content = {"sizes": [len(labels[0]), len(labels[1])], "classes": data.class_names, "labels": digest(labels)}
    trainer = {k: v for k, v in settings["trainer"].items() if k not in DISPLAY_ONLY}
    key = {
        "dataset": settings["dataset"],
        "dataset_content": content,
        "model": settings["model"],
        "parameters": digest(shapes),
        "train": settings["train"],
        "seed": settings["seed"],
        "trainer": trainer,
    }
    return {**key, "trainer": {**trainer, **one_device}}, key


def digest(value: Any) -> str:
    """A short hash of a JSON-ready value (mapping keys in any order)."""
    return hashlib.sha256(_canonical(value).encode()).hexdigest()[:16]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)

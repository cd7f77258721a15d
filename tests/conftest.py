import json
import logging
import os
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def pytest_report_header(config) -> list[str]:
    """The versions and threads every run prints first: CI logs say what the figures were measured with."""
    import platform
    from importlib.metadata import version

    packages = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy", "scikit-learn")
    return [
        f"lightning-forget test run: python {platform.python_version()}, "
        + ", ".join(f"{p} {version(p)}" for p in packages),
        f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"LF_TEST_SEED={TEST_SEED}",
    ]


# The seed of every test that asserts a training result; bench/ci_stability.py runs them over several.
TEST_SEED = int(os.environ.get("LF_TEST_SEED", "0"))


def bound(name: str, value: float, op: str, limit: float) -> None:
    """Assert ``value op limit`` for a figure a training produced.

    With ``LF_BOUNDS_LOG`` set, every check is also appended there (one JSON line), so that
    ``bench/ci_stability.py`` can print each bound beside the spread it saw over seeds and threads.
    """
    assert op in ("<=", ">=", "<", ">"), op
    log = os.environ.get("LF_BOUNDS_LOG")
    if log:
        record = {"bound": name, "value": float(value), "op": op, "limit": float(limit), "seed": TEST_SEED}
        with open(log, "a") as file:
            file.write(json.dumps(record) + "\n")
    holds = {"<=": value <= limit, ">=": value >= limit, "<": value < limit, ">": value > limit}[op]
    assert holds, f"{name}: {value} is not {op} {limit}"


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LitLogger|litlogger).*")
        yield


def tiny_net(num_classes: int = 4, channels: int = 1) -> nn.Module:
    """A small conv net with BatchNorm, 8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def tiny_loader(n_per_class: int = 6, num_classes: int = 4, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


class Trained(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def trained_net():
    """The tiny net trained to recognise its 4 classes (module-scoped: copy it before a fit)."""
    torch.manual_seed(TEST_SEED)
    module = Trained()
    quiet_trainer(max_epochs=30).fit(module, tiny_loader(n_per_class=12, seed=5))
    return module.net

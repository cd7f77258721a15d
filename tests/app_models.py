"""Networks as users write them, for the app tests: their own argument names, no num_classes or in_channels."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyNet(nn.Module):
    """A classifier of 8x8 grey digits with 10 classes built in; ``width`` is its only argument."""

    def __init__(self, width: int = 8, outputs: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.head = nn.Linear(4 * width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FiveLogits(TinyNet):
    """A network with the wrong number of outputs for a 10-class dataset."""

    def __init__(self) -> None:
        super().__init__(outputs=5)


class Wrapped(L.LightningModule):
    """A user's LightningModule holding the network as ``self.backbone`` (keys ``backbone.*`` in its .ckpt)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = TinyNet(width)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.backbone(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)

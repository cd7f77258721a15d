"""Networks whose final layer the linear probe cannot find, for tests/test_app_recovery.py."""

from torch import Tensor, nn


class ConvHead(nn.Module):
    """A classifier of 8x8 grey digits whose logits come from a 1x1 convolution: it has no ``nn.Linear``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)).mean((2, 3))


class TwoHeads(ConvHead):
    """A classifier with two ``nn.Linear`` layers of ``num_classes`` outputs: which one is final is not known."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(num_classes, in_channels)
        self.first = nn.Linear(8, num_classes)
        self.second = nn.Linear(num_classes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(self.body(x).mean((2, 3))))

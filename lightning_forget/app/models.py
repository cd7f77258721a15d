"""Classifier architectures, adapted to small images and any channel count, and the check that a network is one."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tv_models

from lightning_forget.app.data import ClassificationData

ARCHITECTURES: tuple[str, ...] = ("cnn", "resnet18", "resnet34", "resnet50", "vgg16_bn")


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised classifier.

    ``cnn`` is a small 4-layer CNN, fast on a CPU. The torchvision ResNets get a CIFAR-style
    stem (3x3 stride-1 convolution, no max-pool); VGG-16-BN gets ceil-mode pooling and a
    global-pool linear head, so all of them work from 8x8 images up.

    Args:
        arch: one of ``ARCHITECTURES``.
        num_classes: number of output logits.
        in_channels: image channels.

    Raises:
        ValueError: for an unknown architecture.
    """
    if arch == "cnn":
        return _small_cnn(num_classes, in_channels)
    if arch.startswith("resnet") and arch in ARCHITECTURES:
        net = getattr(tv_models, arch)(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        return net
    if arch == "vgg16_bn":
        net = tv_models.vgg16_bn(weights=None)
        first = net.features[0]
        net.features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
        for i, layer in enumerate(net.features):
            if isinstance(layer, nn.MaxPool2d):
                net.features[i] = nn.MaxPool2d(2, ceil_mode=True)
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Linear(512, num_classes)
        return net
    raise ValueError(f"Unknown architecture {arch!r}: choose one of {ARCHITECTURES}.")


def check_classifier(model: nn.Module, data: ClassificationData, name: str) -> None:
    """Refuse a model that does not map one training image of ``data`` to one logit per class.

    Args:
        model: the network; it is left in the mode it was in.
        data: the dataset it is to classify.
        name: how messages call the model.

    Raises:
        ValueError: naming what the model raised or returned, and what it must return.
    """
    image = data.train_eval[0][0].unsqueeze(0).cpu()
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(image)
    except Exception as err:  # whatever the user's forward raises, the fix is in the model or its settings
        raise ValueError(f"model {name} fails on a {tuple(image.shape)} image batch: {err!r}.") from None
    finally:
        model.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (1, data.num_classes):
        raise ValueError(
            f"model {name} returns {shape} for a {tuple(image.shape)} image batch; it must return (batch, "
            f"{data.num_classes}) logits: give it {data.num_classes} classes (e.g. +model.num_classes="
            f"{data.num_classes}) and {data.in_channels} input channels."
        )


def _small_cnn(num_classes: int, in_channels: int) -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 32),
        nn.MaxPool2d(2, ceil_mode=True),
        *block(32, 64),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )

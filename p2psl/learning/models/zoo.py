"""The model zoo: small models for the digits data and the paper's VGG-19 and ResNet-101.

Every zoo model is a list of indivisible layers (see `spec.ModelSpec`). The small models use no
batch normalisation and no dropout, so a split run equals an unsplit one exactly and the digits
accuracy check (SPEC §1, check b) is not blurred by batch-statistics noise.
"""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Callable

from torch import nn

from p2psl.errors import ConfigError
from p2psl.learning.models import resnet, vgg
from p2psl.learning.models.spec import Blueprint, ModelSpec, factory_spec, zoo_spec


def mlp_layers(input_shape: tuple[int, ...], num_classes: int) -> list[Blueprint]:
    """Four layers, so that owner-first, two compute nodes and owner-last each get one."""
    features = math.prod(input_shape)
    return [
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.ReLU()),
        lambda: nn.Sequential(nn.Linear(128, 128), nn.ReLU()),
        lambda: nn.Sequential(nn.Linear(128, 64), nn.ReLU()),
        lambda: nn.Linear(64, num_classes),
    ]


def cnn_layers(input_shape: tuple[int, ...], num_classes: int) -> list[Blueprint]:
    """Six layers: four 3×3 convolutions (two max-pools) and a two-layer classifier.

    Tanh, not ReLU: at the product's default SGD settings (lr 0.05, momentum 0.9) the ReLU
    version of this network diverges or stalls on digits for some seeds, the tanh one reaches
    ≥ 95 % within a few epochs for every seed we tried.
    """
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ConfigError(f"model 'cnn' needs C×H×W inputs with H, W >= 4, got {input_shape}")
    channels, height, width = input_shape
    flat = 64 * (height // 4) * (width // 4)
    return [
        lambda: _conv(channels, 16),
        lambda: nn.Sequential(*_conv(16, 32), nn.MaxPool2d(2)),
        lambda: _conv(32, 32),
        lambda: nn.Sequential(*_conv(32, 64), nn.MaxPool2d(2)),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), nn.Tanh()),
        lambda: nn.Linear(64, num_classes),
    ]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.Tanh())


def _image_model(layers: Callable, name: str, input_shape: tuple[int, ...], num_classes: int) -> list[Blueprint]:
    if len(input_shape) != 3:
        raise ConfigError(f"model {name!r} needs C×H×W inputs, got {input_shape}")
    return layers(input_shape[0], num_classes)


ZOO: dict[str, Callable[[tuple[int, ...], int], list[Blueprint]]] = {
    "mlp": mlp_layers,
    "cnn": cnn_layers,
    "vgg19": partial(_image_model, vgg.vgg19_layers, "vgg19"),
    "resnet101": partial(_image_model, resnet.resnet101_layers, "resnet101"),
}


def model_spec(name: str, input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    """The zoo model `name`, or the layers of the user factory "package.module:factory"."""
    input_shape = tuple(int(d) for d in input_shape)
    if name in ZOO:
        return zoo_spec(name, input_shape, num_classes, ZOO[name](input_shape, num_classes))
    return factory_spec(name, input_shape, num_classes)

"""The MP-SL authors' VGG-19: 16 conv + 5 max-pool + avg-pool + 3 FC = 25 indivisible layers.

Sizes follow the authors' profile (shared/reference/profiles/vgg19_cifar10_bs128.csv): on a 32×32
input their max-pools produce 17, 9, 5, 3 and 2 pixels, which is a 2×2 pool with stride 2 *and
padding 1*; the classifier is the ImageNet one (avg-pool to 7×7, 25088 → 4096 → 4096 → classes)
with the flatten folded into the first FC layer. No batch normalisation, as in their model.
"""

from __future__ import annotations

from torch import nn

from p2psl.learning.models.spec import Blueprint

#: output channels per conv layer, "M" for a max-pool
CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg19_layers(in_channels: int, num_classes: int) -> list[Blueprint]:
    layers: list[Blueprint] = []
    channels = in_channels
    for item in CONFIG:
        if item == "M":
            layers.append(lambda: nn.MaxPool2d(kernel_size=2, stride=2, padding=1))
        else:
            layers.append(lambda cin=channels, cout=item: _conv(cin, cout))
            channels = item
    return layers + [
        lambda: nn.AdaptiveAvgPool2d((7, 7)),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout()),
        lambda: nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout()),
        lambda: nn.Linear(4096, num_classes),
    ]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU())

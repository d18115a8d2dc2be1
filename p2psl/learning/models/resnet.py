"""The MP-SL authors' "ResNet-101": a ResNet of basic blocks, 3+4+23+3, as 37 indivisible layers.

Layer 1 is the stem (7×7 conv stride 2 + BN + ReLU), layer 2 the 3×3 max-pool, layers 3–35 the
33 residual blocks (widths 64/128/256/512, stride 2 at the first block of stages 2–4), layer 36
global average pooling with the flatten, layer 37 the FC layer. On a 32×32 input the outputs are
64×16×16, 64×8×8, then 8×8, 4×4, 2×2 and 1×1 per stage — exactly the activation sizes in the
authors' profile (shared/reference/profiles/resnet101_cifar10_bs128.csv).
"""

from __future__ import annotations

from torch import Tensor, nn

from p2psl.learning.models.spec import Blueprint

STAGES = ((64, 3), (128, 4), (256, 23), (512, 3))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (1×1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet101_layers(in_channels: int, num_classes: int) -> list[Blueprint]:
    layers: list[Blueprint] = [
        lambda: nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                              nn.BatchNorm2d(64), nn.ReLU()),
        lambda: nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    ]
    cin = 64
    for stage, (width, blocks) in enumerate(STAGES):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(lambda cin=cin, cout=width, stride=stride: BasicBlock(cin, cout, stride))
            cin = width
    return layers + [
        lambda: nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()),
        lambda: nn.Linear(512, num_classes),
    ]

"""Models the benchmarks build through `model = "tools.bench.models:NAME"` (a user factory).

`tower`: a convolutional stem, six identical 3×3 convolutions and a linear head. Its middle layers
cost the same, so a chain of compute nodes can be balanced to the layer: what a benchmark of the
pipeline then times is the pipeline, not how unevenly a model's layers happen to fall.
"""

from __future__ import annotations

from torch import nn

#: identical middle layers (a multiple of 2 and of 3: chains of 1, 2, 3 or 6 nodes balance)
TOWER_DEPTH = 6


def tower(input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    channels, height, width = input_shape
    stem = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2))
    body = [nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Tanh()) for _ in range(TOWER_DEPTH)]
    head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (height // 2) * (width // 2), num_classes))
    return [stem, *body, head]

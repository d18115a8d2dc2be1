"""Timing one layer for a profile: forward, backward and SGD step, each after the device drained.

On the CPU torch computes synchronously and a clock read after a call measures it; on a CUDA
device the call only queues kernels, so every clock is read after `torch.cuda.synchronize`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from p2psl.errors import ConfigError


def no_sync() -> None:
    """The CPU computes synchronously: nothing to wait for before reading a clock."""


def synchronizer(device: Any) -> Callable[[], None]:
    """What waits for `device` (a torch device or None) before a clock is read."""
    if getattr(device, "type", None) != "cuda":
        return no_sync
    import torch
    return lambda: torch.cuda.synchronize(device)


def measure_layer(layer: Any, x: Any, needs_grad: bool, warmup: int, repeats: int, sync=no_sync) -> tuple[tuple, Any]:
    import torch

    params = [p for p in layer.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=1e-6, momentum=0.9) if params else None
    fwd, bwd, opt = [], [], []
    out = None
    for attempt in range(warmup + repeats):
        inp = x.detach().requires_grad_(needs_grad and x.is_floating_point())
        sync()
        t0 = time.perf_counter()
        out = layer(inp)
        sync()
        t1 = time.perf_counter()
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"layer {type(layer).__name__} returns {type(out).__name__}, not a tensor")
        if out.requires_grad:
            out.backward(torch.ones_like(out))
        sync()
        t2 = time.perf_counter()
        if sgd is not None:
            sgd.step()
            sgd.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if attempt >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            opt.append(t3 - t2 if sgd else 0.0)
    act = out.numel() * out.element_size()
    par = sum(p.numel() * p.element_size() for p in layer.parameters())
    row = (statistics.median(fwd), statistics.median(bwd), statistics.median(opt), act, par)
    return row, out.detach()

"""Timing one layer for a profile: forward, backward and SGD step, each after the device drained.

On the CPU torch computes synchronously, on the calling thread (profiles are timed with one
torch thread), so the thread's own CPU time across a call measures it; on a CUDA device the call
only queues kernels, so the wall clock is read after `torch.cuda.synchronize`.

[Note: timing under interference] A machine whose cores are all taken (the other peers of a
deployment starting, other work) takes the timing thread off its core for whole scheduler time
slices, milliseconds each. On the wall clock that made a backward pass of 0.7 ms cached at 5.5 ms,
and a peer sharing a core with another peer's start-up for the whole of its first layer timed
that layer at twice the others of the same shape (a Linear(2048, 2048) at 9.2 ms forward where
its three twins took 4.8): every later run on that machine planned with it (one node given three
of four equal layers) and re-planned after round 1 on what it measured. Time off the core is not
the layer's, so on the CPU it is not counted: the clock is the thread's CPU time
(`time.thread_time`). Each time is still the median of a few runs; and where a median stands more
than `INTERFERED` × its fastest run *and* a millisecond above it — on a device's wall clock, the
signature of a time slice lost, not of jitter — the layer is timed again, up to `RETRIES` more
times, and the attempt with the least total is kept.
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


#: [Note: timing under interference]: on a wall clock, a median this many times its fastest run
#: (and a millisecond above it) was preempted; the layer is timed again at most `RETRIES` times
INTERFERED, RETRIES, SLICE_SECONDS = 2.0, 2, 1e-3


def measure_layer(layer: Any, x: Any, needs_grad: bool, warmup: int, repeats: int, sync=no_sync,
                  clock: Callable[[], float] | None = None) -> tuple[tuple, Any]:
    """(fwd, bwd, opt, act_bytes, param_bytes) of one layer on input `x`, and its output. `clock`
    defaults to the thread's CPU time on the CPU (`sync` is `no_sync`), with torch held to this
    one thread meanwhile, and to the wall clock on an accelerator ([Note: timing under interference])."""
    import torch

    on_cpu = clock is None and sync is no_sync
    clock = time.thread_time if on_cpu else clock or time.perf_counter
    threads = torch.get_num_threads()
    if on_cpu and threads != 1:
        torch.set_num_threads(1)  # CPU time counts this thread's work alone
    try:
        return _best_of(layer, x, needs_grad, warmup, repeats, sync, clock)
    finally:
        if on_cpu and threads != 1:
            torch.set_num_threads(threads)


def _best_of(layer: Any, x: Any, needs_grad: bool, warmup: int, repeats: int, sync, clock) -> tuple[tuple, Any]:
    """Timed once, and again where the runs look interfered; the attempt with the least total."""
    best = None
    for _ in range(1 + RETRIES):
        runs, out = _time_runs(layer, x, needs_grad, warmup, repeats, sync, clock)
        medians = tuple(statistics.median(r) for r in runs)
        if best is None or sum(medians) < sum(best[0]):
            best = medians, out
        if not any(_interfered(r) for r in runs):
            break
    (fwd, bwd, opt), out = best
    act = out.numel() * out.element_size()
    par = sum(p.numel() * p.element_size() for p in layer.parameters())
    return (fwd, bwd, opt, act, par), out.detach()


def _interfered(runs: list[float]) -> bool:
    median, fastest = statistics.median(runs), min(runs)
    return median > INTERFERED * fastest and median - fastest > SLICE_SECONDS


def _time_runs(layer: Any, x: Any, needs_grad: bool, warmup: int, repeats: int, sync,
               clock: Callable[[], float]) -> tuple[list, Any]:
    """The forward, backward and step times of `repeats` runs after `warmup` on `clock`, and the output."""
    import torch

    params = [p for p in layer.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=1e-6, momentum=0.9) if params else None
    fwd, bwd, opt = [], [], []
    out = None
    for attempt in range(warmup + repeats):
        inp = x.detach().requires_grad_(needs_grad and x.is_floating_point())
        sync()
        t0 = clock()
        out = layer(inp)
        sync()
        t1 = clock()
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"layer {type(layer).__name__} returns {type(out).__name__}, not a tensor")
        if out.requires_grad:
            out.backward(torch.ones_like(out))
        sync()
        t2 = clock()
        if sgd is not None:
            sgd.step()
            sgd.zero_grad(set_to_none=True)
        sync()
        t3 = clock()
        if attempt >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            opt.append(t3 - t2 if sgd else 0.0)
    return [fwd, bwd, opt], out

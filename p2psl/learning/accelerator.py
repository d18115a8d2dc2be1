"""Where a peer's parts compute: the ``accelerator`` key of its [[peer]] resolved to a torch device.

Everything device-specific lives here so the rest of p2psl speaks one API whatever the device:
tensors cross the wire in host memory (`to_host` before encoding, `to_device` on arrival), times
are taken after `synchronize`, and `peak_bytes` reads the device allocator's high-water mark.
On the CPU every one of these is the identity or free, so CI runs the same code path.

[Note: determinism on accelerators] `deterministic` asks torch for deterministic algorithms where
it has them (cuDNN convolutions, CUBLAS workspace); some CUDA kernels (scatter/index_add with
atomics, some backward passes) have no deterministic version and torch then only warns, so runs
on a GPU may differ in the last bits from run to run, and always differ from CPU runs.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from p2psl.errors import ConfigError

log = logging.getLogger("p2psl.accelerator")

#: below this many bytes, pinning a host tensor costs more than the asynchronous copy saves
PIN_BYTES = 1 << 20


def resolve_device(peer: str, accelerator: str = "cpu", quiet: bool = False) -> torch.device:
    """The torch device for `accelerator` ("cpu", "cuda", "cuda:N", "auto") on this machine.

    Raises a `ConfigError` (exit status 2) naming the peer and what this torch found when the
    accelerator asked for is not there: a local problem, said at start before any network.
    """
    if accelerator == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "auto":
        device = torch.device("cuda", 0) if count else torch.device("cpu")
        if not quiet:
            log.info("%s: accelerator 'auto' chose %s (%s)", peer, device, describe(device))
        return device
    if not accelerator.startswith("cuda"):
        raise ConfigError(f"{peer}: unknown accelerator {accelerator!r} (use 'cpu', 'cuda', 'cuda:N' or 'auto')")
    if count == 0:
        found = "has no CUDA" if torch.version.cuda is None else f"(CUDA {torch.version.cuda}) sees no CUDA device"
        raise ConfigError(f"{peer}: accelerator {accelerator!r} asked, but this torch ({torch.__version__}) {found}")
    index = int(accelerator.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(f"{peer}: accelerator {accelerator!r} asked, but this machine has "
                          f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0–cuda:{count - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """A device in words for logs and benchmark figures."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"


def is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A tensor arrived from the wire (host memory) onto `device`. A large one is pinned first so
    the copy runs asynchronously with what the host does next; the stream orders it before use."""
    if tensor.device == device:
        return tensor
    if is_cuda(device) and tensor.device.type == "cpu":
        if tensor.numel() * tensor.element_size() >= PIN_BYTES and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=tensor.is_pinned())
    return tensor.to(device)


def to_host(tensor: Tensor) -> Tensor:
    """A tensor for the wire, a checkpoint, a digest or an average: in host memory. The copy
    waits for the device, so the bytes are final when this returns."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work, so a wall-clock time measures it (a no-op on the CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device | None) -> int | None:
    """The device allocator's peak since the last `reset_peak` (None on the CPU: see host RSS)."""
    return int(torch.cuda.max_memory_allocated(device)) if is_cuda(device) else None


def reset_peak(device: torch.device | None) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def deterministic(device: torch.device) -> None:
    """Deterministic algorithms where torch has them (see [Note: determinism on accelerators])."""
    if is_cuda(device):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)

"""What a role checks in a message before acting on it: the same rules for owners and nodes.

A message that breaks them is refused with a typed error (SPEC §4) before it touches any state.
"""

from __future__ import annotations

import torch

from p2psl.errors import RemoteProtocolError
from p2psl.topology import TrainingConfig
from p2psl.wire.messages import Routed


def refuse_unless(ok: bool, msg: Routed, why: str) -> None:
    if not ok:
        raise RemoteProtocolError(f"{msg.KIND} from {msg.src} refused: {why}", "wrong_role")


def check_batch(t: torch.Tensor, shape: tuple, msg: Routed, training: TrainingConfig) -> None:
    """A batch of float32 samples of `shape`, no more than a training or an evaluation batch."""
    limit = max(training.batch_size, training.eval_batch_size)
    if t.dtype != torch.float32 or tuple(t.shape[1:]) != tuple(shape) or not 1 <= t.shape[0] <= limit:
        raise RemoteProtocolError(f"{msg.KIND} tensor {t.dtype} {tuple(t.shape)} does not fit the plan "
                                  f"(float32, 1–{limit} × {tuple(shape)})", "bad_tensor")

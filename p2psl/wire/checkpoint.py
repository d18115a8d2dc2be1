"""Per-peer round checkpoints, written atomically in p2psl's own tensor format (no pickle).

A checkpoint file is the codec frames of one `Replica` message (the same bytes a compute node
sends a neighbour to keep a copy of its state), each frame preceded by its u64 length. Reading one
goes through the same validating decoder as the network, so a damaged or hostile file is a
`ConfigError`, never code execution. Files are written to a temporary name, fsynced and renamed;
the newest `keep` rounds are kept (`KEEP` by default, the topology's `keep_checkpoints`; never
fewer than two, so peers that stopped one round apart can agree on a round to resume from).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from p2psl.wire import codec
from p2psl.errors import ConfigError, RemoteProtocolError
from p2psl.wire.messages import Replica

KEEP = 2
_LEN = struct.Struct(">Q")
_NAME = re.compile(r"round-(\d{6})\.ckpt")


def path_for(directory: Path, round_: int) -> Path:
    return Path(directory) / f"round-{round_:06d}.ckpt"


def write_to(f: BinaryIO, replica: Replica) -> None:
    """The replica's frames, each after its u64 length, one at a time: never the whole state twice."""
    for frame in codec.iter_frames(replica, message_id=1):
        f.write(_LEN.pack(len(frame)))
        f.write(frame)


def read_from(f: BinaryIO, source: str = "checkpoint") -> Replica:
    """Frames back to a `Replica`, through the network's validating decoder."""
    decoder, message = codec.Decoder(), None
    try:
        while head := f.read(8):
            if len(head) < 8:
                raise RemoteProtocolError("truncated frame length", "bad_frame")
            (size,) = _LEN.unpack(head)
            if size > codec.MAX_FRAME_BYTES:
                raise RemoteProtocolError(f"a frame of {size} bytes", "bad_frame")
            frame = f.read(size)
            if len(frame) < size:
                raise RemoteProtocolError("truncated frame", "bad_frame")
            message = decoder.feed(frame)
    except RemoteProtocolError as exc:
        if exc.code == "version":  # intact, but in another wire protocol's format
            raise ConfigError(f"{source} was written by a p2psl of another wire protocol ({exc}): this one "
                              "cannot read it; resume with the release that wrote it, or start afresh") from None
        raise ConfigError(f"{source} is damaged: {exc}") from None
    if not isinstance(message, Replica):
        raise ConfigError(f"{source} is not a p2psl checkpoint")
    return message


def save(directory: str | Path, peer: str, round_: int, plan_digest: str, state: dict[str, torch.Tensor],
         keep: int | None = KEEP) -> Path:
    """Write the state of `peer` after `round_`; returns the file. Older rounds beyond the newest
    `keep` go (None: every round stays), and any round after `round_` (an earlier life's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    replica = Replica(src=peer, dst=peer, node=peer, round=round_, plan=plan_digest, state=state)
    final = path_for(directory, round_)
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        write_to(f, replica)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    # rounds after this one are an earlier life's (this peer has just written round_ again): they
    # go; then the oldest beyond `keep`, never the file just written
    older = [r for r in rounds(directory) if r < round_]
    stale = [r for r in rounds(directory) if r > round_]
    for old in stale + (older[:max(0, len(older) + 1 - keep)] if keep else []):
        path_for(directory, old).unlink(missing_ok=True)
    return final


def clear(directory: str | Path) -> int:
    """Remove every round checkpoint in `directory` (a fresh start's, left by an earlier run:
    kept, they would outlive this run's rounds and be what a later --resume restores); how many."""
    stale = rounds(directory)
    for round_ in stale:
        path_for(Path(directory), round_).unlink(missing_ok=True)
    return len(stale)


def load(directory: str | Path, round_: int) -> Replica:
    path = path_for(Path(directory), round_)
    try:
        with open(path, "rb") as f:
            return read_from(f, str(path))
    except OSError as exc:
        raise ConfigError(f"no checkpoint for round {round_} in {directory}: {exc.strerror}") from None


def rounds(directory: str | Path) -> list[int]:
    """Rounds with a complete checkpoint in `directory`, oldest first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _NAME.fullmatch(n)))

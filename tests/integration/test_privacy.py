"""SPEC §1 check (c), on the wire: no frame an owner sends carries its labels or raw inputs.

The owner's every connection goes through a recording TCP proxy, so what is inspected is the bytes
that actually left it during a real training run — not what the code intends to send.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from p2psl.learning.data import batch_order, load_dataset, shard
from p2psl.learning.models import model_spec
from p2psl.planning.plan import Plan
from p2psl.topology import load_topology
from tests.integration.harness import run_in_process, write_topology

pytestmark = pytest.mark.timeout(300)

OWNERS, COMPUTE = ["alice", "bob", "carol"], ["c1", "c2"]


class RecordingProxy:
    """Relays TCP both ways to `target`, keeping every byte the client sent."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.streams: list[bytearray] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        task = asyncio.current_task()
        self.tasks.add(task)
        stream = bytearray()
        self.streams.append(stream)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, stream), self._pipe(up_reader, writer))
        finally:
            self.tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader, writer, record: bytearray | None = None) -> None:
        try:
            while data := await reader.read(1 << 16):
                if record is not None:
                    record += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass

    async def stop(self) -> None:
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


def websocket_payloads(stream: bytes) -> bytes:
    """The unmasked payloads of the client's WebSocket frames (RFC 6455 §5.2) in one stream.

    A client masks every frame it sends with a random key, so the raw TCP bytes hide everything;
    the audit must look at what the frames carry."""
    start = stream.index(b"\r\n\r\n") + 4
    out, i = [], start
    while i + 2 <= len(stream):
        b1 = stream[i + 1]
        length, i = b1 & 0x7F, i + 2
        if length == 126:
            length, i = int.from_bytes(stream[i:i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(stream[i:i + 8], "big"), i + 8
        key = stream[i:i + 4] if b1 & 0x80 else b"\0\0\0\0"
        i += 4 if b1 & 0x80 else 0
        body = np.frombuffer(stream[i:i + length], dtype=np.uint8)
        mask = np.resize(np.frombuffer(key, dtype=np.uint8), len(body))
        out.append((body ^ mask).tobytes())
        i += length
    return b"".join(out)


def encodings_of_labels(labels: np.ndarray) -> list[bytes]:
    return [labels.astype(dtype).tobytes() for dtype in ("<i8", "<i4", "<i2", "u1", "<f4", "<f8")]


async def test_no_frame_from_an_owner_carries_its_labels_or_inputs(tmp_path):
    path = write_topology(tmp_path, OWNERS, COMPUTE, training={"rounds": 2, "batch_size": 16})
    topology = load_topology(path)
    # alice's name sorts first, so alice dials every connection she has: route each through a proxy
    proxies = {p.name: RecordingProxy(p.port) for p in topology.peers if p.name != "alice"}
    dial = {name: ("127.0.0.1", await proxy.start()) for name, proxy in proxies.items()}
    try:
        await run_in_process(topology, tmp_path / "out", addresses={"alice": dial})
    finally:
        for proxy in proxies.values():
            await proxy.stop()
    sent = b"".join(websocket_payloads(bytes(s)) for p in proxies.values() for s in p.streams)
    assert len(sent) > 100_000  # activations, gradients and parts did cross the wire

    cfg = topology.training
    data = load_dataset(cfg)
    mine = shard(data, OWNERS, cfg.partition, cfg.alpha, cfg.seed)["alice"]
    for x in torch.cat([data.x_train[mine.train_idx], data.x_test[mine.test_idx]]):
        for dtype in ("<f4", "<f8"):
            assert x.numpy().astype(dtype).tobytes() not in sent, "a raw input left the owner"
    labels = data.y_train[mine.train_idx].numpy()
    for epoch_round in (1, 2):
        for batch in batch_order(len(labels), cfg.batch_size, cfg.seed, epoch_round, 0, 0):
            if len(batch) < 8:
                continue
            for pattern in encodings_of_labels(labels[batch]):
                assert pattern not in sent, "a batch's labels left the owner"
    test_labels = data.y_test[mine.test_idx].numpy()
    for pattern in encodings_of_labels(test_labels[:32]):
        assert pattern not in sent, "test labels left the owner"

    # the search does see payloads: alice's first activation (part 0 on her first batch, at the
    # initial weights) is found in the capture, byte for byte
    plan = Plan.from_json(json.loads((tmp_path / "out" / "alice" / "plan.json").read_text()))
    spec = model_spec(cfg.model, data.input_shape, data.num_classes)
    part0 = torch.nn.Sequential(*spec.build(list(plan.part_layers(0)), cfg.seed))
    first_batch = batch_order(len(labels), cfg.batch_size, cfg.seed, 1, 0, 0)[0]
    with torch.no_grad():
        h = part0(data.x_train[mine.train_idx][torch.from_numpy(first_batch)])
    if not h.is_contiguous():  # held channels-last: its bytes go as the N×H×W×C array (docs/protocol.md §5)
        h = h.permute(0, 2, 3, 1)
    assert h.contiguous().numpy().tobytes() in sent

"""What one message costs: a ping-pong of activations between two real peers, against aiohttp alone.

    .venv/bin/python tools/bench/pingpong.py [--quick] --out DIR

Two processes on loopback, as in tools/bench/transport.py: this one is peer "a" and a child is
peer "b" of a two-peer topology, both running `p2psl.net.network.Network` as a peer does. "a"
sends an `Activation` carrying a batch of the digits CNN's first activations (32 × 16 × 8 × 8
float32, 128 KiB, held channels-last as a convolution leaves it), "b" sends it straight back, N
times. Each side counts its CPU seconds over the exchange: per round trip, one message received
and one sent at each end. Then the same two processes exchange the same number of bytes over a
bare aiohttp WebSocket (no codec, MAC, session or routing): what the transport alone costs.
The split model's batch is four such messages, so this is the runtime's share of a split batch.

Keys: `pingpong_cpu_us_per_round_trip` (the mean of the two ends), `pingpong_cpu_us_per_round_trip_aiohttp`
(the same over the bare WebSocket), and the ratio of the two, `pingpong_cpu_ratio_vs_aiohttp`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, child_env, free_ports, main, write_json
from tools.bench.transport import _network, topology_text

WARM_UP = 200
ROUND_TRIPS = {True: 1000, False: 4000}
SHAPE = (32, 16, 8, 8)


def _activation(x, batch: int, src: str, dst: str):
    from p2psl.wire.messages import Activation

    return Activation(src=src, dst=dst, epoch=0, owner="a", round=1, batch=batch, part=1, train=True, x=x)


async def _peer_b(path: Path, count: int) -> None:
    """Send every activation back; after the warm-up, print the CPU microseconds per round trip."""
    done, net, start = asyncio.Event(), None, [0.0]

    async def echo(msg) -> None:
        if msg.batch == WARM_UP:
            start[0] = time.process_time()
        await net.send(_activation(msg.x, msg.batch, "b", "a"))
        if msg.batch == WARM_UP + count - 1:
            done.set()

    net = await _network("b", path, echo)
    await net.wait_connected(timeout=60)
    await done.wait()
    print(json.dumps({"b": (time.process_time() - start[0]) / count * 1e6}), flush=True)
    await net.stop()


async def _peer_a(path: Path, count: int) -> float:
    import torch

    replies: asyncio.Queue = asyncio.Queue()

    async def reply(msg) -> None:
        replies.put_nowait(msg)

    net = await _network("a", path, reply)
    await net.wait_connected(timeout=60)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)
    for batch in range(WARM_UP + count):
        if batch == WARM_UP:
            start = time.process_time()
        await net.send(_activation(x, batch, "a", "b"))
        await replies.get()
    used = (time.process_time() - start) / count * 1e6
    await net.stop()
    return used


async def _echo_server(port: int, count: int) -> None:
    from aiohttp import web

    finished = asyncio.Event()

    async def handle(request):
        ws = web.WebSocketResponse(max_msg_size=8 * 2**20, compress=False)
        await ws.prepare(request)
        for index in range(WARM_UP + count):
            if index == WARM_UP:
                start = time.process_time()
            await ws.send_bytes((await ws.receive()).data)
        print(json.dumps({"b": (time.process_time() - start) / count * 1e6}), flush=True)
        finished.set()
        return ws

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await finished.wait()
    await runner.cleanup()


async def _echo_client(port: int, count: int, size: int) -> float:
    import aiohttp

    payload = os.urandom(size)
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                ws = await session.ws_connect(f"ws://127.0.0.1:{port}/", max_msg_size=8 * 2**20, compress=0)
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        for index in range(WARM_UP + count):
            if index == WARM_UP:
                start = time.process_time()
            await ws.send_bytes(payload)
            await ws.receive()
        used = (time.process_time() - start) / count * 1e6
        await ws.close()
    return used


def _child(role: str, arg: str, count: int) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, __file__, role, arg, str(count)], env=child_env(), stdout=subprocess.PIPE, text=True)


def _frame_bytes() -> int:
    import torch
    from p2psl.wire import codec

    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)
    return len(codec.encode(_activation(x, 0, "a", "b"), seq=1)[0])


def run(quick: bool, out: Path) -> dict:
    """Both exchanges, one after the other, with the same number of round trips."""
    count = ROUND_TRIPS[quick]
    os.environ.setdefault("P2PSL_SECRET", "pingpong-" + "x" * 32)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "topology.toml"
    path.write_text(topology_text(free_ports(2)))
    child = _child("peer-b", str(path), count)
    a = asyncio.run(_peer_a(path, count))
    b = json.loads(child.communicate()[0].strip().splitlines()[-1])["b"]
    port = free_ports(1)[0]
    child = _child("echo-server", str(port), count)
    raw_a = asyncio.run(_echo_client(port, count, _frame_bytes()))
    raw_b = json.loads(child.communicate()[0].strip().splitlines()[-1])["b"]
    mine, raw = (a + b) / 2, (raw_a + raw_b) / 2
    results = {"pingpong_cpu_us_per_round_trip": round(mine, 1), "pingpong_cpu_us_per_round_trip_aiohttp": round(raw, 1),
               "pingpong_cpu_ratio_vs_aiohttp": round(mine / raw, 2),
               "details": {"round_trips": count, "p2psl_a": round(a, 1), "p2psl_b": round(b, 1),
                           "aiohttp_a": round(raw_a, 1), "aiohttp_b": round(raw_b, 1)}}
    write_json(out / "pingpong.json", results)
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer-b"]:  # the child processes
        asyncio.run(_peer_b(Path(sys.argv[2]), int(sys.argv[3])))
    elif sys.argv[1:2] == ["echo-server"]:
        asyncio.run(_echo_server(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(main(run, __doc__))

"""Transport: codec throughput, and real peers' WebSocket throughput against raw TCP.

    .venv/bin/python -m tools.bench.transport [--quick] --out DIR     (or through tools/bench/run.py)

Codec: `codec.encode` and `codec.Decoder.feed` of an `Activation` carrying one large float32
tensor (the shape of a batch of activations), in MB of tensor payload (10^6 bytes) per second of
this process's CPU time (single-threaded work, so other processes' load does not skew it; the
best of several runs) beside the per-frame MAC alone (`auth.Sealer.seal` + `auth.Opener.open`).

Link: two processes on loopback. This one is peer "a" and a child process is peer "b" of a
two-peer topology; both run `p2psl.net.network.Network` as a peer does — the authenticated handshake,
a MAC on every frame, chunking into `codec.CHUNK_BYTES` frames, the numbered link session with its
acknowledgements. "a" sends `Activation` messages of one tensor each to "b" and the clock stops
when "b" says it has received them all. Then the same two processes open a plain TCP connection
and move the same number of bytes (the tensors' raw bytes) the same way: one direction, a
reply at the end. `ws_throughput_ratio_vs_raw_tcp` is the first rate over the second; both are
the median of several repetitions, alternated so that load from other processes hits both alike.
Each side also counts the CPU time it spent per GB, which says where the time goes and stays
meaningful when other processes share the cores (`cpu_bound_ratio_vs_raw_tcp`: the throughput
ratio if both transfers were limited by their busier side's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, ROOT, child_env, free_ports, write_json

MB = 1e6
SETTINGS = {True: {"tensor_mib": 16, "messages": 32, "repeats": 5, "codec_repeats": 3},
            False: {"tensor_mib": 16, "messages": 32, "repeats": 5, "codec_repeats": 7}}


def _tensor(mib: int):
    import torch

    return torch.randn(mib * 2**18 // 1024, 1024)  # float32: mib MiB, like a batch of activations


def _activation(x, batch: int = 0, src: str = "a", dst: str = "b"):
    from p2psl.wire.messages import Activation

    return Activation(src=src, dst=dst, epoch=0, owner=src, round=1, batch=batch, part=1, train=True, x=x)


# -- codec ---------------------------------------------------------------------------------------

def codec_rates(tensor_mib: int, repeats: int) -> dict:
    """MB per CPU-second of encode, decode and MAC (seal + open), the best of `repeats` runs."""
    from p2psl.wire import codec
    from p2psl.net.auth import Opener, Sealer

    x = _tensor(tensor_mib)
    nbytes = x.numel() * x.element_size()
    message = _activation(x)
    times: dict[str, list[float]] = {"encode": [], "decode": [], "mac": []}
    clock = time.process_time
    for _ in range(repeats):
        start = clock()
        frames = codec.encode(message, message_id=1)
        times["encode"].append(clock() - start)
        decoder = codec.Decoder()
        start = clock()
        for frame in frames:
            decoded = decoder.feed(frame)
        times["decode"].append(clock() - start)
        assert decoded is not None and decoded.x.shape == x.shape
        sealer, opener = Sealer(b"k" * 32), Opener(b"k" * 32)
        start = clock()
        for frame in frames:
            opener.open(sealer.seal(frame))
        times["mac"].append(clock() - start)
    # the best of the repetitions: a fresh buffer's first-touch page faults hit some and not others
    rates = {f"codec_{k}_mb_per_s": round(nbytes / min(v) / MB, 1) for k, v in times.items()}
    rates["codec_frames"] = len(frames)
    rates["codec_tensor_bytes"] = nbytes
    return rates


# -- two peers -----------------------------------------------------------------------------------

def topology_text(ports: list[int]) -> str:
    return ("[training]\nmodel = \"mlp\"\n\n[timeouts]\nheartbeat = \"2s\"\ndead = \"60s\"\n"
            + "".join(f'\n[[peer]]\nname = "{name}"\nrole = "{role}"\naddress = "127.0.0.1:{port}"\nmemory = "1GiB"\n'
                      for name, role, port in (("a", "data_owner", ports[0]), ("b", "compute", ports[1]))))


async def _network(name: str, topology_path: Path, handler):
    from p2psl.net.network import Network
    from p2psl.topology import load_topology

    topology = load_topology(topology_path)
    network = Network(topology, name, os.environ["P2PSL_SECRET"].encode(), handler)
    await network.listen()
    network.connect()
    return network


async def receiver(topology_path: Path, raw_port: int) -> None:
    """Peer "b": count the tensor bytes of each batch of messages, say "done" when a batch is in;
    and on a raw TCP server, read the announced number of bytes and answer one byte."""
    from p2psl.wire.messages import Activation

    state = {"expect": None, "got": 0, "count": 0, "cpu": 0.0}
    network = None

    async def on_message(msg) -> None:
        if not isinstance(msg, Activation):
            return
        if msg.batch < 0:  # the announcement: how many messages the next batch has
            state.update(expect=-msg.batch, got=0, count=0, cpu=time.process_time())
            return
        state["count"] += 1
        state["got"] += msg.x.numel() * msg.x.element_size()
        if state["count"] == state["expect"]:
            cpu_us = int((time.process_time() - state["cpu"]) * 1e6)  # carried in `round`: a benchmark's liberty
            reply = _activation(msg.x[:1, :1].clone(), batch=state["got"], src="b", dst="a")
            await network.send(dataclasses.replace(reply, round=cpu_us))

    async def on_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while header := await reader.read(8):
            left, cpu = int.from_bytes(header, "big"), time.process_time()
            while left:
                chunk = await reader.read(min(left, 4 * 2**20))
                if not chunk:
                    return
                left -= len(chunk)
            writer.write(int((time.process_time() - cpu) * 1e6).to_bytes(8, "big"))
            await writer.drain()

    raw = await asyncio.start_server(on_raw, "127.0.0.1", raw_port)
    network = await _network("b", topology_path, on_message)
    print("ready", flush=True)  # listening: now peer "a" can dial
    await network.wait_connected(timeout=60)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    raw.close()
    await network.stop()


async def sender(topology_path: Path, raw_port: int, tensor_mib: int, messages: int, repeats: int) -> dict:
    """Peer "a": time `messages` tensors through the peers' WebSocket and through raw TCP, and
    count the CPU seconds both processes spent on each (robust where other load skews the clock)."""
    x = _tensor(tensor_mib)
    payload = x.numel() * x.element_size() * messages
    raw_bytes = x.numpy().tobytes()
    done: asyncio.Queue = asyncio.Queue()

    async def on_message(msg) -> None:
        done.put_nowait((msg.batch, msg.round / 1e6))

    network = await _network("a", topology_path, on_message)
    await network.wait_connected(timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", raw_port)

    async def through_peers() -> tuple[float, float, float]:
        await network.send(_activation(x[:1, :1].clone(), batch=-messages))
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(messages):
            await network.send(_activation(x, batch=i))
        received, their_cpu = await done.get()
        assert received == payload, (received, payload)
        return time.perf_counter() - start, time.process_time() - cpu, their_cpu

    async def through_tcp() -> tuple[float, float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        writer.write(payload.to_bytes(8, "big"))
        for _ in range(messages):
            writer.write(raw_bytes)
            await writer.drain()
        their_cpu = int.from_bytes(await reader.readexactly(8), "big") / 1e6
        return time.perf_counter() - start, time.process_time() - cpu, their_cpu

    await through_peers()  # warm-up: first use of every code path
    await through_tcp()
    ws, tcp = [], []
    for _ in range(repeats):
        ws.append(await through_peers())
        tcp.append(await through_tcp())
    writer.close()
    await network.stop()
    return _summary(ws, tcp, payload) | {"messages": messages, "tensor_bytes": x.numel() * x.element_size()}


def _summary(ws: list[tuple], tcp: list[tuple], payload: int) -> dict:
    """Rates from the median wall times; CPU milliseconds per GB of payload for each side."""
    gb = payload / 1e9
    out = {"payload_bytes": payload, "ws_seconds": [round(r[0], 3) for r in ws],
           "raw_tcp_seconds": [round(r[0], 3) for r in tcp]}
    for name, rows in (("ws", ws), ("raw_tcp", tcp)):
        out[f"{name}_mb_per_s"] = round(payload / statistics.median(r[0] for r in rows) / MB, 1)
        out[f"{name}_sender_cpu_ms_per_gb"] = round(statistics.median(r[1] for r in rows) / gb * 1e3)
        out[f"{name}_receiver_cpu_ms_per_gb"] = round(statistics.median(r[2] for r in rows) / gb * 1e3)
    out["ws_throughput_ratio_vs_raw_tcp"] = round(out["ws_mb_per_s"] / out["raw_tcp_mb_per_s"], 3)
    # the ratio if both transfers were CPU-bound on two cores, sides in parallel
    busiest = lambda name: max(out[f"{name}_sender_cpu_ms_per_gb"], out[f"{name}_receiver_cpu_ms_per_gb"])
    out["cpu_bound_ratio_vs_raw_tcp"] = round(busiest("raw_tcp") / busiest("ws"), 3)
    return out


def link_rates(out: Path, tensor_mib: int, messages: int, repeats: int) -> dict:
    """Start peer "b" as a child process, run peer "a" here, return the rates."""
    out.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3)
    topology = out / "transport.toml"
    topology.write_text(topology_text(ports[:2]), encoding="utf-8")
    env = child_env(P2PSL_SECRET=os.urandom(16).hex())
    os.environ["P2PSL_SECRET"] = env["P2PSL_SECRET"]
    child = subprocess.Popen([PYTHON, "-m", "tools.bench.transport", "--receiver", str(topology), "--raw-port",
                              str(ports[2])], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=open(out / "receiver.log", "wb"), text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the receiving peer did not start; see {out / 'receiver.log'}")
        return asyncio.run(sender(topology, ports[2], tensor_mib, messages, repeats))
    finally:
        child.stdin.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(quick: bool, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    settings = SETTINGS[quick]
    details = {"settings": settings}
    details.update(codec_rates(settings["tensor_mib"], settings["codec_repeats"]))
    details.update(link_rates(Path(out) / "transport", settings["tensor_mib"], settings["messages"],
                              settings["repeats"]))
    results = {k: details[k] for k in ("codec_encode_mb_per_s", "codec_decode_mb_per_s", "codec_mac_mb_per_s",
                                       "ws_mb_per_s", "raw_tcp_mb_per_s", "ws_throughput_ratio_vs_raw_tcp")}
    results["details"] = details
    write_json(Path(out) / "transport.json", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--receiver", type=Path, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--raw-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        import torch

        torch.set_num_threads(1)
        asyncio.run(receiver(args.receiver, args.raw_port))
        return
    results = run(args.quick, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()

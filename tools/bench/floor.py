"""The floor under `round_time_ratio_vs_fedavg`: the same split with as lean a runtime as we could write.

    .venv/bin/python tools/bench/floor.py [--quick] --out DIR

What splitting costs on this machine whatever runtime carries the batches. The deployment of
tools/bench/fedavg.py (the digits CNN, 4 data owners, 2 compute nodes, batch 32, 2 local epochs,
each peer its own process) trains twice with p2psl's own model parts, optimizer, shards and batch
orders, and nothing of its runtime:

- split: the cuts of fedavg.py's split runs (owners keep layer 1 and layers 3-6, each compute node
  layer 2 for two owners: the plan `chains = "auto"` chooses there), the same tasks in the same
  order as p2psl's owners and compute nodes run them, and between the processes only blocking
  loopback TCP sockets carrying a 24-byte header and the tensor's bytes (no event loop,
  serialization, MAC, session, acknowledgement, routing, trace or thread);
- whole: the same owners each training the whole model alone (`OwnerModel.local_step`, as a
  federated-averaging owner does), with no messages at all.

Neither has a round end (no aggregation, evaluation or checkpoint): these are the training phases
alone, where p2psl's split and federated-averaging rounds differ. The owners start their first
round together, once every process is set up; each process counts its CPU seconds and the wall
clock at each round's end; rounds 2..R are compared.

Keys: `floor_cpu_seconds_ratio` (CPU seconds of all processes per round, split ÷ whole) and
`floor_round_time_ratio` (wall seconds per round, split ÷ whole). With p2psl's runtime in place
of the sockets, the same ratios are `round_time_ratio_vs_fedavg` and `cpu_seconds_ratio_vs_fedavg`
of tools/bench/fedavg.py, round ends included.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, child_env, free_ports, main, write_json

OWNERS = ("alice", "bob", "carol", "dave")
#: compute node → the owners it serves: two chains of one node, as fedavg.py's split runs plan them
NODES = {"c1": ("alice", "carol"), "c2": ("bob", "dave")}
#: the cuts of those runs' plan, as 0-based layers: an owner's first and last part, a node's part
FIRST, MIDDLE, LAST = (0,), (1,), (2, 3, 4, 5)
#: a message's header: kind, memory format (0 row-major, 1 channels-last) and four dimensions
HEADER = struct.Struct("<ii4i")
ACTIVATION, GRADIENT, ROUND_END = 0, 1, 2


def _training():
    """The TrainingConfig of fedavg.py's deployment (the same data, shards, seed and batches)."""
    from p2psl.topology import parse_topology
    from tools.bench.fedavg import topology

    return parse_topology(topology("split", 2, free_ports(6))).training


# -- the wire: as little as can carry a tensor ------------------------------------------------------
def _send(sock: socket.socket, kind: int, tensor) -> None:
    channels_last = tensor.dim() == 4 and not tensor.is_contiguous()
    body = tensor.permute(0, 2, 3, 1) if channels_last else tensor
    shape = tuple(tensor.shape) + (1,) * (4 - tensor.dim())
    sock.sendall(HEADER.pack(kind, int(channels_last), *shape))
    sock.sendall(memoryview(body.contiguous().numpy()).cast("B"))


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return buffer


def _recv(sock: socket.socket):
    import torch

    kind, channels_last, *shape = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    size = 4
    for d in shape:
        size *= d
    flat = torch.frombuffer(_recv_exactly(sock, size), dtype=torch.float32)
    if channels_last:
        n, c, h, w = shape
        return kind, flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return kind, flat.view(shape)


# -- the processes --------------------------------------------------------------------------------
def _setup():
    """The deployment's training settings, model and optimizer settings, in one thread as a peer."""
    import torch

    from p2psl.learning.data import load_dataset
    from p2psl.learning.models.part import OptimConfig
    from p2psl.learning.models.zoo import model_spec

    torch.set_num_threads(1)
    cfg = _training()
    data = load_dataset(cfg)
    return cfg, model_spec(cfg.model, tuple(data.x_train.shape[1:]), cfg.num_classes), OptimConfig.from_training(cfg)


def _settle() -> None:
    """The heap as a peer's is once it trains ([Note: a settled heap])."""
    from p2psl.runtime.heap import Settle

    settle = Settle()
    settle.planned()
    settle()


def _owner_data(cfg, me: str):
    from p2psl.learning.data import owner_data

    data, mine = owner_data(cfg, OWNERS, me)
    return data.x_train[mine.train_idx], data.y_train[mine.train_idx]


def _orders(cfg, n: int, round_: int, me: str):
    import torch

    from p2psl.learning.data import batch_order

    for epoch in range(cfg.local_epochs):
        for index in batch_order(n, cfg.batch_size, cfg.seed, round_, epoch, OWNERS.index(me)):
            yield torch.from_numpy(index)


def _ready(me: str) -> None:
    """Say so, then wait for the parent's go: every owner starts its first round at once."""
    print(json.dumps({"ready": me}), flush=True)
    sys.stdin.readline()


def _report(round_: int) -> None:
    print(json.dumps({"round": round_, "cpu": time.process_time(), "wall": time.monotonic()}), flush=True)


def split_owner(me: str, port: int, rounds: int) -> None:
    """p2psl's DataOwner.train_batch with its tasks in the same order, over a bare socket."""
    import torch

    from p2psl.learning.models.owner import OwnerModel

    cfg, spec, optim = _setup()
    model = OwnerModel(spec, FIRST, LAST, cfg.seed, optim, me)
    x, y = _owner_data(cfg, me)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack("<i", OWNERS.index(me)))
    _settle()
    _ready(me)
    for round_ in range(1, rounds + 1):
        for batch, index in enumerate(_orders(cfg, len(y), round_, me), start=1):
            key = (round_, batch, 0)
            _send(sock, ACTIVATION, model.forward(key, x[index]))
            _, z = _recv(sock)
            _, g = model.loss_backward(key, z, y[index])
            _send(sock, GRADIENT, g)
            model.last.step()
            _, g0 = _recv(sock)
            model.backward(key, g0)
            model.first.step()
        _send(sock, ROUND_END, torch.zeros(1))  # for the node's own count of rounds
        _report(round_)
    sock.close()


def split_node(port: int, owners: int) -> None:
    """p2psl's ComputeNode tasks (forward, backward, optimize) for `owners` owners, over bare sockets."""
    from p2psl.learning.models.part import Part

    cfg, spec, optim = _setup()
    listener = socket.create_server(("127.0.0.1", port))
    print(json.dumps({"listening": port}), flush=True)
    parts, pending, ended, reported = {}, {}, {}, 0
    for _ in range(owners):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parts[sock] = Part(spec.build(list(MIDDLE), cfg.seed), MIDDLE, optim, name="node part")
        pending[sock] = 0
        struct.unpack("<i", _recv_exactly(sock, 4))
    _settle()
    while parts:
        for sock in select.select(list(parts), [], [])[0]:
            try:
                kind, tensor = _recv(sock)
            except (EOFError, ConnectionError):
                del parts[sock]
                continue
            part = parts[sock]
            if kind == ROUND_END:  # a round ends for this node when it ends for all its owners
                ended[sock] = ended.get(sock, 0) + 1
                while len(ended) == owners and reported < min(ended.values()):
                    reported += 1
                    _report(reported)
            elif kind == ACTIVATION:
                pending[sock] += 1
                _send(sock, ACTIVATION, part.forward_train(pending[sock], tensor))
            else:
                _send(sock, GRADIENT, part.backward(pending[sock], tensor))
                part.step()


def whole_owner(me: str, rounds: int) -> None:
    """A federated-averaging owner's batches (`OwnerModel.local_step`), with no round end."""
    from p2psl.learning.models.owner import OwnerModel

    cfg, spec, optim = _setup()
    model = OwnerModel(spec, FIRST + MIDDLE + LAST[:-1], LAST[-1:], cfg.seed, optim, me)
    x, y = _owner_data(cfg, me)
    _settle()
    _ready(me)
    for round_ in range(1, rounds + 1):
        for batch, index in enumerate(_orders(cfg, len(y), round_, me), start=1):
            model.local_step((round_, batch), x[index], y[index])
        _report(round_)


# -- the parent -------------------------------------------------------------------------------------
def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(Path(__file__).resolve()), "child", *args], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def measure(mode: str, rounds: int) -> dict:
    """One training of `mode` ("split" or "whole"): the median wall seconds of rounds 2..R (each
    round ending when its last owner ends it) and the CPU seconds per round of all processes."""
    procs: dict[str, subprocess.Popen] = {}
    if mode == "split":
        ports = dict(zip(NODES, free_ports(len(NODES))))
        for node, served in NODES.items():
            procs[node] = _start("node", str(ports[node]), str(len(served)))
            json.loads(procs[node].stdout.readline())  # it listens
        for node, served in NODES.items():
            procs.update({o: _start("owner", o, str(ports[node]), str(rounds)) for o in served})
    else:
        procs = {o: _start("whole", o, str(rounds)) for o in OWNERS}
    for owner in OWNERS:  # each owner is set up and connected
        json.loads(procs[owner].stdout.readline())
    for owner in OWNERS:
        procs[owner].stdin.write("go\n")
        procs[owner].stdin.flush()
    reports = {}
    for name, proc in procs.items():
        lines, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"floor process {name} ({mode}) exited {proc.returncode}")
        reports[name] = {r["round"]: r for r in map(json.loads, lines.splitlines()) if "round" in r}
    ends = [max(reports[o][r]["wall"] for o in OWNERS) for r in range(1, rounds + 1)]
    cpu = sum(r[rounds]["cpu"] - r[1]["cpu"] for r in reports.values()) / (rounds - 1)
    return {"round_seconds": statistics.median(b - a for a, b in zip(ends, ends[1:])), "cpu_seconds_per_round": cpu}


def run(quick: bool, out: Path) -> dict:
    """Split and whole alternating (one pair in the quick mode, three otherwise)."""
    rounds, repeats = (6, 1) if quick else (10, 3)
    runs = []
    for repeat in range(repeats):
        for mode in ("split", "whole"):
            result = measure(mode, rounds) | {"mode": mode}
            runs.append(result)
            print(f"floor {mode:<5} #{repeat + 1}: round {result['round_seconds']:.3f} s, "
                  f"{result['cpu_seconds_per_round']:.3f} CPU s per round", flush=True)
    results = ratios(runs) | {"details": {"runs": runs}}
    write_json(Path(out) / "floor" / "floor.json", results)
    return results


def ratios(runs: list[dict]) -> dict:
    """The keys of the module docstring from runs of `measure` (medians of each mode's runs)."""
    med = {m: {k: statistics.median(r[k] for r in runs if r["mode"] == m) for k in ("round_seconds", "cpu_seconds_per_round")}
           for m in ("split", "whole")}
    return {"floor_round_time_ratio": med["split"]["round_seconds"] / med["whole"]["round_seconds"],
            "floor_cpu_seconds_ratio": med["split"]["cpu_seconds_per_round"] / med["whole"]["cpu_seconds_per_round"]}


def child(args: list[str]) -> None:
    role = args[0]
    if role == "owner":
        split_owner(args[1], int(args[2]), int(args[3]))
    elif role == "node":
        split_node(int(args[1]), int(args[2]))
    else:
        whole_owner(args[1], int(args[2]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        sys.exit(main(run, __doc__))

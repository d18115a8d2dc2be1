"""A data owner written from docs/protocol.md alone, as a third party would write one.

It imports nothing from p2psl: the wire part is doc_peer.py (§2–§10), the rest is here — start-up
(§16: greetings, a measured profile, the plan taken from the others' `plan` messages and checked
against the profiles and memory limits as §13 "Checking a plan" says, without any planner), the
rounds (§16: batches through the chain, train_done, cut, the owners' all-reduce, evaluation,
eval_report, timings) and the farewell. Models, keys, shapes and data come from Appendix A.

    python -m tests.integration.doc_owner --topology FILE --name NAME --secret-file F --out DIR

It listens on its address (every neighbour whose name sorts first dials it, §3; it dials the
others), plays every round, and writes DIR/rounds.jsonl: per round its own state digest, the
owners it included and the digests the other owners reported. It exits 0 once the farewell is
done, 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import statistics
import sys
import time
import tomllib
from pathlib import Path

import aiohttp
import numpy as np
import torch
from aiohttp import web
from torch import nn

from tests.integration.doc_peer import MAX_WS_MESSAGE, Link, Session, accept, dial, topology_digest

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
OVERHEAD = 402_653_184      # §13 "Checking a plan", step 5
SPARSE = {"micro": 0, "micros": 1}   # §13: fields a sender may leave out at these values


# -- the deployment (§2) ----------------------------------------------------------------------

class Deployment:
    def __init__(self, path: Path, me: str):
        self.text = path.read_text()
        self.data = tomllib.loads(self.text)
        self.digest = topology_digest(self.text)
        self.me = me
        self.peers = self.data["peer"]
        self.names = [p["name"] for p in self.peers]
        self.owners = [p["name"] for p in self.peers if p["role"] == "data_owner"]
        self.nodes = sorted(p["name"] for p in self.peers if p["role"] == "compute")
        self.training = {"batch_size": 16, "local_epochs": 1, "learning_rate": 0.05, "momentum": 0.9,
                         "weight_decay": 0.0, "seed": 0, "test_fraction": 0.2, "eval_batch_size": 256,
                         "partition": "iid", **self.data["training"]}
        assert not self.data.get("link"), "this client knows the fully connected case only (§2)"
        self.others = [n for n in self.names if n != me]

    def address(self, name: str) -> tuple[str, int]:
        host, port = next(p["address"] for p in self.peers if p["name"] == name).rsplit(":", 1)
        return host, int(port)

    def memory(self, name: str) -> int:
        text = next(p["memory"] for p in self.peers if p["name"] == name)
        number = text.rstrip("KMGiB")
        return int(float(number) * UNITS[text[len(number):] or "B"])

    def timeout(self, key: str, default: float) -> float:
        value = self.data.get("timeouts", {}).get(key, default)
        if isinstance(value, str):
            value = float(value[:-2]) / 1000 if value.endswith("ms") else float(value.rstrip("s"))
        return float(value)


# -- the model and the data (Appendix A) ------------------------------------------------------

def cnn_layers(channels: int, height: int, width: int, classes: int) -> list[nn.Module]:
    """Appendix A.1.2, layer by layer."""
    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.Tanh()]
    return [nn.Sequential(*conv(channels, 16)), nn.Sequential(*conv(16, 32), nn.MaxPool2d(2)),
            nn.Sequential(*conv(32, 32)), nn.Sequential(*conv(32, 64), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(64 * (height // 4) * (width // 4), 64), nn.Tanh()),
            nn.Linear(64, classes)]


def initialise(layer: nn.Module, seed: int, index: int) -> nn.Module:
    """Appendix A, "Training at an owner": PyTorch's default initialisation from a per-layer generator."""
    digest = hashlib.sha256(f"p2psl-layer:{seed}:{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    for module in layer.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            fan_in = module.weight[0].numel()
            nn.init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
    return layer


def digits_shard(cfg: dict, owner_index: int, owners: int):
    """Appendix A, "Data": the digits, split, and this owner's shard."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=cfg["test_fraction"], stratify=y,
                                   random_state=int(cfg["seed"]) % 2**32)
    rng = np.random.default_rng([int(cfg["seed"]) % 2**64, 0x5A4D])
    mine_train = np.sort(np.array_split(rng.permutation(len(train)), owners)[owner_index])
    mine_test = np.sort(np.array_split(rng.permutation(len(test)), owners)[owner_index])
    return (torch.from_numpy(x[train][mine_train]), torch.from_numpy(y[train][mine_train]),
            torch.from_numpy(x[test][mine_test]), torch.from_numpy(y[test][mine_test]))


def batch_order(n: int, cfg: dict, round_: int, epoch: int, owner_index: int) -> list[np.ndarray]:
    rng = np.random.default_rng([v % 2**64 for v in (int(cfg["seed"]), round_, epoch, owner_index)])
    order = rng.permutation(n)
    return [order[i:i + cfg["batch_size"]] for i in range(0, n, cfg["batch_size"])]


def measure_profile(layers: list[nn.Module], input_shape, batch: int) -> dict:
    """§13 `profile`: this machine's seconds per batch for each layer, and the sizes."""
    x = torch.zeros((batch, *input_shape))
    out = {"device": "doc-owner", "batch_size": batch, "fwd": [], "bwd": [], "opt": [], "act_bytes": [],
           "param_bytes": []}
    for layer in layers:
        x = x.detach().requires_grad_(True)
        fwd, bwd, opt = [], [], []
        for _ in range(3):
            started = time.perf_counter()
            y = layer(x)
            fwd.append(time.perf_counter() - started)
            started = time.perf_counter()
            y.sum().backward()
            bwd.append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                for p in layer.parameters():
                    p.grad = None
            opt.append(time.perf_counter() - started)
        out["fwd"].append(statistics.median(fwd))
        out["bwd"].append(statistics.median(bwd))
        out["opt"].append(statistics.median(opt))
        out["act_bytes"].append(y.numel() * 4)
        out["param_bytes"].append(sum(t.numel() * t.element_size() for t in layer.state_dict().values()))
        x = y.detach()
    return out


# -- the plan (§13 "Checking a plan") ---------------------------------------------------------

def plan_digest(decisions: dict) -> str:
    return hashlib.sha256(json.dumps(decisions, sort_keys=True).encode()).hexdigest()


def plan_problems(decisions: dict, deployment: Deployment, profiles: dict[str, dict]) -> list[str]:
    """Steps 2–5 (step 1, the digest, is checked where the message arrives)."""
    sizes = profiles[min(deployment.names)]
    L = len(sizes["fwd"])
    beta = deployment.training["batch_size"]
    act = [a if sizes["batch_size"] == beta else round(a * beta / sizes["batch_size"]) for a in sizes["act_bytes"]]
    par = sizes["param_bytes"]
    out = []
    parts = [decisions["owner_first"]] + [c[1:] for c in decisions["chain"]] + [decisions["owner_last"]]
    expected = 1
    for first, last in parts:
        if first != expected or last < first:
            out.append(f"parts {parts} are no partition")
        expected = last + 1
    if decisions["num_layers"] != L or expected != L + 1:
        out.append(f"the plan covers {expected - 1} of {L} layers")
    if decisions["owners"] != deployment.owners:
        out.append(f"owners {decisions['owners']}")
    if sorted(c[0] for c in decisions["chain"]) != deployment.nodes:
        out.append(f"chain {decisions['chain']}")
    cfg = deployment.training
    A, B = decisions["owner_first"][1], decisions["owner_last"][0] - 1
    if cfg.get("first_cut", A) != A or cfg.get("last_cut", B) != B:
        out.append("a fixed cut moved")
    m, wanted = decisions.get("micro_batches", 1), cfg.get("micro_batches", 1)
    if (m != wanted) if isinstance(wanted, int) else not 1 <= m <= beta:
        out.append(f"{m} micro-batches, micro_batches is {wanted}")
    if decisions.get("micro_batches") == 1:
        out.append("micro_batches 1 is left out of the decisions")
    K, r = len(deployment.owners), 1 if len(decisions["chain"]) > 1 else 0
    need = {}
    for node, first, last in decisions["chain"]:
        P = sum(par[j - 1] for j in range(first, last + 1))
        S = sum(act[j - 1] for j in range(first, last + 1)) + act[first - 2]
        need[node] = (2 * K + 1 + r * (K + 1)) * P + K * S + OVERHEAD + (K - 1) * P * (m > 1)
    mine = list(range(1, A + 1)) + list(range(B + 1, L + 1))
    P = sum(par[j - 1] for j in mine)
    owner_need = (4 * K + 2 * (K - 1)) * P // K + sum(act[j - 1] for j in mine) + act[B - 1] + OVERHEAD
    need.update({o: owner_need for o in deployment.owners})
    out += [f"{name} needs {n} bytes, has {deployment.memory(name)}" for name, n in need.items()
            if n > deployment.memory(name)]
    return out


# -- FedAvg and the state digest (§16) --------------------------------------------------------

def fedavg(states: dict[str, dict[str, torch.Tensor]], samples: dict[str, int]) -> dict[str, torch.Tensor]:
    owners = sorted(states)
    total = sum(float(samples[o]) for o in owners)
    shares = [float(samples[o]) / total for o in owners]
    out = {}
    for key in sorted(states[owners[0]]):
        acc = torch.zeros(states[owners[0]][key].shape, dtype=torch.float64)
        for owner, share in zip(owners, shares):
            acc += states[owner][key].to(torch.float64) * share
        like = states[owners[0]][key]
        out[key] = acc.to(like.dtype) if like.is_floating_point() else acc.round().to(like.dtype)
    return out


def chunk_bounds(state: dict[str, torch.Tensor], k: int, j: int) -> dict[str, tuple[int, int]]:
    """§16 "Chunks": chunk j of K is elements ⌊n·j/K⌋ to ⌊n·(j+1)/K⌋ of the state's entries laid
    end to end in key order; per entry it touches, the slice of that entry (flattened)."""
    keys = sorted(state)
    n = sum(state[key].numel() for key in keys)
    low, high, offset, out = n * j // k, n * (j + 1) // k, 0, {}
    for key in keys:
        size = state[key].numel()
        start, stop = max(low, offset), min(high, offset + size)
        if start < stop:
            out[key] = (start - offset, stop - offset)
        offset += size
    return out


def chunk_of(state: dict[str, torch.Tensor], k: int, j: int) -> list[tuple[str, np.ndarray]]:
    return [(f"state/{key}", state[key].reshape(-1)[start:stop].numpy())
            for key, (start, stop) in chunk_bounds(state, k, j).items()]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())   # little-endian on this machine
    return h.hexdigest()


# -- the owner --------------------------------------------------------------------------------

class Owner:
    def __init__(self, deployment: Deployment, secret: bytes, out: Path):
        self.d, self.secret, self.out = deployment, secret, out
        self.me = deployment.me
        self.links: dict[str, Link] = {}
        self.sessions = {n: Session() for n in deployment.others}
        self.inbox: list[dict] = []
        self.arrived = asyncio.Event()
        self.connected = asyncio.Event()
        self.cfg = deployment.training

    # links (§3, §7): those whose names sort first dial us, we dial the others
    async def on_websocket(self, request):
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, compress=False)
        await ws.prepare(request)
        callers = [n for n in self.d.others if n < self.me]
        link = await accept(ws, self.me, callers, self.secret, self.d.digest, self.sessions)
        self.adopt_link(link)
        await link.closed.wait()
        return ws

    def adopt_link(self, link: Link) -> None:
        link.inbox, link.arrived = self.inbox, self.arrived     # one inbox for every link
        self.links[link.peer] = link
        if set(self.links) == set(self.d.others):
            self.connected.set()

    async def send(self, kind: str, dst: str, tensors=(), **fields) -> None:
        await self.links[dst].send(kind, tensors, src=self.me, dst=dst, **fields)

    async def expect(self, kind: str, timeout: float = 120.0, **match) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.inbox:
                    if message["kind"] == kind and all(message.get(k, SPARSE.get(k)) == v for k, v in match.items()):
                        self.inbox.remove(message)
                        return message
                self.arrived.clear()
                await self.arrived.wait()

    async def from_each(self, kind: str, senders, **match) -> dict[str, dict]:
        return {s: await self.expect(kind, src=s, **match) for s in sorted(senders)}

    # start-up (§16)
    async def start(self, session: aiohttp.ClientSession) -> None:
        for name in self.d.others:
            if name > self.me:
                host, port = self.d.address(name)
                self.adopt_link(await dial(session, port, self.me, name, self.secret, self.d.digest,
                                           self.sessions[name]))
        await asyncio.wait_for(self.connected.wait(), self.d.timeout("connect", 60))
        self.x_train, self.y_train, self.x_test, self.y_test = digits_shard(
            self.cfg, self.d.owners.index(self.me), len(self.d.owners))
        self.input_shape = list(self.x_train.shape[1:])
        dataset = {"input_shape": self.input_shape, "num_classes": 10, "train": len(self.y_train),
                   "test": len(self.y_test)}
        for peer in self.d.others:
            await self.send("greeting", peer, role="data_owner", completed_round=0, resume=False, dataset=dataset)
        greetings = await self.from_each("greeting", self.d.others)
        self.samples = {o: g["dataset"]["train"] for o, g in greetings.items() if o in self.d.owners}
        self.samples[self.me] = len(self.y_train)
        assert all(g["dataset"].get("input_shape", self.input_shape) == self.input_shape for g in greetings.values())
        self.layers = [initialise(layer, self.cfg["seed"], i) for i, layer in enumerate(cnn_layers(*self.input_shape, 10))]
        assert self.d.training["model"] == "cnn"
        profile = measure_profile(self.layers, self.input_shape, self.cfg["batch_size"])
        for peer in self.d.others:
            await self.send("profile", peer, profile=profile)
        profiles = {s: m["profile"] for s, m in (await self.from_each("profile", self.d.others)).items()}
        profiles[self.me] = profile
        plans = await self.from_each("plan", self.d.others, epoch=0)
        digests = {m["digest"] for m in plans.values()}
        assert len(digests) == 1, f"the peers disagree on the plan: {plans}"
        decisions = next(iter(plans.values()))["decisions"]
        assert plan_digest(decisions) == digests.pop(), "the decisions do not hash to the digest"
        problems = plan_problems(decisions, self.d, profiles)
        assert not problems, f"the plan does not fit: {problems}"
        (self.out / "plan.json").write_text(json.dumps({"digest": plan_digest(decisions), "decisions": decisions}))
        for peer in self.d.others:
            await self.send("plan", peer, digest=plan_digest(decisions), epoch=0, completed=0, gone=[],
                            decisions=decisions)
        self.build(decisions)

    def build(self, decisions: dict) -> None:
        self.decisions = decisions
        self.chain = [c[0] for c in decisions["chain"]]
        self.micro_batches = decisions.get("micro_batches", 1)
        A, B = decisions["owner_first"][1], decisions["owner_last"][0] - 1
        self.first_idx, self.last_idx = list(range(A)), list(range(B, decisions["num_layers"]))
        self.first = nn.Sequential(*(self.layers[i] for i in self.first_idx))
        self.last = nn.Sequential(*(self.layers[i] for i in self.last_idx))
        sgd = dict(lr=self.cfg["learning_rate"], momentum=self.cfg["momentum"], weight_decay=self.cfg["weight_decay"])
        self.opt_first = torch.optim.SGD(self.first.parameters(), **sgd)
        self.opt_last = torch.optim.SGD(self.last.parameters(), **sgd)

    def state(self) -> dict[str, torch.Tensor]:
        """Parts 0 and N + 1 keyed `<layer>.<name>` (Appendix A)."""
        return {f"{i}.{k}": v.detach().clone() for i in self.first_idx + self.last_idx
                for k, v in self.layers[i].state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for i in self.first_idx + self.last_idx:
            self.layers[i].load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                            if k.split(".", 1)[0] == str(i)})

    # a round (§16)
    async def train_batch(self, round_: int, batch: int, index) -> float:
        """§13 "Micro-batches": the batch in min(m, n) pieces of consecutive samples (the first
        n mod k one larger), each loss times its share, every part stepping once at the end."""
        n = len(index)
        k = min(self.micro_batches, n)
        bounds = [sum(n // k + (1 if i < n % k else 0) for i in range(j)) for j in range(k + 1)]
        pieces = [index[bounds[j]:bounds[j + 1]] for j in range(k)]
        ids = dict(epoch=0, owner=self.me, round=round_, batch=batch)
        self.first.train(), self.last.train()
        self.opt_first.zero_grad(), self.opt_last.zero_grad()
        hs, loss = [], 0.0
        for j, piece in enumerate(pieces):
            micro = {"micro": j, "micros": k} if k > 1 else {}     # at their defaults: left out
            tick = time.perf_counter()                  # §13 timings: the training tasks' own seconds
            hs.append(self.first(self.x_train[piece]))
            self.task_seconds += time.perf_counter() - tick
            await self.send("activation", self.chain[0], [("x", hs[-1].detach().numpy())], **ids, part=1, train=True,
                            **micro)
        for j, piece in enumerate(pieces):
            micro = {"micro": j, "micros": k} if k > 1 else {}
            z = await self.expect("activation", src=self.chain[-1], round=round_, batch=batch, train=True, **micro)
            tick = time.perf_counter()
            z = torch.from_numpy(z["tensors"]["x"].copy()).requires_grad_(True)
            part = nn.functional.cross_entropy(self.last(z), self.y_train[piece])
            share = len(piece) / n if k > 1 else 1.0
            (part if k == 1 else part * share).backward()
            loss += float(part) * share
            self.task_seconds += time.perf_counter() - tick
            await self.send("gradient", self.chain[-1], [("g", z.grad.numpy())], **ids, part=len(self.chain), **micro)
        tick = time.perf_counter()
        self.opt_last.step()
        self.task_seconds += time.perf_counter() - tick
        for j, h in enumerate(hs):
            micro = {"micro": j, "micros": k} if k > 1 else {}
            g = await self.expect("gradient", src=self.chain[0], round=round_, batch=batch, part=0, **micro)
            tick = time.perf_counter()
            h.backward(torch.from_numpy(g["tensors"]["g"].copy()))
            self.task_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        self.opt_first.step()
        self.task_seconds += time.perf_counter() - tick
        return loss

    async def evaluate(self, round_: int) -> tuple[int, float]:
        self.first.eval(), self.last.eval()
        correct, loss_sum, size = 0, 0.0, self.cfg["eval_batch_size"]
        for batch, start in enumerate(range(0, len(self.y_test), size), start=1):
            x, y = self.x_test[start:start + size], self.y_test[start:start + size]
            with torch.no_grad():
                h = self.first(x)
            await self.send("activation", self.chain[0], [("x", h.numpy())], epoch=0, owner=self.me, round=round_,
                            batch=batch, part=1, train=False)
            z = await self.expect("activation", src=self.chain[-1], round=round_, batch=batch, train=False)
            with torch.no_grad():
                logits = self.last(torch.from_numpy(z["tensors"]["x"].copy()))
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        return correct, loss_sum

    async def all_reduce(self, round_: int, members: list[str], mine: dict[str, torch.Tensor]) -> dict:
        """§16 "The owners' all-reduce", the first attempt (nobody dies in this deployment):
        scatter my chunks to their reducers, reduce mine if I am one, send it to every other
        owner, gather."""
        others = [o for o in self.d.owners if o != self.me]
        nbytes = sum(v.numel() * v.element_size() for v in mine.values())
        reducers = members[:max(1, min(len(members), nbytes // 65536))]   # the first R members
        k = len(reducers)
        ids = dict(epoch=0, round=round_, members=members)
        if self.me in members:
            for j, reducer in enumerate(reducers):
                if reducer != self.me:
                    await self.send("reduce_part", reducer, chunk_of(mine, k, j), **ids, samples=self.samples[self.me])
        if self.me in reducers:
            place = reducers.index(self.me)
            parts = await self.from_each("reduce_part", [m for m in members if m != self.me], round=round_)
            contributions = {o: {key.split("/", 1)[1]: torch.from_numpy(v.copy()) for key, v in m["tensors"].items()}
                             for o, m in parts.items()}
            contributions[self.me] = {key.split("/", 1)[1]: torch.from_numpy(v)
                                      for key, v in chunk_of(mine, k, place)}
            reduced = fedavg(contributions, {o: self.samples[o] for o in members})
            for owner in others:
                await self.send("reduced_part", owner, [(f"state/{key}", v.numpy()) for key, v in sorted(reduced.items())],
                                **ids, reducer=self.me)
        chunks = await self.from_each("reduced_part", [m for m in reducers if m != self.me], round=round_)
        flat = {key: torch.zeros(v.numel(), dtype=v.dtype) for key, v in mine.items()}
        for j, reducer in enumerate(reducers):
            if reducer == self.me:
                pieces = {key: v for key, v in reduced.items()}
            else:
                pieces = {key.split("/", 1)[1]: torch.from_numpy(v.copy())
                          for key, v in chunks[reducer]["tensors"].items()}
            for key, (start, stop) in chunk_bounds(mine, k, j).items():
                flat[key][start:stop] = pieces[key]
        return {key: flat[key].reshape(mine[key].shape) for key in mine}

    async def round(self, round_: int) -> dict:
        started, losses, self.task_seconds = time.monotonic(), [], 0.0
        for epoch in range(self.cfg["local_epochs"]):
            for index in batch_order(len(self.y_train), self.cfg, round_, epoch, self.d.owners.index(self.me)):
                losses.append(await self.train_batch(round_, len(losses) + 1, torch.from_numpy(index)))
        mine = self.state()
        others = [o for o in self.d.owners if o != self.me]
        for peer in self.d.others:
            await self.send("train_done", peer, epoch=0, owner=self.me, round=round_, samples=self.samples[self.me],
                            batches=len(losses), loss_sum=sum(losses))
        done = await self.from_each("train_done", others, round=round_)
        heard = sorted([self.me, *done])
        for peer in self.d.others:
            await self.send("cut", peer, epoch=0, round=round_, owners=heard)
        cuts = await self.from_each("cut", self.d.others, round=round_)
        included = sorted(set(heard).intersection(*(set(c["owners"]) for c in cuts.values())))
        average = await self.all_reduce(round_, included, mine)
        self.load(average)
        digest = state_digest(average)
        correct, loss_sum = await self.evaluate(round_)
        for peer in self.d.others:
            await self.send("eval_report", peer, epoch=0, owner=self.me, round=round_, correct=correct,
                            total=len(self.y_test), loss_sum=loss_sum, train_loss=sum(losses) / len(losses),
                            samples=self.samples[self.me], seconds=time.monotonic() - started,
                            included=included, digest=digest)
        reports = await self.from_each("eval_report", others, round=round_)
        for peer in self.d.others:                      # §16 "A round", step 9
            await self.send("timings", peer, epoch=0, round=round_, batches=len(losses), seconds=self.task_seconds)
        await self.from_each("timings", self.d.others, round=round_)
        return {"round": round_, "digest": digest, "included": included, "accuracy": correct / len(self.y_test),
                "reported": {o: [r["digest"], r["included"]] for o, r in reports.items()}}

    async def finish(self) -> None:
        rounds = self.cfg["rounds"]
        for peer in self.d.others:
            await self.send("done", peer, round=rounds)
        await self.from_each("done", self.d.others)
        for peer in self.d.others:                     # the farewell (§11)
            await self.links[peer].send("bye", reason="finished")
        try:  # each neighbour closes once every one of its neighbours has said bye
            async with asyncio.timeout(self.d.timeout("dead", 6) + 1):
                for link in self.links.values():
                    await link.closed.wait()
        except TimeoutError:
            pass


async def run(deployment: Deployment, secret: bytes, out: Path) -> int:
    owner = Owner(deployment, secret, out)
    app = web.Application()
    app.router.add_get("/p2psl", owner.on_websocket)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    host, port = deployment.address(deployment.me)
    await web.TCPSite(runner, host, port).start()
    ok = True
    try:
        async with aiohttp.ClientSession() as session:
            await owner.start(session)
            with (out / "rounds.jsonl").open("w") as file:
                for round_ in range(1, deployment.training["rounds"] + 1):
                    record = await owner.round(round_)
                    file.write(json.dumps(record) + "\n")
                    file.flush()
                    ok &= all(v == [record["digest"], record["included"]] for v in record["reported"].values())
            await owner.finish()
            for link in owner.links.values():
                await link.close()
    finally:
        await runner.cleanup()
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    code = asyncio.run(run(Deployment(args.topology, args.name), args.secret_file.read_text().strip().encode(),
                           args.out))
    leaked = sorted(m for m in sys.modules if m == "p2psl" or m.startswith("p2psl."))
    (args.out / "modules.json").write_text(json.dumps(leaked))
    return code if not leaked else 3


if __name__ == "__main__":
    sys.exit(main())

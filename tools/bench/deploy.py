"""Run one benchmark deployment as real peer processes and watch every peer's memory.

A `Deployment` becomes a topology file (synthetic 3×32×32 data, one round of a few batches per
owner, the authors' owner layers, objective "memory", the authors' profile table so that no peer
times the model) and every peer runs as its own `p2psl peer` process, exactly as a user would
start it. A thread polls every peer's public /status JSON (state, RSS, VmHWM) while it runs.

[Note: training peak] The paper's memory figure and the planner's prediction describe training:
K copies of a segment's weights, gradients and momentum plus the activations stashed for
backward. So a deployment is measured over its *training window*, which closes when the first
data owner leaves training (its state turns "aggregating"); every owner runs several batches, so
every copy has its momentum well before then. A peer's training peak is its VmHWM at its last
poll before the window closed (VmHWM only rises, so that poll bounds everything before it).
By default the peers are stopped right there: the end of a round (FedAvg, the round checkpoint,
the replica for the next node, and the owners' all-reduce of their parts) is not what the
figure is about, and it needs more than training (the replica's snapshot above all; see
`complete=True`, which lets the round finish and reads each peer's own peak at exit instead).

[Note: idle from status] A peer measures its idle RSS once it is listening and warmed up,
before any model exists, and restarts VmHWM there ([Note: idle baseline] in p2psl.runtime.peer); its
/status carries that figure (`idle_rss_bytes`, null until then) and so does its exit record. A
stopped run never exits, so the poller takes it from the peer's first poll that has it while
the peer still waits for its neighbours (its RSS at an earlier poll would miss the warm-up).
To make sure that poll happens, one data owner (the gate) starts only after every other peer
was seen waiting; the gate's own memory is not used. Runs that complete check this reading
against the peer's exit record.
"""

from __future__ import annotations

import sys

import json
import os
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES, peak_memory
if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, REFERENCE_PROFILES, ROOT, child_env, free_ports

#: the authors' owner layers: VGG-19 owners keep 1–3 and 23–25, ResNet-101 owners 1–2 and 37
OWNER_CUTS = {"vgg19": (3, 22), "resnet101": (2, 36)}
PROFILE_FILES = {"vgg19": "vgg19_cifar10_bs128.csv", "resnet101": "resnet101_cifar10_bs128.csv"}
#: peer states before training ends (p2psl.runtime.peer and p2psl.runtime.roles.owner set them)
BEFORE_TRAINING_ENDS = {"starting", "connecting", "greeting", "planning", "building", "training"}
WAITING = {"starting", "connecting"}
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Deployment:
    model: str            # "vgg19" or "resnet101"
    owners: int           # K
    hops: int             # N compute nodes in the chain
    batch: int = 16
    batches: int = 3      # training batches per owner

    @property
    def label(self) -> str:
        return f"{self.model}-K{self.owners}-N{self.hops}"

    @property
    def names(self) -> list[str]:
        return [f"owner{k + 1:02d}" for k in range(self.owners)] + [f"c{i + 1}" for i in range(self.hops)]

    def topology(self, ports: list[int]) -> str:
        first_cut, last_cut = OWNER_CUTS[self.model]
        train = self.owners * self.batches * self.batch
        lines = ["[training]", f'model = "{self.model}"', 'dataset = "synthetic"', "synthetic_shape = [3, 32, 32]",
                 f"synthetic_samples = {train * 5 // 4}", "test_fraction = 0.2", "num_classes = 10", "rounds = 1",
                 f"batch_size = {self.batch}", f"eval_batch_size = {self.batch}", "learning_rate = 0.01",
                 "momentum = 0.9", f"first_cut = {first_cut}", f"last_cut = {last_cut}", 'objective = "memory"']
        lines.append(f'profile = "{REFERENCE_PROFILES / PROFILE_FILES[self.model]}"')
        # generous deadlines: shared cores and GiB-sized round ends must not look like failures
        lines += ["", "[timeouts]", 'heartbeat = "2s"', 'dead = "60s"', 'gone = "30s"', 'request = "600s"']
        for name, port in zip(self.names, ports):
            role = "data_owner" if name.startswith("owner") else "compute"
            lines += ["", "[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                      'memory = "256GiB"', 'device = "VM"']
        return "\n".join(lines) + "\n"


# -- watching ------------------------------------------------------------------------------------

@dataclass
class Poll:
    t: float
    state: str
    rss: int
    peak: int
    idle: int | None  # the peer's idle baseline, once measured


@dataclass
class Watch:
    """Every peer's polls in order, and when the training window closed."""

    polls: dict[str, list[Poll]] = field(default_factory=dict)
    training_end: float | None = None

    def idle(self, name: str) -> int | None:
        """The idle baseline a waiting peer reported ([Note: idle from status])."""
        return next((p.idle for p in self.polls.get(name, []) if p.state in WAITING and p.idle), None)

    def training_peak(self, name: str) -> int | None:
        """VmHWM at the last poll before the training window closed ([Note: training peak])."""
        end = self.training_end if self.training_end is not None else float("inf")
        seen = [p.peak for p in self.polls.get(name, []) if p.t < end and p.idle]  # VmHWM restarted
        return max(seen) if seen else None


class Poller(threading.Thread):
    """Polls every peer's /status, owners first in each sweep, until stopped."""

    def __init__(self, addresses: dict[str, str], owners: list[str]):
        super().__init__(daemon=True)
        self.addresses, self.owners = addresses, owners
        self.watch = Watch({name: [] for name in addresses})
        self.changed = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        order = self.owners + [n for n in self.addresses if n not in self.owners]
        while not self._halt.is_set():
            for name in order:
                self._poll(name)
            with self.changed:
                self.changed.notify_all()
            self._halt.wait(POLL_SECONDS)

    def _poll(self, name: str) -> None:
        status = _status(self.addresses[name])
        if status is None or "peak_rss_bytes" not in status:
            return
        now, state = time.monotonic(), str(status.get("state"))
        idle = status.get("idle_rss_bytes")
        self.watch.polls[name].append(Poll(now, state, int(status["rss_bytes"]), int(status["peak_rss_bytes"]),
                                           int(idle) if idle else None))
        if name in self.owners and state not in BEFORE_TRAINING_ENDS and self.watch.training_end is None:
            self.watch.training_end = now

    def wait_for(self, condition, timeout: float, alive) -> bool:
        """Wait until `condition(watch)` holds (True) or `alive()` turns False or time runs out."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not condition(self.watch):
                if not alive() or time.monotonic() > deadline:
                    return False
                self.changed.wait(1.0)
        return True

    def stop(self) -> Watch:
        self._halt.set()
        self.join()
        return self.watch


def _status(address: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=2.0) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


# -- running -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One deployment: the plan, what was polled, and (complete runs) each peer's exit record."""

    deployment: Deployment
    plan: dict
    watch: Watch
    seconds: float
    records: dict[str, dict] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        return list(self.plan["chain"])

    def training(self, name: str) -> int | None:
        """Training peak above the idle RSS ([Note: training peak])."""
        peak, idle = self.watch.training_peak(name), self.watch.idle(name)
        return None if peak is None or idle is None else peak - idle

    def run_peak(self, name: str) -> int | None:
        """The peer's own VmHWM at exit above its own idle baseline (complete runs only)."""
        record = self.records.get(name)
        return None if record is None else record["peak_rss_bytes"] - record["idle_rss_bytes"]

    def predicted(self, name: str) -> int:
        """The cost model's memory for `name` over the training part of a round (what is measured,
        [Note: training peak]) less its fixed per-process overhead, which the idle baseline stands
        for."""
        return self._training_memory[name] - RUNTIME_OVERHEAD_BYTES

    @cached_property
    def _training_memory(self) -> dict[str, int]:
        from p2psl.planning.plan import Plan
        from p2psl.planning.profile import peer_profiles
        from p2psl.topology import parse_topology

        topology = parse_topology(self.deployment.topology(list(range(7000, 7000 + len(self.deployment.names)))))
        return peak_memory(Plan.from_json(self.plan), topology, peer_profiles(topology), round_end=False)


class Processes:
    """The peer processes of one deployment; each in its own session so it can be stopped whole."""

    def __init__(self, topology: Path, folder: Path):
        self.topology, self.folder = topology, folder
        self.env = child_env(P2PSL_SECRET=secrets.token_urlsafe(32))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        out = self.folder / "peers" / name
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "stderr.log", "wb") as log:
            cmd = [PYTHON, "-m", "p2psl", "peer", "--topology", str(self.topology), "--name", name,
                   "--out", str(out), "--log-level", "info"]
            self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def failed(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() not in (None, 0):
                return name
        return None

    def running(self) -> bool:
        return self.failed() is None and any(p.poll() is None for p in self.procs.values())

    def stop(self) -> None:
        """SIGTERM every peer still running (its whole process group), then SIGKILL stragglers."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self, name: str, lines: int = 8) -> str:
        text = (self.folder / "peers" / name / "stderr.log").read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def run_deployment(dep: Deployment, out: Path, complete: bool = False, timeout: float = 900.0) -> Outcome:
    """Run `dep` in `out`: stopped when training ends, or to the end of its round if `complete`."""
    out.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(dep.names))
    topology = out / "topology.toml"
    topology.write_text(f"# benchmark deployment {dep.label}\n" + dep.topology(ports), encoding="utf-8")
    gate, first = dep.names[dep.owners - 1], [n for n in dep.names if n != dep.names[dep.owners - 1]]
    procs = Processes(topology, out)
    poller = Poller({n: f"127.0.0.1:{p}" for n, p in zip(dep.names, ports)}, dep.names[:dep.owners])
    started = time.monotonic()
    poller.start()
    try:
        for name in first:
            procs.start(name)
        all_waiting = lambda w: all(w.idle(n) is not None for n in first)
        if poller.wait_for(all_waiting, timeout, procs.running):
            procs.start(gate)
            if complete:
                poller.wait_for(lambda w: False, timeout, lambda: any(p.poll() is None for p in procs.procs.values()))
            else:
                poller.wait_for(lambda w: w.training_end is not None, timeout, procs.running)
        failed = procs.failed()
        if failed is not None:
            raise RuntimeError(f"{dep.label}: peer {failed} exited with status {procs.procs[failed].returncode}:\n"
                               + procs.tail(failed))
        if not complete and poller.watch.training_end is None:
            raise RuntimeError(f"{dep.label}: training did not end within {timeout:.0f} s (see {out / 'peers'})")
    finally:
        watch = poller.stop()
        procs.stop()
    plan = json.loads((out / "peers" / dep.names[-1] / "plan.json").read_text(encoding="utf-8"))
    records = {}
    if complete:
        for name in dep.names:
            for line in (out / "peers" / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record.get("event") == "peer":
                    records[name] = record
    return Outcome(dep, plan, watch, time.monotonic() - started, records)

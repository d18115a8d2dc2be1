"""`p2psl run`: every peer of a topology as its own process on this machine, or with
`--in-process` all of them in one process (p2psl.cli.together).

The launcher is not a master: it starts the same `p2psl peer` processes a user would start by
hand, reads their public /status JSON to show progress, and merges their outputs once they exit.
The peers would train exactly the same without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

from p2psl.net.auth import SECRET_ENV, load_secret, new_secret
from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES
from p2psl.planning.plan import Plan
from p2psl.errors import ConfigError
from p2psl.runtime.metrics import read_metrics
from p2psl.cli.parent import PARENT_ENV
from p2psl.cli.progress import ProgressView
from p2psl.topology import Topology
from p2psl.runtime.trace import merge_traces, write_json_atomic
from p2psl.units import format_bytes, plural

POLL_SECONDS = 0.5


class Launcher:
    def __init__(self, topology: Topology, out: Path, secret_file: str | None = None, *, baseline: bool = True,
                 dashboard: bool = True, dashboard_port: int = 0, in_process: bool = False, resume: bool = False,
                 echo=print):
        self.topology, self.out = topology, Path(out)
        self.secret_file, self.baseline = secret_file, baseline
        self.dashboard, self.dashboard_port = dashboard, dashboard_port
        self.echo, self.in_process, self.resume = echo, in_process, resume
        self.procs: dict[str, subprocess.Popen] = {}
        self.statuses: dict[str, dict] = {}

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, watch, merge, summarise. Returns the exit status for the command."""
        self.check_ports()  # again: a port may have been taken since
        self.out.mkdir(parents=True, exist_ok=True)
        env = self._env()
        started = time.time()
        self.echo(f"p2psl run: {plural(len(self.topology.owners), 'data owner')}, "
                  f"{plural(len(self.topology.compute_nodes), 'compute node')}, model {self.topology.training.model}, "
                  f"{plural(self.topology.training.rounds, 'round')}{_mode(self.topology.training)} → {self.out}"
                  + (" (resuming from the peers' last common checkpoint there)" if self.resume else ""))
        if self.in_process:
            self._start_together(env)
        else:
            for spec in self.topology.peers:
                self._start(spec.name, env)
        try:
            asyncio.run(self._watch())
        except BaseException:  # Ctrl-C, a closed pipe, a bug here: never leave peers behind
            self._stop_all()
            raise
        codes = {name: proc.wait() for name, proc in self.procs.items()}
        if self.in_process:
            from p2psl.cli.together import exit_codes

            codes.update(exit_codes(self.out / "peers", list(codes)))
        self._merge()
        code = self._summary(codes, time.time() - started)
        from p2psl.cli.report import write_curves

        curves = write_curves(self.out)
        if curves is not None:
            self.echo(f"accuracy and loss per round: {curves}")
        return code

    def _env(self) -> dict:
        env = dict(os.environ)
        if self.secret_file is not None:
            env[SECRET_ENV] = load_secret(self.secret_file).decode()
        elif not env.get(SECRET_ENV):
            env[SECRET_ENV] = new_secret()  # local peers only: a fresh secret for this run
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[PARENT_ENV] = str(os.getpid())  # the peers end when this process ends (p2psl.cli.parent)
        return env

    def check_ports(self) -> None:
        """Every peer's port and the dashboard's free here, or `ConfigError` naming the first taken."""
        busy = [f"{spec.name} at {spec.address}: {why}" for spec in self.topology.peers
                if (why := _unbindable(spec.host, spec.port))]
        if busy:
            raise ConfigError("cannot start every peer here: " + "; ".join(busy))
        if not (self.dashboard and self.dashboard_port):
            return
        mine = [spec.name for spec in self.topology.peers if spec.port == self.dashboard_port]
        why = f"it is {mine[0]}'s" if mine else _unbindable("127.0.0.1", self.dashboard_port)
        if why:
            raise ConfigError(f"cannot serve the dashboard on port {self.dashboard_port}: {why} "
                              "(--dashboard-port 0 takes any free port)")

    def _peer_dir(self, name: str) -> Path:
        return self.out / "peers" / name

    def _start(self, name: str, env: dict) -> None:
        folder = self._peer_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in self._stale():
            (folder / stale).unlink(missing_ok=True)
        log = open(folder / "stderr.log", "wb")
        cmd = [sys.executable, "-m", "p2psl", "peer", "--topology", str(Path(self.topology.source).resolve()),
               "--name", name, "--out", str(folder), "--log-level", "info", *self._resuming()]
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _start_together(self, env: dict) -> None:
        """One process for every peer; each name maps to it, so watching works as for many."""
        from p2psl.cli.together import EXIT_FILE

        folder = self.out / "peers"
        for spec in self.topology.peers:
            for stale in (*self._stale(), EXIT_FILE):
                (self._peer_dir(spec.name) / stale).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "process-stderr.log", "wb")
        cmd = [sys.executable, "-m", "p2psl", "together", "--topology", str(Path(self.topology.source).resolve()),
               "--out", str(folder), "--log-level", "info", *self._resuming()]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.procs = {spec.name: proc for spec in self.topology.peers}

    def _stale(self) -> tuple[str, ...]:
        """A peer's outputs of an earlier run in its folder: gone before it starts, but for the
        rounds a resumed run goes on from (its checkpoints are its own business)."""
        return ("trace.json", "plan.json") if self.resume else ("metrics.jsonl", "trace.json", "plan.json")

    def _resuming(self) -> list[str]:
        return ["--resume"] if self.resume else []

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- watching --------------------------------------------------------------------------------
    async def _watch(self) -> None:
        view = ProgressView(self.topology, self.echo)
        server = None
        if self.dashboard:
            from p2psl.cli.dashboard import Dashboard

            server = Dashboard(self.topology, lambda: self.statuses, self.dashboard_port)
            try:
                await server.start()
                self.echo(f"dashboard: {server.url}")
            except OSError as exc:  # the peers already run: training goes on without the page
                await server.stop()
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                self.echo(f"dashboard: cannot listen on {server.host}:{server.port} ({why}); "
                          "training goes on without it")
                server = None
        failed_at = None
        rounds = RoundRecords([self._peer_dir(p.name) / "metrics.jsonl" for p in self.topology.peers])
        lives = [view.live] + ([server.live] if server is not None else [])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            try:
                while any(p.poll() is None for p in self.procs.values()):
                    await self._poll(session)
                    _add_rounds(rounds, lives)
                    view.update(self.statuses, {n: self._exit_code(n) for n in self.procs})
                    if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs.values()):
                        failed_at = time.time()
                    if failed_at is not None and time.time() - failed_at > self.topology.timeouts.dead + 10:
                        self._stop_all()  # a peer failed and the others did not stop by themselves
                    await asyncio.sleep(POLL_SECONDS)
                await self._poll(session)  # every peer has exited: each one's state from its exit status
                _add_rounds(rounds, lives)
                view.update(self.statuses, {n: self._exit_code(n) for n in self.procs}, final=True)
                if server is not None:
                    await server.last_look()
            finally:
                if server is not None:
                    await server.stop()

    async def _poll(self, session: aiohttp.ClientSession) -> None:
        async def one(name: str) -> None:
            spec = self.topology.peer(name)
            try:
                async with session.get(f"http://{spec.host}:{spec.port}/status") as response:
                    self.statuses[name] = await response.json()
            except (TimeoutError, aiohttp.ClientError, ValueError):
                code = self._exit_code(name)
                if code is not None and name in self.statuses:  # its last numbers stay, as they were
                    self.statuses[name].update(state="finished" if code == 0 else "failed", exit_code=code)
        await asyncio.gather(*(one(n) for n in self.procs))

    def _exit_code(self, name: str) -> int | None:
        """The peer's exit status once it has one (in one process: what `together` wrote for it)."""
        code = self.procs[name].poll()
        if code is None or not self.in_process:
            return code
        from p2psl.cli.together import exit_codes

        return exit_codes(self.out / "peers", [name]).get(name, code)

    # -- results ---------------------------------------------------------------------------------
    def _merge(self) -> None:
        """metrics.jsonl (round records once, peer records of all), plan.json and trace.json."""
        records, rounds = {}, {}
        for spec in self.topology.peers:
            for record in read_metrics(self._peer_dir(spec.name) / "metrics.jsonl"):
                if record.get("event") == "round":
                    rounds[record["round"]] = record  # a round trained again after a resume: its last record
                elif record.get("event") == "peer":
                    records[record.get("name")] = record  # a resumed peer's last run is the one that ended
        with open(self.out / "metrics.jsonl", "w", encoding="utf-8") as f:
            for number in sorted(rounds):
                f.write(json.dumps(rounds[number]) + "\n")
            for record in records.values():
                f.write(json.dumps(record) + "\n")
        for spec in self.topology.peers:
            plan = self._peer_dir(spec.name) / "plan.json"
            if plan.exists():
                shutil.copyfile(plan, self.out / "plan.json")
                break
        traces = {s.name: self._peer_dir(s.name) / "trace.json" for s in self.topology.peers
                  if (self._peer_dir(s.name) / "trace.json").exists()}
        if traces:
            merge_traces(traces, self.out / "trace.json")

    def _summary(self, codes: dict[str, int], seconds: float) -> int:
        from p2psl.cli.summary import summarise

        report, ok = summarise(self.topology, self.out, codes, seconds, self.baseline, self.in_process)
        self.echo(report["text"])
        write_json_atomic(self.out / "summary.json", {k: v for k, v in report.items() if k != "text"})
        log = "peer.log" if self.in_process else "stderr.log"
        for name, code in codes.items():
            if code != 0:
                self.echo(f"{name} exited with status {code}; last lines of {self._peer_dir(name) / log}:")
                self.echo(_tail(self._peer_dir(name) / log))
        return 0 if ok else 1


def _add_rounds(rounds: "RoundRecords", lives: list) -> None:
    """The rounds the peers recorded since the last look, into every view of the run."""
    for record in rounds.read():
        for live in lives:
            live.add_round(record)


class RoundRecords:
    """The round records the peers append to their metrics.jsonl, read as they come: every round
    reaches the progress view and the dashboard, however much shorter than the time between two
    looks at the peers' /status."""

    def __init__(self, paths: list[Path]):
        self._read = {path: 0 for path in paths}  # bytes of each file read so far

    def read(self) -> list[dict]:
        """The records of whole lines written since the last call."""
        found = []
        for path, done in self._read.items():
            try:
                with open(path, "rb") as f:
                    f.seek(done)
                    data = f.read()
            except OSError:
                continue  # not written yet
            whole = data[:data.rfind(b"\n") + 1]  # a line being written is read next time
            self._read[path] = done + len(whole)
            for line in whole.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("event") == "round" and isinstance(record.get("round"), int):
                    found.append(record)
        return found


def machine_memory_warnings(topology: Topology, plan: Plan) -> list[str]:
    """A process per peer: a warning where their predicted peaks add up to more than this machine
    has free (the bundled hundred_owners.toml: about 40 GiB). Each peer on the CPU counts its
    plan's peak, one whose parts live on an accelerator (or left out of the plan) an idle
    process's; a warning, not a refusal: each process counts the pages of the libraries they
    share, so the sum is an upper bound."""
    need = sum(plan.peak_memory_bytes.get(p.name, RUNTIME_OVERHEAD_BYTES) if p.accelerator == "cpu"
               else RUNTIME_OVERHEAD_BYTES for p in topology.peers)
    free = psutil.virtual_memory().available
    if need <= free:
        return []
    return [f"{plural(len(topology.peers), 'peer')}, a process each, may need up to {format_bytes(need)} (the "
            f"plan's peaks); this machine has {format_bytes(free)} free: --in-process runs them in one process"]


def _unbindable(host: str, port: int) -> str | None:
    """Why this machine cannot listen on `host:port` now, or None."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in text[-lines:])


def _mode(training) -> str:
    """How the run trains, where it is not the plain split."""
    if training.mode == "fedavg":
        return ", federated averaging (every owner trains the whole model)"
    if training.micro_batches == 0:
        return ", micro-batches as the planner chooses"
    return f", {training.micro_batches} micro-batches per batch" if training.micro_batches > 1 else ""

"""A fault drill: an unlucky day against a small deployment, one line per case.

    python tools/drill.py [--only NAME ...] [--rounds 4] [--out DIR]

Each case starts a fresh deployment (three data owners, two compute nodes, the digits CNN, a few
rounds, short timeouts) as real `p2psl peer` processes, does something unkind to it — kills a
peer at start-up, at a round's end or as it aggregates, freezes one (SIGSTOP) and lets it go
on (SIGCONT), kills and restarts one, kills every peer and resumes them, starts one with another
secret or topology file — and then says what became of it:

    survived             every peer that was not harmed on purpose finished, every round has a
                         record; the accuracy beside that of the clean run
    stopped cleanly      every peer stopped, each with one line saying why (the line is shown)
    HUNG                 a peer was still running at the deadline (it is killed)
    TRACEBACK            a peer printed a traceback
    NOISE                a peer's log shows an unclosed session or an unhandled asyncio error
    FAILED               anything else (exit codes shown)

The harmed peer's own last line follows the outcome, e.g. "c2: TrainingError: c2 was frozen ...".
Deliberate faults (P2PSL_FAULTS, p2psl.runtime.faults) place kills at an exact point of training;
signals sent from here are used where a fault needs another process (a freeze that ends, a
restart). Uses the machine's CPUs heavily for a few minutes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2psl.runtime.metrics import read_metrics  # noqa: E402
from tools.bench.common import free_ports  # noqa: E402

OWNERS, COMPUTE = ["alice", "bob", "carol"], ["c1", "c2"]
SECRET = "drill-secret"
TIMEOUTS = {"connect": "20s", "heartbeat": "0.5s", "dead": "4s", "gone": "2s", "request": "60s", "start": "60s"}
HANG_SECONDS = 180
#: what a log must not show even when everything went well (asyncio's and aiohttp's complaints)
NOISE = ("Unclosed", "Error handling request", "never retrieved", "Exception in callback")


# -- one deployment --------------------------------------------------------------------------------

class Deployment:
    def __init__(self, folder: Path, rounds: int):
        self.folder, self.rounds = folder, rounds
        self.out = folder / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.ports = free_ports(len(OWNERS) + len(COMPUTE))
        self.topology = self.write("topology.toml", self.toml())
        self.procs: dict[str, subprocess.Popen] = {}
        self.lives: dict[str, int] = {}

    def toml(self, rounds: int | None = None) -> str:
        lines = ["[training]", f"rounds = {rounds or self.rounds}", "batch_size = 32", "[timeouts]"]
        lines += [f'{k} = "{v}"' for k, v in TIMEOUTS.items()]
        for name, port in zip(OWNERS + COMPUTE, self.ports):
            role = "data_owner" if name in OWNERS else "compute"
            lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                      'memory = "4GiB"']
        return "\n".join(lines) + "\n"

    def write(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def start(self, name: str, *extra: str, faults: str = "", secret: str = SECRET, topology: Path | None = None):
        """`p2psl peer NAME`; each life logs to its own file (out/NAME.log, then NAME.2.log …)."""
        life = self.lives.get(name, 0) + 1
        self.lives[name] = life
        env = {**os.environ, "P2PSL_SECRET": secret, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if faults:
            env["P2PSL_FAULTS"] = faults
        log = open(self.log_path(name, life), "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "p2psl", "peer", "--topology", str(topology or self.topology), "--name", name,
             "--out", str(self.out / name), *extra], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env)
        log.close()

    def start_all(self, faults: dict[str, str] | None = None, **per_peer) -> None:
        for name in COMPUTE + OWNERS:
            self.start(name, faults=(faults or {}).get(name, ""), **per_peer.get(name, {}))

    def log_path(self, name: str, life: int | None = None) -> Path:
        life = life or self.lives.get(name, 1)
        return self.out / (f"{name}.log" if life == 1 else f"{name}.{life}.log")

    def rounds_of(self, name: str) -> list[int]:
        return [r["round"] for r in read_metrics(self.out / name / "metrics.jsonl") if r.get("event") == "round"]

    def accuracy(self, name: str) -> float | None:
        records = [r for r in read_metrics(self.out / name / "metrics.jsonl") if r.get("event") == "round"]
        return records[-1]["test_accuracy"] if records else None

    def wait_round(self, name: str, round_: int, timeout: float = HANG_SECONDS) -> bool:
        """Poll `name`'s metrics file (another process: no event to await) until `round_` is recorded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if round_ in self.rounds_of(name):
                return True
            if self.procs[name].poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def wait_started(self, name: str, timeout: float = 60) -> None:
        """Until `name` has written its log's first line (it runs, and listens soon after)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "listening" not in self.log_path(name).read_text(errors="replace"):
            time.sleep(0.05)

    def wait(self, deadline: float) -> dict[str, int | None]:
        """Exit codes; None for a process still running at `deadline` (then killed)."""
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        self.kill_all()
        return codes

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def last_line(self, name: str) -> str:
        lines = self.log_path(name).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(nothing)"

    def tracebacks(self) -> list[str]:
        return self.logs_with("Traceback")

    def logs_with(self, *texts: str) -> list[str]:
        return sorted(p.name for p in self.out.glob("*.log")
                      if any(t in p.read_text(errors="replace") for t in texts))


# -- the cases --------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    what: str
    act: Callable[[Deployment], None]
    harmed: set[str] = field(default_factory=set)   # peers hurt on purpose: not expected to finish


def kill(d: Deployment, name: str) -> None:
    d.procs[name].send_signal(signal.SIGKILL)
    d.procs[name].wait()


def at_start_up(name: str) -> Callable[[Deployment], None]:
    def act(d: Deployment) -> None:
        d.start_all()
        d.wait_started(name)
        kill(d, name)
    return act


def with_faults(faults: dict[str, str]) -> Callable[[Deployment], None]:
    return lambda d: d.start_all(faults)


def freeze(name: str, seconds: float) -> Callable[[Deployment], None]:
    def act(d: Deployment) -> None:
        d.start_all()
        if d.wait_round("alice" if name != "alice" else "bob", 1):
            d.procs[name].send_signal(signal.SIGSTOP)
            time.sleep(seconds)  # the freeze itself
            d.procs[name].send_signal(signal.SIGCONT)
    return act


def restart(name: str) -> Callable[[Deployment], None]:
    def act(d: Deployment) -> None:
        d.start_all()
        if d.wait_round("alice" if name != "alice" else "bob", 1):
            kill(d, name)
            d.start(name)
    return act


def kill_both_compute(d: Deployment) -> None:
    d.start_all()
    if d.wait_round("alice", 1):
        for name in COMPUTE:
            kill(d, name)


def kill_every_owner(d: Deployment) -> None:
    d.start_all()
    if d.wait_round("c1", 1):
        for name in OWNERS:
            kill(d, name)


def kill_all_and_resume(d: Deployment) -> None:
    d.start_all({"alice": "crash:round=2:at=end"})  # everyone else is killed at that moment too
    d.procs["alice"].wait()
    for name in COMPUTE + OWNERS:
        if d.procs[name].poll() is None:
            kill(d, name)
    for name in COMPUTE + OWNERS:
        d.start(name, "--resume")


def other_secret(d: Deployment) -> None:
    d.start_all(c2={"secret": "not the drill secret"})


def other_topology(d: Deployment) -> None:
    d.start_all(c1={"topology": d.write("other.toml", d.toml(rounds=d.rounds + 1))})


CASES = [
    Case("clean", "no fault", with_faults({})),
    Case("owner-at-start", "alice SIGKILLed at start-up", at_start_up("alice"), {"alice"}),
    Case("compute-at-start", "c1 SIGKILLed at start-up", at_start_up("c1"), {"c1"}),
    Case("compute-at-aggregation", "c1 dies as it starts averaging round 2", with_faults({"c1": "crash:round=2:at=aggregate"}),
         {"c1"}),
    Case("owner-at-aggregation", "bob dies as he starts averaging round 2", with_faults({"bob": "crash:round=2:at=aggregate"}),
         {"bob"}),
    Case("compute-at-round-end", "c2 dies right after its round-2 checkpoint and replica",
         with_faults({"c2": "crash:round=2:at=end"}), {"c2"}),
    Case("owner-at-round-end", "carol dies right after her round-2 checkpoint", with_faults({"carol": "crash:round=2:at=end"}),
         {"carol"}),
    Case("compute-mid-batch", "c2 dies at batch 3 of round 2", with_faults({"c2": "crash:round=2:batch=3"}), {"c2"}),
    Case("freeze-compute-short", "c1 SIGSTOPped 2 s (< dead), then SIGCONT", freeze("c1", 2)),
    Case("freeze-compute-long", "c2 SIGSTOPped 12 s (> dead + gone), then SIGCONT", freeze("c2", 12), {"c2"}),
    Case("freeze-owner-long", "alice SIGSTOPped 12 s (> dead + gone), then SIGCONT", freeze("alice", 12), {"alice"}),
    Case("restart-owner", "bob SIGKILLed after round 1 and started again", restart("bob"), {"bob"}),
    Case("restart-compute", "c1 SIGKILLed after round 1 and started again", restart("c1"), {"c1"}),
    Case("both-compute", "c1 and c2 SIGKILLed after round 1", kill_both_compute, {"c1", "c2"}),
    Case("every-owner", "alice, bob and carol SIGKILLed after round 1", kill_every_owner, set(OWNERS)),
    Case("cut-link-short", "alice's link to c1 cut for 1 s (< gone) in round 2",
         with_faults({"alice": "cut:round=2:batch=3:peer=c1:seconds=1"})),
    Case("cut-link-long", "alice's link to c1 cut for 4 s (> gone) in round 2: the others go on without both",
         with_faults({"alice": "cut:round=2:batch=3:peer=c1:seconds=4"}), {"alice", "c1"}),
    Case("kill-all-resume", "every peer killed at the end of round 2, all started again with --resume",
         kill_all_and_resume),
    Case("other-secret", "c2 started with another secret", other_secret, {"c2"}),
    Case("other-topology", "c1 started with another topology file", other_topology, {"c1"}),
]


# -- judging ----------------------------------------------------------------------------------------

def judge(d: Deployment, case: Case, codes: dict[str, int | None], clean: float | None) -> str:
    if any(code is None for code in codes.values()):
        return "HUNG: " + ", ".join(n for n, c in codes.items() if c is None) + " still running"
    if d.tracebacks():
        return "TRACEBACK in " + ", ".join(d.tracebacks())
    if d.logs_with(*NOISE):
        return "NOISE (" + ", ".join(NOISE) + ") in " + ", ".join(d.logs_with(*NOISE))
    others = [n for n in codes if n not in case.harmed]
    notes = "; ".join(f"{n} (exit {codes[n]}): {d.last_line(n)[:150]}" for n in sorted(case.harmed)
                      if codes[n] not in (0, 137, -signal.SIGKILL))
    watcher = next((n for n in OWNERS if n not in case.harmed), "c1")
    if all(codes[n] == 0 for n in others) and d.rounds_of(watcher) == list(range(1, d.rounds + 1)):
        accuracy = d.accuracy(watcher)
        line = f"survived: accuracy {accuracy:.3f}" + (f" (clean {clean:.3f})" if clean is not None else "")
        return line + (f" — {notes}" if notes else "")
    if all(codes[n] != 0 for n in others):
        reasons = sorted({_reason(d.last_line(n)) for n in others})
        return "stopped cleanly: " + " | ".join(reasons)[:300]
    return "FAILED: exit codes " + ", ".join(f"{n}={c}" for n, c in codes.items()) + \
        f"; rounds {d.rounds_of(watcher)}" + (f" — {notes}" if notes else "")


def _reason(line: str) -> str:
    return line if len(line) <= 160 else line[:157] + "…"


def run_case(case: Case, folder: Path, rounds: int, clean: float | None) -> tuple[str, float, Deployment]:
    d = Deployment(folder / case.name, rounds)
    started = time.monotonic()
    try:
        case.act(d)
        codes = d.wait(started + HANG_SECONDS)
    finally:
        d.kill_all()
    return judge(d, case, codes, clean), time.monotonic() - started, d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [case.name for case in CASES]
    parser.add_argument("--only", nargs="*", metavar="CASE", help=f"run only these cases: {', '.join(names)}")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each case's deployment (default: 4)")
    parser.add_argument("--out", type=Path, default=None, help="keep every case's folder here")
    parser.add_argument("--list", action="store_true", help="list the cases, with what each does, and exit")
    args = parser.parse_args()
    if args.list:
        for case in CASES:
            print(f"{case.name:24} {case.what}")
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"--only: no case {', '.join(unknown)} (--list says what each does)")
    folder = args.out or Path(tempfile.mkdtemp(prefix="p2psl-drill-"))
    cases = [c for c in CASES if not args.only or c.name in args.only]
    clean = None
    print(f"{'case':24} {'seconds':>7}  outcome")
    bad = 0
    for case in cases:
        outcome, seconds, d = run_case(case, folder, args.rounds, clean)
        if case.name == "clean" and outcome.startswith("survived"):
            clean = d.accuracy("alice")
        bad += outcome.startswith(("HUNG", "TRACEBACK", "NOISE", "FAILED"))
        print(f"{case.name:24} {seconds:7.1f}  {outcome}", flush=True)
    print(f"(each case's peers and logs: {folder})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

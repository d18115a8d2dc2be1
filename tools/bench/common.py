"""Helpers the benchmark modules share: free loopback ports, child processes, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the paper authors' per-layer profile tables, kept in the repository
REFERENCE_PROFILES = ROOT / "reference" / "profiles"
PYTHON = sys.executable
MIB = 2**20


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (bound to 0, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def child_env(**extra: str) -> dict:
    """The environment of a child process: this checkout importable, one torch thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def run_deployment(text: str, out: Path, what: str) -> list[dict]:
    """`p2psl run` of the topology `text` (written to out/topology.toml, outputs in out/run),
    without dashboard or baseline; its metrics.jsonl records. RuntimeError naming `what` if it fails."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "topology.toml"
    path.write_text(text)
    proc = subprocess.run([PYTHON, "-m", "p2psl", "run", "--topology", str(path), "--out", str(out / "run"),
                           "--no-dashboard", "--no-baseline"], env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"p2psl run ({what}) exited {proc.returncode}: {proc.stderr[-2000:]}")
    return records(out / "run" / "metrics.jsonl")


def records(path: Path) -> list[dict]:
    """The JSON lines of a metrics file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / MIB, 1)


def main(run, doc: str) -> int:
    """A benchmark module's command line: `--quick`, `--out DIR`, then its figures printed."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = run(args.quick, args.out)
    print({k: v for k, v in results.items() if k != "details"})
    return 0

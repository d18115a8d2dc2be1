"""The cost model where a new user first meets it: `p2psl run` of each bundled topology here.

    .venv/bin/python tools/bench/bundled.py [--quick] --out DIR

Runs every file of topologies/ as the README's first command does (every peer its own process
on this machine, the peers sharing its cores; hundred_owners.toml, as its header says, with
--in-process) and compares, round by round, the predicted round
time in metrics.jsonl with the measured one. Round 1 is predicted by the plan's model; every
later round by the model refitted after the rounds before it ([Note: calibration]).

Keys (flat, as tools/bench/run.py collects them; "details" has every round):

    cost_model_median_abs_error_bundled   median of |predicted ÷ measured − 1| over rounds 2..end
                                          of every bundled topology, pooled
    cost_model_round1_abs_error_bundled   the largest round-1 error over the topologies
    planned_median_abs_error_bundled      the same median for the plan's own, uncalibrated model
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import main, PYTHON, child_env, write_json

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = ("ring", "heterogeneous", "many_owners", "hundred_owners")
#: run as the file says it is meant to run: every peer in one process (a little over 3 minutes)
IN_PROCESS = {"hundred_owners"}


def error(record: dict, key: str = "predicted_seconds") -> float | None:
    predicted, measured = record.get(key), record.get("seconds")
    return abs(predicted / measured - 1) if predicted and measured else None


def run_topology(name: str, out: Path) -> dict:
    """One `p2psl run` of topologies/NAME.toml; its rounds' measured and predicted seconds."""
    started = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "p2psl", "run", "--topology", str(ROOT / "topologies" / f"{name}.toml"),
                           "--out", str(out), "--no-dashboard", "--no-baseline",
                           *(["--in-process"] if name in IN_PROCESS else [])],
                          env=child_env(), capture_output=True, text=True)
    rounds = []
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        record = json.loads(line)
        if record.get("event") == "round":
            rounds.append({k: record.get(k) for k in ("round", "seconds", "predicted_seconds", "planned_seconds")})
    return {"topology": name, "exit": proc.returncode, "seconds": round(time.monotonic() - started, 1),
            "rounds": rounds, "round1": error(rounds[0]) if rounds else None,
            "median": _median([error(r) for r in rounds[1:]]),
            "planned_median": _median([error(r, "planned_seconds") for r in rounds[1:]])}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(quick: bool, out: Path) -> dict:
    """Every bundled topology once (the same in both modes: each run is short)."""
    out = Path(out)
    runs = [run_topology(name, out / "bundled" / name) for name in TOPOLOGIES]
    for r in runs:
        print(f"{r['topology']:<14} exit {r['exit']}  round 1 {_pct(r['round1'])}  rounds 2.. median "
              f"{_pct(r['median'])}  (plan's own model {_pct(r['planned_median'])})  {r['seconds']} s", flush=True)
    later = [error(x) for r in runs for x in r["rounds"][1:]]
    planned = [error(x, "planned_seconds") for r in runs for x in r["rounds"][1:]]
    results = {
        "cost_model_median_abs_error_bundled": _median(later),
        "cost_model_round1_abs_error_bundled": max((r["round1"] for r in runs if r["round1"] is not None),
                                                   default=None),
        "planned_median_abs_error_bundled": _median(planned),
        "details": {"runs": runs},
    }
    write_json(out / "bundled.json", results)
    return results


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


if __name__ == "__main__":
    sys.exit(main(run, __doc__))

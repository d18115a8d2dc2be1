"""p2psl's benchmark suite: every module, one results file, plots and a table.

    .venv/bin/python tools/bench/run.py [--quick] --out DIR [--only memory,transport] [--merge]

Runs `tools.bench.<module>.run(quick, DIR)` for each module in turn and writes
DIR/results.json: every module's figures in one flat object, each module's details under
"details", and what each module took. A module that is missing or fails is reported as such
(with the reason) and the others still run. Plots are written by the modules (DIR/*.png). The
table printed at the end lists each key with its target where p2psl sets one. `--merge` keeps
the figures of the modules not run now from DIR/results.json, so one module can be measured
again (or in the full mode) without the others; each module's entry says which mode made it.
`--quick` takes about thirteen minutes on two cores; CI does not run benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import write_json

MODULES = ("memory", "costmodel", "bundled", "planner", "transport", "pingpong", "owners", "fedavg", "microbatch", "chains")
#: p2psl's targets (the README's Performance table): key → (comparison, bound)
TARGETS = {
    "cn_memory_ratio_5hop_vs_1hop": ("<=", 0.30),
    "cn_memory_ratio_4hop_vs_1hop": ("<=", 0.33),
    "owner_memory_ratio_vs_full_model": ("<=", 0.25),
    "owner_memory_ratio_K64_vs_K4": ("<=", 1.15),
    "owner_bytes_ratio_K64_vs_K4": ("<=", 1.15),
    "cost_model_median_abs_error": ("<=", 0.05),
    "cost_model_median_abs_error_bundled": ("<=", 0.10),
    "cost_model_round1_abs_error_bundled": ("<=", 0.25),
    "pipeline_efficiency": (">=", 0.85),
    "planner_seconds_100x8": ("<=", 2.0),
    "ws_throughput_ratio_vs_raw_tcp": (">=", 0.5),
    "round_time_ratio_vs_fedavg": ("<=", 1.5),
    "microbatch_speedup_1owner": (">=", 1.8),
    "chosen_vs_best_chains_round_time_ratio": ("<=", 1.05),
}


def run_module(name: str, quick: bool, out: Path) -> tuple[dict, dict]:
    """(figures, details) of one module; a missing or failing module gives its reason instead."""
    started = time.monotonic()
    try:
        module = importlib.import_module(f"tools.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"tools.bench.{name}":
            raise
        return {}, {"status": "missing", "reason": f"tools/bench/{name}.py does not exist yet"}
    if not callable(getattr(module, "run", None)):
        return {}, {"status": "missing", "reason": f"tools/bench/{name}.py has no run(quick, out) yet"}
    print(f"== {name}", flush=True)
    try:
        result = dict(module.run(quick, out))
    except Exception as exc:  # one broken module must not cost the others' figures
        traceback.print_exc()
        return {}, {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                    "seconds": round(time.monotonic() - started, 1)}
    details = result.pop("details", {})
    return result, {"status": "ok", "seconds": round(time.monotonic() - started, 1), "figures": result,
                    "details": details}


def verdict(key: str, value) -> str:
    if key not in TARGETS or not isinstance(value, (int, float)):
        return ""
    op, bound = TARGETS[key]
    met = value <= bound if op == "<=" else value >= bound
    return f"{'met' if met else 'NOT met'} ({op} {bound:g})"


def table(results: dict, modules: dict) -> str:
    rows = [("figure", "value", "target")]
    for key in sorted(results, key=lambda k: (k not in TARGETS, k)):
        value = results[key]
        rows.append((key, f"{value:g}" if isinstance(value, (int, float)) else str(value), verdict(key, value)))
    for key in TARGETS:
        if key not in results:
            rows.append((key, "—", "not measured"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for name, info in modules.items():
        if info["status"] != "ok":
            lines.append(f"{name}: {info['status']} — {info['reason']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick version (about thirteen minutes on two cores)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated modules (default: all)")
    parser.add_argument("--merge", action="store_true", help="keep other modules' figures from DIR/results.json")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(MODULES)
    unknown = [name for name in names if name not in MODULES]
    if unknown:  # else a typo would run nothing and, without --merge, overwrite the earlier figures
        parser.error(f"--only: no module {', '.join(unknown)} (the modules: {', '.join(MODULES)})")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out}: cannot be a folder ({exc.strerror or exc})")
    started = time.monotonic()
    try:
        results, modules = _kept(args.out / "results.json", names) if args.merge else ({}, {})
    except (ValueError, OSError, AttributeError, TypeError) as exc:  # not JSON, unreadable, not an object
        parser.error(f"--merge: {args.out / 'results.json'} is not a results file ({exc})")
    for name in names:
        figures, info = run_module(name, args.quick, args.out)
        results.update(figures)
        modules[name] = {**info, "quick": args.quick}
        write_json(args.out / "results.json", _document(results, modules, args, started))  # partial results survive
    document = _document(results, modules, args, started)
    write_json(args.out / "results.json", document)
    print()
    print(table(results, modules))
    print(f"\n{'quick' if args.quick else 'full'} run, {document['seconds']:.0f} s; {args.out / 'results.json'}")
    return 0 if all(m["status"] != "failed" for m in modules.values()) else 1


def _kept(path: Path, names: list[str]) -> tuple[dict, dict]:
    """Figures and module entries of an earlier results file, less the modules about to run."""
    if not path.exists():
        return {}, {}
    earlier = json.loads(path.read_text())
    modules = {m: info for m, info in earlier.get("modules", {}).items() if m not in names}
    figures = {}
    for name, info in modules.items():
        if "figures" not in info and info.get("status") == "ok":
            if len(earlier.get("modules", {})) != 1:
                raise SystemExit(f"{path}: the figures of {name} are not filed under it (a file older than "
                                 "--merge); run every module again without --merge")
            info["figures"] = {k: v for k, v in earlier.items() if k not in ("quick", "seconds", "machine", "modules")}
        info.setdefault("quick", earlier.get("quick"))
        figures.update(info.get("figures", {}))
    return figures, modules


def _document(results: dict, modules: dict, args, started: float) -> dict:
    return {**results, "quick": all(m.get("quick", args.quick) for m in modules.values()), "seconds": round(time.monotonic() - started, 1),
            "machine": f"{platform.node()}, {platform.processor() or platform.machine()}, "
                       f"{_cores()} cores, Python {platform.python_version()}",
            "modules": modules}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())

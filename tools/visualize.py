"""Draw a deployment: peers by role, links with bandwidth and latency, each compute node's layers
and the owners' kept layers, and predicted memory against capacity per peer.

    .venv/bin/python tools/visualize.py --topology topologies/ring.toml --out ring.png
    .venv/bin/python tools/visualize.py --topology T.toml --plan runs/T/plan.json --out T.html

The format follows the extension: .png, .svg, or .html (a standalone page: the picture plus tables
of peers, links and the plan). Without --plan the plan is computed here, as `p2psl plan` would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2psl.errors import P2PSLError, report
from p2psl.planning.plan import Plan
from p2psl.topology import Topology, load_topology

EXTENSIONS = (".png", ".svg", ".html", ".htm")


def compute_plan(topology: Topology) -> Plan:
    """The plan the peers would agree on (measured profiles or the topology's profile table)."""
    from p2psl.planning.planner import make_plan
    from p2psl.learning.local_plan import local_inputs

    _, profiles, samples = local_inputs(topology)
    return make_plan(topology, profiles, samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", required=True, help="topology file (TOML)")
    parser.add_argument("--plan", help="plan.json (from `p2psl plan --json` or a run's output folder); "
                                       "computed when omitted")
    parser.add_argument("--no-plan", action="store_true", help="draw the topology alone, without planning")
    parser.add_argument("--out", required=True, help="output file: .png, .svg or .html")
    args = parser.parse_args(argv)
    if args.plan and args.no_plan:
        parser.error("--plan and --no-plan: give one")
    if Path(args.out).suffix.lower() not in EXTENSIONS:
        parser.error(f"--out {args.out}: the extension must be one of {', '.join(EXTENSIONS)}")
    try:
        topology = load_topology(args.topology)
        plan = None if args.no_plan else Plan.read(_plan_file(args.plan)) if args.plan else compute_plan(topology)
        if args.plan:  # a plan computed here is this file's by construction
            _check(plan, topology)
        from p2psl.viz.topology import write_picture

        out = write_picture(topology, plan, args.out)
    except (P2PSLError, OSError) as exc:
        return report(exc)
    print(out)
    return 0


def _plan_file(path: str) -> Path:
    """A plan.json, or a run's output folder holding one."""
    return Path(path) / "plan.json" if Path(path).is_dir() else Path(path)


def _check(plan: Plan, topology: Topology) -> None:
    """A plan from another deployment would draw nonsense: say so instead."""
    from p2psl.errors import ConfigError

    strangers = sorted((set(plan.nodes) | set(plan.owners)) - set(topology.names))
    if strangers:
        raise ConfigError(f"the plan names peers that {topology.source} does not have: {', '.join(strangers)}")
    from p2psl.learning.data import load_dataset
    from p2psl.learning.models import ZOO, model_spec

    if topology.training.model not in ZOO:  # a user's factory: not imported only to count its layers
        return
    data = load_dataset(topology.training)
    layers = model_spec(topology.training.model, data.input_shape, data.num_classes).num_layers
    if plan.num_layers != layers:
        raise ConfigError(f"the plan cuts {plan.num_layers} layers, {topology.source}'s model "
                          f"{topology.training.model!r} has {layers}: give the plan of this file")


if __name__ == "__main__":
    sys.exit(main())

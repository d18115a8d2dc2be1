"""Render the pipeline timeline of a run: one lane per peer, one colour per owner, the whole run
above and a zoomed steady-state window below, with the measured and the plan's predicted period.

    .venv/bin/python tools/timeline.py --trace runs/ring/trace.json --plan runs/ring/plan.json --out timeline.png

The trace is the merged trace.json that `p2psl run` writes (Perfetto and chrome://tracing open the
same file). --round picks the round to zoom into (default: the last). Prints the measured period.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2psl.errors import ConfigError, P2PSLError, report
from p2psl.planning.plan import Plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", required=True, help="merged trace.json from a run's output folder")
    parser.add_argument("--plan", help="the run's plan.json (lane order, owners, predicted period)")
    parser.add_argument("--round", type=int, help="round to zoom into (default: the last)")
    parser.add_argument("--out", required=True, help="output picture: .png or .svg")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() not in (".png", ".svg"):
        parser.error(f"--out {args.out}: the extension must be .png or .svg")
    from p2psl.viz import format_seconds, save
    from p2psl.viz.timeline import draw_timeline, load_trace, measured_period, owners_of

    try:
        trace = load_trace(args.trace)
        plan = Plan.read(args.plan) if args.plan else None
        _check(trace, plan, args.round)
        save(draw_timeline(trace, plan, args.round), args.out)
    except (P2PSLError, OSError) as exc:
        return report(exc)
    period = measured_period(trace, owners_of(trace, plan))
    predicted = (plan.expected_period_seconds or plan.period_seconds) if plan is not None else None
    print(f"{args.out}: {len(trace.peers)} peers, {len(trace.spans)} spans; period measured "
          f"{format_seconds(period)}, predicted {format_seconds(predicted)}")
    return 0



def _check(trace, plan: Plan | None, round_: int | None) -> None:
    """Another run's plan, or a round the run did not train, would draw nonsense: say so instead.
    (A plan's peer missing from the trace is no sign: a peer that died wrote no trace.)"""
    for role, names in (("compute nodes", plan.nodes), ("data owners", plan.owners)) if plan is not None else ():
        if not set(names) & set(trace.peers):
            raise ConfigError(f"the trace has none of the plan's {role} ({', '.join(names)}): give the plan.json "
                              "of the same run")
    rounds = sorted({s.round for s in trace.spans if s.training and s.round is not None})
    if round_ is not None and round_ not in rounds:
        where = f"rounds {rounds[0]}–{rounds[-1]}" if rounds else "no round"
        raise ConfigError(f"--round {round_}: the trace has {where}")


if __name__ == "__main__":
    sys.exit(main())

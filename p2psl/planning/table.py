"""The text table `p2psl plan` prints: who runs which layers, memory against capacity, and the
predicted period and round time. Pure formatting; the numbers come from the plan and
`costmodel.Prediction`."""

from __future__ import annotations

from p2psl.planning.cost import hourly_price, round_cost
from p2psl.planning.costmodel import Prediction
from p2psl.planning.plan import Plan
from p2psl.units import format_bytes, plural, span


def _rows(plan: Plan, topology) -> list[tuple[str, str, str, str]]:
    owner_layers = f"{span(*plan.owner_first)}, {span(*plan.owner_last)}"
    several = plan.chains > 1  # [Note: several chains]: say which chain each peer belongs to
    rows = [(name, "data owner" + (f", chain {plan.route(name) + 1}" if several else ""), owner_layers)
            for name in plan.owners]
    rows += [(s.node, (f"chain {index // plan.hops + 1} " if several else "") + f"compute #{index % plan.hops + 1}",
              span(s.first, s.last)) for index, s in enumerate(plan.chain)]
    out = [(name, role, layers, _memory(plan, topology, name)) for name, role, layers in rows]
    for peer in topology.compute_nodes:  # [Note: the cost objective]: nodes not worth paying for
        if peer.name not in plan.nodes:
            out.append((peer.name, "not used", "—", f"— / {format_bytes(peer.memory)}"))
    return out


def _memory(plan: Plan, topology, name: str) -> str:
    capacity = topology.peer(name).memory
    need = plan.peak_memory_bytes.get(name)
    if need is None:
        return f"? / {format_bytes(capacity)}"
    return f"{format_bytes(need)} / {format_bytes(capacity)} ({100 * need / capacity:.0f} %)"


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.3g} s" if value < 100 else f"{value:,.0f} s"


def format_plan(plan: Plan, prediction: Prediction | None, topology) -> str:
    """A table of peers (name, role, layers, peak memory / capacity) and the predictions."""
    header = ("peer", "role", "layers", "peak memory / capacity")
    rows = [header, *_rows(plan, topology)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = [f"plan ({plan.method}, objective {plan.objective}), {plan.num_layers} layers, "
             f"{plural(len(plan.chain), 'compute node')}" + (f" in {plan.chains} chains" if plan.chains > 1 else "")
             + f", {plural(len(plan.owners), 'data owner')}, digest {plan.digest[:12]}", ""]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    lines.extend(_predictions(plan, prediction))
    lines.extend(_cost(plan, topology))
    return "\n".join(lines)


def _cost(plan: Plan, topology) -> list[str]:
    """The predicted cost of a round, where the compute nodes have prices."""
    if not any(p.price for p in topology.compute_nodes) or plan.round_seconds is None:
        return []
    price = hourly_price(plan, topology)
    deadline = topology.training.deadline
    rounds = topology.training.rounds
    per_round = round_cost(plan, topology)
    return [f"predicted cost {per_round:.3g} per round, {rounds * per_round:.3g} for {plural(rounds, 'round')} "
            f"({plural(len(plan.nodes), 'compute node')} at {price:.4g} per hour together"
            + (f"; deadline {_seconds(deadline)} a round" if deadline else "") + ")"]


def _predictions(plan: Plan, p: Prediction | None) -> list[str]:
    if p is None:
        return [f"predicted period {_seconds(plan.period_seconds)}, round {_seconds(plan.round_seconds)}"]
    owners = len(plan.owners)
    return [
        f"predicted period {_seconds(p.expected_period_seconds)} for one batch from each of {plural(owners, 'owner')} "
        f"(bottleneck: {p.bottleneck or 'none'}; {_seconds(p.period_seconds)} without the runtime's "
        "per-task and per-message costs, the planner's objective)",
        f"predicted round  {_seconds(p.round_seconds)} = training {_seconds(p.training_seconds)} "
        f"(fill {_seconds(p.fill_seconds)}, drain {_seconds(p.drain_seconds)}) + round end "
        f"{_seconds(p.aggregation_seconds)} + evaluation {_seconds(p.evaluation_seconds)}",
    ]

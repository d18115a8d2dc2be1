"""Checking a plan without planning: what any peer can verify of the decisions a `plan` message
carries (docs/protocol.md §13, "Checking a plan"), with nothing but the topology and the profiles.

The planner (a MILP) chooses the best plan; whether a given plan is *allowed* is much simpler,
and a peer that cannot run the planner can still refuse a plan that does not fit: its parts must
cover the model's layers in order, its owners and chain must be the topology's, its chain order
must be one the links can run, the cuts fixed by the topology must be kept, no peer may get a
layer its profile did not time, and every peer's predicted peak memory (p2psl.planning.memory) must be within its `memory`. Optimality is not
checked: that would take the planner.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from p2psl.errors import ConfigError
from p2psl.planning.memory import peak_memory
from p2psl.planning.plan import Plan, Stage
from p2psl.planning.problem import Problem
from p2psl.planning.profile import Profile


def decisions_digest(decisions: Mapping) -> str:
    """The plan digest of a plan message's `decisions`: SHA-256 of their sorted-key JSON."""
    return hashlib.sha256(json.dumps(decisions, sort_keys=True).encode()).hexdigest()


def plan_of(decisions: Mapping) -> Plan:
    """The `Plan` the decisions describe; `ConfigError` if they are malformed or no partition."""
    try:
        chain = tuple(Stage(str(n), int(f), int(last)) for n, f, last in decisions["chain"])
        micro = decisions.get("micro_batches", 1)
        if not isinstance(micro, int) or isinstance(micro, bool):
            raise ValueError(f"micro_batches must be an integer, got {micro!r}")
        if "micro_batches" in decisions and micro == 1:  # whole batches: left out, one digest per plan
            raise ValueError("micro_batches 1 must be left out")
        chains, routes = decisions.get("chains", 1), decisions.get("routes", [])
        if not isinstance(chains, int) or isinstance(chains, bool) or not isinstance(routes, list):
            raise ValueError(f"chains must be an integer and routes a list, got {chains!r} and {routes!r}")
        if "chains" in decisions and chains == 1:  # one chain: left out, one digest per plan
            raise ValueError("chains 1 must be left out")
        if ("routes" in decisions) != ("chains" in decisions):
            raise ValueError("chains and routes go together")
        return Plan(int(decisions["num_layers"]), tuple(map(int, decisions["owner_first"])),
                    tuple(map(int, decisions["owner_last"])), chain, tuple(map(str, decisions["owners"])),
                    micro_batches=micro, chains=chains, routes=tuple(routes))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed plan decisions: {exc}") from None


def plan_problems(decisions: Mapping, topology, profiles: Mapping[str, Profile]) -> list[str]:
    """Why the plan `decisions` cannot run on `topology` (the peers planned over: after a failure,
    without the compute nodes gone) with these profiles; empty if it can."""
    try:
        plan = plan_of(decisions)
    except ConfigError as exc:
        return [str(exc)]
    problem = Problem.build(topology, profiles, {})
    cfg, out = topology.training, []
    if plan.num_layers != problem.num_layers:
        out.append(f"the plan has {plan.num_layers} layers, the profiles {problem.num_layers}")
    if plan.owners != problem.owners:
        out.append(f"owners {list(plan.owners)}, expected the topology's {list(problem.owners)}")
    some = cfg.objective == "cost"  # [Note: the cost objective]: the compute nodes worth paying for
    if (not set(plan.nodes) <= set(problem.nodes) or len(set(plan.nodes)) != len(plan.nodes)) if some \
            else sorted(plan.nodes) != list(problem.nodes):
        expected = "each at most once" if some else "every compute node once"
        out.append(f"chain {list(plan.nodes)}, expected {expected}: {list(problem.nodes)}")
    else:
        out += [f"the links cannot run the chain in the order {' → '.join(s.node for s in path)}"
                for c, path in enumerate(plan.paths) if not problem.valid_order([s.node for s in path], plan.lane(c).owners)]
    if cfg.first_cut is not None and plan.owner_first[1] != cfg.first_cut:
        out.append(f"part 0 ends at layer {plan.owner_first[1]}, first_cut is {cfg.first_cut}")
    if cfg.last_cut is not None and plan.owner_last[0] - 1 != cfg.last_cut:
        out.append(f"the middle ends at layer {plan.owner_last[0] - 1}, last_cut is {cfg.last_cut}")
    if cfg.chains == 1 and plan.chains != 1:
        out.append(f"{plan.chains} chains, the topology's chains is 1")
    if cfg.micro_batches >= 1 and plan.micro_batches != cfg.micro_batches:
        out.append(f"{plan.micro_batches} micro-batches per batch, micro_batches is {cfg.micro_batches}")
    elif cfg.micro_batches == 0 and plan.micro_batches > cfg.batch_size:
        out.append(f"{plan.micro_batches} micro-batches per batch, more than batch_size ({cfg.batch_size})")
    out.extend(untimed(plan, problem.profiles))
    if out:
        return out
    for name, need in peak_memory(plan, topology, problem.profiles).items():
        if need > problem.capacity(name):
            out.append(f"{name} needs {need} bytes, its memory is {problem.capacity(name)}")
    return out


def untimed(plan: Plan, profiles: Mapping[str, Profile]) -> list[str]:
    """Peers the plan gives layers their profiles have no times for ([Note: profiling what a peer
    may hold]): their predicted times would be zeros."""
    owner_layers = [*range(plan.owner_first[1]), *range(plan.owner_last[0] - 1, plan.num_layers)]
    held = {**{o: owner_layers for o in plan.owners}, **{s.node: range(s.first - 1, s.last) for s in plan.chain}}
    out = []
    for name, layers in held.items():
        missing = [j + 1 for j in layers if name in profiles and not profiles[name].measured(j)]
        if missing:
            out.append(f"{name} is given layers its profile did not time: {missing}")
    return out

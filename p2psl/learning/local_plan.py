"""Planning on one machine, for `p2psl plan` and `p2psl validate` (no peers involved).

The same inputs the peers would agree on: the dataset's shape and each owner's sample count from
the topology's data, and each peer's profile from the topology's profile table or measured here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from p2psl.learning.data import load_dataset, shard
from p2psl.errors import ConfigError, PlanInfeasible
from p2psl.learning.models import ModelSpec, model_spec
from p2psl.planning.memory import whole_model_memory
from p2psl.units import format_bytes
from p2psl.planning.plan import Plan
from p2psl.planning.planner import make_plan
from p2psl.planning.problem import Problem
from p2psl.planning.profile import Profile, available_cores, peer_profiles
from p2psl.planning.profiling import cached_layers_profile
from p2psl.topology import Topology


#: told (layers timed, layers to time) while the model's layers are timed here (not when cached)
Progress = Callable[[int, int], None] | None


def local_inputs(topology: Topology, progress: Progress = None) -> tuple[ModelSpec, dict[str, Profile], dict[str, int]]:
    cfg = topology.training
    data = load_dataset(cfg)
    owners = [o.name for o in topology.owners]
    shards = shard(data, owners, cfg.partition, cfg.alpha, cfg.seed)
    samples = {o: len(shards[o].train_idx) for o in owners}
    spec = model_spec(cfg.model, data.input_shape, data.num_classes)
    if cfg.profile:
        profiles = peer_profiles(topology)
    else:
        measured = cached_layers_profile(spec.measurable(cfg.seed), range(spec.num_layers), cfg.batch_size,
                                         progress=progress).profile
        measured = replace(measured, cores=available_cores())  # measured here: [Note: shared machines]
        profiles = peer_profiles(topology, measured)
    return spec, profiles, samples


def plan_locally(topology: Topology, progress: Progress = None) -> tuple[Plan, dict[str, Profile], dict[str, int]]:
    """The plan the peers would agree on, with the profiles and sample counts behind it."""
    spec, profiles, samples = local_inputs(topology, progress)
    return make_plan(topology, profiles, samples), profiles, samples


def deep_problems(topology: Topology, progress: Progress = None) -> list[str]:
    """Problems only visible once the model, the data and the planner are involved."""
    stops, overruns, _ = check_locally(topology, progress)
    return stops + overruns


def check_locally(topology: Topology, progress: Progress = None) -> tuple[list[str], list[str], Plan | None]:
    """(problems the peers would stop on, memory the file declares that a federated-averaging
    owner would overrun — the peers do not check it, `validate` does —, the plan the peers would
    agree on where there is one)."""
    try:
        spec, profiles, samples = local_inputs(topology, progress)
    except ConfigError as exc:
        return [str(exc)], [], None
    try:
        plan = make_plan(topology, profiles, samples)
    except PlanInfeasible as exc:
        return [f"no plan fits: {exc}"], [], None
    if spec.num_layers < plan.hops + 2:  # a chain's nodes, not every compute node ([Note: several chains])
        return [f"model {spec.name!r} has {spec.num_layers} layers: too few for {plan.hops} "
                "compute nodes plus the owners' two parts"], [], plan
    if topology.training.mode == "fedavg":
        need = whole_model_memory(topology, profiles)
        problem = Problem.build(topology, profiles, samples)  # capacity: the accelerator's, if it has one
        return [], [f"peer {o.name!r}: [training] mode = \"fedavg\" trains the whole model on each data owner, "
                    f"about {format_bytes(need)}; it has {format_bytes(problem.capacity(o.name))}"
                    for o in topology.owners if problem.capacity(o.name) < need], plan
    return [], [], plan

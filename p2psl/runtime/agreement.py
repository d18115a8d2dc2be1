"""Agreeing on a plan without a master (SPEC §3, step 3).

Every peer contributes its own per-layer profile — read from the topology's profile table, or
measured here once and cached — and sends it to every other peer. When a peer holds all of them
it runs the same deterministic planner as everybody else and sends the plan's digest around; if
any digest differs, nobody trains (`PlanMismatch` names who disagrees).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from p2psl.runtime.roles.context import Topic
from p2psl.errors import ConfigError, PlanMismatch, RemoteProtocolError
from p2psl.wire.messages import Greeting, PlanProposal, ProfileShare
from p2psl.learning.models import ModelSpec
from p2psl.planning.check import decisions_digest, plan_problems
from p2psl.planning.plan import Plan
from p2psl.planning.planner import make_plan
from p2psl.learning.accelerator import resolve_device
from p2psl.planning.profile import Profile, available_cores, peer_profiles
from p2psl.planning.profiling import cached_layers_profile, candidate_layers
from p2psl.runtime.state import Actions, PeerState
from p2psl.topology import DATA_OWNER, Topology
from p2psl.units import plural



def _count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def dataset_facts(topology: Topology, greetings: dict[str, Greeting]) -> tuple[tuple[int, ...], int, dict[str, int]]:
    """(input shape, number of classes, training samples per owner) from the owners' greetings;
    the owners must agree on the first two."""
    shapes, samples = {}, {}
    for name, greeting in sorted(greetings.items()):
        if topology.peer(name).role != DATA_OWNER:
            continue  # the topology says who owns data, whatever a greeting claims
        facts = greeting.dataset
        shape, classes, train = (facts.get(key) for key in ("input_shape", "num_classes", "train"))
        if not (isinstance(shape, list) and shape and all(_count(s, 1) for s in shape)
                and _count(classes, 1) and _count(train, 0)):
            raise RemoteProtocolError(f"{name}'s greeting lacks its dataset facts (or they are no counts)",
                                      "bad_header")
        shapes[name], samples[name] = (tuple(shape), classes), train
    if len(set(shapes.values())) != 1:
        seen = ", ".join(f"{n}: {s[0]} with {s[1]} classes" for n, s in shapes.items())
        raise ConfigError(f"the data owners' datasets differ in shape or classes ({seen})")
    (shape, classes), = set(shapes.values())
    return shape, classes, samples


def local_profile(topology: Topology, me: str, spec: ModelSpec,
                  progress: Callable[[int, int], None] | None = None) -> tuple[Profile, str]:
    """This peer's profile — its device's columns of the profile table, or its possible layers
    measured here and cached ([Note: profiling what a peer may hold]) — and a line saying how."""
    cfg = topology.training
    if cfg.profile:
        return peer_profiles(topology)[me], f"profile: {topology.peer(me).device or 'default'} columns of {cfg.profile}"
    device = resolve_device(me, topology.peer(me).accelerator, quiet=True)  # measured where it trains
    layers = spec.measurable(cfg.seed)
    wanted = candidate_layers(topology, me, layers)
    measured = cached_layers_profile(layers, wanted, cfg.batch_size, device=device, progress=progress)
    how = (f"profile: timed {plural(measured.timed, 'layer')} in {measured.seconds:.1f} s" if measured.timed
           else "profile: every layer this peer may hold was timed before")
    how += f" ({layer_ranges(wanted)} of {spec.num_layers} may be its; cache {measured.path})"
    # the cores this machine gives the peer travel with its profile ([Note: shared machines])
    return replace(measured.profile.scaled(topology.peer(me).speed), cores=available_cores()), how


def layer_ranges(indices: list[int]) -> str:
    """0-based layer indices as 1-based ranges: [0, 1, 36] → "layers 1–2, 37"."""
    runs: list[list[int]] = []
    for j in sorted(indices):
        if runs and j == runs[-1][1] + 1:
            runs[-1][1] = j
        else:
            runs.append([j, j])
    text = ", ".join(f"{a + 1}" if a == b else f"{a + 1}–{b + 1}" for a, b in runs)
    return ("layer " if len(indices) == 1 else "layers ") + text


async def agree_on_plan(state: PeerState, actions: Actions, spec: ModelSpec, samples: dict[str, int],
                        planned: Callable[[], None] | None = None) -> tuple[Plan, dict[str, Profile]]:
    """Exchange profiles, plan, and check that every peer planned the same (the plan and the
    profiles behind it, which re-planning after a failure reuses). `planned` is called between
    planning and proposing: a pause there delays every peer alike ([Note: a settled heap])."""
    topology, me, timeouts = state.topology, state.me, state.topology.timeouts
    others = state.others()
    loop = asyncio.get_running_loop()

    def progress(done: int, total: int) -> None:  # on the worker thread
        loop.call_soon_threadsafe(setattr, state.status, "detail", f"timing layer {done + 1} of {total} for the profile")

    mine, how = await state.worker.run("profile", local_profile, topology, me, spec, progress)
    state.say("planning", how)
    state.told.append(ProfileShare(src=me, dst=me, profile=mine.to_json()))
    for other in others:
        await actions.send(ProfileShare(src=me, dst=other, profile=mine.to_json()), timeouts.start)
    shares = await state.collector.gather(Topic.PROFILE, 0, set(others), timeouts.start, "every peer shares its profile")
    profiles = {me: mine}
    for name, share in shares.items():
        try:
            profiles[name] = Profile.from_json(share.profile)
        except (ValueError, ConfigError) as exc:
            raise RemoteProtocolError(f"{name}'s profile is unusable: {exc}", "bad_profile") from None
        if profiles[name].num_layers != spec.num_layers:
            raise ConfigError(f"{name} profiled {profiles[name].num_layers} layers, the model has {spec.num_layers}")
    plan = await state.worker.run("plan", make_plan, topology, profiles, samples)
    if planned is not None:
        planned()
    state.told.append(PlanProposal(src=me, dst=me, digest=plan.digest, epoch=0, decisions=plan.decisions))
    for other in others:
        await actions.send(replace(state.told[-1], dst=other), timeouts.start)
    proposals = await state.collector.gather(Topic.PLAN, 0, set(others), timeouts.start, "every peer proposes its plan")
    differ = sorted(n for n, p in proposals.items() if p.digest != plan.digest)
    if differ:
        raise PlanMismatch(f"{', '.join(differ)} computed a different plan than {me} "
                           f"({plan.digest[:12]}…{judge(proposals[differ[0]], topology, profiles)}): "
                           f"check that every peer runs the same p2psl and profile table")
    return plan, profiles


def judge(proposal: PlanProposal, topology: Topology, profiles: dict[str, Profile]) -> str:
    """What a differing plan is worth, for the error: its decisions checked without planning."""
    if not proposal.decisions:
        return ""
    if decisions_digest(proposal.decisions) != proposal.digest:
        return f"; {proposal.src}'s decisions do not match its digest"
    problems = plan_problems(proposal.decisions, topology, profiles)
    return f"; {proposal.src}'s plan " + (f"cannot run: {problems[0]}" if problems else "fits too, but differs")

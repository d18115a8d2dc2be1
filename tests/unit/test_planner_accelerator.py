"""The planner with `accelerator_memory`: a compute node's parts must fit its accelerator, the
runtime its host `memory` (authors' VGG-19 profiles, three identical VMs)."""

from __future__ import annotations

import pytest

from p2psl.errors import PlanInfeasible
from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES
from p2psl.planning.planner import make_plan, plan_bruteforce, plan_milp
from p2psl.planning.problem import Problem
from p2psl.planning.profile import Profile, peer_profiles
from p2psl.topology import parse_topology
from tests.unit.test_planner import REFERENCE, nodes, owners, toml

GIB = 2**30


def deployment(accelerators: dict[str, tuple[str, int | None]], memory: str = "64GiB"):
    """VGG-19 over 8 owners and c1–c3 (VMs); `accelerators`: node → (accelerator, bytes or None)."""
    text = toml(owners(8, device="d1", memory="4GiB") + nodes(*({"device": "VM", "memory": memory},) * 3),
                batch_size=128, first_cut=3, last_cut=22, profile=str(REFERENCE / "vgg19_cifar10_bs128.csv"))
    for name, (accelerator, size) in accelerators.items():
        keys = f'accelerator = "{accelerator}"' + (f'\naccelerator_memory = "{size}B"' if size else "")
        text = text.replace(f'name = "{name}"\n', f'name = "{name}"\n{keys}\n')
    topo = parse_topology(text)
    return topo, peer_profiles(topo), {f"o{k:02d}": 3000 for k in range(8)}


def parts_bytes(plan, node: str) -> int:
    return plan.peak_memory_bytes[node] - RUNTIME_OVERHEAD_BYTES


def test_the_capacity_is_the_accelerator_for_the_parts_and_the_host_for_all():
    topo, profiles, _ = deployment({"c1": ("cuda", 8 * GIB), "c2": ("cuda", 200 * GIB), "c3": ("auto", None)})
    problem = Problem.build(topo, profiles, {})
    assert problem.capacity("c1") == 8 * GIB + RUNTIME_OVERHEAD_BYTES
    assert problem.capacity("c2") == 64 * GIB           # the host binds: it holds the runtime too
    assert problem.capacity("c3") == 64 * GIB           # no accelerator_memory: no second bound


def test_a_small_accelerator_moves_layers_off_its_node():
    topo, profiles, samples = deployment({})
    free = make_plan(topo, profiles, samples)
    heaviest = max(free.nodes, key=lambda n: parts_bytes(free, n))
    limit = parts_bytes(free, heaviest) * 3 // 4
    topo, profiles, samples = deployment({heaviest: ("cuda", limit)})
    bound = make_plan(topo, profiles, samples)
    assert parts_bytes(bound, heaviest) <= limit < parts_bytes(free, heaviest)
    assert bound.period_seconds >= free.period_seconds
    best = plan_bruteforce(topo, profiles, samples)
    assert plan_milp(topo, profiles, samples).digest == best.digest == bound.digest


def test_an_accelerator_too_small_for_any_split_is_named():
    topo, profiles, samples = deployment({"c2": ("cuda:0", 1024)})
    with pytest.raises(PlanInfeasible, match="c2"):
        make_plan(topo, profiles, samples)


def test_a_large_accelerator_changes_nothing():
    plain = make_plan(*deployment({}))
    roomy = make_plan(*deployment({n: ("cuda", 60 * GIB) for n in ("c1", "c2", "c3")}))
    assert roomy.digest == plain.digest


def test_validate_holds_a_federated_owner_to_its_accelerator(monkeypatch):
    """`[training] mode = "fedavg"`: each owner trains the whole model where its parts would
    train, so `p2psl validate` compares the whole model with the accelerator's memory, not
    only with the host's."""
    from types import SimpleNamespace

    from p2psl.learning import local_plan

    text = toml(owners(2, memory="64GiB") + nodes({}), batch_size=8, mode="fedavg")
    layers = Profile("u", 8, (0.01,) * 4, (0.02,) * 4, (0.0,) * 4, (1000,) * 4, (2**28,) * 4)  # 1 GiB of weights
    samples = {"o00": 64, "o01": 64}

    def problems(owner_keys: str) -> list[str]:
        topo = parse_topology(text.replace('name = "o01"\n', f'name = "o01"\n{owner_keys}\n'))
        inputs = (SimpleNamespace(name="m", num_layers=4), {p.name: layers for p in topo.peers}, samples)
        monkeypatch.setattr(local_plan, "local_inputs", lambda topology, progress=None: inputs)
        return local_plan.deep_problems(topo)

    assert problems("") == []
    [problem] = problems('accelerator = "cuda"\naccelerator_memory = "4GiB"')  # the split fits, the whole not
    assert problem.startswith("peer 'o01': [training] mode = \"fedavg\" trains the whole model")
    assert problems('accelerator = "cuda"\naccelerator_memory = "32GiB"') == []

"""The planner: MILP, dynamic program and brute force agree; infeasibility is explained; plans
are deterministic and respect the links."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from p2psl.planning import costmodel
from p2psl.errors import PlanInfeasible, TopologyError
from p2psl.planning.table import format_plan
from p2psl.planning.planner import even_plan, make_plan, plan_bruteforce, plan_dp, plan_milp
from p2psl.planning.problem import Problem
from p2psl.planning.profile import Profile, peer_profiles
from p2psl.topology import parse_topology

_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = _ROOT / "reference" / "profiles"  # the authors' tables, kept in the repository
MIB = 2**20


def toml(peers: list[dict], links: list[dict] = (), **training) -> str:
    """Topology text; peers are dicts with name, role and optional memory, device, speed."""
    lines = ["[training]"] + [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in training.items()]
    for index, peer in enumerate(peers):
        lines += ["[[peer]]", f'name = "{peer["name"]}"', f'role = "{peer["role"]}"',
                  f'address = "127.0.0.1:{7000 + index}"', f'memory = "{peer.get("memory", "64GiB")}"']
        lines += [f'device = "{peer["device"]}"'] if "device" in peer else []
        lines += [f'speed = {peer["speed"]}'] if "speed" in peer else []
        lines += [f'machine = "{peer["machine"]}"'] if "machine" in peer else []
    for link in links:
        lines += ["[[link]]", f'peers = ["{link["a"]}", "{link["b"]}"]']
        lines += [f'bandwidth = "{link["bandwidth"]}"'] if link.get("bandwidth") else []
        lines += [f'latency = "{link["latency"]}"'] if link.get("latency") else []
    return "\n".join(lines) + "\n"


def owners(count: int, **extra) -> list[dict]:
    return [{"name": f"o{k:02d}", "role": "data_owner", **extra} for k in range(count)]


def nodes(*specs: dict) -> list[dict]:
    return [{"name": f"c{i}", "role": "compute", **spec} for i, spec in enumerate(specs, start=1)]


# -- the authors' profiles -----------------------------------------------------------------------

MODELS = {"resnet101": (2, 36), "vgg19": (3, 22)}


def reference(model: str, devices: list[str], memory: str = "64GiB", objective: str = "time"):
    first, last = MODELS[model]
    # the paper's owners are Raspberry Pi 4s with 4 GiB; the owners' all-reduce keeps an owner
    # that holds VGG-19's classifier (470 MB) within them
    text = toml(owners(16, device="d1", memory="4GiB") + nodes(*({"device": d, "memory": memory} for d in devices)),
                batch_size=128, first_cut=first, last_cut=last, objective=objective,
                profile=str(REFERENCE / f"{model}_cifar10_bs128.csv"))
    topo = parse_topology(text)
    return topo, peer_profiles(topo), {f"o{k:02d}": 3000 for k in range(16)}


def papers_deployment(k: int, vms: int, tmp: Path | None = None):
    """VGG-19, owners keeping layers 1–3 and 23–25 on Raspberry Pi 4s (`d1`, 4 GiB), `vms`
    compute nodes on the paper's 16 GB VMs, the authors' profiles."""
    text = toml(owners(k, device="d1", memory="4GiB") + nodes(*({"device": "VM", "memory": "16GiB"},) * vms),
                batch_size=128, first_cut=3, last_cut=22, profile=str(REFERENCE / "vgg19_cifar10_bs128.csv"))
    topo = parse_topology(text)
    return topo, peer_profiles(topo), {f"o{i:02d}": 3000 for i in range(k)}, text


@pytest.mark.parametrize("vms", [3, 4, 5])
def test_the_papers_deployment_fits_its_four_gib_owners(vms):
    topo, profiles, samples, _ = papers_deployment(16, vms)
    plan = make_plan(topo, profiles, samples)
    assert max(plan.peak_memory_bytes[o] for o in plan.owners) <= 4 * 2**30
    assert (plan.owner_first, plan.owner_last) == ((1, 3), (23, 25))


def test_p2psl_plan_accepts_the_papers_deployment(tmp_path):
    *_, text = papers_deployment(16, 3)
    (tmp_path / "paper.toml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "p2psl", "plan", "--topology", str(tmp_path / "paper.toml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "o15" in done.stdout


def test_an_owners_predicted_peak_stays_flat_from_4_to_100_owners():
    """What an owner holds at the round end does not grow with the number of owners."""
    peaks = {}
    for k in (4, 16, 100):
        topo, profiles, samples, _ = papers_deployment(k, 5)
        plan = make_plan(topo, profiles, samples)
        peaks[k] = plan.peak_memory_bytes["o00"]
    assert peaks[4] <= peaks[16] <= peaks[100] <= 1.1 * peaks[4]


CASES = [("vgg19", ["VM"] * n) for n in (2, 3, 4, 5)] + [("resnet101", ["VM"] * n) for n in (2, 3, 4)] + [
    ("resnet101", ["VM", "laptop", "VM"]), ("vgg19", ["laptop", "VM", "VM", "laptop"])]


@pytest.mark.parametrize("model,devices", CASES, ids=[f"{m}-{'+'.join(d)}" for m, d in CASES])
def test_milp_matches_exhaustive_search_on_the_authors_profiles(model, devices):
    topo, profiles, samples = reference(model, devices)
    best = plan_bruteforce(topo, profiles, samples)
    milp = plan_milp(topo, profiles, samples)
    assert milp.digest == best.digest
    assert milp.period_seconds == pytest.approx(best.period_seconds)
    if len(set(devices)) == 1:
        assert plan_dp(topo, profiles, samples).digest == best.digest
        assert make_plan(topo, profiles, samples).method == "dp"
    else:
        assert make_plan(topo, profiles, samples).method == "milp"


def test_auto_scores_every_plan_where_there_are_few_and_finds_the_milp_s():
    """With the owners' cuts fixed (as a re-plan keeps them) and three layers between them, the
    three compute nodes have one split in 6 chain orders (3 once the two identical VMs keep name
    order) to score, milliseconds where HiGHS takes tens of them. Left free, the cuts of
    resnet101 are too many to score."""
    topo, profiles, samples = reference("resnet101", ["VM", "laptop", "VM"])
    plan = make_plan(topo, profiles, samples)
    assert plan.method == "milp"
    fixed = topo.with_changes(first_cut=plan.owner_first[1], last_cut=plan.owner_first[1] + 3)
    few = make_plan(fixed, profiles, samples)
    assert few.method == "bruteforce"
    assert few.digest == plan_milp(fixed, profiles, samples).digest


def test_memory_objective_and_tight_memory_on_the_authors_profiles():
    topo, profiles, samples = reference("vgg19", ["VM", "laptop", "VM"], memory="30GiB", objective="memory")
    best = plan_bruteforce(topo, profiles, samples)
    assert plan_milp(topo, profiles, samples).digest == best.digest
    assert all(best.peak_memory_bytes[s.node] <= 30 * 2**30 for s in best.chain)
    timed = make_plan(topo, profiles, samples, objective="time")
    assert max(timed.peak_memory_bytes[n] for n in timed.nodes) >= max(best.peak_memory_bytes[n] for n in best.nodes)


def test_compute_bound_period_matches_spec():
    topo, profiles, samples = reference("resnet101", ["VM"] * 4)
    plan = make_plan(topo, profiles, samples)
    work = costmodel.workload(plan, topo, profiles)
    worst = max(max(work.loads[n].values()) for n in plan.nodes)
    assert plan.period_seconds == pytest.approx(max(16 * worst, max(work.cycles.values())))


# -- random small instances ----------------------------------------------------------------------

@st.composite
def instances(draw):
    """A topology, per-peer profiles and sample counts small enough to enumerate every plan."""
    layers = draw(st.integers(4, 8))
    n = draw(st.integers(1, min(4, layers - 2)))
    k = draw(st.integers(1, 3))
    times = st.floats(0.01, 2.0, allow_nan=False)
    fwd = draw(st.lists(times, min_size=layers, max_size=layers))
    bwd = draw(st.lists(times, min_size=layers, max_size=layers))
    opt = draw(st.lists(st.floats(0.0, 0.5), min_size=layers, max_size=layers))
    act = draw(st.lists(st.integers(1, 64 * MIB), min_size=layers, max_size=layers))
    par = draw(st.lists(st.integers(0, 64 * MIB), min_size=layers, max_size=layers))
    base = Profile("r", 8, tuple(fwd), tuple(bwd), tuple(opt), tuple(act), tuple(par))
    same = draw(st.booleans())
    speeds = [1.0] * n if same else draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=n, max_size=n))
    memory = ["8GiB"] * n if same else draw(st.lists(st.sampled_from(["600MiB", "1GiB", "2GiB", "8GiB"]),
                                                      min_size=n, max_size=n))
    peers = owners(k, memory=draw(st.sampled_from(["500MiB", "2GiB"]))) + nodes(
        *({"memory": m, "speed": s} for m, s in zip(memory, speeds)))
    training = {"batch_size": 8, "objective": draw(st.sampled_from(["time", "memory"])),
                "micro_batches": draw(st.sampled_from([1, 1, 2, 3, 4]))}
    if draw(st.booleans()):
        training["first_cut"] = draw(st.integers(1, layers - n - 1))
    if draw(st.booleans()):
        training["last_cut"] = draw(st.integers(training.get("first_cut", 1) + n, layers - 1))
    links = draw(_links([p["name"] for p in peers], [p["name"] for p in peers if p["role"] == "compute"]))
    try:
        topo = parse_topology(toml(peers, links, **training))
    except TopologyError:
        assume(False)
    profiles = {p.name: base.scaled(p.speed) for p in topo.peers}
    samples = {o.name: draw(st.sampled_from([8, 16, 24])) for o in topo.owners}
    return topo, profiles, samples


@st.composite
def _links(draw, names: list[str], compute: list[str]) -> list[dict]:
    """No links, or every pair linked (a few compute pairs left out) with random costs."""
    if draw(st.booleans()):
        return []
    out = []
    for index, a in enumerate(names):
        for b in names[index + 1:]:
            if a in compute and b in compute and draw(st.integers(0, 3)) == 0:
                continue
            out.append({"a": a, "b": b, "bandwidth": draw(st.sampled_from([None, "100Mbit/s", "1Gbit/s"])),
                        "latency": draw(st.sampled_from([None, "5ms"]))})
    return out


def _solve(method, topo, profiles, samples):
    try:
        return method(topo, profiles, samples)
    except PlanInfeasible:
        return None


@settings(max_examples=int(os.environ.get("P2PSL_PLANNER_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(instances())
def test_milp_dp_and_bruteforce_agree(instance):
    """Same plan from all methods, batches whole or cut into micro-batches (the cuts are
    chosen for them) (P2PSL_PLANNER_EXAMPLES=2000 for a thorough run)."""
    topo, profiles, samples = instance
    best = _solve(plan_bruteforce, topo, profiles, samples)
    milp = _solve(plan_milp, topo, profiles, samples)
    event("infeasible" if best is None else f"{len(topo.compute_nodes)} nodes, links: {bool(topo.links)}")
    if best is None:
        assert milp is None
        return
    problem = Problem.build(topo, profiles, samples)
    assert milp is not None
    assert problem.score(milp) == pytest.approx(problem.score(best), rel=1e-6)
    assert milp.digest == best.digest
    if problem.homogeneous:
        assert plan_dp(topo, profiles, samples).digest == best.digest


# -- infeasibility, determinism, links -----------------------------------------------------------

def _uniform(layers: int = 8, params: int = 200 * MIB) -> Profile:
    return Profile("u", 8, (0.1,) * layers, (0.2,) * layers, (0.0,) * layers, (MIB,) * layers, (params,) * layers)


def test_too_few_middle_layers_for_the_chain_are_counted_in_words():
    topo = parse_topology(toml(owners(2) + nodes({}, {}), batch_size=8, first_cut=2, last_cut=3))
    with pytest.raises(PlanInfeasible, match=r"^1 layer between the owners' parts \(layer 3\) cannot give each "
                                             r"of 2 compute nodes a layer$"):
        make_plan(topo, {p.name: _uniform() for p in topo.peers}, {"o00": 8, "o01": 8})


def test_infeasible_memory_names_the_node():
    topo = parse_topology(toml(owners(4) + nodes({"memory": "64GiB"}, {"memory": "2GiB"}), batch_size=8,
                               first_cut=1, last_cut=7))
    profiles = {p.name: _uniform() for p in topo.peers}
    with pytest.raises(PlanInfeasible, match=r"c2 needs .* GiB for 4 copies of (layer \d+|layers \d+–\d+), has 2\.0 GiB"):
        make_plan(topo, profiles, {f"o{k:02d}": 8 for k in range(4)})


def test_infeasible_owner_memory_names_the_owner():
    topo = parse_topology(toml(owners(2, memory="300MiB") + nodes({}), batch_size=8))
    profiles = {p.name: _uniform() for p in topo.peers}
    with pytest.raises(PlanInfeasible, match=r"o00 needs .* for layers? 1 and 8 .*has 300\.0 MiB"):
        make_plan(topo, profiles, {"o00": 8, "o01": 8})


def test_too_few_layers_is_infeasible():
    topo = parse_topology(toml(owners(1) + nodes({}, {}, {}), batch_size=8, first_cut=2, last_cut=4))
    with pytest.raises(PlanInfeasible, match="3 compute nodes"):
        make_plan(topo, {p.name: _uniform() for p in topo.peers}, {"o00": 8})


def test_no_compute_node_left_is_infeasible_for_every_method():
    """Re-planning after every compute node is gone: a clear refusal, never StopIteration."""
    topo = parse_topology(toml(owners(2) + nodes({}, {}), batch_size=8))
    profiles = {p.name: _uniform() for p in topo.peers}
    left = topo.without_peers({"c00", "c01"} | {p.name for p in topo.compute_nodes})
    for method in ("auto", "milp", "dp", "bruteforce"):
        with pytest.raises(PlanInfeasible, match="no compute node"):
            make_plan(left, profiles, {"o00": 8, "o01": 8}, method=method)


def test_losing_the_middle_of_a_chain_is_infeasible_for_every_method():
    """Owners linked to the chain's ends only: without c2, c1 and c3 form no chain."""
    links = [{"a": "c1", "b": "c2"}, {"a": "c2", "b": "c3"}]
    links += [{"a": o["name"], "b": end} for o in owners(2) for end in ("c1", "c3")]
    topo = parse_topology(toml(owners(2) + nodes({}, {}, {}), links, batch_size=8))
    profiles = {p.name: _uniform() for p in topo.peers}
    left = topo.without_peers({"c2"})
    for method in ("auto", "milp", "dp", "bruteforce"):
        with pytest.raises(PlanInfeasible, match=r"compute nodes \(c1, c3\) cannot form a chain"):
            make_plan(left, profiles, {"o00": 8, "o01": 8}, method=method)


def test_equal_inputs_give_equal_plans_that_callers_own():
    """Peers sharing a process share one solve ([Note: one plan per process]); each still gets
    its own plan object, and inputs that differ in anything get their own solve."""
    topo, profiles, samples = _mixed()
    first = make_plan(topo, profiles, samples)
    again = make_plan(parse_topology(toml(owners(3) + nodes({"speed": 2.0}, {"speed": 0.5},
                                                             {"speed": 1.0, "memory": "3GiB"}), batch_size=8)),
                      dict(profiles), dict(samples))
    assert again == first and again.peak_memory_bytes == first.peak_memory_bytes
    again.peak_memory_bytes.clear()
    assert make_plan(topo, profiles, samples).peak_memory_bytes == first.peak_memory_bytes
    fewer = make_plan(topo, profiles, {**samples, "o01": 8})  # o01 has the most
    assert fewer.round_seconds < first.round_seconds


def _mixed():
    text = toml(owners(3) + nodes({"speed": 2.0}, {"speed": 0.5}, {"speed": 1.0, "memory": "3GiB"}), batch_size=8)
    topo = parse_topology(text)
    base = Profile("m", 8, tuple(0.05 * (j % 3 + 1) for j in range(12)), (0.1,) * 12, (0.01,) * 12,
                   (MIB,) * 12, (8 * MIB,) * 12)
    return topo, {p.name: base.scaled(p.speed) for p in topo.peers}, {"o00": 64, "o01": 80, "o02": 64}


def test_plans_are_deterministic():
    topo, profiles, samples = _mixed()
    first = make_plan(topo, profiles, samples)
    second = make_plan(topo, dict(reversed(list(profiles.items()))), dict(samples))
    assert first.method == "milp" and first.digest == second.digest and first == second


def test_chain_order_respects_the_links():
    # the fast node would be put first, but only c1 and c3 reach the owners and c2 sits between
    peers = owners(2) + nodes({"speed": 0.5}, {"speed": 4.0}, {"speed": 0.5})
    links = [{"a": o, "b": c} for o in ("o00", "o01") for c in ("c1", "c3")] + [
        {"a": "c1", "b": "c2"}, {"a": "c2", "b": "c3"}]
    topo = parse_topology(toml(peers, links, batch_size=8))
    base = Profile("m", 8, (0.1,) * 10, (0.2,) * 10, (0.0,) * 10, (MIB,) * 10, (MIB,) * 10)
    profiles = {p.name: base.scaled(p.speed) for p in topo.peers}
    plan = make_plan(topo, profiles, {"o00": 80, "o01": 80})
    assert plan.nodes in (("c1", "c2", "c3"), ("c3", "c2", "c1"))
    assert plan.digest == plan_bruteforce(topo, profiles, {"o00": 80, "o01": 80}).digest


def test_even_plan_and_table():
    topo, profiles, samples = _mixed()
    even = even_plan(topo, 12)
    assert [(s.first, s.last) for s in even.chain] == [(2, 5), (6, 8), (9, 11)] and even.method == "even"
    best = make_plan(topo, profiles, samples)
    assert best.period_seconds <= even_plan(topo, 12, profiles, samples).period_seconds
    text = format_plan(best, costmodel.predict(best, topo, profiles, samples), topo)
    for needle in ("c1", "o02", "data owner", "compute #1", "GiB", "period", "bottleneck", best.digest[:12]):
        assert needle in text


def test_no_solver_banner_on_stdout():
    """HiGHS prints a banner on the first instance in a process; `p2psl plan --json` must not."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import test_planner as t\n"
        "from p2psl.planning.planner import make_plan\n"
        "topo, profiles, samples = t._mixed()\n"
        "make_plan(topo, profiles, samples, method='milp')\n"
    ) % str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=_ROOT)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b""

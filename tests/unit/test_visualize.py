"""The topology and plan picture: what it says (links, layers, memory), and that it stays readable
from 2 peers to 30 (boxes never overlap, the picture grows instead)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.text import Text

from p2psl.planning.plan import plan_from_cuts
from p2psl.viz.layout import scene
from p2psl.viz.topology import draw_topology, write_picture
from tests.helpers import make_topology, topology_toml

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


def two_peers():
    topology = make_topology(["alice"], ["c1"], links=[("alice", "c1", "8Mbit/s", "20ms")], memory="1GiB")
    plan = plan_from_cuts([2, 4], ["c1"], ["alice"], 6, period_seconds=0.012, round_seconds=1.5,
                          peak_memory_bytes={"alice": 300 * MIB, "c1": 1536 * MIB})
    return topology, plan


def thirty_peers():
    owners = [f"phone{i:02d}" for i in range(1, 26)]
    nodes = [f"edge{i}" for i in range(1, 6)]
    links = [(a, b, "1Gbit/s", "1ms") for a, b in zip(nodes, nodes[1:])]
    links += [(o, n, "50Mbit/s", "15ms") for o in owners for n in (nodes[0], nodes[-1])]
    topology = make_topology(owners, nodes, links=links, memory="2GiB")
    plan = plan_from_cuts([3, 6, 9, 12, 15, 18], nodes, owners, 25, period_seconds=0.5, round_seconds=60.0,
                          peak_memory_bytes={n: 700 * MIB for n in owners + nodes})
    return topology, plan


def test_picture_names_links_layers_and_memory():
    topology, plan = two_peers()
    text = texts(draw_topology(topology, plan))
    assert "8 Mbit/s · 20 ms" in text
    assert "layers 3–4" in text            # c1's segment
    assert "keeps layers 1–2 and 5–6" in text
    assert "300.0 MiB / 1.0 GiB (29%)" in text
    assert "the planner's period 12 ms, round 1.5 s (without the runtime's costs)" in text


def test_over_capacity_is_flagged():
    topology, plan = two_peers()
    text = texts(draw_topology(topology, plan))
    assert "1.5 GiB / 1.0 GiB (150%)" in text  # c1 is given 1 GiB in two_peers


def test_without_a_plan_only_the_topology_is_drawn():
    topology, _ = two_peers()
    text = texts(draw_topology(topology, None))
    assert "no prediction" in text and "(no plan)" in text and "layers" not in text


def test_fully_connected_topology_draws_only_the_links_a_batch_uses():
    topology = make_topology(["a", "b", "c"], ["x", "y"])
    edges = scene(topology).edges
    assert {frozenset((e.a, e.b)) for e in edges} == {frozenset(p) for p in
                                                      [("x", "y"), ("a", "x"), ("b", "x"), ("c", "x"),
                                                       ("a", "y"), ("b", "y"), ("c", "y")]}
    assert all(e.implicit and e.label == "free" for e in edges)


def test_layout_follows_the_chain_order_of_the_plan():
    topology = make_topology(["a"], ["x", "y", "z"])
    plan = plan_from_cuts([1, 2, 3, 4], ["z", "x", "y"], ["a"], 5)
    sc = scene(topology, plan)
    ys = {n.name: n.y for n in sc.nodes}
    assert ys["z"] < ys["x"] < ys["y"]
    assert {n.name: n.x for n in sc.nodes} == {"a": 0.0, "x": 1.0, "y": 1.0, "z": 1.0}


def _box_extents(fig):
    fig.draw_without_rendering()
    return [t.get_bbox_patch().get_window_extent() for t in fig.findobj(Text) if t.get_bbox_patch() is not None]


@pytest.mark.parametrize("make", [two_peers, thirty_peers], ids=["2 peers", "30 peers"])
def test_boxes_never_overlap(make):
    topology, plan = make()
    boxes = _box_extents(draw_topology(topology, plan))
    assert len(boxes) == len(topology.peers)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two peer boxes overlap"


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_every_format_is_written(tmp_path, suffix):
    topology, plan = two_peers()
    out = write_picture(topology, plan, tmp_path / f"t{suffix}")
    data = out.read_text(encoding="utf-8", errors="replace") if suffix != ".png" else ""
    if suffix == ".png":
        image = matplotlib.image.imread(out)
        assert image.shape[1] >= 800 and image.shape[0] >= 300
    elif suffix == ".svg":
        ET.fromstring(out.read_bytes())  # well-formed
        assert "alice" in data and "8 Mbit/s · 20 ms" in data  # text kept as text
    else:
        assert data.startswith("<!doctype html>") and "<svg" in data
        assert "<td>alice</td>" in data and "<td>8 Mbit/s · 20 ms</td>" in data and '"digest"' in data


def test_thirty_peers_grow_the_picture_instead_of_shrinking_it(tmp_path):
    small = matplotlib.image.imread(write_picture(*two_peers(), tmp_path / "2.png"))
    large = matplotlib.image.imread(write_picture(*thirty_peers(), tmp_path / "30.png"))
    assert large.shape[0] > 3 * small.shape[0]
    assert abs(large.shape[1] - small.shape[1]) < 0.2 * small.shape[1]


# -- the command ---------------------------------------------------------------------------------

def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "visualize.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_tool_draws_a_given_plan(tmp_path):
    topology, plan = two_peers()
    (tmp_path / "t.toml").write_text(topology_toml(["alice"], ["c1"], links=[("alice", "c1", "8Mbit/s", "20ms")]))
    import json

    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--plan", str(tmp_path / "plan.json"),
                      "--out", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    assert matplotlib.image.imread(tmp_path / "out.png").shape[1] >= 800


def test_tool_computes_a_plan_when_none_is_given(tmp_path):
    # a profile table for the six layers of the digits CNN, so planning measures nothing
    rows = ["layer,act_KiB,param_KiB,VM_fwd_ms,VM_bwd_ms,VM_opt_ms"]
    rows += [f"{j},{64 - 8 * j},{4 * j},{0.2 * j:.1f},{0.4 * j:.1f},0.05" for j in range(1, 7)]
    (tmp_path / "cnn_bs32.csv").write_text("\n".join(rows) + "\n")
    text = topology_toml(["alice"], ["c1", "c2"], memory="16GiB",
                         training={"model": "cnn", "dataset": "digits", "profile": "cnn_bs32.csv"})
    (tmp_path / "t.toml").write_text(text)
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--out", str(tmp_path / "out.svg"))
    assert result.returncode == 0, result.stderr
    svg = (tmp_path / "out.svg").read_text(encoding="utf-8")
    assert "c1 · part 1" in svg and "c2 · part 2" in svg and "the planner's period" in svg


def test_tool_refuses_a_plan_of_another_deployment(tmp_path):
    (tmp_path / "t.toml").write_text(topology_toml(["alice"], ["c1"]))
    import json

    other = plan_from_cuts([2, 4], ["zed"], ["alice"], 6)
    (tmp_path / "plan.json").write_text(json.dumps(other.to_json()))
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--plan", str(tmp_path / "plan.json"),
                      "--out", str(tmp_path / "out.png"))
    assert result.returncode == 2
    assert "zed" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_tool_refuses_an_unknown_extension(tmp_path):
    (tmp_path / "t.toml").write_text(topology_toml(["alice"], ["c1"]))
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--out", str(tmp_path / "out.jpg"))
    assert result.returncode == 2 and ".png, .svg, .html" in result.stderr


def test_tool_says_a_missing_plan_file_is_bad_input(tmp_path):
    (tmp_path / "t.toml").write_text(topology_toml(["alice"], ["c1"]))
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--plan", str(tmp_path / "none.json"),
                      "--out", str(tmp_path / "out.png"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"ConfigError: cannot read the plan {tmp_path / 'none.json'}: No such file or directory"


def test_tool_reads_the_plan_of_a_run_folder_and_refuses_one_of_another_model(tmp_path):
    (tmp_path / "t.toml").write_text(topology_toml(["alice"], ["c1"]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text(json.dumps(plan_from_cuts([2, 4], ["c1"], ["alice"], 6).to_json()))
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--plan", str(tmp_path / "run"),
                      "--out", str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    (tmp_path / "run" / "plan.json").write_text(json.dumps(plan_from_cuts([2, 4], ["c1"], ["alice"], 25).to_json()))
    result = run_tool("--topology", str(tmp_path / "t.toml"), "--plan", str(tmp_path / "run"),
                      "--out", str(tmp_path / "other.png"))
    assert result.returncode == 2
    assert f"the plan cuts 25 layers, {tmp_path / 't.toml'}'s model 'cnn' has 6" in result.stderr
    assert not (tmp_path / "other.png").exists()

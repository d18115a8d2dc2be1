"""The pipeline timeline: reading a merged trace, the measured period, and the picture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.text import Text

from p2psl.errors import ConfigError
from p2psl.planning.plan import plan_from_cuts
from p2psl.runtime.trace import WORKER, Tracer, merge_traces
from p2psl.viz.timeline import (busy_share, draw_timeline, lanes, load_trace, measured_period, owners_of,
                                parse_events, rounds)

ROOT = Path(__file__).resolve().parents[2]
PERIOD = 0.010   # seconds between an owner's batches, by construction
T0 = 1.7e15      # wall-clock microseconds, like real traces


def synthetic_trace(tmp_path: Path, batches: int = 6, fill: float = 0.0) -> Path:
    """Two owners (a, b) and one compute node x: each owner finishes a batch every PERIOD."""
    tracers = {name: Tracer(name) for name in ("a", "b", "x")}
    tracers["x"].add("build", "compute", T0, T0 + 2e6, WORKER)
    for round_ in (1, 2):
        start = T0 + 3e6 + (round_ - 1) * 1e6 + fill * 1e6
        for k in range(batches):
            for shift, owner in ((0.0, "a"), (0.004, "b")):
                t = start + (k * PERIOD + shift) * 1e6
                ids = dict(owner=owner, round=round_, batch=k + 1)
                tracers[owner].add("forward", "compute", t, t + 500, WORKER, **ids)
                tracers["x"].add("forward", "compute", t + 600, t + 1600, WORKER, **ids)
                tracers["x"].add("send activation", "network", t + 1600, t + 1700, 0, dst=owner, **ids)
                tracers[owner].add("loss+backward", "compute", t + 1800, t + 2300, WORKER, **ids)
                tracers["x"].add("backward", "compute", t + 2400, t + 3400, WORKER, **ids)
                tracers[owner].add("backward", "compute", t + 3500, t + 3900, WORKER, **ids)
        tracers["a"].add("evaluate", "compute", start + 0.5e6, start + 0.51e6, WORKER, owner="a", round=round_, batch=1)
    paths = {}
    for name, tracer in tracers.items():
        tracer.write(tmp_path / f"{name}.json")
        paths[name] = tmp_path / f"{name}.json"
    merge_traces(paths, tmp_path / "trace.json")
    return tmp_path / "trace.json"


def plan():
    return plan_from_cuts([1, 2], ["x"], ["a", "b"], 3, period_seconds=0.004, round_seconds=0.1)


def test_merged_trace_has_every_peer_named(tmp_path):
    trace = load_trace(synthetic_trace(tmp_path))
    assert set(trace.peers) == {"a", "b", "x"}
    assert {s.peer for s in trace.spans} == {"a", "b", "x"}
    assert min(s.start for s in trace.spans) == 0.0


def test_measured_period_is_the_time_between_an_owners_batches(tmp_path):
    trace = load_trace(synthetic_trace(tmp_path))
    assert measured_period(trace, ["a", "b"]) == pytest.approx(PERIOD, rel=1e-6)


def test_measured_period_leaves_out_the_pipeline_fill(tmp_path):
    trace = load_trace(synthetic_trace(tmp_path, fill=0.5))
    assert measured_period(trace, owners_of(trace)) == pytest.approx(PERIOD, rel=1e-6)


def test_no_period_without_three_batches(tmp_path):
    trace = load_trace(synthetic_trace(tmp_path, batches=2))
    assert measured_period(trace, ["a", "b"]) is None


def test_rounds_lanes_and_utilisation(tmp_path):
    trace = load_trace(synthetic_trace(tmp_path))
    spans = rounds(trace)
    assert sorted(spans) == [1, 2]
    first, last = spans[1]
    assert last - first == pytest.approx(5 * PERIOD + 0.004 + 0.0039, rel=1e-6)
    assert lanes(trace, plan()) == ["a", "b", "x"]
    assert busy_share(trace, "x", first, last) == pytest.approx(12 * 0.002 / (last - first), rel=1e-6)


def test_evaluation_spans_are_not_batches(tmp_path):
    trace = load_trace(synthetic_trace(tmp_path))
    evaluate = [s for s in trace.spans if s.name == "evaluate"]
    assert evaluate and not any(s.training for s in evaluate)


def test_picture_marks_measured_and_predicted_period(tmp_path):
    fig = draw_timeline(load_trace(synthetic_trace(tmp_path)), plan())
    text = "\n".join(t.get_text() for t in fig.findobj(Text))
    assert "measured period 10 ms" in text and "predicted period 4 ms" in text
    assert "measured 10 ms, predicted 4 ms (measured/predicted 2.50×)" in text
    for name in ("a", "b", "x"):
        assert name in text   # a lane per peer
    assert "round 1" in text and "round 2" in text


def test_trace_without_spans_is_refused():
    with pytest.raises(ConfigError):
        draw_timeline(parse_events([]))


def test_not_a_trace_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a Chrome trace"):
        load_trace(tmp_path / "bad.json")


def test_tool_writes_a_png_and_prints_the_period(tmp_path):
    trace = synthetic_trace(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(plan().to_json()))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "timeline.py"), "--trace", str(trace), "--plan",
                             str(tmp_path / "plan.json"), "--out", str(tmp_path / "timeline.png")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "period measured 10 ms, predicted 4 ms" in result.stdout
    image = matplotlib.image.imread(tmp_path / "timeline.png")
    assert image.shape[1] >= 1000 and image.shape[0] >= 500


def test_tool_reports_a_missing_trace(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "timeline.py"), "--trace",
                             str(tmp_path / "nope.json"), "--out", str(tmp_path / "t.png")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "cannot read the trace" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,problem", [
    (["--round", "3"], "ConfigError: --round 3: the trace has rounds 1–2"),
    (["--plan", "OTHER"], "ConfigError: the trace has none of the plan's compute nodes (y): give the plan.json of "
                          "the same run"),
])
def test_tool_refuses_a_round_or_a_plan_the_run_did_not_have(tmp_path, args, problem):
    trace = synthetic_trace(tmp_path)
    other = plan_from_cuts([1, 2], ["y"], ["a", "b"], 3)
    (tmp_path / "other.json").write_text(json.dumps(other.to_json()))
    args = [str(tmp_path / "other.json") if a == "OTHER" else a for a in args]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "timeline.py"), "--trace", str(trace), *args,
                             "--out", str(tmp_path / "t.png")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip() == problem
    assert not (tmp_path / "t.png").exists()


def test_tool_draws_a_run_whose_peer_died_with_its_plan(tmp_path):
    """A peer that died wrote no trace, but its run's plan still names it."""
    trace = synthetic_trace(tmp_path)
    with_dead = plan_from_cuts([1, 2], ["x"], ["a", "b", "dead"], 3)
    (tmp_path / "plan.json").write_text(json.dumps(with_dead.to_json()))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "timeline.py"), "--trace", str(trace), "--plan",
                             str(tmp_path / "plan.json"), "--out", str(tmp_path / "t.png")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr

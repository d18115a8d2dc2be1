"""Terminal progress: bars over rounds and per owner's batches, ETA, utilisation, round history."""

from __future__ import annotations

import io

import pytest

from p2psl.cli.progress import Live, ProgressView, bar, format_duration
from tests.helpers import make_topology


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def topology(rounds: int = 4):
    return make_topology(["alice", "bob"], ["c1", "c2"], training={"rounds": rounds})


def owner(round_: int, batch: int, batches: int = 10, state: str = "training", **extra) -> dict:
    return {"role": "data_owner", "state": state, "round": round_, "rounds": 4, "batch": batch, "batches": batches,
            "loss": 0.5, **extra}


def compute(round_: int, busy: float, state: str = "forward", accuracy=None, loss=None) -> dict:
    return {"role": "compute", "state": state, "round": round_, "rounds": 4, "batch": 7, "busy_seconds": busy,
            "accuracy": accuracy, "loss": loss}


def test_bar_has_eighth_block_resolution():
    assert bar(0.0, 8) == "········"
    assert bar(1.0, 8) == "████████"
    assert bar(0.5 + 1 / 64, 8) == "████▏···"


def test_durations():
    assert format_duration(65) == "1:05" and format_duration(3725) == "1:02:05" and format_duration(None) == "—"


def test_fraction_counts_rounds_and_batches():
    live = Live(topology())
    statuses = {"alice": owner(2, 5), "bob": owner(1, 10, state="aggregating")}
    # alice: (1 + 0.5) / 4, bob: (0 + 1) / 4
    assert live.fraction(statuses) == pytest.approx((1.5 / 4 + 1 / 4) / 2)
    assert live.current_round(statuses) == 2


def test_eta_extrapolates_training_time_not_start_up():
    clock = Clock()
    live = Live(topology(), clock)
    live.observe({"alice": owner(0, 0, state="building")})
    clock.now += 30           # start-up does not count
    live.observe({"alice": owner(1, 0)})
    clock.now += 10
    assert live.eta(0.25) == pytest.approx(30.0)   # 10 s for a quarter: 30 s to go
    assert live.eta(0.01) is None and live.eta(1.0) is None


def test_eta_counts_only_the_progress_made_since_training_was_first_seen():
    """Rounds faster than the launcher looks: the first look already finds a round done, and
    that round took time the clock did not see."""
    clock = Clock()
    live = Live(topology(), clock)
    live.observe({"alice": owner(2, 0), "bob": owner(2, 0)})  # a quarter done at the first look
    assert live.eta(0.25) is None                            # no progress seen yet, no guess
    clock.now += 10
    assert live.eta(0.5) == pytest.approx(20.0)   # a quarter more in 10 s: the half left in 20 s


def test_utilisation_is_recent_and_ignores_building():
    clock = Clock()
    live = Live(topology(), clock)
    live.observe({"c1": compute(0, 0.0, state="building")})
    clock.now += 1
    live.observe({"c1": compute(1, 3.0)})        # the build finished: 3 busy seconds at once
    for _ in range(4):
        clock.now += 1
        live.observe({"c1": compute(1, live._busy["c1"][-1][1] + 0.25)})
    assert live.utilisation("c1") == pytest.approx(0.25)
    assert live.pipeline_utilisation() == pytest.approx(0.25)   # c2 has no samples yet


def test_round_history_is_read_when_the_next_round_begins():
    live = Live(topology())
    live.observe({"c1": compute(1, 0.0)})
    assert live.rounds_seen() == []
    live.observe({"c1": compute(2, 0.0, accuracy=0.8, loss=0.4)})
    live.observe({"c1": compute(2, 0.0, state="finishing", accuracy=0.9, loss=0.2)})
    assert live.rounds_seen() == [{"round": 1, "accuracy": 0.8, "loss": 0.4, "seconds": None, "predicted": None},
                                  {"round": 2, "accuracy": 0.9, "loss": 0.2, "seconds": None, "predicted": None}]


def test_round_history_keeps_measured_and_predicted_round_times():
    live = Live(topology())
    live.observe({"c1": {**compute(2, 0.0, accuracy=0.8, loss=0.4), "round_seconds": 1.5, "predicted_seconds": 1.4}})
    assert live.rounds_seen() == [{"round": 1, "accuracy": 0.8, "loss": 0.4, "seconds": 1.5, "predicted": 1.4}]


def test_terminal_view_draws_a_bar_per_owner_and_a_header():
    clock = Clock()
    view = ProgressView(topology(), stream=io.StringIO(), clock=clock)
    statuses = {"alice": owner(2, 5), "bob": owner(2, 10), "c1": compute(2, 1.0), "c2": compute(2, 1.0)}
    view.live.observe({"alice": owner(1, 0)})
    clock.now += 20
    view.live.observe(statuses)
    header, alice, bob, c1, c2 = view.lines(statuses, {})
    assert header.startswith("round 2/4") and "ETA" in header
    view.live.observe({**statuses, "c1": compute(3, 1.0, accuracy=0.8, loss=0.4)})
    assert "round 2: test acc 0.800, train loss 0.400" in view.lines(statuses, {})[0]
    assert "batch 5/10" in alice and "██████······" in alice
    assert "batch 10/10" in bob and "████████████" in bob
    assert "7 batches served" in c1 and "training" in c1


def test_finished_peers_show_full_bars():
    view = ProgressView(topology(), stream=io.StringIO())
    statuses = {"alice": owner(4, 3), "bob": owner(4, 10), "c1": compute(4, 1), "c2": compute(4, 1)}
    lines = view.lines(statuses, {"alice": 0, "bob": 0, "c1": 0, "c2": 1})
    assert "batch 10/10" in lines[1] and "finished" in lines[1]
    assert "loss" not in lines[1]  # its last snapshot's loss is of some batch before the end
    assert "failed (exit 1)" in lines[4]


def test_log_output_prints_once_per_round_not_per_batch():
    printed: list[str] = []
    view = ProgressView(topology(), echo=printed.append, stream=io.StringIO())
    for batch in range(1, 6):
        view.update({"alice": owner(1, batch), "bob": owner(1, batch)}, {})
    headers = [line for line in printed if line.startswith("round")]
    assert len(headers) == 1
    view.update({"alice": owner(2, 1), "bob": owner(2, 1)}, {})
    assert len([line for line in printed if line.startswith("round")]) == 2


def test_many_owners_are_summed_up_with_the_slowest_shown():
    names = [f"o{i:03d}" for i in range(100)]
    view = ProgressView(make_topology(names, ["c1", "c2"], training={"rounds": 4}), stream=io.StringIO())
    statuses = {n: owner(2, 9 if i % 10 else 3, state="training" if i % 4 else "evaluating")
                for i, n in enumerate(names)}
    statuses.update(c1=compute(2, 1.0), c2=compute(2, 1.0))
    header, summary, *rest = view.lines(statuses, {"o007": 1})
    assert len(rest) == 5 + 2  # the five slowest owners, then the compute nodes
    assert summary.startswith("  100 owners:") and "1 failed (exit 1)" in summary and "batches" in summary
    assert [line.split()[0] for line in rest] == ["o007", "o000", "o010", "o020", "o030", "c1", "c2"]
    printed: list[str] = []
    logged = ProgressView(view.topology, echo=printed.append, stream=io.StringIO())
    for batch in range(1, 4):
        logged.update({n: owner(1, batch) for n in names}, {})
    assert len(printed) == 2 + 2  # the header, the owners' line, a line per compute node


def test_round_records_fill_the_history_however_short_the_rounds():
    live = Live(topology())
    live.observe({"c1": compute(5, 0.0, accuracy=0.8, loss=0.4)})  # a look at /status caught round 4 only
    for n in (1, 2, 3, 4):
        live.add_round({"event": "round", "round": n, "test_accuracy": n / 10, "train_loss": 1 / n,
                        "seconds": 0.3, "predicted_seconds": 0.31})
    assert [h["round"] for h in live.rounds_seen()] == [1, 2, 3, 4]
    assert live.rounds_seen()[0] == {"round": 1, "accuracy": 0.1, "loss": 1.0, "seconds": 0.3, "predicted": 0.31}
    assert live.rounds_seen()[3]["accuracy"] == 0.4  # a record wins over a look at /status
    live.add_round({"event": "round", "round": 4, "test_accuracy": 0.45})  # round 4 again, after a resume
    assert live.rounds_seen()[3]["accuracy"] == 0.45


def test_a_failed_owner_counts_as_far_as_it_got_not_as_done():
    live = Live(topology())
    failed = owner(2, 5, state="failed", exit_code=-9)
    assert live.owner_fraction(failed) == pytest.approx(1.5 / 4)
    assert live.owner_fraction(owner(4, 10, state="finished")) == 1.0

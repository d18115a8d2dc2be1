"""The end-of-run report's peer table: every peer with few owners, a summary with many."""

from __future__ import annotations

from p2psl.cli.summary import peer_lines

MiB = 2**20


def peer(name: str, role: str, sent: int) -> dict:
    return {"name": name, "role": role, "peak_rss_bytes": 300 * MiB, "bytes_sent": sent * MiB,
            "bytes_received": sent * MiB}


def test_few_owners_get_a_row_each():
    lines = peer_lines([peer("alice", "data_owner", 3), peer("bob", "data_owner", 4), peer("c1", "compute", 9)])
    assert [line.split()[0] for line in lines[2:]] == ["alice", "bob", "c1"]


def test_many_owners_are_summed_up_with_the_three_that_sent_most():
    owners = [peer(f"owner{k:03d}", "data_owner", k) for k in range(1, 101)]
    lines = peer_lines([*owners, peer("c1", "compute", 500)], shared_process=True)
    text = "\n".join(lines)
    assert len(lines) < 12 and "owner050" not in text
    assert "100 data owners, least / median / most" in text and "sent 1.0 MiB / 50.0 MiB / 100.0 MiB" in text
    assert [line.split()[0] for line in lines if line.startswith("owner")] == ["owner100", "owner099", "owner098"]
    assert lines[2].startswith("c1") and "one process" in lines[-1]


def summary_of(tmp_path, rounds: int, codes=None) -> str:
    """The run's report over `rounds` round records (none: a run that failed at start)."""
    import json

    from p2psl.cli.summary import summarise
    from tests.helpers import make_topology

    topology = make_topology(["alice"], ["c1"], training={"rounds": 3})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for n in range(1, rounds + 1):
            f.write(json.dumps({"event": "round", "round": n, "train_loss": 1.0, "test_accuracy": 0.5,
                                "seconds": 1.0, "predicted_seconds": 1.1, "planned_seconds": 1.2}) + "\n")
    report, _ = summarise(topology, tmp_path, codes or {"alice": 0, "c1": 0}, 3.0, baseline=False)
    return report["text"]


def test_the_prediction_line_names_the_rounds_it_covers(tmp_path):
    assert "round 1 10.0 %\n" in summary_of(tmp_path, 1) + "\n"  # no "rounds 2–1"
    assert "round 1 10.0 %, round 2 10.0 % (calibrated after every round; the plan's own model: 20.0 %)" \
        in summary_of(tmp_path, 2)
    assert "round 1 10.0 %, rounds 2–3 median 10.0 %" in summary_of(tmp_path, 3)


def test_a_run_that_trained_nothing_shows_no_table_and_lists_only_what_it_wrote(tmp_path):
    (tmp_path / "metrics.jsonl").touch()
    text = summary_of(tmp_path, 0, {"alice": 1, "c1": 1})
    assert "train loss" not in text and "after 0 rounds: —" in text
    assert text.splitlines()[-1] == f"outputs: none in {tmp_path}"
    (tmp_path / "peers").mkdir()
    assert summary_of(tmp_path, 1).splitlines()[-1] == f"outputs: {tmp_path}/metrics.jsonl, peers/"


def test_roles_read_as_words():
    assert " data owner " in peer_lines([peer("alice", "data_owner", 3)])[2]

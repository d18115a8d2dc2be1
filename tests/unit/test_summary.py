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

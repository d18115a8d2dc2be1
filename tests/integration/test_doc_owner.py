"""A data owner written from docs/protocol.md alone (doc_owner.py, which imports nothing from
p2psl) plays carol in the bundled default deployment (topologies/ring.toml: alice, bob, carol,
c1, c2) next to real p2psl peers: it takes the plan from their `plan` messages and checks it
against the profiles and memory limits, trains through the real compute nodes, averages the
owners' parts itself, and its state digest equals the p2psl owners' in every round."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_ports
from tests.integration.harness import SECRET, log_tail, rounds_of, start_peer, wait_all

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3


def default_deployment(tmp: Path, micro_batches: int = 1) -> Path:
    """topologies/ring.toml with free ports and fewer rounds (and batches cut into micro-batches)."""
    text = (ROOT / "topologies" / "ring.toml").read_text()
    if micro_batches != 1:
        text = text.replace("[training]\n", f"[training]\nmicro_batches = {micro_batches}\n", 1)
    ports = iter(free_ports(5))
    text = re.sub(r'address = "127\.0\.0\.1:\d+"', lambda m: f'address = "127.0.0.1:{next(ports)}"', text)
    text = re.sub(r"^rounds = \d+$", f"rounds = {ROUNDS}", text, flags=re.M)
    path = tmp / "ring.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_data_owner_written_from_the_document_trains_with_p2psl_peers(tmp_path, micro_batches):
    """With micro-batches too: carol cuts her batches as §13 says, and her state digest is still
    the p2psl owners' to the bit (3 pieces of 16 samples: sizes 6, 5, 5)."""
    topology, out = default_deployment(tmp_path, micro_batches), tmp_path / "out"
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    procs = {n: start_peer(topology, n, out) for n in ("c1", "c2", "alice", "bob")}
    (out / "carol").mkdir(parents=True)
    with open(out / "carol.log", "wb") as log:
        procs["carol"] = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.doc_owner", "--topology", str(topology), "--name", "carol",
             "--secret-file", str(secret), "--out", str(out / "carol")],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    codes = wait_all(procs, timeout=500)
    assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    assert json.loads((out / "carol" / "modules.json").read_text()) == []   # nothing of p2psl was imported

    # the plan carol checked and sent is the one the p2psl peers agreed on
    carol_plan = json.loads((out / "carol" / "plan.json").read_text())
    assert carol_plan["digest"] == json.loads((out / "alice" / "plan.json").read_text())["digest"]
    assert carol_plan["decisions"].get("micro_batches", 1) == micro_batches

    owners = ["alice", "bob", "carol"]
    carol = [json.loads(line) for line in (out / "carol" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in carol] == list(range(1, ROUNDS + 1))
    for record in carol:   # the p2psl owners' digests, as they reported them, equal carol's own
        assert record["included"] == owners
        assert record["reported"] == {o: [record["digest"], owners] for o in ("alice", "bob")}
    for name in ("alice", "bob", "c1", "c2"):   # every p2psl peer recorded every round with carol in it
        assert [(r["round"], r["aggregated"]) for r in rounds_of(out, name)] == \
            [(r, owners) for r in range(1, ROUNDS + 1)]
    print("carol's accuracy per round:", [r["accuracy"] for r in carol],
          "deployment:", [r["test_accuracy"] for r in rounds_of(out, "alice")])
    assert rounds_of(out, "alice")[-1]["test_accuracy"] > 0.7   # it learns (0.86 after 3 rounds when measured)

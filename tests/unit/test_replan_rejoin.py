"""Re-planning and rejoining as functions of the peer's state, in memory: no process, no socket.

Each peer is a `PeerState` with its `Inbox`; `Cluster` plays the network and implements the
`Actions` the peer would (a send lands in the destination's inbox, `become` is recorded), so the
agreement over a new plan and an owner's return run exactly the runtime's code.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from p2psl.errors import RemoteProtocolError, TrainingError
from p2psl.planning.planner import make_plan
from p2psl.planning.profile import Profile
from p2psl.runtime import rejoin, replan
from p2psl.runtime.inbox import Inbox
from p2psl.runtime.roles.context import Collector, Status, Topic
from p2psl.runtime.roles.owner import DataOwner
from p2psl.runtime.state import PeerState
from p2psl.runtime.trace import Tracer
from p2psl.runtime.worker import TorchWorker
from p2psl.topology import parse_topology
from p2psl.wire.messages import Adopt, Gone, Greeting, JoinInfo, Joining, PlanProposal, Routed, StateTransfer

LAYERS = 6


def topology_text(owners: list[str], nodes: list[str]) -> str:
    peers = [(n, "data_owner") for n in owners] + [(n, "compute") for n in nodes]
    text = '[training]\nmodel = "cnn"\ndataset = "digits"\nrounds = 5\n[timeouts]\nstart = "5s"\nrequest = "5s"\n'
    for i, (name, role) in enumerate(peers):
        text += f'[[peer]]\nname = "{name}"\nrole = "{role}"\naddress = "127.0.0.1:{7400 + i}"\nmemory = "4GiB"\n'
    return text


def uniform_profile() -> Profile:
    return Profile("cpu", 16, (1e-3,) * LAYERS, (2e-3,) * LAYERS, (1e-4,) * LAYERS, (4096,) * LAYERS,
                   (8192,) * LAYERS)


class Cluster:
    """Peers in memory: one `PeerState` and `Inbox` each, and the Actions of each peer."""

    def __init__(self, tmp: Path, owners: list[str], nodes: list[str]):
        self.topology = parse_topology(topology_text(owners, nodes), "memory.toml")
        self.profiles = {name: uniform_profile() for name in self.topology.names}
        self.samples = {name: 100 for name in owners}
        plan = make_plan(self.topology, self.profiles, self.samples)
        self.worker = TorchWorker(Tracer("memory", False))
        self.states: dict[str, PeerState] = {}
        self.inboxes: dict[str, Inbox] = {}
        self.became: dict[str, list[tuple[int, dict | None]]] = {}
        for name in self.topology.names:
            state = PeerState(self.topology, name, tmp / name, logging.LoggerAdapter(logging.getLogger("test"), {}),
                              Status(name, self.topology.peer(name).role), Collector(), self.worker,
                              profiles=dict(self.profiles), samples=dict(self.samples), plan=plan, first_plan=plan)
            self.states[name] = state
            self.inboxes[name] = Inbox(state, self.actions(name), lambda exc: None)
            self.became[name] = []

    def actions(self, me: str) -> "PeerActions":
        return PeerActions(self, me)

    def lose(self, name: str) -> None:
        """Every live peer learns that `name` is gone, as `Peer.declare_gone` would tell them."""
        for state in self.states.values():
            if state.me != name:
                state.gone.add(name)
                state.collector.poke()
                if name in state.plan.nodes:
                    state.recovery_needed.set()

    def close(self) -> None:
        self.worker.close()


class PeerActions:
    def __init__(self, cluster: Cluster, me: str):
        self.cluster, self.me = cluster, me
        self.sent: list[Routed] = []
        self.declared: list[str] = []
        self.changed = asyncio.Event()

    async def send(self, msg: Routed, timeout: float | None = None) -> None:
        self.sent.append(msg)
        self.changed.set()
        if msg.dst not in self.cluster.states[self.me].gone:
            await self.cluster.inboxes[msg.dst].deliver(msg)

    async def send_anyway(self, msg: Routed, timeout: float) -> None:
        self.sent.append(msg)

    def declare_gone(self, name: str, reason: str, life: bytes | None = None) -> None:
        self.declared.append(name)
        self.cluster.states[self.me].gone.add(name)

    async def become(self, start: int, state: dict | None) -> None:
        self.cluster.became[self.me].append((start, state))
        self.cluster.states[self.me].next_round = start + 1


def bobs_greeting(incarnation: bytes = b"") -> Greeting:
    """bob's greeting to alice, as a data owner started again sends it."""
    return Greeting(src="bob", dst="alice", role="data_owner", completed_round=0, resume=False, dataset={},
                    incarnation=incarnation)


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path, ["alice", "bob"], ["c1", "c2", "c3"])
    yield made
    made.close()


@pytest.fixture
def alice_peer(cluster, tmp_path):
    """alice as a real `Peer` (its network never started), with what it would post collected in `told`."""
    from p2psl.runtime.peer import Peer, PeerOptions

    peer = Peer(cluster.topology, "alice", b"s" * 32, PeerOptions(out=tmp_path / "alice", trace=False))
    peer.told = []
    peer.outbox.post_nowait = peer.told.append
    yield peer
    peer.worker.close()


async def recover_all(cluster: Cluster, names: list[str]) -> None:
    async with asyncio.timeout(20):
        await asyncio.gather(*(replan.recover(cluster.states[n], cluster.actions(n)) for n in names))


async def test_survivors_agree_on_a_plan_without_the_lost_node(cluster):
    cluster.lose("c3")
    live = ["alice", "bob", "c1", "c2"]
    await recover_all(cluster, live)
    plans = {cluster.states[n].plan.digest for n in live}
    assert len(plans) == 1
    plan = cluster.states["alice"].plan
    assert set(plan.nodes) == {"c1", "c2"} and plan.num_layers == cluster.states["alice"].first_plan.num_layers
    # the owners keep their parts: re-planning moves only the middle
    assert (plan.owner_first, plan.owner_last) == (cluster.states["alice"].first_plan.owner_first,
                                                    cluster.states["alice"].first_plan.owner_last)
    assert all(cluster.states[n].epoch == 1 for n in live)
    assert all(cluster.became[n] == [(0, None)] for n in live)  # nothing completed yet: from round 1


async def test_a_node_lost_while_agreeing_makes_everyone_plan_again(cluster):
    cluster.lose("c3")
    live = ["alice", "bob", "c1"]

    async def lose_c2_once_proposals_flow():
        while not cluster.states["alice"].collector.get(Topic.PLAN, 1):
            await cluster.states["alice"].collector.wait_change()
        cluster.lose("c2")

    async with asyncio.timeout(20):
        await asyncio.gather(lose_c2_once_proposals_flow(),
                             *(replan.recover(cluster.states[n], cluster.actions(n)) for n in live))
    assert {cluster.states[n].plan.digest for n in live} == {cluster.states["c1"].plan.digest}
    assert cluster.states["c1"].plan.nodes == ("c1",)
    assert all(cluster.states[n].epoch == 2 for n in live)


async def test_a_compute_node_cannot_rejoin_and_an_owner_is_told_the_plan(cluster):
    alice = cluster.states["alice"]
    with pytest.raises(RemoteProtocolError) as refused:
        await rejoin.welcome(alice, cluster.actions("alice"), Greeting(src="c2", dst="alice", role="compute", completed_round=0,
                                                                      resume=False, dataset={}))
    assert refused.value.code == "not_admitted"
    actions = cluster.actions("alice")
    await rejoin.welcome(alice, actions, bobs_greeting())
    info, = actions.sent
    assert isinstance(info, JoinInfo) and info.dst == "bob" and info.plan == alice.plan.to_json()
    assert alice.joiners == {"bob": None} and "bob" in alice.gone


async def test_joining_is_taken_only_from_an_owner_that_asked(cluster):
    alice = cluster.states["alice"]
    with pytest.raises(RemoteProtocolError):
        rejoin.receive(alice, Joining(src="bob", dst="alice", round=3))
    alice.joiners["bob"] = None
    rejoin.receive(alice, Joining(src="bob", dst="alice", round=3))
    assert alice.joiners == {"bob": 3}
    rejoin.receive(alice, Adopt(src="bob", dst="alice", epoch=0, round=1, state={}))  # late: alice trains already
    assert alice.collector.get(Topic.ADOPT, 0) == {}
    joiner = cluster.states["bob"]
    joiner.plan = None
    with pytest.raises(RemoteProtocolError):
        rejoin.receive(joiner, Adopt(src="c1", dst="bob", epoch=0, round=1, state={}))  # only owners hand over


def test_a_joiner_is_counted_in_from_the_round_it_announced(cluster):
    alice = cluster.states["alice"]
    alice.gone.add("bob")
    alice.joiners["bob"] = 3
    alice.next_round = 2
    rejoin.admit_joiners(alice)
    assert "bob" in alice.gone and alice.live_participants() == {"alice"}
    assert alice.audience() >= {"bob"}  # it listens to round 2 before it counts
    alice.next_round = 3
    rejoin.admit_joiners(alice)
    assert "bob" not in alice.gone and alice.joiners == {} and alice.live_participants() == {"alice", "bob"}


async def test_an_owner_coming_back_adopts_a_round_and_trains_from_two_rounds_later(cluster, tmp_path):
    bob, actions = cluster.states["bob"], cluster.actions("bob")
    bob.plan = bob.first_plan = None
    for other in ("alice", "c1", "c2", "c3"):
        cluster.states[other].joiners["bob"] = None  # as their welcome of bob's greeting left it
    bob.data = type("Data", (), {"input_shape": (1, 8, 8), "num_classes": 10})()
    alice = cluster.states["alice"]
    info = JoinInfo(src="alice", dst="bob", epoch=0, round=2, plan=alice.plan.to_json(),
                    first_plan=alice.plan.to_json(), gone=[], profiles={n: p.to_json() for n, p in cluster.profiles.items()},
                    samples=cluster.samples)
    rejoin.receive(bob, info)
    parts = {"model/0.weight": torch.ones(2)}

    async def owners_hand_over():
        rejoin.receive(bob, Adopt(src="alice", dst="bob", epoch=0, round=1, state=parts))
        while not any(isinstance(m, Joining) for m in actions.sent):  # the joiner announces itself first
            actions.changed.clear()
            await actions.changed.wait()
        rejoin.receive(bob, Adopt(src="alice", dst="bob", epoch=0, round=2, state=parts))

    async with asyncio.timeout(20):
        await asyncio.gather(rejoin.join(bob, actions), owners_hand_over())
    joining = {m.dst: m.round for m in actions.sent if isinstance(m, Joining)}
    assert joining == {"alice": 3, "c1": 3, "c2": 3, "c3": 3}  # the first adopted round + 2
    (start, state), = cluster.became["bob"]
    assert start == 2 and torch.equal(state["model/0.weight"], parts["model/0.weight"])
    assert not bob.too_late and (tmp_path / "bob" / "checkpoints").is_dir()


def rejoining_bob(cluster, senders: list[str], round_: int):
    """bob, started again, with the `join_info` of each of `senders` saying the others are in
    `round_` (of 5); returns bob's state and actions."""
    bob, actions = cluster.states["bob"], cluster.actions("bob")
    bob.data = type("Data", (), {"input_shape": (1, 8, 8), "num_classes": 10})()
    plan = cluster.states["alice"].plan.to_json()
    bob.plan = None
    for sender in senders:
        rejoin.receive(bob, JoinInfo(src=sender, dst="bob", epoch=0, round=round_, plan=plan, first_plan=plan,
                                     gone=[], profiles={n: p.to_json() for n, p in cluster.profiles.items()},
                                     samples=cluster.samples))
    return bob, actions


async def test_an_owner_back_after_the_last_round_stops_without_training(cluster):
    bob, actions = rejoining_bob(cluster, ["alice"], round_=6)  # rounds + 1: the others have finished
    rejoin.receive(bob, Adopt(src="alice", dst="bob", epoch=0, round=5, state={}))
    async with asyncio.timeout(20):
        await rejoin.join(bob, actions)
    assert bob.too_late and cluster.became["bob"] == [] and actions.sent == []


async def test_an_owner_back_during_the_last_round_stops_at_once_without_waiting_for_parts(cluster):
    """No owner will hand over parts it could still train from (it would train from round
    rounds + 1 at the soonest), and the others may finish before it can reach them: it does not
    wait for a hand-over (timeouts.round, an hour by default) but stops, too late."""
    bob, actions = rejoining_bob(cluster, ["c1"], round_=5)
    async with asyncio.timeout(20):  # no Adopt ever comes
        await rejoin.join(bob, actions)
    assert bob.too_late and cluster.became["bob"] == [] and actions.sent == []


async def test_an_owner_waiting_to_rejoin_stops_once_every_peer_that_answered_it_has_left(cluster):
    """The others finish before any owner can hand it parts (the owner that would was never
    reachable): once every peer that answered its greeting has closed its link saying bye, it
    stops, too late, instead of waiting timeouts.round for a hand-over that cannot come."""
    bob, actions = rejoining_bob(cluster, ["c1", "c2"], round_=3)

    async def the_others_finish():
        bob.link_event("c1", False, "said bye")
        await asyncio.sleep(0)
        assert not bob.too_late  # c2 is still there: a hand-over may still come
        bob.link_event("c2", False, "said bye")

    async with asyncio.timeout(20):
        await asyncio.gather(rejoin.join(bob, actions), the_others_finish())
    assert bob.too_late and cluster.became["bob"] == [] and actions.sent == []


async def test_no_compute_node_left_stops_recovery_with_the_reason(cluster):
    """Re-planning over an empty chain would find no chain order: it stops first, saying why."""
    for node in ("c1", "c2", "c3"):
        cluster.lose(node)
    with pytest.raises(TrainingError, match=r"no compute node is left \(c1, c2, c3 gone\)"):
        await recover_all(cluster, ["alice", "bob"])


async def test_a_peer_frozen_past_gone_is_told_the_others_went_on_without_it(cluster):
    """`gone` about itself stops a peer, and a long stall is named as the cause."""
    state, stopped = cluster.states["c1"], []
    inbox = Inbox(state, cluster.actions("c1"), stopped.append)
    await inbox.deliver(Gone(src="alice", dst="c1", peer="c1", reason="out of reach"))
    assert str(stopped[0]) == "the deployment went on without c1: alice counts it gone (out of reach)"
    state.frozen = 12.4
    await inbox.deliver(Gone(src="alice", dst="c1", peer="c1", reason="out of reach"))
    assert str(stopped[1]).startswith("c1 was frozen for 12 s, longer than the others wait for a silent peer")
    assert "the deployment went on without c1 (alice counts it gone)" in str(stopped[1])


@pytest.mark.parametrize("key", ["x", "alice/model/two.weight", "mallory/model/2.weight", "alice/2.weight"])
async def test_a_state_transfer_naming_no_owners_copy_is_refused(cluster, key):
    """Recovery reads owner and layer out of every key: one it cannot read is refused on arrival,
    before it can stop the recovery that waits for it."""
    transfer = StateTransfer(src="c1", dst="c2", epoch=1, round=1, layers=["2"],
                             state={"alice/model/2.weight": torch.ones(1), key: torch.ones(1)})
    with pytest.raises(RemoteProtocolError, match="is no owner's copy of a layer") as info:
        await cluster.inboxes["c2"].deliver(transfer)
    assert info.value.code == "bad_value"
    assert cluster.states["c2"].collector.get(Topic.STATE, 1) == {}


async def test_a_state_transfer_of_owners_copies_is_filed(cluster):
    state = {"alice/model/2.weight": torch.ones(1), "bob/optim/2.weight.momentum_buffer": torch.ones(1)}
    await cluster.inboxes["c2"].deliver(StateTransfer(src="c1", dst="c2", epoch=1, round=1, layers=["2"], state=state))
    assert set(cluster.states["c2"].collector.get(Topic.STATE, 1)) == {"c1"}


# -- the plan changing while an owner rejoins ([Note: rejoining]) ----------------------------------

def plan_without_c3(cluster):
    return make_plan(cluster.topology.without_peers({"c3"}), cluster.profiles, cluster.samples)


async def test_a_plan_naming_a_joiner_gone_does_not_forget_it(cluster):
    """Every `plan` of a re-planning names the owners still rejoining as gone (they are, until
    counted in): that is no news of the new life, and the joiner stays one."""
    alice, actions = cluster.states["alice"], cluster.actions("alice")
    inbox = Inbox(alice, actions, lambda exc: None)
    alice.gone.add("bob")
    alice.joiners["bob"] = 4
    await inbox.deliver(PlanProposal(src="c1", dst="alice", digest="d" * 64, epoch=1, completed=3,
                                     gone=["bob", "c3"]))
    assert actions.declared == ["c3"]  # news of c3 only
    assert alice.joiners == {"bob": 4} and "bob" in alice.audience()


def data_owner_holding(parts: dict) -> DataOwner:
    """A data owner's role as far as the hand-over reads it: its parts' state."""
    owner = DataOwner.__new__(DataOwner)
    owner.model = type("Model", (), {"state": staticmethod(lambda: dict(parts))})()
    return owner


async def test_the_hand_over_after_a_plan_change_tells_the_joiner_the_new_plan_first(cluster):
    alice, actions = cluster.states["alice"], cluster.actions("alice")
    alice.role = data_owner_holding({"0.weight": torch.ones(2)})
    await rejoin.welcome(alice, actions, bobs_greeting())
    await rejoin.hand_over(alice, actions, 2)
    assert [(type(m), m.epoch) for m in actions.sent] == [(JoinInfo, 0), (Adopt, 0)]
    actions.sent.clear()
    alice.epoch, alice.plan = 1, plan_without_c3(cluster)  # re-planned at the end of round 3
    await rejoin.hand_over(alice, actions, 3)
    info, adopt = actions.sent
    assert isinstance(info, JoinInfo) and (info.epoch, info.plan) == (1, alice.plan.to_json())
    assert isinstance(adopt, Adopt) and (adopt.epoch, adopt.round) == (1, 3)
    actions.sent.clear()
    await rejoin.hand_over(alice, actions, 4)  # told already: the parts alone
    assert [type(m) for m in actions.sent] == [Adopt]


async def test_an_owner_rejoining_across_a_plan_change_trains_under_the_plan_of_the_parts_it_adopts(cluster):
    """bob took epoch 0's plan from c1's answer; the others re-planned before the parts it
    trains from: alice's fresh `join_info` of epoch 1 came before them, and bob builds that plan."""
    bob, actions = rejoining_bob(cluster, ["c1"], round_=2)
    for other in ("alice", "c1", "c2", "c3"):
        cluster.states[other].joiners["bob"] = None  # as their welcome of bob's greeting left it
    new_plan = plan_without_c3(cluster)
    assert new_plan.digest != cluster.states["alice"].plan.digest
    parts = {"model/0.weight": torch.ones(2)}

    async def owners_hand_over():
        rejoin.receive(bob, Adopt(src="alice", dst="bob", epoch=0, round=1, state=parts))
        while not any(isinstance(m, Joining) for m in actions.sent):
            actions.changed.clear()
            await actions.changed.wait()
        rejoin.receive(bob, JoinInfo(src="alice", dst="bob", epoch=1, round=3, plan=new_plan.to_json(),
                                     first_plan=cluster.states["alice"].plan.to_json(), gone=["c3"],
                                     profiles={n: p.to_json() for n, p in cluster.profiles.items()},
                                     samples=cluster.samples))
        rejoin.receive(bob, Adopt(src="alice", dst="bob", epoch=1, round=2, state=parts))

    async with asyncio.timeout(20):
        await asyncio.gather(rejoin.join(bob, actions), owners_hand_over())
    assert (bob.epoch, bob.plan.digest, bob.gone) == (1, new_plan.digest, {"c3"})
    assert bob.rebalances == 0  # epoch 1 = one compute node gone
    assert cluster.became["bob"] == [(2, parts)]


async def test_parts_of_an_epoch_whose_plan_was_never_told_stop_the_rejoining_owner(cluster):
    bob, actions = rejoining_bob(cluster, ["c1"], round_=2)
    rejoin.receive(bob, Adopt(src="alice", dst="bob", epoch=1, round=1, state={}))
    with pytest.raises(TrainingError, match="parts of round 1 under epoch 1 without telling it that epoch's plan"):
        async with asyncio.timeout(20):
            await rejoin.join(bob, actions)
    assert cluster.became["bob"] == []


async def test_gone_news_of_an_earlier_life_keeps_an_owner_rejoining_and_news_of_its_new_life_forgets_it(cluster):
    """An owner that restarts within timeouts.gone greets while its neighbours' news of the
    restart still floods: that `gone` names the life before, and must not undo the welcome."""
    alice, actions = cluster.states["alice"], cluster.actions("alice")
    inbox = Inbox(alice, actions, lambda exc: None)
    alice.lives["bob"] = b"first life"
    await rejoin.welcome(alice, actions, bobs_greeting(incarnation=b"second life"))
    actions.declared.clear()
    await inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="it restarted and lost its state",
                             incarnation=b"first life"))
    assert actions.declared == [] and alice.joiners == {"bob": None}
    alice.joiners["bob"] = 3  # announced: still, a gone of another life is not about this one
    await inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="it restarted", incarnation=b"first life"))
    assert actions.declared == []
    alice.joiners["bob"] = None
    await inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="unreachable for 3 s"))  # life unknown
    assert actions.declared == []
    await inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="unreachable for 3 s",
                             incarnation=b"second life"))
    assert actions.declared == ["bob"]


async def test_a_plan_leaves_the_owners_rejoining_out_of_its_gone(cluster):
    """A peer that counted bob in already would take bob in a `plan`'s `gone` for news of him."""
    live = ["alice", "c1", "c2", "c3"]
    for name in live:
        cluster.states[name].gone.add("bob")
        cluster.states[name].joiners["bob"] = 2
    plan = cluster.states["alice"].plan
    async with asyncio.timeout(20):
        await asyncio.gather(*(replan.rebalance(cluster.states[n], cluster.actions(n), plan, 0) for n in live))
    proposals = cluster.states["c1"].collector.get(Topic.PLAN, 1)
    assert set(proposals) == set(live) and all(p.gone == [] for p in proposals.values())
    assert all(cluster.states[n].joiners == {"bob": 2} for n in live)


async def test_gone_news_without_the_joiner_flag_forgets_an_owner_that_announced_its_round(cluster):
    """Once bob has announced its round here, the news of its restart is long past: a `gone`
    about it is about this life (another peer may have counted it in, then lost it)."""
    alice, actions = cluster.states["alice"], cluster.actions("alice")
    inbox = Inbox(alice, actions, lambda exc: None)
    alice.gone.add("bob")
    alice.joiners["bob"] = 3
    await inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="unreachable for 3 s"))
    assert actions.declared == ["bob"]


async def test_a_peer_names_the_life_it_declares_gone(cluster, alice_peer):
    """`Peer.declare_gone` names the life its news is about, as the peer's greeting told it:
    for an owner rejoining, the life that asked to rejoin."""
    peer, told = alice_peer, alice_peer.told
    assert peer.state.life == peer.network.incarnation and len(peer.state.life) > 0
    peer.state.plan = peer.state.first_plan = cluster.states["alice"].plan
    peer.state.lives = {"bob": b"second life", "c3": b"c3's life"}
    peer.state.gone.add("bob")
    peer.state.joiners["bob"] = None
    peer.declare_gone("bob", "unreachable for 3 s")  # the life that asked to rejoin
    assert {(m.dst, m.peer, m.incarnation) for m in told} == {(n, "bob", b"second life") for n in ("c1", "c2", "c3")}
    assert peer.state.joiners == {}
    told.clear()
    peer.declare_gone("c3", "unreachable for 3 s")
    assert {(m.dst, m.peer, m.incarnation) for m in told} == {(n, "c3", b"c3's life") for n in ("c1", "c2")}


async def test_a_join_info_that_could_not_be_sent_goes_again_with_the_next_parts(cluster):
    from p2psl.errors import PeerTimeout

    alice, actions = cluster.states["alice"], cluster.actions("alice")
    alice.role = data_owner_holding({"0.weight": torch.ones(2)})

    async def unreachable(msg, timeout):
        raise PeerTimeout("no way to bob yet")

    actions.send_anyway = unreachable
    with pytest.raises(PeerTimeout):
        await rejoin.welcome(alice, actions, bobs_greeting())
    assert alice.joiners == {"bob": None} and alice.told_epoch == {}
    actions = cluster.actions("alice")
    await rejoin.hand_over(alice, actions, 2)
    assert [type(m) for m in actions.sent] == [JoinInfo, Adopt]


async def test_news_passed_on_names_the_life_it_named_and_a_greeting_before_the_plan_tells_its_life(
        cluster, alice_peer):
    """A peer passing a `gone` on names the life that news named (none, if it named none), not
    the one it knows; a greeting that reaches it while it starts records its sender's life."""
    peer = alice_peer
    await peer.inbox.deliver(bobs_greeting(incarnation=b"first life"))
    assert peer.state.lives == {"bob": b"first life"}
    peer.state.plan = peer.state.first_plan = cluster.states["alice"].plan
    peer.state.gone.add("bob")
    peer.state.joiners["bob"] = 3  # announced; the news below names no life
    await peer.inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="unreachable"))
    assert {(m.peer, m.incarnation) for m in peer.told} == {("bob", b"")}


async def test_news_of_an_owner_gone_reaches_the_owners_rejoining_and_news_of_a_node_does_not(tmp_path):
    """An owner rejoining waits for every owner it counts live: news of another owner gone goes to
    it too, announced or not (it would wait for that owner's round messages in vain). News of a
    compute node does not: the joiner learns that with the new plan, and must not recover itself."""
    from p2psl.runtime.peer import Peer, PeerOptions

    four = Cluster(tmp_path / "four", ["alice", "bob", "carol", "dave"], ["c1", "c2"])
    peer = Peer(four.topology, "alice", b"s" * 32, PeerOptions(out=tmp_path / "alice", trace=False))
    told: list = []
    peer.outbox.post_nowait = told.append
    try:
        peer.state.plan = peer.state.first_plan = four.states["alice"].plan
        peer.state.gone |= {"bob", "dave"}
        peer.state.joiners.update({"bob": None, "dave": 4})  # one not announced yet, one announced
        peer.declare_gone("carol", "unreachable for 3 s")
        assert sorted(m.dst for m in told if m.peer == "carol") == ["bob", "c1", "c2", "dave"]
        told.clear()
        peer.declare_gone("c2", "unreachable for 3 s")
        assert sorted(m.dst for m in told) == ["c1"]
        told.clear()
        peer.declare_gone("dave", "it started again and lost its state")  # a joiner gone again
        assert sorted(m.dst for m in told) == ["bob", "c1"]
    finally:
        peer.worker.close()
        four.close()


async def test_an_owner_rejoining_keeps_news_of_owners_gone_that_came_after_the_plan_it_takes_again(tmp_path):
    """bob, rejoining, holds alice's `join_info` of epoch 0. The plan changes: alice's fresh
    `join_info` of epoch 1 arrives, then news of carol gone (from a faster peer than alice),
    then alice's parts of epoch 1. Taking epoch 1's plan keeps carol gone. News heard before
    that `join_info` is alice's to know: dave, whom she counts in again, is not kept gone."""
    from p2psl.runtime.peer import Peer, PeerOptions

    four = Cluster(tmp_path / "four", ["alice", "bob", "carol", "dave"], ["c1", "c2"])
    peer = Peer(four.topology, "bob", b"s" * 32, PeerOptions(out=tmp_path / "bob", trace=False))
    peer.outbox.post_nowait = lambda msg: None
    state, plan = peer.state, four.states["alice"].plan.to_json()

    def join_info(epoch: int) -> JoinInfo:
        return JoinInfo(src="alice", dst="bob", epoch=epoch, round=2, plan=plan, first_plan=plan, gone=[],
                        profiles={n: p.to_json() for n, p in four.profiles.items()}, samples=four.samples)

    try:
        rejoin.receive(state, join_info(0))
        rejoin._take_plan(state, state.collector.get(Topic.JOIN_INFO, 0)["alice"])  # as `join` does
        state.status.state = "joining"
        peer.declare_gone("dave", "unreachable for 3 s")  # before epoch 1's join_info: alice knows better
        rejoin.receive(state, join_info(1))
        peer.declare_gone("carol", "unreachable for 3 s, says c1")  # after it
        rejoin._plan_of(state, Adopt(src="alice", dst="bob", epoch=1, round=2, state={}))
        assert state.epoch == 1 and state.gone == {"carol"}
    finally:
        peer.worker.close()
        four.close()


async def test_a_late_greeting_of_a_life_declared_gone_is_dropped_and_a_new_life_is_answered(cluster):
    """bob's life A was declared gone and life B asked to rejoin; A's greeting, relayed late
    behind B's, must not make alice forget B (and tell everyone to) and answer a dead process."""
    alice, actions = cluster.states["alice"], cluster.actions("alice")
    alice.gone.add("bob")
    alice.ended_lives = {"bob": {b"life A"}}
    alice.lives["bob"], alice.joiners["bob"] = b"life B", None
    await rejoin.welcome(alice, actions, bobs_greeting(incarnation=b"life A"))
    assert actions.declared == [] and actions.sent == []
    assert alice.joiners == {"bob": None} and alice.lives["bob"] == b"life B"
    await rejoin.welcome(alice, actions, bobs_greeting(incarnation=b"life C"))  # bob restarted again
    assert actions.declared == ["bob"] and [type(m) for m in actions.sent] == [JoinInfo]
    assert alice.lives["bob"] == b"life C"


async def test_a_peer_remembers_each_life_it_declares_gone(cluster, alice_peer):
    peer = alice_peer
    peer.state.plan = peer.state.first_plan = cluster.states["alice"].plan
    peer.state.lives = {"bob": b"life A"}
    peer.declare_gone("bob", "unreachable for 3 s")  # the life its greeting told
    peer.state.lives["bob"], peer.state.joiners["bob"] = b"life B", None
    peer.declare_gone("bob", "unreachable for 3 s, says c1", life=b"life B")  # the joiner, gone again
    peer.declare_gone("c3", "unreachable for 3 s")  # no greeting told its life: nothing to remember
    assert peer.state.ended_lives == {"bob": {b"life A", b"life B"}}


async def test_news_of_an_owner_already_gone_still_counts_as_news_after_the_join_info(tmp_path):
    """bob, rejoining, heard from c1 that carol is gone before alice's `join_info` of epoch 1,
    which alice sent before she heard it; her own `gone` about carol comes after it. Taking
    that plan keeps carol gone: alice's news is newer than her `join_info`."""
    from p2psl.runtime.peer import Peer, PeerOptions

    four = Cluster(tmp_path / "four", ["alice", "bob", "carol", "dave"], ["c1", "c2"])
    peer = Peer(four.topology, "bob", b"s" * 32, PeerOptions(out=tmp_path / "bob", trace=False))
    peer.outbox.post_nowait = lambda msg: None
    state, plan = peer.state, four.states["alice"].plan.to_json()
    info = {epoch: JoinInfo(src="alice", dst="bob", epoch=epoch, round=2, plan=plan, first_plan=plan, gone=[],
                            profiles={n: p.to_json() for n, p in four.profiles.items()}, samples=four.samples)
            for epoch in (0, 1)}
    try:
        rejoin.receive(state, info[0])
        rejoin._take_plan(state, info[0])
        state.status.state = "joining"
        await peer.inbox.deliver(Gone(src="c1", dst="bob", peer="carol", reason="unreachable"))
        rejoin.receive(state, info[1])
        await peer.inbox.deliver(Gone(src="alice", dst="bob", peer="carol", reason="unreachable, says c1"))
        rejoin._plan_of(state, Adopt(src="alice", dst="bob", epoch=1, round=2, state={}))
        assert state.gone == {"carol"}
    finally:
        peer.worker.close()
        four.close()


async def test_every_life_named_in_news_is_remembered_so_its_late_greeting_is_dropped(cluster, alice_peer):
    """bob restarts as A1, then as A2. News naming A1 reaches alice while she counts bob gone
    already, or while A2 rejoins (news of an earlier life): either way A1's late greeting must
    not make her forget A2 and answer A1."""
    peer, state = alice_peer, alice_peer.state
    state.plan = state.first_plan = cluster.states["alice"].plan
    state.lives["bob"] = b"A0"
    peer.declare_gone("bob", "unreachable for 3 s")
    await peer.inbox.deliver(Gone(src="c1", dst="alice", peer="bob", reason="restarted", incarnation=b"A1"))
    assert state.ended_lives["bob"] == {b"A0", b"A1"}
    state.lives["bob"], state.joiners["bob"] = b"A2", None
    await peer.inbox.deliver(Gone(src="c2", dst="alice", peer="bob", reason="restarted", incarnation=b"A1b"))
    assert state.joiners == {"bob": None} and b"A1b" in state.ended_lives["bob"]
    peer.told.clear()
    async with asyncio.timeout(5):
        await rejoin.welcome(state, peer, bobs_greeting(incarnation=b"A1"))
    assert state.joiners == {"bob": None} and state.lives["bob"] == b"A2" and peer.told == []

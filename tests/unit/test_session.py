"""Link sessions in memory ([Note: link sessions]): numbering, acknowledgements, resumption after
a dropped connection and a restarted neighbour, without sockets or processes."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psl.errors import RemoteProtocolError
from p2psl.net.session import Session, new_incarnation
from p2psl.wire.messages import Cut


def msg(n: int) -> Cut:
    return Cut(src="a", dst="b", epoch=0, round=n, owners=[])


def connected() -> tuple[Session, Session]:
    """Two sessions after their first exchange of `Resume`s."""
    a, b = Session(b"A" * 8), Session(b"B" * 8)
    assert a.on_resume(b.resume()) == ([], False)
    assert b.on_resume(a.resume()) == ([], False)
    return a, b


def test_new_incarnations_differ():
    """A restarted process must be told apart from its previous life."""
    assert len({new_incarnation() for _ in range(20)}) == 20


def test_stamp_numbers_from_one_and_keeps_until_acked():
    a, _ = connected()
    assert [a.stamp(msg(n)) for n in range(1, 4)] == [1, 2, 3]
    assert [seq for seq, _ in a.unacked] == [1, 2, 3]


def test_ack_is_cumulative():
    """One Ack releases every message up to it, and an old Ack releases nothing more."""
    a, _ = connected()
    for n in range(1, 6):
        a.stamp(msg(n))
    a.on_ack(3)
    assert [seq for seq, _ in a.unacked] == [4, 5]
    a.on_ack(2)
    assert [seq for seq, _ in a.unacked] == [4, 5]
    a.on_ack(5)
    assert not a.unacked


def test_accept_delivers_in_order_and_drops_duplicates():
    _, b = connected()
    assert b.accept(1) and b.accept(2)
    assert not b.accept(1) and not b.accept(2)
    assert b.delivered == 2


def test_a_gap_is_a_protocol_error():
    """Over one ordered link a missing number means a broken peer, not a slow one."""
    _, b = connected()
    b.accept(1)
    with pytest.raises(RemoteProtocolError) as caught:
        b.accept(3)
    assert caught.value.code == "bad_sequence"
    assert b.delivered == 1


def test_ack_due_coalesces():
    """Several deliveries give one Ack of the last; nothing new, no Ack."""
    _, b = connected()
    assert b.ack_due() is None
    for seq in (1, 2, 3):
        b.accept(seq)
    assert b.ack_due() == 3
    assert b.ack_due() is None
    b.accept(4)
    assert b.ack_due() == 4


def test_resume_resends_exactly_the_unacked_in_order():
    a, b = connected()
    for n in range(1, 6):
        a.stamp(msg(n))
    for seq in (1, 2, 3):  # 1..3 arrive, 4 and 5 are lost with the connection; no Ack went out
        b.accept(seq)
    again, restarted = a.on_resume(b.resume())
    assert [(seq, m.round) for seq, m in again] == [(4, 4), (5, 5)]
    assert not restarted
    assert b.on_resume(a.resume()) == ([], False)
    assert a.stamp(msg(6)) == 6  # numbering goes on


def test_a_restarted_neighbour_gets_a_fresh_stream():
    """What was queued for b's previous life is void; a learns that b restarted."""
    a, b = connected()
    for n in range(1, 4):
        a.stamp(msg(n))
    b.accept(1)
    b2 = Session(b"C" * 8)  # b's process came back with a new incarnation and no memory
    again, restarted = a.on_resume(b2.resume())
    assert again == [] and restarted
    assert not a.unacked and a.stamp(msg(9)) == 1
    assert b2.on_resume(a.resume()) == ([], False)  # b2 never knew a before
    assert b2.accept(1)


def test_a_restarted_sender_is_delivered_from_one_again():
    """The receiver forgets the old stream's numbering when the sender's incarnation changes."""
    a, b = connected()
    a.stamp(msg(1))
    b.accept(1)
    b.ack_due()
    a2 = Session(b"D" * 8)
    assert b.on_resume(a2.resume()) == ([], True)
    assert b.delivered == 0 and b.accept(1)


class Wire:
    """Two sessions a → b over a connection that may drop; a sends, b acknowledges."""

    def __init__(self) -> None:
        self.a, self.b = connected()
        self.to_b: deque = deque()
        self.to_a: deque = deque()
        self.up, self.sent, self.received = True, 0, []

    def step(self, op: str) -> None:
        getattr(self, op)()

    def send(self) -> None:
        self.sent += 1
        seq = self.a.stamp(msg(self.sent))
        if self.up:
            self.to_b.append((seq, msg(self.sent)))

    def deliver(self) -> None:
        if self.to_b:
            seq, m = self.to_b.popleft()
            if self.b.accept(seq):
                self.received.append(m.round)

    def ack(self) -> None:
        due = self.b.ack_due()
        if due is not None:
            self.to_a.append(due)
        if self.to_a:
            self.a.on_ack(self.to_a.popleft())

    def drop(self) -> None:
        """The connection goes: whatever was in flight either way is lost."""
        self.up = False
        self.to_b.clear()
        self.to_a.clear()

    def reconnect(self) -> None:
        if not self.up:
            self.up = True
            again, restarted = self.a.on_resume(self.b.resume())
            assert self.b.on_resume(self.a.resume()) == ([], False) and not restarted
            self.to_b.extend(again)

    def settle(self) -> None:
        self.reconnect()
        while self.to_b:
            self.deliver()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["send", "send", "deliver", "deliver", "ack", "drop", "reconnect"]), max_size=80))
def test_every_message_once_and_in_order_whatever_the_drops(ops):
    wire = Wire()
    for op in ops:
        wire.step(op)
    wire.settle()
    assert wire.received == list(range(1, wire.sent + 1))


def test_drop_mid_stream_after_a_partial_ack():
    """The scenario the property covers, spelled out: 10 sent, 6 delivered, 4 acknowledged."""
    wire = Wire()
    for _ in range(10):
        wire.send()
    for _ in range(4):
        wire.deliver()
    wire.ack()
    wire.deliver(), wire.deliver()
    wire.drop()
    wire.send()
    wire.reconnect()
    assert [seq for seq, _ in wire.to_b] == [7, 8, 9, 10, 11]
    wire.settle()
    assert wire.received == list(range(1, 12))


def test_unstamp_takes_back_only_the_last_number():
    a = Session(b"A" * 8)
    a.stamp(msg(1))
    seq = a.stamp(msg(2))
    with pytest.raises(ValueError):
        a.unstamp(1)
    a.unstamp(seq)
    assert a.next_seq == 2 and [s for s, _ in a.unacked] == [1]
    assert a.stamp(msg(3)) == 2

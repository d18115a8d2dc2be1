"""Exactly-once delivery of routed messages over a link that may drop and come back.

[Note: link sessions] Each routed message sent to a neighbour gets the next sequence number of
that neighbour's session and stays in `unacked` until the neighbour acknowledges it (a cumulative
`Ack`). Right after every (re)connection both sides send a `Resume`: "I am incarnation X; of your
incarnation Y I have delivered everything up to n". Each side then drops what the other already
has and retransmits the rest, in order, before anything new. The receiver hands a message to the
runtime only if its sequence number is the next one expected, so a retransmitted duplicate is
dropped and nothing is lost or applied twice across a reconnection.

An incarnation is a random id a process draws at start: a neighbour that restarted (crashed and
came back) has a new one, and its session starts from scratch — what was queued for its previous
life is void, and the runtime is told it restarted.
"""

from __future__ import annotations

import secrets
from collections import deque

from p2psl.errors import RemoteProtocolError
from p2psl.wire.messages import Resume, Routed


def new_incarnation() -> bytes:
    return secrets.token_bytes(8)


class Session:
    def __init__(self, incarnation: bytes):
        self.incarnation = incarnation
        self.remote: bytes | None = None     # the neighbour's incarnation this session talks to
        self.next_seq = 1
        self.unacked: deque[tuple[int, Routed]] = deque()
        self.delivered = 0                   # last sequence number handed to the runtime
        self.acked = 0                       # last sequence number we acknowledged

    def stamp(self, message: Routed) -> int:
        """Number an outgoing message and keep it until acknowledged."""
        seq = self.next_seq
        self.next_seq += 1
        self.unacked.append((seq, message))
        return seq

    def unstamp(self, seq: int) -> None:
        """Take back the number of the last message stamped, which could not be encoded: it was
        never sent, so the next message must take its number, or the neighbour sees a gap."""
        if not (self.unacked and self.unacked[-1][0] == seq == self.next_seq - 1):
            raise ValueError(f"message {seq} is not the last one stamped")
        self.unacked.pop()
        self.next_seq -= 1

    def on_ack(self, received: int) -> None:
        while self.unacked and self.unacked[0][0] <= received:
            self.unacked.popleft()

    def resume(self) -> Resume:
        return Resume(incarnation=self.incarnation, peer_incarnation=self.remote or b"", received=self.delivered)

    def on_resume(self, message: Resume) -> tuple[list[tuple[int, Routed]], bool]:
        """Reconcile after a (re)connection: (messages to send again, whether the neighbour restarted)."""
        restarted = self.remote is not None and message.incarnation != self.remote
        if message.incarnation != self.remote:
            self.remote, self.delivered, self.acked = message.incarnation, 0, 0
        if message.peer_incarnation == self.incarnation:
            self.on_ack(message.received)
            return list(self.unacked), restarted
        # the neighbour has never heard of this incarnation of ours: start our stream afresh
        self.unacked.clear()
        self.next_seq = 1
        return [], restarted

    def accept(self, seq: int) -> bool:
        """True if `seq` is the next message to deliver; False for a duplicate already delivered."""
        if seq == self.delivered + 1:
            self.delivered = seq
            return True
        if seq <= self.delivered:
            return False
        raise RemoteProtocolError(f"message {seq} arrived while {self.delivered + 1} was expected", "bad_sequence")

    def ack_due(self) -> int | None:
        """The cumulative acknowledgement to send now, if any."""
        if self.delivered > self.acked:
            self.acked = self.delivered
            return self.delivered
        return None

"""Fuzzing in CI (well under a minute): the codec and both sides of the handshake take thousands
of malformed inputs; none raises anything but a typed refusal, and none is let in without the
secret. tools/fuzz.py runs the same drivers for as long as you like."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psl.wire import codec
from tests.fuzzing import DIGEST, decode_outcome, dialler_outcome, hostile_frames, listener_outcome

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames = hostile_frames


@FAST
@given(st.lists(frames(), min_size=1, max_size=4))
def test_decoder_refuses_junk_with_typed_errors(batch):
    assert decode_outcome(batch) in {"ok", "bad_frame", "bad_header", "version", "unknown_kind", "bad_tensor",
                                     "too_large", "bad_chunk"}


@FAST
@given(st.lists(frames(), max_size=3))
def test_listener_never_admits_without_the_secret(batch):
    assert listener_outcome(batch) in {"refused", "broken"}


@FAST
@given(st.lists(frames(), max_size=3))
def test_dialler_never_connects_without_the_secret(batch):
    assert dialler_outcome(batch) in {"refused", "broken"}


def test_a_valid_hello_alone_is_not_enough():
    from p2psl.wire.messages import Auth, Hello

    hello = codec.encode(Hello(name="alice", topology=DIGEST, nonce=b"n" * 32))[0]
    wrong_proof = codec.encode(Auth(proof=b"p" * 32))[0]
    assert listener_outcome([hello, wrong_proof]) == "refused"

"""Codec round trips for every message kind, property tests, and hostile frames."""

from __future__ import annotations

import struct

import cbor2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psl import PROTOCOL_VERSION
from p2psl.wire import codec
from p2psl.wire import messages as m
from p2psl.errors import LocalProtocolError, RemoteProtocolError

R = dict(src="alice", dst="c1")

EXAMPLES: list[m.Message] = [
    m.Hello(name="alice", topology="ab" * 32, nonce=b"\x01" * 32),
    m.Challenge(name="c1", nonce=b"\x02" * 32, proof=b"\x03" * 32),
    m.Auth(proof=b"\x04" * 32),
    m.Welcome(),
    m.Ping(sent=1.5),
    m.Pong(sent=2.5),
    m.Bye(reason="done"),
    m.Resume(incarnation=b"\x05" * 8, peer_incarnation=b"", received=12),
    m.Ack(received=7),
    m.Error(code="bad_header", message="no", ref="activation"),
    m.Error(code="wrong_role", message="no", src="c1", dst="alice"),
    m.Greeting(role="data_owner", completed_round=2, resume=True,
               dataset={"input_shape": [1, 8, 8], "num_classes": 10, "train": 479, "test": 120}, **R),
    m.Greeting(role="data_owner", completed_round=0, resume=False, dataset={}, incarnation=b"\x01" * 16, **R),
    m.Done(round=3, **R),
    m.JoinInfo(epoch=1, round=4, plan={"chain": ["c1"]}, first_plan={"chain": ["c1", "c2"]}, gone=["c2"],
               profiles={"c1": {"device": "VM"}}, samples={"alice": 400}, **R),
    m.Adopt(epoch=1, round=3, state={"model/0.weight": torch.ones(2, 2)}, **R),
    m.Joining(round=4, **R),
    m.ProfileShare(profile={"device": "VM", "fwd": [0.1, 0.2], "nested": {"a": None}}, **R),
    m.PlanProposal(digest="f" * 64, epoch=0, **R),
    m.PlanProposal(digest="f" * 64, epoch=2, completed=3, gone=["c2", "c3"], **R),
    m.Abort(code="plan_mismatch", reason="digests differ", **R),
    m.Activation(epoch=0, owner="alice", round=1, batch=7, part=1, train=True, x=torch.randn(4, 3, 2), **R),
    m.Gradient(epoch=0, owner="alice", round=1, batch=7, part=2, g=torch.randn(4, 16), **R),
    m.TrainDone(epoch=0, owner="alice", round=1, samples=100, batches=7, loss_sum=3.25, **R),
    m.ReducePart(epoch=1, round=1, members=["alice", "bob"], samples=100,
                 state={"first.0.weight": torch.randn(3, 3), "last.bias": torch.zeros(2, dtype=torch.float64),
                        "steps": torch.tensor(5)}, **R),
    m.ReducedPart(epoch=1, round=1, members=["alice", "bob"], reducer="bob", state={"0.weight": torch.randn(4)}, **R),
    m.ReduceStatus(epoch=1, round=1, members=["alice", "bob", "carol"], held=["alice"], **R),
    m.ChainPart(epoch=0, round=3, part=1, state={"1.weight": torch.ones(2, 2, dtype=torch.float64)}, **R),
    m.EvalReport(epoch=0, owner="alice", round=1, correct=90, total=100, loss_sum=12.5, train_loss=0.3, samples=400,
                 seconds=1.25, included=["alice", "bob"], digest="ab" * 32, **R),
    m.Cut(epoch=0, round=2, owners=["alice", "bob"], **R),
    m.Timings(epoch=0, round=2, batches=30, seconds=0.25, **R),
    m.Gone(peer="c2", reason="silent for 6 s", **R),
    m.Gone(peer="bob", reason="it restarted", incarnation=b"\x02" * 16, **R),
    m.StateTransfer(epoch=1, round=2, layers=["3", "4"], state={"alice/model/3.weight": torch.ones(2)}, **R),
    m.Replica(node="c1", round=2, plan="e" * 64, state={"0.weight": torch.ones(2, 2)}, **R),
]


def assert_same(a: m.Message, b: m.Message) -> None:
    assert type(a) is type(b)
    for name, kind in m.field_types(type(a)).items():
        x, y = getattr(a, name), getattr(b, name)
        if kind == "Tensor":
            assert x.dtype == y.dtype and torch.equal(x, y)
        elif kind == "TensorMap":
            assert x.keys() == y.keys()
            for key in x:
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key])
        else:
            assert x == y and type(x) is type(y)


def roundtrip(message: m.Message) -> m.Message:
    decoder = codec.Decoder()
    out = [decoder.feed(frame) for frame in codec.encode(message, message_id=9)]
    assert all(o is None for o in out[:-1])
    assert decoder.pending == 0
    return out[-1]


def test_every_kind_has_an_example():
    assert {type(e).KIND for e in EXAMPLES} == set(m.KINDS)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda e: type(e).KIND)
def test_roundtrip_every_kind(message):
    assert_same(message, roundtrip(message))


def test_large_tensor_is_chunked_and_reassembled():
    x = torch.randn(3 * codec.CHUNK_BYTES // 4 + 5)
    message = m.Activation(epoch=0, owner="bob", round=1, batch=1, part=1, train=True, x=x, **R)
    frames = codec.encode(message, message_id=3)
    assert len(frames) == 4
    assert all(len(f) <= codec.MAX_FRAME_BYTES for f in frames)
    assert_same(message, roundtrip(message))


def test_chunks_of_two_messages_may_interleave():
    a = m.Activation(epoch=0, owner="a", round=1, batch=1, part=1, train=True, x=torch.randn(codec.CHUNK_BYTES // 2), **R)
    b = m.Gradient(epoch=0, owner="b", round=1, batch=2, part=1, g=torch.randn(codec.CHUNK_BYTES // 2), **R)
    fa, fb = codec.encode(a, 1), codec.encode(b, 2)
    decoder = codec.Decoder()
    assert decoder.feed(fa[0]) is None and decoder.feed(fb[0]) is None
    assert_same(b, decoder.feed(fb[1]))
    assert_same(a, decoder.feed(fa[1]))


def test_session_sequence_numbers_travel_in_the_header():
    decoder = codec.Decoder()
    big = m.Gradient(epoch=0, owner="a", round=1, batch=1, part=1, g=torch.zeros(codec.CHUNK_BYTES // 2), **R)
    for message, seq in ((EXAMPLES[4], None), (big, 41), (EXAMPLES[9], 42)):
        frames = codec.encode(message, 5, seq)
        out, numbered = [decoder.feed_numbered(f) for f in frames][-1]
        assert type(out) is type(message) and numbered == seq
    with pytest.raises(RemoteProtocolError):
        decoder.feed(frame_of({"v": PROTOCOL_VERSION, "kind": "ping", "sent": 1.0, "seq": -3}))


def test_decoded_tensors_are_writable_copies():
    frame = codec.encode(m.Gradient(epoch=0, owner="a", round=1, batch=1, part=1, g=torch.zeros(3), **R))[0]
    g = codec.decode(frame).g
    g += 1  # must not raise or touch the frame
    assert codec.decode(frame).g.sum() == 0


def test_unsupported_dtype_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        codec.encode(m.Gradient(epoch=0, owner="a", round=1, batch=1, part=1, g=torch.zeros(2, dtype=torch.bfloat16), **R))


# -- property tests --------------------------------------------------------------------------------

DTYPES = list(codec.DTYPE_TO_TAG)
names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    n = 1
    for s in shape:
        n *= s
    raw = draw(st.binary(min_size=n * torch.empty((), dtype=dtype).element_size(),
                         max_size=n * torch.empty((), dtype=dtype).element_size()))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


@settings(max_examples=200, deadline=None)
@given(owner=names, rnd=st.integers(0, 2**62), batch=st.integers(-(2**62), 2**62), part=st.integers(0, 99),
       train=st.booleans(), x=tensors(), src=names, dst=names)
def test_property_activation_roundtrip(owner, rnd, batch, part, train, x, src, dst):
    message = m.Activation(epoch=0, owner=owner, round=rnd, batch=batch, part=part, train=train, x=x, src=src, dst=dst)
    back = roundtrip(message)
    assert back.x.dtype == x.dtype and back.x.shape == x.shape
    assert back.x.numpy().tobytes() == x.numpy().tobytes()  # bitwise, NaNs included
    assert (back.owner, back.round, back.batch, back.part, back.train) == (owner, rnd, batch, part, train)


@settings(max_examples=100, deadline=None)
@given(state=st.dictionaries(names.filter(lambda s: "/" not in s), tensors(), max_size=5),
       samples=st.integers(0, 10**9), loss=st.floats(allow_nan=False))
def test_property_tensor_maps_and_floats(state, samples, loss):
    share = m.ReducePart(epoch=1, round=1, members=["o"], samples=samples, state=state, **R)
    back = roundtrip(share)
    assert back.state.keys() == state.keys()
    for key, value in state.items():
        assert back.state[key].numpy().tobytes() == value.numpy().tobytes()
    done = roundtrip(m.TrainDone(epoch=0, owner="o", round=1, samples=samples, batches=1, loss_sum=loss, **R))
    assert done.loss_sum == loss


# -- hostile frames ----------------------------------------------------------------------------------

def frame_of(header, payload=b""):
    head = cbor2.dumps(header)
    return struct.pack(">I", len(head)) + head + payload


BAD_FRAMES = {
    "empty": (b"", "bad_frame"),
    "short": (b"\x00\x01", "bad_frame"),
    "length_past_end": (struct.pack(">I", 100) + b"\xa0", "bad_frame"),
    "not_cbor": (struct.pack(">I", 3) + b"\xff\xff\xff", "bad_frame"),
    "not_a_map": (frame_of([1, 2, 3]), "bad_header"),
    "no_version": (frame_of({"kind": "ping", "sent": 1.0}), "version"),
    "other_version": (frame_of({"v": PROTOCOL_VERSION + 1, "kind": "ping", "sent": 1.0}), "version"),
    "unknown_kind": (frame_of({"v": PROTOCOL_VERSION, "kind": "launch_missiles"}), "unknown_kind"),
    "kind_not_text": (frame_of({"v": PROTOCOL_VERSION, "kind": 7}), "bad_header"),
    "missing_field": (frame_of({"v": PROTOCOL_VERSION, "kind": "ping"}), "bad_header"),
    "wrong_type": (frame_of({"v": PROTOCOL_VERSION, "kind": "ping", "sent": "soon"}), "bad_header"),
    "bool_for_int": (frame_of({"v": PROTOCOL_VERSION, "kind": "greeting", "src": "a", "dst": "b", "role": "x",
                               "completed_round": True, "resume": False, "dataset": {}}), "bad_header"),
    "missing_tensor": (frame_of({"v": PROTOCOL_VERSION, "kind": "gradient", "src": "a", "dst": "b", "owner": "a", "epoch": 0,
                                 "round": 1, "batch": 1, "part": 1}), "bad_tensor"),
    "bad_tag": (frame_of({"v": PROTOCOL_VERSION, "kind": "gradient", "src": "a", "dst": "b", "owner": "a", "epoch": 0,
                          "round": 1, "batch": 1, "part": 1, "tensors": [["g", 1234, [1]]]}), "bad_tensor"),
    "short_payload": (frame_of({"v": PROTOCOL_VERSION, "kind": "gradient", "src": "a", "dst": "b", "owner": "a", "epoch": 0,
                                "round": 1, "batch": 1, "part": 1, "tensors": [["g", 85, [4]]]}, b"\0" * 15),
                      "bad_tensor"),
    "negative_dim": (frame_of({"v": PROTOCOL_VERSION, "kind": "gradient", "src": "a", "dst": "b", "owner": "a", "epoch": 0,
                               "round": 1, "batch": 1, "part": 1, "tensors": [["g", 85, [-1]]]}), "bad_tensor"),
    "huge_claim": (frame_of({"v": PROTOCOL_VERSION, "kind": "gradient", "src": "a", "dst": "b", "owner": "a", "epoch": 0,
                             "round": 1, "batch": 1, "part": 1, "tensors": [["g", 85, [2**39, 2**39]]]}), "too_large"),
    "stray_chunk": (frame_of({"v": PROTOCOL_VERSION, "kind": "chunk", "id": 5, "index": 1}, b"x"), "bad_chunk"),
    "unknown_tensor": (frame_of({"v": PROTOCOL_VERSION, "kind": "ping", "sent": 1.0,
                                 "tensors": [["evil", 85, [1]]]}, b"\0" * 4), "bad_tensor"),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_hostile_frames_raise_typed_errors(name):
    frame, code = BAD_FRAMES[name]
    decoder = codec.Decoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(frame)
    assert info.value.code == code
    # the decoder keeps working after the bad frame
    ping = EXAMPLES[4]
    assert isinstance(ping, m.Ping)
    assert_same(ping, decoder.feed(codec.encode(ping)[0]))


def test_out_of_order_chunk_drops_the_partial_message():
    x = torch.randn(2 * codec.CHUNK_BYTES // 4 + 1)
    frames = codec.encode(m.Activation(epoch=0, owner="a", round=1, batch=1, part=1, train=True, x=x, **R), 4)
    decoder = codec.Decoder()
    decoder.feed(frames[0])
    with pytest.raises(RemoteProtocolError):
        decoder.feed(frames[2])
    assert decoder.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_never_crash(data):
    try:
        codec.Decoder().feed(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "kind", "src", "dst", "sent", "owner", "round", "batch", "part",
                                        "tensors", "chunks", "id", "index", "x", "g", "state"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=4),
                                 st.sampled_from(list(m.KINDS) + ["chunk"]), st.binary(max_size=4),
                                 st.lists(st.integers(0, 3), max_size=3)), max_size=10),
       st.binary(max_size=64))
def test_fuzz_structured_headers_never_crash(header, payload):
    header.setdefault("v", PROTOCOL_VERSION)
    try:
        codec.Decoder().feed(frame_of(header, payload))
    except RemoteProtocolError:
        pass


def _activation(x: torch.Tensor) -> m.Activation:
    return m.Activation(src="alice", dst="c1", epoch=0, owner="alice", round=1, batch=1, part=1, train=True, x=x)


def test_a_channels_last_tensor_travels_in_its_own_memory_order_and_arrives_so():
    """[Note: memory order on the wire]: the bytes of a tensor held channels-last are its N×H×W×C
    array, its shape stays N, C, H, W, and the receiver holds it channels-last again, so that the
    next convolution rounds as in the whole model."""
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    frames = codec.encode(_activation(x))
    header, payload = codec.split_frame(frames[0])
    assert header["channels_last"] == ["x"] and header["tensors"][0][2] == [4, 3, 5, 5]
    assert bytes(payload) == x.permute(0, 2, 3, 1).contiguous().numpy().tobytes()
    got = codec.decode(frames[0]).x
    assert torch.equal(got, x) and not got.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
    plain = codec.encode(_activation(x.contiguous()))[0]
    header, payload = codec.split_frame(plain)
    assert "channels_last" not in header and bytes(payload) == x.contiguous().numpy().tobytes()
    assert codec.decode(plain).x.is_contiguous()


def test_the_documented_channels_last_vector():
    """docs/protocol.md §19: p2psl writes the channels-last activation's very bytes."""
    from tests.integration.test_protocol_doc import CHANNELS_LAST_ACTIVATION
    x = torch.tensor([[[[0.0, 1.0]], [[10.0, 11.0]]]]).contiguous(memory_format=torch.channels_last)
    assert codec.encode(_activation(x), seq=1)[0].hex() == CHANNELS_LAST_ACTIVATION


def test_a_tensor_that_requires_grad_travels_as_its_values():
    """An activation straight from a part's forward pass (it requires grad, held channels-last)
    is encoded without detaching it first, and arrives as plain values in the same order."""
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = x * 2  # not a leaf: part of a graph, as a forward pass leaves it
    got = codec.decode(codec.encode(_activation(y))[0]).x
    assert torch.equal(got, y.detach()) and not got.requires_grad and got.grad_fn is None
    assert got.is_contiguous(memory_format=torch.channels_last) and y.grad_fn is not None


def test_a_chunked_channels_last_tensor_arrives_channels_last():
    """The reassembled buffer's view is held channels-last too."""
    x = torch.randn(3, 64, 64, 64).contiguous(memory_format=torch.channels_last)   # 3 MiB: two chunks
    frames = codec.encode(_activation(x))
    assert len(frames) == 2
    decoder = codec.Decoder()
    assert decoder.feed(frames[0]) is None
    got = decoder.feed(frames[1]).x
    assert torch.equal(got, x) and got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()


def test_an_unaligned_channels_last_entry_of_a_chunked_map_arrives_channels_last():
    """An entry that starts off the 64-byte boundary of the reassembled buffer is copied, and
    held channels-last all the same."""
    big = torch.randn(3, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    state = {"a": torch.randn(3), "b": big}   # "b" starts 12 bytes in
    replica = m.Replica(src="c1", dst="c2", node="c1", round=1, plan="p", state=state)
    decoder, got = codec.Decoder(), None
    for frame in codec.encode(replica, 1):
        got = decoder.feed(frame)
    assert torch.equal(got.state["a"], state["a"]) and torch.equal(got.state["b"], big)
    assert got.state["b"].is_contiguous(memory_format=torch.channels_last) and not got.state["b"].is_contiguous()


@pytest.mark.parametrize("listed", [["y"], "x", [1]])
def test_a_channels_last_list_naming_no_4d_tensor_of_the_message_is_bad_tensor(listed):
    frame = codec.encode(_activation(torch.randn(2, 3, 4, 4)))[0]
    header, payload = codec.split_frame(frame)
    head = cbor2.dumps({**header, "channels_last": listed})
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode(struct.pack(">I", len(head)) + head + bytes(payload))
    assert info.value.code == "bad_tensor"


HOSTILE_VALUES = [5, -1, 2**1100, -(2**1100), 1.5, float("nan"), float("inf"), "x", b"\x00", None, True,
                  [1], ["x"], [[1]], {"a": 1}, {1: 2}]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.KIND)
def test_any_value_in_any_header_field_decodes_or_is_refused_typed(example):
    """A peer's reader ends only on typed refusals, so no header value may raise anything else:
    not an integer too large for a float field, not a number where a list of names belongs."""
    for frame in codec.encode(example)[:1]:
        header, payload = codec.split_frame(frame)
        for field in set(header) - {"v", "kind", "tensors", "channels_last"}:
            for value in HOSTILE_VALUES:
                try:
                    codec.Decoder().feed(frame_of({**header, field: value}, bytes(payload)))
                except RemoteProtocolError:
                    pass

"""Bytes ⇄ messages: a CBOR header plus raw tensor bytes. Pure functions, no I/O.

Frame layout (one WebSocket binary message; docs/protocol.md has the full contract)::

    u32 big-endian  H = length of the header
    H bytes         CBOR map: {"v": 2, "kind": "...", <fields>, "tensors": [[name, tag, shape], ...]}
    rest            payload: the tensors' raw little-endian bytes, back to back, in header order

Tensors follow RFC 8746: `tag` is the typed-array tag naming the element type (85 = float32 LE,
79 = int64 LE, ...) and `shape` the dimensions, i.e. the semantics of tag 40 (multi-dimensional
array, row-major; a tensor named in ``"channels_last"`` is the N×H×W×C array instead, [Note: memory
order on the wire]) with the data kept outside the CBOR item so it is never re-encoded —
cbor2 would turn a memoryview into an array of ints (SPEC §10).

A message whose payload exceeds `CHUNK_BYTES` is split: its first frame carries the full header
plus ``"chunks": n`` and ``"id"``, then n − 1 frames ``{"v", "kind": "chunk", "id", "index"}`` carry
the rest of the payload in order. Frames of different messages may interleave between chunks.

[Note: memory order on the wire] torch may hold a 4-dimensional activation in channels-last
memory (a convolution's output follows its input's memory order, and a one-channel input can
carry strides that read as channels-last: the digits as p2psl loads them do), and a convolution
then runs other kernels, which round differently, than on the same values in row-major memory.
A tensor goes in the order the sender holds it: row-major, or, for a tensor the header's
``"channels_last"`` names, channels-last (the bytes of the N×H×W×C row-major array; the
descriptor's shape stays N, C, H, W). The receiver holds it so again by viewing those bytes,
without reordering them. A chain of parts then computes the very bits of the whole model, which
a data owner's checks and the federated-averaging baseline rely on; and neither end pays for a
strided copy (one at each end cost a quarter of a 128 KiB activation's trip between peers).

Decoding never trusts the remote: every field is type-checked against the message's dataclass,
every tensor descriptor against the payload length, and failures raise `RemoteProtocolError`
with a wire error code. Nothing is unpickled; tensors are rebuilt with `torch.frombuffer`.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
from dataclasses import dataclass
from collections.abc import Iterator

import cbor2
import torch

from p2psl import PROTOCOL_VERSION
from p2psl.errors import LocalProtocolError, RemoteProtocolError
from p2psl.wire.messages import KINDS, Message, field_types, required_fields, sparse_defaults

#: payload bytes per frame; 1–4 MiB frames are the fastest on loopback (SPEC §10)
CHUNK_BYTES = 2 * 1024 * 1024
#: the largest header accepted (a checkpoint of many owners' copies lists thousands of tensors)
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: the largest frame a peer sends or accepts (chunk + header + MAC, with room to spare)
MAX_FRAME_BYTES = CHUNK_BYTES + MAX_HEADER_BYTES + 1024
#: the largest reassembled payload accepted by default
MAX_MESSAGE_BYTES = 4 * 1024**3
MAX_DIMS = 8

# RFC 8746 typed-array tags, little-endian variants
DTYPE_TO_TAG = {
    torch.uint8: 64, torch.int8: 72, torch.int16: 77, torch.int32: 78, torch.int64: 79,
    torch.float16: 84, torch.float32: 85, torch.float64: 86,
}
TAG_TO_DTYPE = {tag: dtype for dtype, tag in DTYPE_TO_TAG.items()}
ITEM_BYTES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_TO_TAG}

_LEN = struct.Struct(">I")
ALIGN = 64  # a tensor view into a reassembled buffer must start as aligned as torch's own tensors


# -- encoding -----------------------------------------------------------------------------------

def encode(message: Message, message_id: int = 0, seq: int | None = None) -> list[bytes]:
    """The frames carrying `message` (one unless its payload needs chunking); `seq` is the link
    session's sequence number of a routed message ([Note: link sessions] in p2psl.net.session)."""
    return list(iter_frames(message, message_id, seq))


def iter_frames(message: Message, message_id: int = 0, seq: int | None = None) -> Iterator[bytes]:
    """`encode`, one frame at a time: a message of N bytes never needs more than one chunk of
    extra memory on its way out (the tensors are read in place, never joined)."""
    header, buffers = _header_and_payload(message)
    if seq is not None:
        header["seq"] = seq
    total = sum(len(b) for b in buffers)
    if total <= CHUNK_BYTES:
        yield _frame(header, *buffers)
        return
    header["chunks"], header["id"] = math.ceil(total / CHUNK_BYTES), message_id
    for index, piece in enumerate(_pieces(buffers, CHUNK_BYTES)):
        head = header if index == 0 else {"v": PROTOCOL_VERSION, "kind": "chunk", "id": message_id, "index": index}
        yield _frame(head, *piece)


def _pieces(buffers: list[memoryview], size: int) -> Iterator[list[memoryview]]:
    """The concatenation of `buffers` cut into `size`-byte pieces, as lists of slices (no copy)."""
    piece, room = [], size
    for buffer in buffers:
        offset = 0
        while offset < len(buffer):
            take = min(room, len(buffer) - offset)
            piece.append(buffer[offset:offset + take])
            offset, room = offset + take, room - take
            if room == 0:
                yield piece
                piece, room = [], size
    if piece:
        yield piece


_DENSE = object()  # the "default" of a field that is always sent


@functools.cache
def _encoding(cls: type[Message]) -> tuple[tuple[str, str, object], ...]:
    """(name, kind, default) of each field of a message kind, the default being that of a
    sparse field (left out while it holds it) or `_DENSE`: worked out once per kind."""
    sparse = sparse_defaults(cls)
    return tuple((name, kind, sparse.get(name, _DENSE)) for name, kind in field_types(cls).items())


def check_encodable(message: Message, seq: int | None = None) -> None:
    """Raise `LocalProtocolError` where `iter_frames` would (a tensor of a dtype the wire does not
    carry, a header too large), without building the frames: the header as sent, with the
    largest message id and chunk count a link uses."""
    header, _ = _header_and_payload(message)
    if seq is not None:
        header["seq"] = seq
    _frame({**header, "chunks": 2**32, "id": 2**32})


def _header_and_payload(message: Message) -> tuple[dict, list[memoryview]]:
    header: dict = {"v": PROTOCOL_VERSION, "kind": message.KIND}
    descriptors, buffers, channels_last = [], [], []
    for name, kind, default in _encoding(type(message)):
        value = getattr(message, name)
        if default is not _DENSE and value == default:
            continue  # a field its kind gained later, at its default: left out
        if kind == "Tensor":
            _add_tensor(name, value, descriptors, buffers, channels_last)
        elif kind == "TensorMap":
            for key in sorted(value):
                _add_tensor(f"{name}/{key}", value[key], descriptors, buffers, channels_last)
        else:
            header[name] = value
    if descriptors:
        header["tensors"] = descriptors
    if channels_last:
        header["channels_last"] = channels_last
    return header, [b for b in buffers if len(b)]


def _add_tensor(name: str, tensor: torch.Tensor, descriptors: list, buffers: list, channels_last: list) -> None:
    """The tensor's descriptor and its bytes in the order it is held: row-major, or channels-last
    with its name in `channels_last` ([Note: memory order on the wire])."""
    if not isinstance(tensor, torch.Tensor):
        raise LocalProtocolError(f"field {name!r} must be a tensor, got {type(tensor).__name__}")
    tag = DTYPE_TO_TAG.get(tensor.dtype)
    if tag is None:
        raise LocalProtocolError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire format does not carry")
    if tensor.requires_grad or not tensor.is_cpu:
        tensor = tensor.detach().cpu()
    descriptors.append([name, tag, list(tensor.shape)])
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        channels_last.append(name)
        array = tensor.permute(0, 2, 3, 1).numpy()  # N×H×W×C, already contiguous: no copy
    else:
        array = tensor.contiguous().numpy()
    buffers.append(memoryview(array).cast("B") if array.size else memoryview(b""))


def _frame(header: dict, *payload) -> bytes:
    head = cbor2.dumps(header)
    if len(head) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"{header.get('kind')} header is {len(head)} bytes, over {MAX_HEADER_BYTES}")
    return b"".join((_LEN.pack(len(head)), head, *payload))


# -- decoding -----------------------------------------------------------------------------------

def split_frame(frame: bytes | bytearray | memoryview) -> tuple[dict, memoryview]:
    """(header, payload) of one frame; raises RemoteProtocolError for anything malformed."""
    view = memoryview(frame).cast("B")
    if len(view) < 4:
        raise RemoteProtocolError(f"frame of {len(view)} bytes is too short", "bad_frame")
    (length,) = _LEN.unpack(view[:4])
    if length > MAX_HEADER_BYTES or 4 + length > len(view):
        raise RemoteProtocolError(f"header length {length} does not fit the frame of {len(view)} bytes", "bad_frame")
    try:
        header = cbor2.loads(bytes(view[4:4 + length]))
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise RemoteProtocolError(f"header is not valid CBOR ({exc})", "bad_frame") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError(f"header must be a CBOR map, got {type(header).__name__}", "bad_header")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}", "version")
    if not isinstance(header.get("kind"), str):
        raise RemoteProtocolError("header has no text 'kind'", "bad_header")
    return header, view[4 + length:]


def peek_name(frame: bytes | bytearray | memoryview) -> str | None:
    """The text `name` of a frame's header whatever its protocol version, or None: lets a
    listener say which neighbour speaks another version (a hello names its sender)."""
    try:
        view = memoryview(frame).cast("B")
        (length,) = _LEN.unpack(view[:4])
        header = cbor2.loads(bytes(view[4:4 + min(length, MAX_HEADER_BYTES)]))
    except Exception:  # best effort on a frame already refused: any failure means no name
        return None
    name = header.get("name") if isinstance(header, dict) else None
    return name if isinstance(name, str) else None


@dataclass
class _Pending:
    header: dict
    total: int
    buffer: torch.Tensor  # uint8, `total` bytes: every chunk is copied here once
    received: int = 0
    next_index: int = 1

    def append(self, payload: memoryview) -> None:
        end = self.received + len(payload)
        memoryview(self.buffer[self.received:end].numpy()).cast("B")[:] = payload
        self.received = end


class Decoder:
    """Turns frames back into messages, reassembling chunked ones. One per connection direction.

    `feed` returns a message when one is complete, else None; `feed_numbered` returns it with the
    link-session number its header carried ("seq"), which belongs to the session layer
    (p2psl.net.session). A bad frame raises `RemoteProtocolError`, carrying that number when the
    header was readable; the decoder stays usable (a broken partial message is dropped)."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES, max_pending: int = 64):
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self._pending: dict[int, _Pending] = {}

    def feed(self, frame: bytes | bytearray | memoryview) -> Message | None:
        numbered = self.feed_numbered(frame)
        return None if numbered is None else numbered[0]

    def feed_numbered(self, frame: bytes | bytearray | memoryview) -> tuple[Message, int | None] | None:
        header, payload = split_frame(frame)
        if header["kind"] == "chunk":
            return self._continue(header, payload)
        seq = header.get("seq")
        if seq is not None and (not _is_int(seq) or seq < 1):
            raise RemoteProtocolError(f"'seq' must be a positive integer, got {seq!r}", "bad_header")
        try:
            message = self._begin(header, payload)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc), exc.code, seq) from None
        return None if message is None else (message, seq)

    def _begin(self, header: dict, payload: memoryview) -> Message | None:
        cls = KINDS.get(header["kind"])
        if cls is None:
            raise RemoteProtocolError(f"unknown message kind {header['kind']!r}", "unknown_kind")
        values = _check_fields(cls, header)
        descriptors = _check_layouts(header.get("channels_last", []),
                                     _check_descriptors(cls, header.get("tensors", [])))
        total = sum(_nbytes(d) for d in descriptors)
        if total > self.max_message_bytes:
            raise RemoteProtocolError(f"{cls.KIND} payload of {total} bytes exceeds {self.max_message_bytes}", "too_large")
        chunks = header.get("chunks", 1)
        if not _is_int(chunks):
            raise RemoteProtocolError(f"'chunks' must be an integer, got {chunks!r}", "bad_chunk")
        if chunks == 1:
            return _build(cls, values, descriptors, payload, total)
        return self._start(cls, values, descriptors, header, payload, total, chunks)

    def _start(self, cls, values, descriptors, header, payload, total, chunks) -> None:
        message_id = header.get("id")
        if not _is_int(chunks) or not _is_int(message_id) or chunks < 2:
            raise RemoteProtocolError("bad 'chunks' or 'id' in a chunked message", "bad_chunk")
        if message_id in self._pending or len(self._pending) >= self.max_pending:
            raise RemoteProtocolError(f"chunked message id {message_id} already open or too many open", "bad_chunk")
        if chunks != math.ceil(total / CHUNK_BYTES) or len(payload) != CHUNK_BYTES:
            raise RemoteProtocolError(f"{chunks} chunks cannot carry {total} payload bytes", "bad_chunk")
        pending = _Pending({"cls": cls, "values": values, "descriptors": descriptors, "chunks": chunks,
                            "seq": header.get("seq")}, total, torch.empty(total, dtype=torch.uint8))
        pending.append(payload)
        self._pending[message_id] = pending

    def _continue(self, header: dict, payload: memoryview) -> tuple[Message, int | None] | None:
        message_id, index = header.get("id"), header.get("index")
        pending = self._pending.get(message_id) if _is_int(message_id) else None
        if pending is None:
            raise RemoteProtocolError(f"chunk for unknown message id {message_id!r}", "bad_chunk")
        last = pending.next_index == pending.header["chunks"] - 1
        expected = pending.total - pending.received if last else CHUNK_BYTES
        if index != pending.next_index or len(payload) != expected:
            del self._pending[message_id]
            raise RemoteProtocolError(f"chunk {index!r} of message {message_id} out of order or wrong size",
                                      "bad_chunk", pending.header["seq"])
        pending.append(payload)
        pending.next_index += 1
        if not last:
            return None
        del self._pending[message_id]
        h = pending.header
        try:
            return _build(h["cls"], h["values"], h["descriptors"], pending.buffer, pending.total), h["seq"]
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc), exc.code, h["seq"]) from None

    @property
    def pending(self) -> int:
        """Chunked messages still being reassembled."""
        return len(self._pending)


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Decode a single, unchunked frame (handshake and tests)."""
    message = Decoder().feed(frame)
    if message is None:
        raise RemoteProtocolError("a chunked message cannot be decoded from one frame", "bad_chunk")
    return message


# -- validation helpers -------------------------------------------------------------------------

def _is_int(value) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def _is_float(value) -> bool:
    """A CBOR float, or an integer a float can hold (CBOR integers are unbounded, floats are not)."""
    if isinstance(value, float):
        return True
    return _is_int(value) and abs(value) <= _FLOAT_MAX


_FLOAT_MAX = int(sys.float_info.max)


_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "float": _is_float,
    "bool": lambda v: isinstance(v, bool),
    "bytes": lambda v: isinstance(v, bytes),
    "TextList": lambda v: isinstance(v, list) and len(v) <= 100_000 and all(isinstance(x, str) for x in v),
}


@functools.cache
def _decoding(cls: type[Message]) -> tuple[tuple[str, str, bool], ...]:
    """(name, kind, required) of each header field of a message kind, worked out once per kind."""
    required = required_fields(cls)
    return tuple((name, kind, name in required) for name, kind in field_types(cls).items()
                 if kind not in ("Tensor", "TensorMap"))


def _check_fields(cls: type[Message], header: dict) -> dict:
    values = {}
    for name, kind, required in _decoding(cls):
        if name not in header:
            if required:
                raise RemoteProtocolError(f"{cls.KIND} header lacks field {name!r}", "bad_header")
            continue
        value = header[name]
        ok = _json_like(value) and isinstance(value, dict) if kind == "JSONMap" else _CHECKS[kind](value)
        if not ok:
            raise RemoteProtocolError(f"{cls.KIND} field {name!r} must be {kind}, got {type(value).__name__}", "bad_header")
        values[name] = float(value) if kind == "float" else value
    return values


def _json_like(value, depth: int = 0) -> bool:
    if depth > 16:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_like(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _check_descriptors(cls: type[Message], raw) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    if not isinstance(raw, list):
        raise RemoteProtocolError("'tensors' must be an array", "bad_tensor")
    kinds = field_types(cls)
    out, names = [], set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise RemoteProtocolError(f"tensor descriptor must be [name, tag, shape], got {item!r:.80}", "bad_tensor")
        name, tag, shape = item
        base, _, key = name.partition("/")
        if kinds.get(base) not in ("Tensor", "TensorMap") or (kinds[base] == "TensorMap") != bool(key) or name in names:
            raise RemoteProtocolError(f"{cls.KIND} has no tensor field {name!r} (or it repeats)", "bad_tensor")
        if not _is_int(tag) or tag not in TAG_TO_DTYPE:
            raise RemoteProtocolError(f"tensor {name!r}: unsupported RFC 8746 tag {tag!r}", "bad_tensor")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(s) and 0 <= s < 2**40 for s in shape)):
            raise RemoteProtocolError(f"tensor {name!r}: bad shape {shape!r:.80}", "bad_tensor")
        names.add(name)
        out.append((name, TAG_TO_DTYPE[tag], tuple(shape)))
    missing = [n for n, k in kinds.items() if k == "Tensor" and n not in names]
    if missing:
        raise RemoteProtocolError(f"{cls.KIND} lacks tensor {missing[0]!r}", "bad_tensor")
    return out


def _check_layouts(raw, descriptors: list[tuple]) -> list[tuple]:
    """The descriptors, each with whether its tensor is to be held channels-last: `raw` must name
    4-dimensional tensors of this message ([Note: memory order on the wire])."""
    four_d = {name for name, _, shape in descriptors if len(shape) == 4}
    if not (isinstance(raw, list) and all(isinstance(n, str) and n in four_d for n in raw)):
        raise RemoteProtocolError(f"'channels_last' must list 4-dimensional tensors of the message, got {raw!r:.80}",
                                  "bad_tensor")
    return [(name, dtype, shape, name in raw) for name, dtype, shape in descriptors]


def _nbytes(descriptor) -> int:
    dtype, shape = descriptor[1], descriptor[2]
    return math.prod(shape) * ITEM_BYTES[dtype]


def _build(cls, values: dict, descriptors, payload: memoryview | torch.Tensor, total: int) -> Message:
    """The message, its tensors cut out of `payload`: copies of a frame's bytes, or views of a
    reassembled buffer (already torch's own memory) where they start 64-byte aligned."""
    if len(payload) != total:
        raise RemoteProtocolError(f"{cls.KIND} payload is {len(payload)} bytes, its tensors need {total}", "bad_tensor")
    offset = 0
    maps: dict[str, dict] = {n: {} for n in _tensor_maps(cls)}
    for name, dtype, shape, channels_last in descriptors:
        size = _nbytes((name, dtype, shape))
        held = (shape[0], shape[2], shape[3], shape[1]) if channels_last else shape  # N×H×W×C bytes
        if isinstance(payload, torch.Tensor) and offset % ALIGN == 0 and size:
            tensor = payload[offset:offset + size].view(dtype).view(held)
        else:
            data = payload[offset:offset + size]
            tensor = _tensor(memoryview(data.numpy()) if isinstance(data, torch.Tensor) else data, dtype, held)
        if channels_last:  # the same values, held as the sender held them
            tensor = tensor.permute(0, 3, 1, 2)
        offset += size
        base, _, key = name.partition("/")
        if key:
            maps[base][key] = tensor
        else:
            values[name] = tensor
    values.update(maps)
    try:
        return cls(**values)
    except TypeError as exc:  # a field combination the dataclass refuses
        raise RemoteProtocolError(f"{cls.KIND}: {exc}", "bad_header") from None


@functools.cache
def _tensor_maps(cls: type[Message]) -> tuple[str, ...]:
    """The message kind's TensorMap fields."""
    return tuple(n for n, k in field_types(cls).items() if k == "TensorMap")


def _tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A fresh tensor holding `data`, in torch's own (aligned) memory.

    Copying into a torch allocation rather than wrapping a bytes buffer keeps results
    reproducible: oneDNN/MKL kernels may take different code paths, and round differently, for
    differently aligned inputs, and a Python buffer's alignment varies from run to run."""
    tensor = torch.empty(shape, dtype=dtype)
    if len(data):
        memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")[:] = data
    return tensor

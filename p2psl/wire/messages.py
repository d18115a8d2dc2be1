"""Every message p2psl peers exchange, as frozen dataclasses. No I/O here.

Two families share one wire format (docs/protocol.md):

* link messages travel over exactly one connection: the handshake (`Hello`, `Challenge`, `Auth`,
  `Welcome`), heartbeats (`Ping`, `Pong`), `Bye` and `Error`;
* routed messages carry `src` and `dst` peer names and are relayed along the topology's shortest
  path when the two are not neighbours: everything about plans, batches, rounds and state.

A field annotated `Tensor` travels as raw bytes in the payload; `TensorMap` (a name → tensor dict)
travels as one payload entry per tensor. Every other field lives in the CBOR header. The codec
derives the header schema from these annotations, so adding a field here is the whole change.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar, Union

import torch

Tensor = torch.Tensor
TensorMap = dict  # dict[str, torch.Tensor]; a distinct alias so the codec can tell it from JSON maps
JSONMap = dict    # plain CBOR map of JSON-like values (profiles)
TextList = list   # CBOR array of text strings (peer names)
#: field metadata: the codec leaves the field out while it holds its default (`sparse_defaults`)
SPARSE = {"sparse": True}


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message; `KIND` is the wire name."""

    KIND: ClassVar[str] = ""
    ROUTED: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class Routed(Message):
    """A message between two peers that may be relayed by others on the way."""

    ROUTED: ClassVar[bool] = True
    src: str
    dst: str


# -- link messages: handshake -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """Dialler → listener: who I am, which deployment, and a fresh challenge for the listener."""

    KIND: ClassVar[str] = "hello"
    name: str
    topology: str
    nonce: bytes


@dataclass(frozen=True, kw_only=True)
class Challenge(Message):
    """Listener → dialler: the listener's proof of the secret and its own challenge."""

    KIND: ClassVar[str] = "challenge"
    name: str
    nonce: bytes
    proof: bytes


@dataclass(frozen=True, kw_only=True)
class Auth(Message):
    """Dialler → listener: the dialler's proof of the secret."""

    KIND: ClassVar[str] = "auth"
    proof: bytes


@dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    """Listener → dialler: the handshake succeeded; from here on every frame carries a MAC."""

    KIND: ClassVar[str] = "welcome"


# -- link messages: liveness and errors ---------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    KIND: ClassVar[str] = "ping"
    sent: float


@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    KIND: ClassVar[str] = "pong"
    sent: float


@dataclass(frozen=True, kw_only=True)
class Resume(Message):
    """First sealed message each way on every connection: reconciles the link session
    ([Note: link sessions] in p2psl.net.session)."""

    KIND: ClassVar[str] = "resume"
    incarnation: bytes
    peer_incarnation: bytes
    received: int


@dataclass(frozen=True, kw_only=True)
class Ack(Message):
    """Cumulative acknowledgement: every routed message up to `received` was delivered."""

    KIND: ClassVar[str] = "ack"
    received: int


@dataclass(frozen=True, kw_only=True)
class Bye(Message):
    """Announces a deliberate close, so the other side does not treat it as a failure."""

    KIND: ClassVar[str] = "bye"
    reason: str


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    """A typed refusal of something the remote sent; `ref` names the offending kind if known.

    `src`/`dst` are empty on a link-level error and set when the error is routed back to the
    peer that originated the offending message."""

    KIND: ClassVar[str] = "error"
    code: str
    message: str
    ref: str = ""
    src: str = ""
    dst: str = ""


# -- routed: start-up ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Greeting(Routed):
    """First routed message to every peer: alive, its role, the last round it completed (when
    resuming) and, from a data owner, what its data looks like — {"input_shape": [...],
    "num_classes": n, "train": samples, "test": samples} — so compute nodes never need the data."""

    KIND: ClassVar[str] = "greeting"
    role: str
    completed_round: int
    resume: bool
    dataset: JSONMap
    incarnation: bytes = field(default=b"", metadata=SPARSE)  # the sender's life (its link sessions')


@dataclass(frozen=True, kw_only=True)
class Done(Routed):
    """This peer finished every round and wrote its outputs; peers exit once all said so."""

    KIND: ClassVar[str] = "done"
    round: int


@dataclass(frozen=True, kw_only=True)
class ProfileShare(Routed):
    """This peer's per-layer profile (p2psl.planning.profile.Profile.to_json), sent to every peer."""

    KIND: ClassVar[str] = "profile"
    profile: JSONMap


@dataclass(frozen=True, kw_only=True)
class PlanProposal(Routed):
    """The plan this peer computed: its digest, which all peers must send the same, and the
    decisions the digest covers, which any peer can check without planning (p2psl.planning.check)."""

    KIND: ClassVar[str] = "plan"
    digest: str
    epoch: int
    completed: int = 0
    gone: TextList = field(default_factory=list)
    decisions: JSONMap = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class JoinInfo(Routed):
    """Answer to the greeting of a data owner that comes back while the others train: the plan in
    force (and the first one, which re-planning starts from), the epoch, the round this peer is in,
    who is gone, and the profiles and sample counts the plans were made from."""

    KIND: ClassVar[str] = "join_info"
    epoch: int
    round: int
    plan: JSONMap
    first_plan: JSONMap
    gone: TextList
    profiles: JSONMap
    samples: JSONMap


@dataclass(frozen=True, kw_only=True)
class Adopt(Routed):
    """The owners' aggregated parts after `round`, for an owner that rejoins from the next round."""

    KIND: ClassVar[str] = "adopt"
    epoch: int
    round: int
    state: TensorMap


@dataclass(frozen=True, kw_only=True)
class Joining(Routed):
    """A rejoining owner trains again from `round` on: count it in from that round."""

    KIND: ClassVar[str] = "joining"
    round: int


@dataclass(frozen=True, kw_only=True)
class Abort(Routed):
    """Stop the whole deployment: something every peer must hear about went wrong."""

    KIND: ClassVar[str] = "abort"
    code: str
    reason: str


# -- routed: training ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Activation(Routed):
    """Output of part `part - 1` for `owner`'s batch, to be consumed by part `part`.

    `train` false marks an evaluation batch: no stash, no backward."""

    KIND: ClassVar[str] = "activation"
    epoch: int
    owner: str
    round: int
    batch: int
    part: int
    train: bool
    x: Tensor
    micro: int = field(default=0, metadata=SPARSE)    # which of the batch's micro-batches (from 0)
    micros: int = field(default=1, metadata=SPARSE)   # how many the batch is cut into


@dataclass(frozen=True, kw_only=True)
class Gradient(Routed):
    """Gradient of the loss w.r.t. the output of part `part` for `owner`'s batch."""

    KIND: ClassVar[str] = "gradient"
    epoch: int
    owner: str
    round: int
    batch: int
    part: int
    g: Tensor
    micro: int = field(default=0, metadata=SPARSE)
    micros: int = field(default=1, metadata=SPARSE)


@dataclass(frozen=True, kw_only=True)
class TrainDone(Routed):
    """An owner finished its local epochs of `round`; `samples` weights its share in FedAvg.
    Sent to every peer: it is what each peer's `Cut` is made of."""

    KIND: ClassVar[str] = "train_done"
    epoch: int
    owner: str
    round: int
    samples: int
    batches: int
    loss_sum: float


@dataclass(frozen=True, kw_only=True)
class ReducePart(Routed):
    """An owner's contribution to the owners' FedAvg of `round`: the chunk of its parts that the
    receiver reduces ([Note: the owners' all-reduce]). `members`, sorted, are the owners of this
    attempt of the all-reduce; the receiver is one of them and its chunk is its place among them."""

    KIND: ClassVar[str] = "reduce_part"
    epoch: int
    round: int
    members: TextList
    samples: int
    state: TensorMap


@dataclass(frozen=True, kw_only=True)
class ReducedPart(Routed):
    """The average of `reducer`'s chunk among `members`: from the reducer to every other owner,
    or after a failure from an owner that holds it to one that lacks it."""

    KIND: ClassVar[str] = "reduced_part"
    epoch: int
    round: int
    members: TextList
    reducer: str
    state: TensorMap


@dataclass(frozen=True, kw_only=True)
class ReduceStatus(Routed):
    """After an owner of `members` is gone mid-all-reduce: the reducers whose averaged chunk the
    sender holds. Sending it freezes the sender's attempt: from then on it completes that attempt
    only if the owners' statuses together cover every chunk, else it tries again without the gone."""

    KIND: ClassVar[str] = "reduce_status"
    epoch: int
    round: int
    members: TextList
    held: TextList


@dataclass(frozen=True, kw_only=True)
class ChainPart(Routed):
    """With several chains: a compute node's share of the FedAvg of its part after `round`, to
    the node that runs the same part on another chain: Σ (n_k / n) · weights_k over the
    included owners of its chain, entry by entry in float64 (n: every included owner's samples)."""

    KIND: ClassVar[str] = "chain_part"
    epoch: int
    round: int
    part: int
    state: TensorMap


@dataclass(frozen=True, kw_only=True)
class EvalReport(Routed):
    """An owner's evaluation on its own test split after `round` (counts, never the data)."""

    KIND: ClassVar[str] = "eval_report"
    epoch: int
    owner: str
    round: int
    correct: int
    total: int
    loss_sum: float
    train_loss: float
    samples: int
    seconds: float
    included: TextList = field(default_factory=list)
    digest: str = ""


@dataclass(frozen=True, kw_only=True)
class Timings(Routed):
    """What the sender measured in `round`: wall seconds of its training tasks and the owner
    batches they served; every peer refits the cost model from everyone's ([Note: calibration]
    in p2psl.planning.calibrate)."""

    KIND: ClassVar[str] = "timings"
    epoch: int
    round: int
    batches: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Cut(Routed):
    """Which owners' `TrainDone` for `round` this peer had when it stopped waiting (all of them,
    or the round deadline passed). The owners aggregated are those in every live peer's cut."""

    KIND: ClassVar[str] = "cut"
    epoch: int
    round: int
    owners: TextList


@dataclass(frozen=True, kw_only=True)
class Gone(Routed):
    """`peer` is unreachable for longer than the `gone` timeout: the deployment goes on without it.
    `incarnation`: the life of `peer` the sender declared gone, as its greeting told it (empty if
    unknown), so news of an earlier life does not undo an owner's rejoining ([Note: rejoining])."""

    KIND: ClassVar[str] = "gone"
    peer: str
    reason: str
    incarnation: bytes = field(default=b"", metadata=SPARSE)

@dataclass(frozen=True, kw_only=True)
class Replica(Routed):
    """A compute node's state after `round`, kept by a neighbour so it survives the node."""

    KIND: ClassVar[str] = "replica"
    node: str
    round: int
    plan: str
    state: TensorMap


@dataclass(frozen=True, kw_only=True)
class StateTransfer(Routed):
    """After a re-plan: the state of `round` for the layers the receiver now runs, from whoever
    has it (their previous holder, or the holder of that node's replica)."""

    KIND: ClassVar[str] = "state_transfer"
    epoch: int
    round: int
    layers: TextList
    state: TensorMap

AnyMessage = Union[
    Hello, Challenge, Auth, Welcome, Ping, Pong, Resume, Ack, Bye, Error,
    Greeting, ProfileShare, PlanProposal, JoinInfo, Adopt, Joining, Abort, Done, Gone,
    Activation, Gradient, TrainDone, Cut, ReducePart, ReducedPart, ReduceStatus, EvalReport, Replica, StateTransfer,
    Timings, ChainPart,
]

#: wire name → class
KINDS: dict[str, type[Message]] = {cls.KIND: cls for cls in AnyMessage.__args__}

HANDSHAKE_KINDS = frozenset({"hello", "challenge", "auth", "welcome", "error"})


def field_types(cls: type[Message]) -> dict[str, str]:
    """Field name → annotation as written ("str", "int", "Tensor", "TensorMap", ...).

    Annotations stay strings (``from __future__ import annotations``), which is exactly what the
    codec needs to choose a validator; `TensorMap` and `JSONMap` are told apart by name."""
    cached = _FIELD_CACHE.get(cls)
    if cached is None:
        names = {f.name for f in fields(cls)}
        hints: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for name, ann in getattr(klass, "__annotations__", {}).items():
                if name in names:
                    hints[name] = ann if isinstance(ann, str) else ann.__name__
        cached = _FIELD_CACHE[cls] = hints
    return cached


@functools.cache
def required_fields(cls: type[Message]) -> frozenset[str]:
    """Fields without a default: a header missing one is malformed (asked for every message
    decoded, hence kept)."""
    return frozenset(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)


def sparse_defaults(cls: type[Message]) -> dict[str, object]:
    """The fields left out of the header while they hold their default (`SPARSE`): fields added
    to a kind after its first version, so that what earlier peers sent and understood is
    unchanged whenever the new field is not used."""
    cached = _SPARSE_CACHE.get(cls)
    if cached is None:
        cached = _SPARSE_CACHE[cls] = {f.name: f.default for f in fields(cls) if f.metadata.get("sparse")}
    return cached


_FIELD_CACHE: dict[type, dict[str, str]] = {}
_SPARSE_CACHE: dict[type, dict[str, object]] = {}

"""Predicted peak memory of each peer of a plan. Pure: no torch, no sockets.

A compute node holds K copies of weights and SGD momentum but one set
of gradients: the runtime steps an owner's copy right after its backward pass and frees the
gradients, before any other task runs (roles/compute.py), so training takes (2K + 1) × parameter
bytes, not the 3K of a node that kept every copy's gradients. Per owner batch in flight at it, a
node also holds the activations its layers save for backward (their outputs plus the received
input); in the worst case all K owners are in flight there. When a neighbour keeps its replica
(two or more compute nodes), a snapshot travels there while the next round trains: the weights,
which FedAvg made the same in every copy, once, and every copy's momentum ((K + 1) × parameter
bytes), so the node's peak is (3K + 2) × parameter bytes plus the stash. The round end's FedAvg
of the copies adds nothing that counts: each averaged tensor is written into the copies before
the next is made (p2psl.learning.models.copies). Not counted: the replica this node keeps for its predecessor, which it
decodes whole before writing it (2K × the predecessor's parameter bytes, briefly). An owner holds
weights, gradients and momentum of parts 0 and N+1 and one batch's activations, and at the round
end, in the owners' all-reduce (p2psl.learning.allreduce), a copy of its parts that it sends from
and assembles the average into, the K − 1 contributions to the chunk it reduces and the K − 1
averaged chunks of the others, each 1/K of the parts: (4 + 2(K − 1)/K) × parameter bytes plus the
stash, which stays under 6 × whatever K — a sum of both phases that keeps the planner's
constraint linear. Where the parts are too small for K chunks of `MIN_CHUNK_BYTES`, fewer owners
reduce larger chunks ([Note: fewer reducers for small parts]): a reducer's K − 1 contributions
then hold under 2(K − 1) × `MIN_CHUNK_BYTES`, which the owner's peak adds whatever its parts (a
bound that stays linear in them). Both add
`RUNTIME_OVERHEAD_BYTES` for the interpreter, torch and buffers. With micro-batches
([Note: micro-batches]) a node steps an owner's copy only after the batch's last micro-batch, so
it may hold every owner's gradients at once: K − 1 more sets of its parameter bytes. With several
chains ([Note: several chains]) a compute node keeps copies for its own chain's owners only (K is
theirs), and at the round end holds every chain's float64 sum of its layers: 2C × its parameter
bytes more.

Sizes come from `costmodel.model_sizes`, as for the times.
"""

from __future__ import annotations

from collections.abc import Mapping

from p2psl.planning.costmodel import model_sizes
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile
from p2psl.planning.roundend import MIN_CHUNK_BYTES

#: per-process memory that is not weights or activations: a peer's idle RSS (Python, torch and
#: the runtime loaded and warmed up: ~350 MiB with the CPU build of torch 2.13) and its buffers
RUNTIME_OVERHEAD_BYTES = 384 * 2**20


def node_state_bytes(params, copies: int, replica: bool = False, micro: bool = False):
    """Weights and momentum of every copy plus one copy's gradients — every copy's with `micro`
    (batches cut into micro-batches: each owner's gradients wait for its batch's last
    micro-batch, [Note: micro-batches]) — and with `replica` (a neighbour keeps this node's
    replica) the snapshot that travels there while the next round trains: the copies' common
    weights once and every copy's momentum (module docstring). Works on ints and on numpy arrays
    of parameter bytes alike."""
    gradients = copies if micro else 1
    return (2 * copies + gradients + (copies + 1 if replica else 0)) * params


def owner_state_bytes(params, copies: int, round_end: bool = True):
    """An owner's weights, gradients and momentum; with `round_end` also what the all-reduce
    among `copies` owners holds (module docstring). Works on ints and on numpy arrays alike."""
    if not round_end:
        return 3 * params
    return (4 * copies + 2 * (copies - 1)) * params // copies + 2 * (copies - 1) * MIN_CHUNK_BYTES


def node_memory(sizes: Profile, first: int, last: int, copies: int, replica: bool = False,
                micro: bool = False) -> int:
    """Peak bytes of a compute node holding layers first..last (1-based) for `copies` owners."""
    layers = range(first - 1, last)
    params = sum(sizes.param_bytes[j] for j in layers)
    stash = sum(sizes.act_bytes[j] for j in layers) + (sizes.act_bytes[first - 2] if first > 1 else 0)
    return node_state_bytes(params, copies, replica, micro) + copies * stash + RUNTIME_OVERHEAD_BYTES


def owner_memory(sizes: Profile, first_cut: int, last_cut: int, copies: int, round_end: bool = True) -> int:
    """Peak bytes of a data owner holding layers 1..first_cut and last_cut+1..L among `copies`
    owners."""
    layers = [*range(first_cut), *range(last_cut, sizes.num_layers)]
    params = sum(sizes.param_bytes[j] for j in layers)
    stash = sum(sizes.act_bytes[j] for j in layers) + sizes.act_bytes[last_cut - 1]
    return owner_state_bytes(params, copies, round_end) + stash + RUNTIME_OVERHEAD_BYTES


def peak_memory(plan: Plan, topology, profiles: Mapping[str, Profile], round_end: bool = True) -> dict[str, int]:
    """Predicted peak bytes per peer of the plan (compute nodes and owners); `round_end=False`
    gives the training part of a round alone (no FedAvg shares, no replica in flight)."""
    sizes = model_sizes(topology, profiles).at_batch(topology.training.batch_size)
    k, replica = len(plan.owners), round_end and len(plan.chain) > 1
    out = {s.node: node_memory(sizes, s.first, s.last, len(plan.owners_of(s.node)), replica, plan.micro_batches > 1)
           + (_chains_share(sizes, s, plan.chains) if round_end and plan.chains > 1 else 0) for s in plan.chain}
    for owner in plan.owners:
        out[owner] = owner_memory(sizes, plan.owner_first[1], plan.owner_last[0] - 1, k, round_end)
    return dict(sorted(out.items()))


def _chains_share(sizes: Profile, stage, chains: int) -> int:
    """What the averaging across `chains` chains ([Note: several chains]) adds at the round end:
    the node's weighted sum of its copies in float64 (twice its float32 parameters) and the
    other chains' sums, each as large, all held until the last arrives."""
    params = sum(sizes.param_bytes[j] for j in stage.layers)
    return 2 * chains * params


def whole_model_memory(topology, profiles: Mapping[str, Profile]) -> int:
    """Predicted peak bytes of a data owner that trains the whole model itself (`[training] mode
    = "fedavg"`): every layer's weights and momentum, the averaging's shares, every activation."""
    sizes = model_sizes(topology, profiles).at_batch(topology.training.batch_size)
    last = sizes.num_layers - 1
    return owner_memory(sizes, last, last, len(topology.owners))

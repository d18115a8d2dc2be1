"""The owners' FedAvg cut into chunks, one per owner (a butterfly all-reduce). Pure: no I/O.

[Note: the owners' all-reduce] With K owners, every owner's state (parts 0 and N+1) is seen as
one flat sequence of elements: its entries in key order, each flattened row-major. `layout`
cuts that sequence into K contiguous chunks of ⌊N·j/K⌋…⌊N·(j+1)/K⌋ elements; chunk j belongs to
the j-th owner by name, its *reducer*. Every owner sends chunk j of its state to the reducer j
(reduce-scatter); the reducer averages the K contributions of its chunk and sends the result
to every other owner (all-gather), who `assemble` the whole average from the K reduced chunks.
An owner sends and receives (K − 1)/K of its state's bytes in each phase, whatever K, and holds
at most one state's worth of other owners' chunks.

A chunk is averaged by `fedavg` itself, over slices: element by element, the same operations in
the same order (owners by name, in float64, cast back once), so the average assembled from the
chunks is bit for bit the FedAvg of the whole states — on every owner, since each chunk is
computed once, by its reducer, and only copied after that.

[Note: fewer reducers for small parts] Cutting the parts into K chunks costs 2K(K − 1) messages a
round, and with small parts nearly all of it is the messages' fixed cost: a hundred owners of
the digits CNN (topologies/hundred_owners.toml, 69 KB of parts) sent 19,800 chunks of 0.7 KB,
and in one process the all-reduce took 9–11 s of a 25–33 s round. So the chunks are at least
`MIN_CHUNK_BYTES` (64 KiB): with parts of B bytes, R = min(K, max(1, ⌊B / 64 KiB⌋)) owners
reduce, the first R members by name, and chunk j of R belongs to members[j]. Each owner then
sends R chunks and receives R, 2R(K − 1) messages in all (198 for those hundred owners, whose
all-reduce now takes 1.3–1.8 s and rounds 18–25 s); a reducer still handles 2(K − 1) messages,
as every owner did, with larger chunks (under 128 KiB each). With K chunks of 64 KiB or more, R = K: the
butterfly above, unchanged. The arithmetic is the same for any R, so every R gives the same
bits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from p2psl.learning.aggregate import fedavg
from p2psl.planning.roundend import MIN_CHUNK_BYTES, reducer_count

#: (entry, first element, end element) of the flattened entry: a piece of one chunk
Span = tuple[str, int, int]


def layout(numels: Mapping[str, int], k: int) -> tuple[tuple[Span, ...], ...]:
    """The k chunks of a state whose entries have `numels` elements: chunk j is elements
    ⌊N·j/k⌋ to ⌊N·(j+1)/k⌋ of the entries laid end to end in key order (empty if N < k).

    Kept per (numels, k): every message of the all-reduce is checked against its chunk, and
    with a hundred owners, making the layout for each of them cost seconds of the event loop."""
    if k < 1:
        raise ValueError("an all-reduce needs at least one owner")
    return _layout(tuple(sorted(numels.items())), k)


@functools.lru_cache(maxsize=64)
def _layout(numels: tuple[tuple[str, int], ...], k: int) -> tuple[tuple[Span, ...], ...]:
    offsets, total = {}, 0
    for key, n in numels:
        offsets[key] = total
        total += n
    sizes = dict(numels)
    chunks = []
    for j in range(k):
        lo, hi = total * j // k, total * (j + 1) // k
        chunks.append(tuple((key, max(lo, start) - start, min(hi, start + sizes[key]) - start)
                            for key, start in offsets.items() if max(lo, start) < min(hi, start + sizes[key])))
    return tuple(chunks)


def reducers(members: Sequence[str], nbytes: int, min_chunk: int = MIN_CHUNK_BYTES) -> tuple[str, ...]:
    """The members that reduce a chunk of parts of `nbytes` (`state_bytes`; [Note: fewer reducers
    for small parts]); chunk j of `layout(numels(parts), len(result))` is result[j]'s."""
    return tuple(members[:reducer_count(nbytes, len(members), min_chunk)])


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """The bytes of a state's entries: every element times its type's size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def numels(state: Mapping[str, Tensor]) -> dict[str, int]:
    return {key: t.numel() for key, t in state.items()}


def chunk_of(state: Mapping[str, Tensor], spans: Iterable[Span]) -> dict[str, Tensor]:
    """One chunk of a state: 1-D views of its entries' slices, nothing copied."""
    return {key: state[key].detach().reshape(-1)[start:stop] for key, start, stop in spans}


def check_chunk(chunk: Mapping[str, Tensor], spans: Iterable[Span], like: Mapping[str, Tensor]) -> None:
    """A chunk received must be exactly the slices `spans` of a state like `like`: a ValueError
    says what differs."""
    want = {key: stop - start for key, start, stop in spans}
    if set(chunk) != set(want):
        raise ValueError(f"chunk entries {sorted(chunk)[:3]}… are not the expected {sorted(want)[:3]}…")
    for key, size in want.items():
        t = chunk[key]
        if t.dim() != 1 or t.numel() != size or t.dtype != like[key].dtype:
            raise ValueError(f"{key}: expected {size} elements of {like[key].dtype}, got {tuple(t.shape)} {t.dtype}")


def reduce_chunk(contributions: Mapping[str, Mapping[str, Tensor]], samples: Mapping[str, float]) -> dict[str, Tensor]:
    """The reducer's work: FedAvg of every owner's contribution to one chunk, weighted by samples."""
    return fedavg(contributions, samples)


def assemble(into: dict[str, Tensor], pieces: Iterable[tuple[Iterable[Span], Mapping[str, Tensor]]]) -> dict[str, Tensor]:
    """Copy reduced chunks into `into` (a state of the same layout, overwritten in place) and
    return it; every element must be covered exactly once."""
    covered = {key: 0 for key in into}
    for spans, chunk in pieces:
        for key, start, stop in spans:
            into[key].view(-1)[start:stop] = chunk[key]
            covered[key] += stop - start
    short = [key for key, n in covered.items() if n != into[key].numel()]
    if short:
        raise ValueError(f"the reduced chunks do not cover {short[:3]}")
    return into


def contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Entries whose flat views `chunk_of` and `assemble` can take (copied only if they are not)."""
    return {key: t.detach().contiguous() for key, t in state.items()}

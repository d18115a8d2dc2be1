"""FedAvg over state dicts: pure, deterministic, the same bits on every peer.

Every owner computes the average of the first and last parts itself, and every compute node the
average of its copies (SPEC §1), so the arithmetic must not depend on who runs it or on dict
order: owners are summed in sorted order, in float64, and the result is cast back once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor


def fedavg(states: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """The weighted average of `states` (owner → name → tensor), weights renormalised to sum 1.

    Floating tensors are averaged; integer tensors (BatchNorm's num_batches_tracked) get the
    weighted average rounded to the nearest integer, so equal counters stay equal.
    """
    return dict(fedavg_items(states, weights))


def fedavg_items(states: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float]) -> Iterator[tuple[str, Tensor]]:
    """`fedavg` one tensor at a time, in name order, for a caller that stores each average before
    the next is made (the whole average never exists at once). Checks everything first."""
    owners = sorted(states)
    if not owners:
        raise ValueError("fedavg of no states")
    shares = _shares(owners, weights)
    reference = states[owners[0]]
    for owner in owners[1:]:
        _check_compatible(owners[0], reference, owner, states[owner])
    return ((name, _average([states[o][name] for o in owners], shares)) for name in sorted(reference))


def _shares(owners: list[str], weights: Mapping[str, float]) -> list[float]:
    missing = [o for o in owners if o not in weights]
    extra = sorted(set(weights) - set(owners))
    if missing or extra:
        raise ValueError(f"weights do not match the states: missing {missing}, unexpected {extra}")
    values = [float(weights[o]) for o in owners]
    if any(not w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {dict(zip(owners, values))}")
    total = sum(values)
    return [w / total for w in values]


def _check_compatible(a: str, first: Mapping[str, Tensor], b: str, other: Mapping[str, Tensor]) -> None:
    if set(first) != set(other):
        diff = sorted(set(first) ^ set(other))
        raise ValueError(f"states of {a} and {b} have different keys: {diff[:5]}")
    for name in first:
        if first[name].shape != other[name].shape or first[name].dtype != other[name].dtype:
            raise ValueError(f"{name}: {a} has {tuple(first[name].shape)} {first[name].dtype}, "
                             f"{b} has {tuple(other[name].shape)} {other[name].dtype}")


def chain_sum(states: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float],
              like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One chain's share of a FedAvg over several chains ([Note: several chains] in
    p2psl.planning.plan): Σ_k (w_k / Σ w) · state_k over the owners in `states` (sorted), in
    float64, where `weights` holds every included owner of every chain (so the shares are the
    same on every chain). Zeros, shaped as `like`, when the chain has no included owner."""
    everyone = sorted(weights)
    total_shares = dict(zip(everyone, _shares(everyone, weights)))
    owners = sorted(states)
    missing = [o for o in owners if o not in total_shares]
    if missing:
        raise ValueError(f"no weight for {missing}")
    for owner in owners[1:]:
        _check_compatible(owners[0], states[owners[0]], owner, states[owner])
    out = {}
    for name in sorted(like):
        total = torch.zeros(like[name].shape, dtype=torch.float64)
        for owner in owners:
            total += states[owner][name].detach().cpu().to(torch.float64) * total_shares[owner]
        out[name] = total
    return out


def chains_average(sums: list[Mapping[str, Tensor]], like: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """The FedAvg from every chain's `chain_sum`, added in the order given (the chains' order,
    the same on every node) and cast back to each entry's dtype once (integers rounded), a
    tensor at a time."""
    for name in sorted(like):
        total = torch.zeros(like[name].shape, dtype=torch.float64)
        for part in sums:
            total += part[name]
        yield name, total.to(like[name].dtype) if like[name].is_floating_point() else total.round().to(like[name].dtype)


#: elements averaged at a time: float64 temporaries of a slice, not of a whole 400 MB layer
SLICE_ELEMENTS = 1 << 20


def _average(tensors: list[Tensor], shares: list[float]) -> Tensor:
    """Σ share·tensor in float64, owner by owner in the given order, cast back once. Done a slice
    at a time: the same operations on every element, so the same bits, without float64 copies
    of the whole tensor (6× its float32 size at once)."""
    first = tensors[0]
    out = torch.empty(first.shape, dtype=first.dtype)
    flat_out = out.view(-1)
    flats = [t.detach().cpu().reshape(-1) for t in tensors]
    for start in range(0, flat_out.numel(), SLICE_ELEMENTS):
        stop = min(start + SLICE_ELEMENTS, flat_out.numel())
        total = torch.zeros(stop - start, dtype=torch.float64)
        for flat, share in zip(flats, shares):
            total += flat[start:stop].to(torch.float64) * share
        flat_out[start:stop] = total if first.is_floating_point() else total.round()
    return out

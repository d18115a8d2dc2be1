"""Measuring this peer's profile: only the layers a plan may give it, one layer built at a time.

[Note: profiling what a peer may hold] Measuring every layer of the model on every peer costs
each peer the whole model's memory before training starts (an owner of ResNet-101 measured at
608 MiB where its plan promised 386 MiB) and seconds of CPU for layers it will never run. A
peer's possible layers follow from the topology alone:

- with `first_cut` and `last_cut` set, an owner holds exactly 1..first_cut and last_cut+1..L and a
  compute node some of first_cut+1..last_cut (re-planning keeps the cuts);
- otherwise an owner holds a front and a back whose size its `memory` bounds
  (`owner_candidates`), and a compute node any of 2..L−1.

The other layers are `unmeasured`: their times are 0 and their sizes come from the model's shapes
(`Layers`), and the planner never gives them to the peer (`Problem.a_range`, `b_range`). Each
layer is built on its own from its blueprint, timed on a random input of its input's shape and
dropped, so the peak is one layer's, not the model's. The cache keeps what every run measured on
this machine and adds to it, so a later run (or another peer of the same host) measures only
what is still missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2psl.planning.measure import measure_layer, synchronizer
from p2psl.planning.memory import owner_memory
from p2psl.planning.profile import Profile, cache_dir_default, cache_key, write_atomic

#: bytes of one element of an activation whose size is not measured (the zoo trains in float32)
ELEMENT_BYTES = 4


@dataclass(frozen=True)
class Layers:
    """What measuring needs of a model without holding it whole."""

    name: str
    input_shape: tuple[int, ...]
    output_shapes: Sequence[tuple[int, ...]]   # each layer's output, without the batch dimension
    param_bytes: Sequence[int]                 # each layer's weights
    build: Callable[[int], Any]                # a fresh copy of 0-based layer j

    @property
    def count(self) -> int:
        return len(self.output_shapes)

    def input_of(self, j: int) -> tuple[int, ...]:
        return tuple(self.input_shape if j == 0 else self.output_shapes[j - 1])

    def sizes(self, batch_size: int) -> Profile:
        """A profile with the sizes alone (no times): what the memory model needs."""
        zeros = (0.0,) * self.count
        act = tuple(batch_size * math.prod(s) * ELEMENT_BYTES for s in self.output_shapes)
        return Profile("sizes", batch_size, zeros, zeros, zeros, act, tuple(self.param_bytes),
                       unmeasured=tuple(range(1, self.count + 1)))


def candidate_layers(topology, me: str, layers: Layers) -> list[int]:
    """The 0-based layers a plan may give `me` (the module note)."""
    cfg, count = topology.training, layers.count
    owner = topology.peer(me).role == "data_owner"
    if cfg.first_cut is not None and cfg.last_cut is not None:
        if owner:
            return [*range(cfg.first_cut), *range(cfg.last_cut, count)]
        return list(range(cfg.first_cut, cfg.last_cut))
    if not owner:
        return list(range(1, count - 1))
    front, back = owner_candidates(topology, me, layers)
    return sorted({*range(front), *range(count - back, count)})


def owner_candidates(topology, me: str, layers: Layers) -> tuple[int, int]:
    """How many front and back layers `me` could hold within its memory: the largest front with
    the smallest back (the last layer), and the largest back with the smallest front; at least
    one each (a plan that cannot fit even those is the planner's PlanInfeasible to report)."""
    cfg, count = topology.training, layers.count
    sizes, copies, memory = layers.sizes(cfg.batch_size), len(topology.owners), topology.peer(me).memory
    fits = lambda a, b: owner_memory(sizes, a, b, copies) <= memory
    front = cfg.first_cut if cfg.first_cut is not None else \
        max([a for a in range(1, count - 1) if fits(a, count - 1)], default=1)
    back = count - cfg.last_cut if cfg.last_cut is not None else \
        max([k for k in range(1, count - 1) if fits(1, count - k)], default=1)
    return front, back


def measure_layers(layers: Layers, indices: Iterable[int], batch_size: int, *, warmup: int = 2, repeats: int = 5,
                   device: Any = None, progress: Callable[[int, int], None] | None = None) -> dict[int, tuple]:
    """(fwd, bwd, opt, act_bytes, param_bytes) of each 0-based layer in `indices`, each layer built
    alone, on one torch thread (as a peer trains), and dropped before the next is built."""
    import torch

    indices = list(indices)
    rows: dict[int, tuple] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for done, j in enumerate(indices):
            if progress is not None:
                progress(done, len(indices))
            layer = layers.build(j).to(device or "cpu").train()
            x = torch.randn(batch_size, *layers.input_of(j)).to(device or "cpu")
            rows[j], _ = measure_layer(layer, x, j > 0, warmup, repeats, synchronizer(device))
            del layer, x
    finally:
        torch.set_num_threads(threads)
    return rows


@dataclass(frozen=True)
class Measured:
    """A peer's profile and what it took: the cache file, the layers timed now, the seconds."""

    profile: Profile
    path: Path
    timed: int
    seconds: float


def cached_layers_profile(layers: Layers, indices: Iterable[int], batch_size: int, *, device: Any = None,
                          device_name: str = "local", cache_dir: str | Path | None = None,
                          progress: Callable[[int, int], None] | None = None, **measure: Any) -> Measured:
    """The profile with at least `indices` timed: the cached one where it has them, else the
    missing layers timed now and added to the cache (written atomically)."""
    directory = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    path = directory / f"{cache_key(layers.name, layers.input_shape, batch_size, device)}.json"
    wanted = {int(j) for j in indices}
    cached, missing = _lookup(path, layers.count, wanted)
    if not missing and path in _CHECKED:
        return Measured(_only(cached, wanted, layers), path, 0, 0.0)
    with in_turn(path):  # [Note: measuring in turn]
        cached, missing = _lookup(path, layers.count, wanted)  # another peer may have timed them meanwhile
        started = time.perf_counter()
        if not missing and (path in _CHECKED or not _timed_slower(cached, wanted, layers, device, measure)):
            _CHECKED.add(path)
            return Measured(_only(cached, wanted, layers), path, 0, 0.0)
        timing = missing or sorted(wanted)  # [Note: a cache timed slower than the machine runs]
        rows = measure_layers(layers, timing, batch_size, device=device, progress=progress, **measure)
        profile = _merge(cached or _empty(layers, batch_size, device_name), _faster(cached, rows) if not missing else rows)
        try:
            write_atomic(path, json.dumps(profile.to_json()))
        except OSError:
            pass  # an unwritable cache only costs the next start the timing again
        _CHECKED.add(path)
    return Measured(_only(profile, wanted, layers), path, len(timing), time.perf_counter() - started)


#: cache files this process has checked against the machine ([Note: a cache timed slower than the
#: machine runs]); the peers of one process check each file once
_CHECKED: set[Path] = set()
#: a cached layer this many times slower than timed now was timed while the machine was busy
SLOWER = 1.5
#: the largest layer time (s) that a check times; a model of only larger layers checks its smallest
CHECK_UP_TO = 0.02


def _timed_slower(cached: Profile, wanted: set[int], layers: Layers, device: Any, measure: dict) -> bool:
    """Whether the cache's times are `SLOWER` than this machine runs now, by one layer timed again.

    [Note: a cache timed slower than the machine runs] A profile timed on the wall clock while
    every core was busy (a test suite, other peers training) was slow throughout, every layer by
    about the same factor, which no single layer's runs can tell apart from its own time: the
    digits CNN was cached 1.8× slower than it ran, and every later run on the machine predicted
    its first round half again too long. CPU time ([Note: timing under interference]) leaves out
    a core shared all along, but not a slower core, caches taken by other work or a lower clock
    frequency while the cache was timed; so the check stays. So once per process and cache file, before a peer takes every time
    from the cache, it times one of its layers again (the slowest under `CHECK_UP_TO`, a few
    milliseconds); where the cache is `SLOWER` than that, the peer times all its layers again,
    and each layer keeps the faster of its two times. A check that comes out slower changes
    nothing: the machine is busy now, and a profile is what a layer takes on a free core."""
    totals = {j: cached.fwd[j] + cached.bwd[j] + cached.opt[j] for j in wanted}
    small = [j for j in totals if totals[j] <= CHECK_UP_TO]
    j = max(small, key=lambda i: (totals[i], -i)) if small else min(totals, key=lambda i: (totals[i], i))
    fwd, bwd, opt, _, _ = measure_layers(layers, [j], cached.batch_size, device=device, **measure)[j]
    return (fwd + bwd + opt) * SLOWER < totals[j]


def _faster(cached: Profile, rows: dict[int, tuple]) -> dict[int, tuple]:
    """Each layer's times from `rows` or the cache, whichever is less."""
    out = {}
    for j, (fwd, bwd, opt, act, par) in rows.items():
        before = cached.fwd[j] + cached.bwd[j] + cached.opt[j]
        out[j] = (fwd, bwd, opt, act, par) if fwd + bwd + opt <= before else \
            (cached.fwd[j], cached.bwd[j], cached.opt[j], act, par)
    return out


def _only(profile: Profile, wanted: set[int], layers: Layers) -> Profile:
    """The profile with times for the `wanted` layers alone, whatever else the cache holds: what
    a peer shares must follow from the topology and its times, not from which peers of the
    machine timed what before (the sizes of the others are the model's, as if never timed)."""
    sizes = layers.sizes(profile.batch_size)
    untimed = {j: (0.0, 0.0, 0.0, sizes.act_bytes[j], sizes.param_bytes[j])
               for j in range(layers.count) if j not in wanted}
    return _with_rows(profile, untimed, timed=False) if untimed else profile


@contextlib.contextmanager
def in_turn(path: Path) -> Iterator[None]:
    """Hold the lock of one cache file: peers of one machine, in one process or many, time layers
    one after another.

    [Note: measuring in turn] Peers that start together profile together. On the wall clock
    (cache formats before 3) a layer timed while other peers of the machine timed theirs was
    timed on a share of its cores: a hundred peers in one process measured the digits CNN 100
    times slower than it runs, and the cache kept those times for every later run. CPU time
    ([Note: timing under interference]) no longer counts that share, but peers timing at once
    still compete for caches and memory, and each would time what one peer's timing gives all:
    timing under an exclusive lock of the cache file, and reading the cache again once the lock
    is held, makes the first peer time the layers alone and lets the others of that machine take
    its times without timing anything."""
    lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+b")
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except OSError:  # an unwritable cache, or a filesystem without locks: time without taking turns
        if lock is not None:
            lock.close()
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()


def _lookup(path: Path, count: int, wanted: set[int]) -> tuple[Profile | None, list[int]]:
    """The cached profile and the wanted layers it has no times for."""
    cached = _read(path, count)
    have = {j for j in range(count) if cached.measured(j)} if cached else set()
    return cached, sorted(wanted - have)


def _read(path: Path, count: int) -> Profile | None:
    try:
        profile = Profile.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None  # missing or damaged: measured again and overwritten
    return profile if profile.num_layers == count else None


def _empty(layers: Layers, batch_size: int, device_name: str) -> Profile:
    return replace(layers.sizes(batch_size), device=device_name)


def _merge(profile: Profile, rows: dict[int, tuple]) -> Profile:
    """The profile with the layers of `rows` timed now."""
    return _with_rows(profile, rows, timed=True)


def _with_rows(profile: Profile, rows: dict[int, tuple], timed: bool) -> Profile:
    """`profile` with each 0-based layer of `rows` set to its (fwd, bwd, opt, act_bytes,
    param_bytes), listed as timed or not."""
    columns = [list(c) for c in (profile.fwd, profile.bwd, profile.opt, profile.act_bytes, profile.param_bytes)]
    for j, row in rows.items():
        for column, value in zip(columns, row):
            column[j] = value
    fwd, bwd, opt, act, par = (tuple(c) for c in columns)
    changed = {j + 1 for j in rows}
    unmeasured = set(profile.unmeasured) - changed if timed else set(profile.unmeasured) | changed
    return replace(profile, fwd=fwd, bwd=bwd, opt=opt, act_bytes=act, param_bytes=par,
                   unmeasured=tuple(sorted(unmeasured)))

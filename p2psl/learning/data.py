"""Datasets and how they are split among data owners. Pure and offline: nothing is downloaded.

[Note: identical shards] Every peer derives the same shards and batch orders from the topology's
seed alone, so no one has to hand out indices (and no index list travels). The test set is split
IID whatever the training partition, and the owners' test shards are disjoint and cover it, so
Σ correct / Σ total over the owners is exactly the centralized accuracy on the whole test set.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from p2psl.errors import ConfigError
from p2psl.planning.profile import cache_root
from p2psl.units import plural

if TYPE_CHECKING:
    from p2psl.topology import TrainingConfig

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """Inputs (float32, N×C×H×W or N×features) and int64 labels, split into train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class OwnerShard:
    """Which training and test samples one data owner holds (indices into the Dataset)."""

    train_idx: np.ndarray
    test_idx: np.ndarray


def load_dataset(cfg: TrainingConfig) -> Dataset:
    """The dataset a `TrainingConfig` names: "digits", "synthetic" or a path to an .npz file."""
    if cfg.dataset == "digits":
        return _digits(cfg.test_fraction, cfg.seed)
    if cfg.dataset == "synthetic":
        return synthetic(tuple(cfg.synthetic_shape), cfg.synthetic_samples, cfg.num_classes,
                         cfg.test_fraction, cfg.seed)
    return load_npz(cfg.dataset, cfg.num_classes)


def _entropy(*values: int) -> list[int]:
    """Seed material for numpy from any ints (negative seeds included)."""
    return [int(v) % 2**64 for v in values]


def _digits(test_fraction: float, seed: int) -> Dataset:
    """scikit-learn's bundled digits, split stratified by the seed.

    [Note: digits cache] Importing scikit-learn (and SciPy behind it) costs a data owner more CPU
    at start-up than the rest of its preparation, so the scaled images and the split are kept in
    the cache folder (keyed by the split and scikit-learn's version, which decides the split) and
    read back with numpy alone. The arrays are then indexed exactly as when they are made, so the
    tensors match bit for bit, strides included (convolution kernels may choose by stride)."""
    path = cache_root() / "datasets" / f"digits-{_sklearn_version()}-{test_fraction!r}-{int(seed)}.npz"
    arrays = _cached_arrays(path, DIGITS_KEYS)
    if arrays is None:
        arrays = _split_digits(test_fraction, seed)
        _cache_arrays(path, arrays)
    x, y = arrays["images"][:, None, :, :], arrays["target"]
    train, test = arrays["train"], arrays["test"]
    return _from_numpy(x[train], y[train], x[test], y[test], 10)


DIGITS_KEYS = ("images", "target", "train", "test")


def _split_digits(test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    target = bunch.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(target)), test_size=test_fraction, stratify=target,
                                   random_state=int(seed) % 2**32)
    return dict(images=(bunch.images / 16.0).astype(np.float32), target=target, train=train, test=test)


def _sklearn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scikit-learn")
    except PackageNotFoundError:
        return "none"


def _cached_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None where the file is missing or unreadable (it is made again)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _cache_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Written atomically; a cache that cannot be written only costs the next run the import."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def synthetic(shape: tuple[int, ...], samples: int, num_classes: int, test_fraction: float, seed: int,
              rows: OwnerShard | None = None) -> Dataset:
    """Smooth per-class prototypes plus noise: learnable, but not by a lookup of single pixels.

    Each class has a random pattern drawn at a lower resolution and upsampled (so neighbouring
    values agree, like images); a sample is its class pattern at a random contrast plus
    independent noise almost as strong as the pattern. Values are roughly standardised.

    Each sample's noise comes from its own generator, so `rows` (training and test indices) can
    make only those samples, in that order: an owner makes its own shard and never the whole set.
    """
    prototypes, y, contrast = _synthetic_classes(shape, samples, num_classes, seed)
    n_test = _test_count(samples, test_fraction)
    train, test = (np.arange(n_test, samples), np.arange(n_test)) if rows is None else \
        (n_test + rows.train_idx, rows.test_idx)

    def make(index: np.ndarray) -> np.ndarray:
        x = np.empty((len(index), *shape), dtype=np.float32)
        for row, i in enumerate(index):
            noise = np.random.default_rng(_entropy(seed, 0x5EED, i)).normal(size=shape)
            x[row] = prototypes[y[i]] * contrast[i] + 0.8 * noise
        return x

    return _from_numpy(make(train), y[train], make(test), y[test], num_classes)


def synthetic_labels(shape: tuple[int, ...], samples: int, num_classes: int, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and test labels of `synthetic`, without making any input."""
    y = _synthetic_classes(shape, samples, num_classes, seed)[1]
    n_test = _test_count(samples, test_fraction)
    return y[n_test:], y[:n_test]


def _synthetic_classes(shape: tuple[int, ...], samples: int, num_classes: int, seed: int):
    """(class prototypes, every sample's label, every sample's contrast), from the seed."""
    rng = np.random.default_rng(_entropy(seed, 0x5EED))
    prototypes = np.stack([_smooth_pattern(rng, shape) for _ in range(num_classes)])
    y = rng.permutation(np.arange(samples) % num_classes).astype(np.int64)
    return prototypes, y, rng.uniform(0.5, 1.5, size=samples)


def _test_count(samples: int, test_fraction: float) -> int:
    return max(1, min(samples - 1, round(samples * test_fraction)))


def _smooth_pattern(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random pattern whose spatial (non-channel) axes are upsampled from a coarse grid
    (4× for axes of 16 or more, 2× for smaller ones)."""
    spatial = range(1, len(shape)) if len(shape) > 1 else range(1)
    factors = {axis: 4 if shape[axis] >= 16 else 2 for axis in spatial}
    pattern = rng.normal(size=[-(-d // factors[a]) if a in factors else d for a, d in enumerate(shape)])
    for axis, factor in factors.items():
        pattern = np.repeat(pattern, factor, axis=axis).take(range(shape[axis]), axis=axis)
    return pattern


def _from_numpy(x_train, y_train, x_test, y_test, num_classes: int) -> Dataset:
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    as_y = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return Dataset(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test),
                   tuple(int(d) for d in x_train.shape[1:]), int(num_classes))


# -- the user's own data -------------------------------------------------------------------------

def load_npz(path: str | Path, num_classes: int) -> Dataset:
    """An .npz with x_train, y_train, x_test, y_test; every problem is a `ConfigError` naming the key.

    Inputs may be N×features, N×H×W (a channel axis is added) or N×C×H×W; labels integers in
    [0, num_classes). Object arrays are refused: the file is never unpickled.
    """
    arrays = _read_npz(Path(path))
    x_train, x_test = (_inputs(path, key, arrays[key]) for key in ("x_train", "x_test"))
    y_train, y_test = (_labels(path, key, arrays[key], num_classes) for key in ("y_train", "y_test"))
    for x_key, y_key, x, y in (("x_train", "y_train", x_train, y_train), ("x_test", "y_test", x_test, y_test)):
        if len(x) != len(y):
            raise ConfigError(f"{path}: {x_key} has {len(x)} samples but {y_key} has {len(y)}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(f"{path}: x_train samples have shape {x_train.shape[1:]}, x_test {x_test.shape[1:]}")
    return _from_numpy(x_train, y_train, x_test, y_test, num_classes)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb"):
            pass  # a missing or unreadable file is an OSError here, said as such
        if not zipfile.is_zipfile(path):  # else numpy takes it for pickled data, and suggests loading that
            raise ValueError("not a zip archive of arrays, as numpy.savez writes")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise ConfigError(f"{path}: missing key{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(missing)} (expected {', '.join(NPZ_KEYS)})")
            return {key: _array(path, npz, key) for key in NPZ_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read as .npz: {exc}") from None


def _array(path: Path, npz, key: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise ConfigError(f"{path}: {key} cannot be read without unpickling ({exc})") from None


def _inputs(path, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise ConfigError(f"{path}: {key} must be numeric, got dtype {x.dtype}")
    if x.ndim not in (2, 3, 4) or len(x) == 0:
        raise ConfigError(f"{path}: {key} must be a non-empty N×features, N×H×W or N×C×H×W array, "
                          f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{path}: {key} contains NaN or infinite values")
    return x[:, None] if x.ndim == 3 else x


def _labels(path, key: str, y: np.ndarray, num_classes: int) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ConfigError(f"{path}: {key} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"{path}: {key} has labels in [{y.min()}, {y.max()}], "
                          f"expected [0, {num_classes - 1}] (num_classes = {num_classes})")
    return y


# -- sharding and batches ----------------------------------------------------------------------

def owner_data(cfg: TrainingConfig, owners: Sequence[str], me: str) -> tuple[Dataset, OwnerShard]:
    """What owner `me` keeps: its own samples only, and its shard over them. Synthetic inputs are
    made for its own samples alone: with many owners, each making the whole set would cost every
    owner the memory of everyone's data."""
    if cfg.dataset != "synthetic":
        data = load_dataset(cfg)
        return own_samples(data, shard(data, owners, cfg.partition, cfg.alpha, cfg.seed)[me])
    shape, samples = tuple(cfg.synthetic_shape), cfg.synthetic_samples
    y_train, y_test = synthetic_labels(shape, samples, cfg.num_classes, cfg.test_fraction, cfg.seed)
    mine = shard_labels(y_train, len(y_test), owners, cfg.partition, cfg.alpha, cfg.seed)[me]
    data = synthetic(shape, samples, cfg.num_classes, cfg.test_fraction, cfg.seed, rows=mine)
    return data, OwnerShard(np.arange(len(mine.train_idx), dtype=np.int64), np.arange(len(mine.test_idx), dtype=np.int64))


def shard(dataset: Dataset, owners: Sequence[str], partition: str, alpha: float, seed: int) -> dict[str, OwnerShard]:
    """Each owner's training and test indices (see [Note: identical shards])."""
    return shard_labels(dataset.y_train.numpy(), len(dataset.y_test), owners, partition, alpha, seed)


def shard_labels(y_train: np.ndarray, n_test: int, owners: Sequence[str], partition: str, alpha: float,
                 seed: int) -> dict[str, OwnerShard]:
    """Each owner's training and test indices, from the training labels and the test set's size.

    "iid": a shuffle cut into near-equal pieces. "dirichlet": per class, the owners' shares are
    drawn from Dirichlet(alpha) (small alpha: few classes per owner); every owner gets at least one
    training sample.
    """
    owners = list(owners)
    n_train = len(y_train)
    if not owners or n_train < len(owners) or n_test < len(owners):
        raise ConfigError(f"cannot shard {n_train} training and {n_test} test samples "
                          f"among {plural(len(owners), 'data owner')}")
    rng = np.random.default_rng(_entropy(seed, 0x5A4D))
    if partition == "iid":
        train = np.array_split(rng.permutation(n_train), len(owners))
    elif partition == "dirichlet":
        train = _dirichlet(y_train, len(owners), alpha, rng)
    else:
        raise ConfigError(f"unknown partition {partition!r} (expected 'iid' or 'dirichlet')")
    test = np.array_split(rng.permutation(n_test), len(owners))
    return {o: OwnerShard(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64))
            for o, tr, te in zip(owners, train, test)}


def own_samples(dataset: Dataset, mine: OwnerShard) -> tuple[Dataset, OwnerShard]:
    """Only one owner's samples, and its shard over them: what an owner keeps once the shards
    are drawn (a hundred owners in one process would otherwise each hold the whole dataset)."""
    train, test = torch.from_numpy(mine.train_idx), torch.from_numpy(mine.test_idx)
    kept = Dataset(dataset.x_train[train], dataset.y_train[train], dataset.x_test[test], dataset.y_test[test],
                   dataset.input_shape, dataset.num_classes)
    return kept, OwnerShard(np.arange(len(train), dtype=np.int64), np.arange(len(test), dtype=np.int64))


def _dirichlet(labels: np.ndarray, owners: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(owners)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(owners, float(alpha)))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for owner, chunk in enumerate(np.split(members, cuts)):
            pieces[owner].append(chunk)
    shards = [np.concatenate(p) for p in pieces]
    return _no_empty(shards)


def _no_empty(shards: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty owner one sample from the currently largest shard (lowest index on ties)."""
    for owner in range(len(shards)):
        if len(shards[owner]) == 0:
            donor = max(range(len(shards)), key=lambda o: (len(shards[o]), -o))
            shards[owner], shards[donor] = shards[donor][-1:], shards[donor][:-1]
    return shards


def batch_order(n: int, batch_size: int, seed: int, round: int, epoch: int, owner_index: int) -> list[np.ndarray]:
    """Positions 0..n-1 shuffled for this (round, epoch, owner) and cut into batches.

    The last batch may be smaller. Positions index into an owner's shard (shard.train_idx[batch]).
    """
    rng = np.random.default_rng(_entropy(seed, round, epoch, owner_index))
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]

"""Datasets, shards and batch orders: deterministic, complete, validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2psl.learning.data import batch_order, load_dataset, load_npz, own_samples, owner_data, shard, synthetic
from p2psl.errors import ConfigError
from p2psl.topology import TrainingConfig

torch.set_num_threads(1)
OWNERS = ["alice", "bob", "carol", "dave"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset(TrainingConfig())


def test_digits_is_bundled_scaled_and_stratified(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == 360  # test_fraction 0.2
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_split_follows_the_seed():
    a = load_dataset(TrainingConfig(seed=1))
    b = load_dataset(TrainingConfig(seed=1))
    c = load_dataset(TrainingConfig(seed=2))
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_test, c.x_test)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_shards_are_deterministic_disjoint_and_complete(digits, partition):
    shards = shard(digits, OWNERS, partition, alpha=0.5, seed=3)
    again = shard(digits, OWNERS, partition, alpha=0.5, seed=3)
    assert list(shards) == OWNERS
    for owner in OWNERS:
        assert np.array_equal(shards[owner].train_idx, again[owner].train_idx)
        assert np.array_equal(shards[owner].test_idx, again[owner].test_idx)
        assert len(shards[owner].train_idx) >= 1
    train = np.concatenate([s.train_idx for s in shards.values()])
    test = np.concatenate([s.test_idx for s in shards.values()])
    assert np.array_equal(np.sort(train), np.arange(len(digits.y_train)))
    assert np.array_equal(np.sort(test), np.arange(len(digits.y_test)))  # global accuracy = centralized
    sizes = [len(s.test_idx) for s in shards.values()]
    assert max(sizes) - min(sizes) <= 1


def test_iid_training_shards_are_near_equal(digits):
    sizes = [len(s.train_idx) for s in shard(digits, OWNERS, "iid", 0.5, seed=0).values()]
    assert max(sizes) - min(sizes) <= 1


def test_different_seeds_give_different_shards(digits):
    a = shard(digits, OWNERS, "iid", 0.5, seed=0)["alice"].train_idx
    b = shard(digits, OWNERS, "iid", 0.5, seed=1)["alice"].train_idx
    assert not np.array_equal(a, b)


def _label_skew(digits, shards) -> float:
    """Mean total-variation distance between an owner's label distribution and the global one."""
    labels = digits.y_train.numpy()
    overall = np.bincount(labels, minlength=10) / len(labels)
    skews = [0.5 * np.abs(np.bincount(labels[s.train_idx], minlength=10) / len(s.train_idx) - overall).sum()
             for s in shards.values()]
    return float(np.mean(skews))


def test_dirichlet_is_skewed_and_alpha_controls_it(digits):
    iid = _label_skew(digits, shard(digits, OWNERS, "iid", 0.5, seed=0))
    mild = _label_skew(digits, shard(digits, OWNERS, "dirichlet", 10.0, seed=0))
    strong = _label_skew(digits, shard(digits, OWNERS, "dirichlet", 0.1, seed=0))
    assert iid < 0.1 < strong
    assert mild < strong


def test_dirichlet_gives_every_owner_a_sample(digits):
    owners = [f"o{i}" for i in range(60)]
    shards = shard(digits, owners, "dirichlet", alpha=0.01, seed=5)
    assert all(len(s.train_idx) >= 1 for s in shards.values())
    assert sum(len(s.train_idx) for s in shards.values()) == len(digits.y_train)


def test_too_many_owners_or_unknown_partition(digits):
    small = synthetic((4,), 10, 2, 0.5, seed=0)
    with pytest.raises(ConfigError, match="among 6 data owners"):
        shard(small, [f"o{i}" for i in range(6)], "iid", 0.5, 0)
    with pytest.raises(ConfigError, match="unknown partition"):
        shard(digits, OWNERS, "by-label", 0.5, 0)


def test_batch_order_is_a_deterministic_shuffle_with_a_partial_last_batch():
    batches = batch_order(10, 4, seed=1, round=0, epoch=0, owner_index=2)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(10))
    again = batch_order(10, 4, seed=1, round=0, epoch=0, owner_index=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    others = [batch_order(10, 4, 1, 1, 0, 2), batch_order(10, 4, 1, 0, 1, 2), batch_order(10, 4, 1, 0, 0, 3)]
    assert all(not np.array_equal(np.concatenate(o), np.concatenate(batches)) for o in others)
    assert batch_order(0, 4, -1, 0, 0, 0) == []


def test_synthetic_has_the_requested_shape_and_learnable_structure():
    cfg = TrainingConfig(dataset="synthetic", synthetic_shape=(3, 16, 16), synthetic_samples=400,
                         num_classes=5, test_fraction=0.25)
    data = load_dataset(cfg)
    assert data.x_train.shape == (300, 3, 16, 16) and data.x_test.shape == (100, 3, 16, 16)
    assert data.input_shape == (3, 16, 16) and data.num_classes == 5
    assert torch.equal(load_dataset(cfg).x_train, data.x_train)
    # a nearest-class-mean classifier fit on the training set beats chance (20 %) by far
    means = torch.stack([data.x_train[data.y_train == c].mean(0) for c in range(5)])
    distances = ((data.x_test[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    accuracy = (distances.argmin(1) == data.y_test).float().mean().item()
    assert accuracy > 0.8


def test_synthetic_trains_a_small_model():
    from p2psl.learning.centralized import train_centralized

    cfg = TrainingConfig(model="mlp", dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_samples=600,
                         batch_size=32)
    assert train_centralized(cfg, epochs=3)["test_accuracy"] > 0.5  # chance is 0.1


# -- the user's own data --------------------------------------------------------------------------

def _arrays(**changes):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((20, 2, 4, 4), dtype=np.float32),
        "y_train": rng.integers(0, 3, 20),
        "x_test": rng.random((6, 2, 4, 4), dtype=np.float32),
        "y_test": rng.integers(0, 3, 6),
    }
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _npz(tmp_path, **changes):
    path = tmp_path / "data.npz"
    np.savez(path, **_arrays(**changes))
    return path


def test_npz_loads_through_the_config(tmp_path):
    path = _npz(tmp_path, x_train=np.zeros((20, 4, 4)), x_test=np.ones((6, 4, 4)))
    data = load_dataset(TrainingConfig(dataset=str(path), num_classes=3))
    assert data.input_shape == (1, 4, 4)  # a channel axis is added to N×H×W
    assert data.x_train.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert data.num_classes == 3


@pytest.mark.parametrize("changes, message", [
    ({"y_test": None}, "missing key y_test"),
    ({"x_train": np.zeros(20)}, "x_train must be a non-empty"),
    ({"x_test": np.zeros((6, 2, 4, 4, 1, 1))}, "x_test must be a non-empty"),
    ({"y_train": np.full(20, 3)}, r"y_train has labels in \[3, 3\]"),
    ({"y_test": -np.ones(6, dtype=np.int64)}, "y_test has labels"),
    ({"y_train": np.zeros(20, dtype=np.float32)}, "y_train must be a 1-D integer array"),
    ({"y_train": np.zeros(19, dtype=np.int64)}, "x_train has 20 samples but y_train has 19"),
    ({"x_test": np.zeros((6, 2, 5, 5))}, "x_train samples have shape"),
    ({"x_train": np.full((20, 3), np.nan)}, "NaN"),
    ({"x_train": np.array(["a"] * 20)}, "must be numeric"),
    ({"y_train": np.array([object()] * 20, dtype=object)}, "y_train cannot be read without unpickling"),
])
def test_npz_problems_name_the_file_and_key(tmp_path, changes, message):
    path = _npz(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as info:
        load_npz(path, num_classes=3)
    assert str(path) in str(info.value)


def test_unreadable_npz(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="cannot read as .npz: not a zip archive of arrays") as info:
        load_npz(path, 3)
    assert "pickle" not in str(info.value)  # numpy's own advice would be to load it unsafely
    with pytest.raises(ConfigError, match="cannot read as .npz: .*No such file"):
        load_npz(tmp_path / "absent.npz", 3)


def test_digits_are_read_back_from_the_cache_bit_for_bit_without_scikit_learn(tmp_path, monkeypatch):
    """[Note: digits cache]: the first load writes the split arrays, a later process reads them
    with numpy alone, and a damaged cache file is made again."""
    import subprocess
    import sys

    monkeypatch.setenv("P2PSL_CACHE_DIR", str(tmp_path))
    first = load_dataset(TrainingConfig(seed=3))
    (cached,) = (tmp_path / "datasets").glob("digits-*-0.2-3.npz")
    probe = ("import sys; from p2psl.learning.data import load_dataset; from p2psl.topology import TrainingConfig; "
             "d = load_dataset(TrainingConfig(seed=3)); print('sklearn' in sys.modules, float(d.x_train.sum()))")
    env = {**__import__("os").environ, "P2PSL_CACHE_DIR": str(tmp_path)}
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert shown.split() == ["False", str(float(first.x_train.sum()))]
    cached_copy = load_dataset(TrainingConfig(seed=3))
    cached.write_bytes(b"not a zip file")
    again = load_dataset(TrainingConfig(seed=3))
    for key in ("x_train", "y_train", "x_test", "y_test"):
        for other in (cached_copy, again):  # strides too: convolution kernels may choose by them
            assert torch.equal(getattr(first, key), getattr(other, key))
            assert getattr(first, key).stride() == getattr(other, key).stride()
    assert np.load(cached)["test"].shape == (360,)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_an_owner_makes_exactly_its_own_synthetic_samples(partition):
    """`owner_data` makes only the owner's rows; they equal its rows of the whole set."""
    cfg = TrainingConfig(dataset="synthetic", synthetic_shape=(1, 12, 12), synthetic_samples=300, num_classes=5,
                         partition=partition, seed=4)
    whole = load_dataset(cfg)
    owners = ["a", "b", "c", "d"]
    for name, part in shard(whole, owners, partition, cfg.alpha, cfg.seed).items():
        data, mine = owner_data(cfg, owners, name)
        assert torch.equal(data.x_train[mine.train_idx], whole.x_train[part.train_idx])
        assert torch.equal(data.y_train[mine.train_idx], whole.y_train[part.train_idx])
        assert torch.equal(data.x_test[mine.test_idx], whole.x_test[part.test_idx])
        assert torch.equal(data.y_test[mine.test_idx], whole.y_test[part.test_idx])


def test_an_owner_keeps_only_its_own_samples(digits):
    shards = shard(digits, ["a", "b", "c"], "dirichlet", 0.5, seed=1)
    kept, mine = own_samples(digits, shards["b"])
    assert torch.equal(kept.x_train[mine.train_idx], digits.x_train[shards["b"].train_idx])
    assert torch.equal(kept.y_test[mine.test_idx], digits.y_test[shards["b"].test_idx])
    assert len(kept.y_train) == len(shards["b"].train_idx) < len(digits.y_train)

"""Datasets (digits, MNIST IDX, CIFAR-10 pickles, synthetic), shards, and the model zoo."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from labkit.data import (
    DataError,
    batches_per_epoch,
    check_data_dir,
    load_dataset,
    make_synthetic,
    read_idx,
    shard_indices,
    train_size,
)
from labkit.models import build_model, flops_per_sample, parameter_count


def test_digits_standardized_with_training_statistics():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    assert len(d.y_train) == train_size("digits", None)
    assert abs(float(d.x_train.mean())) < 1e-5
    assert abs(float(d.x_train.std()) - 1) < 1e-3
    assert abs(float(d.x_test.mean())) > 1e-6  # test set uses the *training* statistics
    again = load_dataset("digits")
    assert torch.equal(d.x_test, again.x_test)  # deterministic split


def test_digits_split_is_cached_and_a_bad_cache_is_rebuilt(tmp_path, monkeypatch):
    from labkit import data

    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = load_dataset("digits")  # no cache yet: scikit-learn makes the split
    (cache,) = (tmp_path / "cache").iterdir()
    assert cache.suffix == ".npz" and not list(cache.parent.glob(".*.tmp"))
    fresh = data._make("digits", *data._split_digits(), 10)
    cached = load_dataset("digits")
    for d in (first, cached):
        for key in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(d, key), getattr(fresh, key)), key
    cache.write_bytes(b"not an npz file")  # a damaged cache is ignored and written anew
    assert torch.equal(load_dataset("digits").x_train, fresh.x_train)
    assert np.load(cache)["x_train"].shape == (train_size("digits", None), 1, 8, 8)
    (tmp_path / "a-file").write_text("")  # a cache that cannot be written costs only time
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert torch.equal(load_dataset("digits").y_test, fresh.y_test)


def _write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 255, (50, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 50, dtype=np.uint8), gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 20, dtype=np.uint8))
    d = load_dataset("mnist", str(tmp_path))
    assert d.x_train.shape == (50, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert train_size("mnist", str(tmp_path)) == 50
    raw = read_idx(tmp_path / "t10k-labels-idx1-ubyte")
    assert torch.equal(d.y_test, torch.from_numpy(raw.astype(np.int64)))


def test_mnist_missing_files_named(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*t10k-images"):
        check_data_dir("mnist", str(tmp_path))


def test_idx_bad_magic(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")


def test_cifar10_from_pickles(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        pickle.dump(batch, open(folder / name, "wb"))
    d = load_dataset("cifar10", str(tmp_path))
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert torch.allclose(d.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar10_missing_named(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*test_batch"):
        check_data_dir("cifar10", str(tmp_path))


def test_synthetic_any_size():
    d = make_synthetic(n_train=100, n_test=10, shape=(3, 4, 4), num_classes=5)
    assert d.x_train.shape == (100, 3, 4, 4) and int(d.y_train.max()) < 5


@pytest.mark.parametrize("n,world", [(1437, 4), (100, 3), (10, 1), (7, 8)])
def test_shards_partition_each_epoch(n, world):
    for epoch in range(3):
        shards = [shard_indices(n, r, world, epoch, seed=1) for r in range(world)]
        together = torch.cat(shards).sort().values
        assert torch.equal(together, torch.arange(n)), "each sample in exactly one shard"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert not torch.equal(shard_indices(n, 0, world, 0, 1), shard_indices(n, 0, world, 1, 1)) or n <= world
    assert batches_per_epoch(n, world, 2) >= 1


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("lenet", (1, 8, 8)), ("lenet", (1, 28, 28)),
                                        ("resnet", (3, 32, 32)), ("resnet", (1, 8, 8))])
def test_models_flops_match_torch_counter(name, shape):
    model = build_model(name, shape, 10, seed=0)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    with FlopCounterMode(display=False) as counter:
        model.eval()
        model(torch.zeros(1, *shape))
    assert flops_per_sample(model, shape) == counter.get_total_flops()
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0


def test_xavier_init_and_seeded_build():
    a = build_model("mlp", (1, 8, 8), 10, seed=3)
    b = build_model("mlp", (1, 8, 8), 10, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    w = a[1].weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert float(a[1].bias.abs().max()) == 0

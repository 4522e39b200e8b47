"""Datasets: scikit-learn's digits (embedded, the default), MNIST, CIFAR-10, synthetic.

Every loader returns a :class:`Dataset` of in-memory tensors, standardized with the
*training* set's statistics so that the inputs have mean 0 and standard deviation 1
(step 1 of Algorithm 3 in "Scaling Deep Learning on GPU and Knights Landing Clusters").

Sharding for data parallelism is :func:`shard_indices`: every epoch a fresh permutation
(seeded by the run's seed and the epoch) is dealt round-robin to the ranks, so each
sample lands in exactly one shard per epoch.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .registry import DATASETS


class DataError(ValueError):
    """A dataset cannot be loaded (missing or malformed files)."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (n, C, H, W), standardized
    y_train: torch.Tensor  # int64, (n,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name}: {len(self.y_train)} train, {len(self.y_test)} test, "
                f"input {self.input_shape}, {self.num_classes} classes)")


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each channel to mean 0, std 1 using the training set's statistics only."""
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _make(name, x_train, y_train, x_test, y_test, num_classes) -> Dataset:
    x_train, x_test = standardize(x_train.astype(np.float64), x_test.astype(np.float64))
    return Dataset(name, torch.from_numpy(x_train), torch.from_numpy(np.asarray(y_train, np.int64)),
                   torch.from_numpy(x_test), torch.from_numpy(np.asarray(y_test, np.int64)),
                   num_classes)


# --- scikit-learn digits ------------------------------------------------------------
DIGITS_SAMPLES = 1797
DIGITS_TEST_FRACTION = 0.2


@DATASETS.register("digits", help="scikit-learn's 8x8 handwritten digits (1797 images, embedded)",
                   needs_data_dir=False)
def load_digits(data_dir: str | None = None) -> Dataset:
    """1797 8x8 grey images of digits; a fixed stratified 80/20 train/test split.

    The split is kept in a small cache file (see :func:`cache_dir`): importing
    scikit-learn and parsing its CSV takes over a second, and every rank of every run
    loads the data.
    """
    cached = _read_digits_cache()
    if cached is None:
        cached = _split_digits()
        _write_digits_cache(cached)
    x_tr, y_tr, x_te, y_te = cached
    return _make("digits", x_tr, y_tr, x_te, y_te, 10)


def _split_digits():
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    x = x.reshape(-1, 1, 8, 8)
    # The split does not depend on the run's seed, so every run is tested on the same images.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION,
                                              random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def cache_dir() -> Path:
    """Where labkit keeps derived files: $LABKIT_CACHE_DIR, else $XDG_CACHE_HOME/labkit."""
    if os.environ.get("LABKIT_CACHE_DIR"):
        return Path(os.environ["LABKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labkit"


def _digits_cache_path() -> Path:
    from importlib.metadata import PackageNotFoundError, version

    try:
        sklearn_version = version("scikit-learn")
    except PackageNotFoundError:
        sklearn_version = "unknown"
    return cache_dir() / f"digits-split1-sklearn{sklearn_version}.npz"


def _read_digits_cache():
    """The cached split, or None when it is missing or unreadable (then it is made anew)."""
    try:
        with np.load(_digits_cache_path(), allow_pickle=False) as f:
            arrays = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    except (OSError, KeyError, ValueError, EOFError):
        return None
    n_train = train_size("digits", None)
    if arrays[0].shape != (n_train, 1, 8, 8) or arrays[2].shape != (DIGITS_SAMPLES - n_train, 1, 8, 8):
        return None
    return arrays


def _write_digits_cache(arrays) -> None:
    """Write the split atomically (a temp file, then rename); a cache that cannot be written is skipped."""
    path = _digits_cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


# --- MNIST (IDX files) ---------------------------------------------------------------
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0 0 dtype ndim, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path}: expected {expected} bytes of data for shape {tuple(dims)}, "
                        f"found {len(raw) - offset}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for folder in (data_dir, data_dir / "MNIST" / "raw", data_dir / "mnist"):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def mnist_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """The four IDX files of MNIST in ``data_dir``; DataError naming any that are missing."""
    root = Path(data_dir)
    found = {key: _find(root, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DataError(f"MNIST files missing in {root}: {', '.join(missing)} (.gz accepted)")
    return found


@DATASETS.register("mnist", help="MNIST from its four IDX files in --data-dir", needs_data_dir=True)
def load_mnist(data_dir: str | None = None) -> Dataset:
    if data_dir is None:
        raise DataError("MNIST needs --data-dir, a folder with the four IDX files")
    files = mnist_files(data_dir)
    x_tr, y_tr = read_idx(files["train_images"]), read_idx(files["train_labels"])
    x_te, y_te = read_idx(files["test_images"]), read_idx(files["test_labels"])
    for x, y, part in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if x.ndim != 3 or len(x) != len(y):
            raise DataError(f"MNIST {part}: images {x.shape} and labels {y.shape} do not match")
    return _make("mnist", x_tr[:, None], y_tr, x_te[:, None], y_te, 10)


# --- CIFAR-10 (python pickle batches) ----------------------------------------------------
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"


def cifar_dir(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir)
    for folder in (root, root / "cifar-10-batches-py"):
        names = CIFAR_TRAIN + [CIFAR_TEST]
        if all((folder / n).is_file() for n in names):
            return folder
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in CIFAR_TRAIN + [CIFAR_TEST] if not (folder / n).is_file()]
    raise DataError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    try:
        data, labels = batch[b"data"], batch[b"labels"]
    except (KeyError, TypeError):
        raise DataError(f"{path}: not a CIFAR-10 python batch (no data/labels)") from None
    return np.asarray(data, np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, np.int64)


@DATASETS.register("cifar10", help="CIFAR-10 from its python batches in --data-dir", needs_data_dir=True)
def load_cifar10(data_dir: str | None = None) -> Dataset:
    if data_dir is None:
        raise DataError("CIFAR-10 needs --data-dir, a folder with data_batch_1..5 and test_batch")
    folder = cifar_dir(data_dir)
    parts = [_read_cifar_batch(folder / n) for n in CIFAR_TRAIN]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(folder / CIFAR_TEST)
    return _make("cifar10", x_tr, y_tr, x_te, y_te, 10)


# --- synthetic -------------------------------------------------------------------------
def make_synthetic(n_train: int = 8192, n_test: int = 2048, shape=(1, 16, 16),
                   num_classes: int = 10, seed: int = 0, noise: float = 2.0) -> Dataset:
    """Learnable data of any size: each class is a random template plus Gaussian noise."""
    g = np.random.default_rng(seed)
    templates = g.normal(size=(num_classes, *shape))
    y = g.integers(0, num_classes, size=n_train + n_test)
    x = templates[y] + noise * g.normal(size=(n_train + n_test, *shape))
    return _make("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


@DATASETS.register("synthetic", help="random class templates plus noise (8192 train, 1x16x16), for benchmarks",
                   needs_data_dir=False)
def load_synthetic(data_dir: str | None = None) -> Dataset:
    return make_synthetic()


# --- the public entry points -------------------------------------------------------------
def check_data_dir(name: str, data_dir: str | None) -> None:
    """Raise DataError if ``name`` cannot find its files in ``data_dir`` (cheap: no loading)."""
    if not DATASETS.entry(name).meta.get("needs_data_dir"):
        return
    if data_dir is None:
        raise DataError(f"dataset {name} needs --data-dir, a folder with its files")
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir} is not a directory")
    if name == "mnist":
        mnist_files(data_dir)
    elif name == "cifar10":
        cifar_dir(data_dir)


def train_size(name: str, data_dir: str | None) -> int:
    """Number of training samples, read cheaply (headers only where possible)."""
    if name == "digits":
        return DIGITS_SAMPLES - math.ceil(DIGITS_SAMPLES * DIGITS_TEST_FRACTION)  # as train_test_split rounds
    if name == "synthetic":
        return 8192
    if name == "mnist":
        path = mnist_files(data_dir)["train_labels"]
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            return int(np.frombuffer(f.read(8), ">u4")[1])
    if name == "cifar10":
        return 50000
    return len(load_dataset(name, data_dir).y_train)


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    return DATASETS.get(name)(data_dir)


def shard_indices(n: int, rank: int, world_size: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's sample indices for ``epoch``: a seeded permutation dealt round-robin.

    The shards of one epoch are disjoint and together cover all ``n`` samples.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[rank::world_size]


def batches_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Steps per epoch, the same on every rank so synchronous modes stay in lock step."""
    return max(1, (n // world_size) // batch_size)

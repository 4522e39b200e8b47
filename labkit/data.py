"""Datasets: scikit-learn's digits (embedded, the default), MNIST, CIFAR-10, synthetic.

Every loader returns a :class:`Dataset` of in-memory tensors, standardized with the
*training* set's statistics so that the inputs have mean 0 and standard deviation 1
(step 1 of Algorithm 3 in "Scaling Deep Learning on GPU and Knights Landing Clusters").

Sharding for data parallelism is :func:`shard_indices`: every epoch a fresh permutation
(seeded by the run's seed and the epoch) is dealt round-robin to the ranks, so each
sample lands in exactly one shard per epoch.

Data files are untrusted: :func:`check_data_dir` (run by ``RunConfig.validate()`` before
any rank starts) checks MNIST's IDX files (gzip, magic, type, shapes, sizes, counts,
label range) and CIFAR-10's batches, which are pickles read by :class:`SafeUnpickler`:
it builds only containers, bytes, text, numbers and numpy arrays, so a crafted file
cannot run code. Every problem is one line that names the file.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
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


# --- reading files that may be damaged or hostile ------------------------------------------
# Every problem with a data file is a DataError whose message is one line that starts
# with the file's path: validate() turns it into ``labkit: error: --data-dir: PATH: ...``.
GZIP_MAGIC = b"\x1f\x8b"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_start(head: bytes) -> str:
    return "0x" + head[:4].hex() if head else "nothing"


def _open_data_file(path: Path):
    """Open ``path`` for reading bytes: plain, or gzip when it is gzip (by content, not name).

    A file named ``.gz`` that is not gzip, an empty file and an unreadable one are
    DataErrors naming the file.
    """
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if size == 0:
        f.close()
        raise DataError(f"{path}: the file is empty (0 bytes)")
    head = f.read(4)
    f.seek(0)
    if head[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb"), None
    if path.suffix == ".gz":
        f.close()
        raise DataError(f"{path}: named .gz but is not gzip data (it starts with {_describe_start(head)}, "
                        f"gzip starts with 0x1f8b)")
    return f, size


def _read_exactly(f, n: int, path: Path) -> bytes:
    """Up to ``n`` bytes from ``f``; damaged or truncated gzip data is a DataError naming ``path``."""
    try:
        return f.read(n)
    except EOFError:
        raise DataError(f"{path}: the gzip data is truncated (the file ends inside the compressed stream)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: damaged gzip data ({_one_line(e)})") from None


def _remaining_length(f, size: int | None, consumed: int, path: Path) -> int:
    """Bytes left after ``consumed``: from the file size, or by decompressing to the end
    in chunks (which also checks gzip's CRC and length fields)."""
    if size is not None:
        return size - consumed
    total = 0
    while True:
        chunk = _read_exactly(f, 1 << 20, path)
        if not chunk:
            return total
        total += len(chunk)


# --- MNIST (IDX files) ---------------------------------------------------------------
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_CLASSES = 10


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX file says it holds, and how many data bytes it really has."""

    path: Path
    type_code: int
    dims: tuple[int, ...]
    data_bytes: int  # found after the header

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_IDX_DTYPES[self.type_code])

    @property
    def expected_bytes(self) -> int:
        return math.prod(self.dims) * self.dtype.itemsize


def _parse_idx_header(f, path: Path) -> tuple[int, tuple[int, ...], int]:
    """(type code, dims, header length) of an IDX file: magic 0 0 TYPE NDIM, then NDIM big-endian uint32."""
    magic = _read_exactly(f, 4, path)
    if len(magic) < 4:
        raise DataError(f"{path}: too short for an IDX file ({len(magic)} bytes; "
                        f"the magic number alone is 4 bytes)")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{magic.hex()}; "
                        f"expected 0x0000 then a type code and the number of dimensions)")
    ndim = magic[3]
    raw_dims = _read_exactly(f, 4 * ndim, path)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: IDX header cut short ({4 + len(raw_dims)} bytes; "
                        f"{ndim} dimensions need {4 + 4 * ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, ">u4"))
    return magic[2], dims, 4 + 4 * ndim


def idx_header(path: str | os.PathLike) -> IdxHeader:
    """The header of an IDX file (gzipped or not) and the number of data bytes after it.

    Reads the header only, plus, for gzip, a pass over the compressed stream (no array kept).
    """
    path = Path(path)
    f, size = _open_data_file(path)
    with f:
        code, dims, header_len = _parse_idx_header(f, path)
        return IdxHeader(path, code, dims, _remaining_length(f, size, header_len, path))


def _check_idx_size(h: IdxHeader) -> None:
    if h.data_bytes != h.expected_bytes:
        cut = " (the file is truncated)" if h.data_bytes < h.expected_bytes else " (extra bytes at the end)"
        raise DataError(f"{h.path}: expected {h.expected_bytes} bytes of data for shape {h.dims}, "
                        f"found {h.data_bytes}{cut}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0 0 dtype ndim, big-endian dims, data."""
    path = Path(path)
    f, _ = _open_data_file(path)
    with f:
        code, dims, _ = _parse_idx_header(f, path)
        dtype = np.dtype(_IDX_DTYPES[code])
        expected = math.prod(dims) * dtype.itemsize
        chunks, want = [], expected + 1  # one more byte tells trailing garbage apart
        while want > 0:  # in chunks: a header may claim more than the file holds
            chunk = _read_exactly(f, min(want, 1 << 24), path)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        raw = b"".join(chunks)
    _check_idx_size(IdxHeader(path, code, dims, len(raw)))
    return np.frombuffer(raw, dtype).reshape(dims)


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


def _check_mnist_images(h: IdxHeader) -> None:
    if h.type_code != 0x08:
        raise DataError(f"{h.path}: MNIST images must be unsigned bytes (IDX type 0x08), "
                        f"found type 0x{h.type_code:02x} ({h.dtype})")
    if len(h.dims) != 3:
        raise DataError(f"{h.path}: MNIST images need 3 dimensions (count, rows, columns), "
                        f"found {len(h.dims)}: {h.dims}")
    if 0 in h.dims:
        raise DataError(f"{h.path}: holds no images (shape {h.dims})")
    _check_idx_size(h)


def _check_mnist_labels(path: Path) -> np.ndarray:
    h = idx_header(path)
    if h.type_code != 0x08:
        raise DataError(f"{path}: MNIST labels must be unsigned bytes (IDX type 0x08), "
                        f"found type 0x{h.type_code:02x} ({h.dtype})")
    if len(h.dims) != 1:
        raise DataError(f"{path}: MNIST labels need 1 dimension (count), found {len(h.dims)}: {h.dims}")
    _check_idx_size(h)
    labels = read_idx(path)
    bad = np.flatnonzero(labels >= MNIST_CLASSES)
    if len(bad):
        raise DataError(f"{path}: label {int(labels[bad[0]])} at position {int(bad[0])} is outside "
                        f"0-{MNIST_CLASSES - 1} ({len(bad)} such labels)")
    return labels


def check_mnist(data_dir: str | os.PathLike) -> tuple[int, int]:
    """Check the four MNIST files fully (magic, type, shapes, sizes, counts, label range, gzip).

    Returns (training samples, test samples). Images are checked from their headers and
    sizes (a gzipped file is decompressed once, in chunks); labels are read.
    """
    files = mnist_files(data_dir)
    counts = {}
    image_shape = None
    for part in ("train", "test"):
        images = idx_header(files[f"{part}_images"])
        _check_mnist_images(images)
        labels = _check_mnist_labels(files[f"{part}_labels"])
        if images.dims[0] != len(labels):
            raise DataError(f"{images.path}: holds {images.dims[0]} images but {files[f'{part}_labels'].name} "
                            f"holds {len(labels)} labels")
        if image_shape is not None and images.dims[1:] != image_shape:
            raise DataError(f"{images.path}: images are {images.dims[1]}x{images.dims[2]} but the training "
                            f"images are {image_shape[0]}x{image_shape[1]}")
        image_shape = images.dims[1:]
        counts[part] = images.dims[0]
    return counts["train"], counts["test"]


@DATASETS.register("mnist", help="MNIST from its four IDX files in --data-dir", needs_data_dir=True)
def load_mnist(data_dir: str | None = None) -> Dataset:
    if data_dir is None:
        raise DataError("MNIST needs --data-dir, a folder with the four IDX files")
    check_mnist(data_dir)
    files = mnist_files(data_dir)
    x_tr, y_tr = read_idx(files["train_images"]), read_idx(files["train_labels"])
    x_te, y_te = read_idx(files["test_images"]), read_idx(files["test_labels"])
    return _make("mnist", x_tr[:, None], y_tr, x_te[:, None], y_te, MNIST_CLASSES)


# --- CIFAR-10 (python pickle batches) ----------------------------------------------------
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"
CIFAR_CLASSES = 10
CIFAR_SAMPLE_BYTES = 3 * 32 * 32


def _numpy_core(module: str):
    """numpy's core module under its numpy 2 name (numpy._core) or its numpy 1 name (numpy.core)."""
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{prefix}.{module}")
        except ImportError:
            continue
    raise ImportError(f"numpy has no core.{module}")


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as pickle protocol 2 uses it for bytes, limited to latin-1."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not how pickle stores bytes")
    return text.encode("latin1", errors="strict")


def _empty_bytes(*args):
    """``bytes()`` as pickle protocol 2 uses it for an empty bytes object, and nothing more."""
    if args:
        raise pickle.UnpicklingError("bytes() with arguments is not how pickle stores bytes")
    return b""


def _pickle_whitelist() -> dict[tuple[str, str], object]:
    """Exactly the globals a pickled CIFAR-10 batch names: numpy's array and scalar
    reconstruction (under numpy 1 and 2 module names, pickle protocols 2-5), and the two
    ways pickle protocol 2 writes bytes (latin-1 text, empty bytes)."""
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode,
               ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RefusedPickle(DataError):
    """A pickle names something a data file never holds (it could run code): not loaded."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers, bytes, text, numbers and numpy arrays.

    Plain pickle runs whatever callable a file names (``os.system`` included); this one
    resolves only the names in :func:`_pickle_whitelist` and refuses any other, naming
    the file. No persistent ids, no extension registry beyond the whitelist.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _pickle_whitelist()

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise RefusedPickle(f"{self._path}: refused to load: the pickle calls {module}.{name}, which a "
                                f"CIFAR-10 batch never holds (only dicts, lists, bytes, text, numbers and "
                                f"numpy arrays are accepted)")
        return found

    def persistent_load(self, pid):
        raise RefusedPickle(f"{self._path}: refused to load: the pickle uses persistent ids")


def safe_unpickle(path: str | os.PathLike):
    """Load a pickle file with :class:`SafeUnpickler`; every failure is a DataError naming it."""
    path = Path(path)
    f, _ = _open_data_file(path)
    with f:
        try:
            return SafeUnpickler(f, path).load()
        except DataError:
            raise
        except (pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"{path}: not a readable pickle ({_one_line(e) or 'truncated'})") from None
        except MemoryError:
            raise DataError(f"{path}: the pickle asks for more memory than there is") from None
        except Exception as e:  # noqa: BLE001 - anything a malformed stream makes numpy or pickle raise
            raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {_one_line(e)})") from None


def cifar_dir(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir)
    for folder in (root, root / "cifar-10-batches-py"):
        names = CIFAR_TRAIN + [CIFAR_TEST]
        if all((folder / n).is_file() for n in names):
            return folder
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in CIFAR_TRAIN + [CIFAR_TEST] if not (folder / n).is_file()]
    raise DataError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)}")


def _entry(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch, read safely and checked: (uint8 images (n, 3, 32, 32), labels (n,))."""
    path = Path(path)
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    data, labels = _entry(batch, "data"), _entry(batch, "labels")
    if data is None or labels is None:
        raise DataError(f"{path}: not a CIFAR-10 python batch (no data/labels)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"an array of {data.dtype}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DataError(f"{path}: data must be an array of uint8, found {kind}")
    if data.ndim != 2 or data.shape[1] != CIFAR_SAMPLE_BYTES:
        raise DataError(f"{path}: data must have shape (n, {CIFAR_SAMPLE_BYTES}) (3x32x32 images), "
                        f"found {data.shape}")
    if len(data) == 0:
        raise DataError(f"{path}: holds no images")
    if not isinstance(labels, (list, np.ndarray)):
        raise DataError(f"{path}: labels must be a list of whole numbers, found a {type(labels).__name__}")
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError):
        raise DataError(f"{path}: labels must be a list of whole numbers") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be a list of whole numbers, found {y.dtype} of shape {y.shape}")
    if len(y) != len(data):
        raise DataError(f"{path}: holds {len(data)} images but {len(y)} labels")
    bad = np.flatnonzero((y < 0) | (y >= CIFAR_CLASSES))
    if len(bad):
        raise DataError(f"{path}: label {int(y[bad[0]])} at position {int(bad[0])} is outside "
                        f"0-{CIFAR_CLASSES - 1} ({len(bad)} such labels)")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


_cifar_checked: dict[tuple, tuple[int, int]] = {}


def check_cifar10(data_dir: str | os.PathLike) -> tuple[int, int]:
    """Read and check all six CIFAR-10 batches safely; (training samples, test samples).

    The answer is remembered for the files as they are (path, size, modification time),
    so validating a configuration and asking its training size read the files once.
    """
    folder = cifar_dir(data_dir)
    names = CIFAR_TRAIN + [CIFAR_TEST]
    key = tuple((str((folder / n).resolve()), (st := (folder / n).stat()).st_size, st.st_mtime_ns, st.st_ino)
                for n in names)
    if key not in _cifar_checked:
        counts = [len(read_cifar_batch(folder / n)[1]) for n in names]
        _cifar_checked.clear()
        _cifar_checked[key] = (sum(counts[:-1]), counts[-1])
    return _cifar_checked[key]


@DATASETS.register("cifar10", help="CIFAR-10 from its python batches in --data-dir", needs_data_dir=True)
def load_cifar10(data_dir: str | None = None) -> Dataset:
    if data_dir is None:
        raise DataError("CIFAR-10 needs --data-dir, a folder with data_batch_1..5 and test_batch")
    folder = cifar_dir(data_dir)
    parts = [read_cifar_batch(folder / n) for n in CIFAR_TRAIN]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_cifar_batch(folder / CIFAR_TEST)
    return _make("cifar10", x_tr, y_tr, x_te, y_te, CIFAR_CLASSES)


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
    """Raise DataError if ``name``'s files in ``data_dir`` are missing or malformed.

    Run by ``RunConfig.validate()`` before any rank starts: MNIST's IDX files are checked
    from their headers and sizes (labels read), CIFAR-10's batches are read with the
    safe unpickler and checked. Every message is one line naming the file.
    """
    if not DATASETS.entry(name).meta.get("needs_data_dir"):
        return
    if data_dir is None:
        raise DataError(f"dataset {name} needs --data-dir, a folder with its files")
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir} is not a directory")
    if name == "mnist":
        check_mnist(data_dir)
    elif name == "cifar10":
        check_cifar10(data_dir)


def train_size(name: str, data_dir: str | None) -> int:
    """Number of training samples, read cheaply (headers only where possible)."""
    if name == "digits":
        return DIGITS_SAMPLES - math.ceil(DIGITS_SAMPLES * DIGITS_TEST_FRACTION)  # as train_test_split rounds
    if name == "synthetic":
        return 8192
    if name == "mnist":
        path = mnist_files(data_dir)["train_labels"]
        f, _ = _open_data_file(path)
        with f:
            _, dims, _ = _parse_idx_header(f, path)
        return dims[0] if dims else 0
    if name == "cifar10":
        return check_cifar10(data_dir)[0]
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

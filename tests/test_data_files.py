"""Bad data files end in one line naming the file, before any rank starts; pickles cannot run code.

Every case writes a small, real-format dataset, damages one file, and asserts the exact
message ``validate()`` gives (``--data-dir: PATH: what is wrong``).
"""

import gzip
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from labkit import ConfigError, RunConfig
from labkit.data import (
    DataError,
    check_data_dir,
    load_dataset,
    read_cifar_batch,
    read_idx,
    safe_unpickle,
    train_size,
)

from .conftest import ROOT

MNIST = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CIFAR = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.tobytes()


def make_mnist(folder, n_train=6, n_test=4, gz=()):
    """Four valid IDX files (the keys in ``gz`` gzipped, with a .gz name); returns their paths."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 255, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 255, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    paths = {}
    for key, array in arrays.items():
        raw = idx_bytes(array)
        if key in gz:
            paths[key] = folder / (MNIST[key] + ".gz")
            paths[key].write_bytes(gzip.compress(raw))
        else:
            paths[key] = folder / MNIST[key]
            paths[key].write_bytes(raw)
    return paths


def validate_error(dataset: str, folder) -> str:
    """The message validate() raises for ``dataset`` in ``folder`` (the test fails if it passes)."""
    with pytest.raises(ConfigError) as info:
        RunConfig(dataset=dataset, data_dir=str(folder), batch_size=1).validate()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--data-dir: ")
    return message[len("--data-dir: "):]


# --- MNIST ------------------------------------------------------------------------------
def test_valid_mnist_passes_plain_gzipped_and_gzip_without_gz_name(tmp_path):
    paths = make_mnist(tmp_path, gz=("train_images", "test_labels"))
    RunConfig(dataset="mnist", data_dir=str(tmp_path), batch_size=2).validate()
    assert train_size("mnist", str(tmp_path)) == 6
    # gzip data under a plain name is recognized by its content
    plain = tmp_path / MNIST["train_images"]
    plain.write_bytes(paths["train_images"].read_bytes())
    paths["train_images"].unlink()
    d = load_dataset("mnist", str(tmp_path))
    assert d.x_train.shape == (6, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)


@pytest.mark.parametrize("content,problem", [
    (b"", "the file is empty (0 bytes)"),
    (b"\x00\x00\x08", "too short for an IDX file (3 bytes; the magic number alone is 4 bytes)"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x06", "IDX header cut short (8 bytes; 3 dimensions need 16)"),
    (b"PK\x03\x04" + bytes(100), "not an IDX file (bad magic number 0x504b0304; expected 0x0000 then a type "
                                 "code and the number of dimensions)"),
])
def test_mnist_empty_tiny_cut_or_foreign_images(tmp_path, content, problem):
    paths = make_mnist(tmp_path)
    paths["train_images"].write_bytes(content)
    assert validate_error("mnist", tmp_path) == f"{paths['train_images']}: {problem}"


def test_mnist_gz_that_is_not_gzip(tmp_path):
    paths = make_mnist(tmp_path, gz=("train_labels",))
    paths["train_labels"].write_bytes(idx_bytes(np.zeros(6, np.uint8)))  # plain IDX under a .gz name
    assert validate_error("mnist", tmp_path) == (
        f"{paths['train_labels']}: named .gz but is not gzip data (it starts with 0x00000801, "
        f"gzip starts with 0x1f8b)")


def test_mnist_truncated_gzip(tmp_path):
    paths = make_mnist(tmp_path, gz=("train_images",))
    whole = paths["train_images"].read_bytes()
    paths["train_images"].write_bytes(whole[: len(whole) // 2])
    assert validate_error("mnist", tmp_path) == (
        f"{paths['train_images']}: the gzip data is truncated (the file ends inside the compressed stream)")


def test_mnist_gzip_with_a_bad_checksum(tmp_path):
    paths = make_mnist(tmp_path, gz=("test_images",))
    whole = bytearray(paths["test_images"].read_bytes())
    whole[-8] ^= 0xFF  # the CRC-32 of the uncompressed data
    paths["test_images"].write_bytes(bytes(whole))
    message = validate_error("mnist", tmp_path)
    assert re.fullmatch(re.escape(f"{paths['test_images']}: damaged gzip data (CRC check failed ")
                        + r"0x[0-9a-f]+ != 0x[0-9a-f]+\)", message), message


@pytest.mark.parametrize("cut,problem", [
    (-100, "expected 4704 bytes of data for shape (6, 28, 28), found 4604 (the file is truncated)"),
    (+3, "expected 4704 bytes of data for shape (6, 28, 28), found 4707 (extra bytes at the end)"),
])
def test_mnist_image_data_size(tmp_path, cut, problem):
    paths = make_mnist(tmp_path)
    raw = paths["train_images"].read_bytes()
    paths["train_images"].write_bytes(raw[:cut] if cut < 0 else raw + bytes(cut))
    assert validate_error("mnist", tmp_path) == f"{paths['train_images']}: {problem}"


def test_mnist_truncated_gzipped_data_is_counted_after_decompression(tmp_path):
    paths = make_mnist(tmp_path, gz=("test_images",))
    paths["test_images"].write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10]))
    assert validate_error("mnist", tmp_path) == (
        f"{paths['test_images']}: expected 3136 bytes of data for shape (4, 28, 28), found 3126 "
        f"(the file is truncated)")


@pytest.mark.parametrize("key,array,type_code,problem", [
    ("train_images", np.zeros((6, 28, 28), ">f4"), 0x0D,
     "MNIST images must be unsigned bytes (IDX type 0x08), found type 0x0d (>f4)"),
    ("train_images", np.zeros((6, 784), np.uint8), 0x08,
     "MNIST images need 3 dimensions (count, rows, columns), found 2: (6, 784)"),
    ("train_images", np.zeros((0, 28, 28), np.uint8), 0x08, "holds no images (shape (0, 28, 28))"),
    ("test_labels", np.zeros(4, ">i4"), 0x0C,
     "MNIST labels must be unsigned bytes (IDX type 0x08), found type 0x0c (>i4)"),
    ("test_labels", np.zeros((4, 1), np.uint8), 0x08, "MNIST labels need 1 dimension (count), found 2: (4, 1)"),
    ("train_labels", np.array([1, 2, 12, 3, 200, 0], np.uint8), 0x08,
     "label 12 at position 2 is outside 0-9 (2 such labels)"),
])
def test_mnist_types_shapes_and_label_range(tmp_path, key, array, type_code, problem):
    paths = make_mnist(tmp_path)
    paths[key].write_bytes(idx_bytes(array, type_code))
    assert validate_error("mnist", tmp_path) == f"{paths[key]}: {problem}"


def test_mnist_counts_and_image_sizes_must_match(tmp_path):
    paths = make_mnist(tmp_path)
    paths["train_labels"].write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    assert validate_error("mnist", tmp_path) == (
        f"{paths['train_images']}: holds 6 images but train-labels-idx1-ubyte holds 5 labels")
    paths = make_mnist(tmp_path)
    paths["test_images"].write_bytes(idx_bytes(np.zeros((4, 27, 27), np.uint8)))
    assert validate_error("mnist", tmp_path) == (
        f"{paths['test_images']}: images are 27x27 but the training images are 28x28")


def test_read_idx_names_the_file_for_damaged_gzip_and_huge_headers(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(50, np.uint8)))[:-12])
    with pytest.raises(DataError, match=re.escape(f"{bad}: the gzip data is truncated")):
        read_idx(bad)
    huge = tmp_path / "huge"  # claims 4 billion^3 bytes; must not try to allocate them
    huge.write_bytes(b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3 + bytes(10))
    with pytest.raises(DataError, match=re.escape(f"{huge}: expected ") + ".*found 10 .the file is truncated"):
        read_idx(huge)


# --- CIFAR-10 -------------------------------------------------------------------------------
def cifar_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def make_cifar(folder, protocol=2, numpy1_names=False):
    """Six python batches as the official files hold them (dict of bytes keys, uint8 data, int labels).

    ``numpy1_names`` writes numpy's reconstruction function under the module name the
    official files (pickled with numpy 1) use: ``numpy.core.multiarray``.
    """
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(CIFAR):
        raw = pickle.dumps(cifar_batch(4 if name != "test_batch" else 3, seed=i), protocol=protocol)
        if numpy1_names:
            assert b"numpy._core.multiarray\n" in raw
            raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("protocol,numpy1_names", [(2, True), (2, False), (4, False), (5, False)])
def test_cifar_real_format_loads(tmp_path, protocol, numpy1_names):
    folder = make_cifar(tmp_path / "cifar-10-batches-py", protocol, numpy1_names)
    RunConfig(dataset="cifar10", data_dir=str(tmp_path), batch_size=2).validate()
    assert train_size("cifar10", str(tmp_path)) == 20
    d = load_dataset("cifar10", str(tmp_path))
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    x, y = read_cifar_batch(folder / "data_batch_2")
    expected = cifar_batch(4, seed=1)
    assert np.array_equal(x.reshape(4, -1), expected[b"data"]) and y.tolist() == expected[b"labels"]


class ShellCommand:
    """What an attacker puts in a pickle: unpickling calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_pickle_that_runs_a_command_is_refused(tmp_path):
    folder = make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = cifar_batch(4)
    evil[b"labels"] = ShellCommand(f"touch {marker}")
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    problem = (f"{folder / 'data_batch_3'}: refused to load: the pickle calls posix.system, which a CIFAR-10 "
               f"batch never holds (only dicts, lists, bytes, text, numbers and numpy arrays are accepted)")
    assert validate_error("cifar10", folder) == problem
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", str(folder))
    assert str(info.value) == problem
    assert not marker.exists()
    # The payload is live: plain pickle runs the command. This is what the safe reader prevents.
    with open(folder / "data_batch_3", "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()


class Harmless:
    pass


@pytest.mark.parametrize("payload,name", [
    (Harmless(), "tests.test_data_files.Harmless"),  # any class is refused, even a harmless one
    (np.array([1, "x"], dtype=object), None),  # object arrays hold Python objects: refused as data
])
def test_cifar_other_globals_refused(tmp_path, payload, name):
    folder = make_cifar(tmp_path)
    batch = cifar_batch(4)
    batch[b"data"] = payload
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    message = validate_error("cifar10", folder)
    if name:
        assert message.startswith(f"{folder / 'test_batch'}: refused to load: the pickle calls {name}, ")
    else:
        assert message == f"{folder / 'test_batch'}: data must be an array of uint8, found an array of object"


def test_codecs_encode_only_as_pickle_uses_it(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError) as info:
        safe_unpickle(path)
    assert str(info.value) == f"{path}: not a readable pickle (_codecs.encode with 'rot13' is not how pickle stores bytes)"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R.")
    assert safe_unpickle(path) == b"abc"
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nK\x0a\x85R.")  # bytes(10): not how pickle writes bytes
    with pytest.raises(DataError, match="bytes.. with arguments is not how pickle stores bytes"):
        safe_unpickle(path)


def _dump(batch):
    return pickle.dumps(batch, protocol=2)


@pytest.mark.parametrize("content,problem", [
    (b"", "the file is empty (0 bytes)"),
    (_dump(cifar_batch())[:200], "not a readable pickle (pickle data was truncated)"),
    (b"\x80", "not a readable pickle (pickle data was truncated)"),
    (b"{not a pickle}", "not a readable pickle (invalid load key, '{'.)"),
    (_dump([1, 2]), "not a CIFAR-10 python batch (holds a list, not a dict)"),
    (_dump({b"data": np.zeros((4, 3072), np.uint8)}), "not a CIFAR-10 python batch (no data/labels)"),
    (_dump({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}),
     "data must be an array of uint8, found an array of float32"),
    (_dump({b"data": [[0] * 3072] * 4, b"labels": [0] * 4}), "data must be an array of uint8, found a list"),
    (_dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}),
     "data must have shape (n, 3072) (3x32x32 images), found (4, 3000)"),
    (_dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}), "holds no images"),
    (_dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}), "holds 4 images but 3 labels"),
    (_dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 10, -1, 3]}),
     "label 10 at position 1 is outside 0-9 (2 such labels)"),
    (_dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": ["a", "b", "c", "d"]}),
     "labels must be a list of whole numbers, found <U1 of shape (4,)"),
    (_dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": b"\x00\x01\x02\x03"}),
     "labels must be a list of whole numbers, found a bytes"),
])
def test_cifar_bad_batches(tmp_path, content, problem):
    folder = make_cifar(tmp_path)
    (folder / "data_batch_5").write_bytes(content)
    assert validate_error("cifar10", folder) == f"{folder / 'data_batch_5'}: {problem}"


def test_check_data_dir_reads_each_cifar_file_once_per_change(tmp_path):
    folder = make_cifar(tmp_path)
    check_data_dir("cifar10", str(folder))
    assert train_size("cifar10", str(folder)) == 20
    (folder / "data_batch_1").write_bytes(_dump({b"data": np.zeros((7, 3072), np.uint8), b"labels": [1] * 7}))
    assert train_size("cifar10", str(folder)) == 23  # a changed file is read again


# --- the command line: one line, exit 2, no process started -----------------------------------
DRIVER = textwrap.dedent("""
    import os, subprocess, sys
    def refuse(*args, **kwargs):
        print("STARTED A PROCESS", args[:1], file=sys.stderr)
        os._exit(99)
    subprocess.Popen.__init__ = refuse
    os.fork = os.posix_spawn = os.posix_spawnp = refuse
    from labkit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_cli_bad_data_exits_2_with_one_line_and_starts_nothing(tmp_path, dataset):
    marker = tmp_path / "pwned"
    (tmp_path / "data").mkdir()
    if dataset == "mnist":
        paths = make_mnist(tmp_path / "data", gz=("train_labels",))
        paths["train_labels"].write_bytes(b"not gzip at all")
        bad_file = paths["train_labels"]
        problem = "named .gz but is not gzip data (it starts with 0x6e6f7420, gzip starts with 0x1f8b)"
    else:
        folder = make_cifar(tmp_path / "data")
        batch = cifar_batch(4)
        batch[b"data"] = ShellCommand(f"touch {marker}")
        bad_file = folder / "data_batch_1"
        bad_file.write_bytes(pickle.dumps(batch, protocol=2))
        problem = ("refused to load: the pickle calls posix.system, which a CIFAR-10 batch never holds "
                   "(only dicts, lists, bytes, text, numbers and numpy arrays are accepted)")
    run_dir = tmp_path / "run"
    env = {**os.environ, "LABKIT_RUNS_DIR": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-c", DRIVER, "train", "--dataset", dataset,
                          "--data-dir", str(tmp_path / "data"), "--run-dir", str(run_dir), "--steps", "5"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr == f"labkit: error: --data-dir: {bad_file}: {problem}\n"
    assert not run_dir.exists() and not (tmp_path / "runs").exists() and not marker.exists()

"""The names in every registry, remembered between processes, so that listing the choices
(``labkit train --help``, the options of a form) does not import torch.

The registries are filled by importing the packages that register things (models,
sync modes, compressors, ...), and those import torch: seconds of start-up for a command
that only prints its options. After a process has filled the registries it writes their
names here; the next process that only needs the names reads them back. The file is keyed
by labkit's source files (their paths, sizes and modification times) and the Python that
runs them, so a changed or reinstalled labkit never reads names it did not register: the
key no longer matches and the registries are filled the slow way, once.

Where: ``$LABKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/labkit``, else ``~/.cache/labkit``.
A cache that cannot be read or written is simply not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

CACHE_ENV = "LABKIT_CACHE_DIR"
FILE_NAME = "choices.json"
PACKAGE_DIR = Path(__file__).resolve().parent

_loaded: dict | None = None  # what this process read (or wrote): {kind: [names]}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "labkit"


def source_key() -> str:
    """A digest of labkit's source files (path, size, mtime) and the running Python."""
    digest = hashlib.sha256(f"{PACKAGE_DIR}|{sys.version}|{sys.executable}".encode())
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                digest.update(f"{os.path.relpath(path, PACKAGE_DIR)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()


def load() -> dict | None:
    """{registry kind: [names]} as the last full fill wrote them, if they are still true."""
    global _loaded
    if _loaded is None:
        try:
            data = json.loads((cache_dir() / FILE_NAME).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != source_key() or not isinstance(data.get("names"), dict):
            return None
        _loaded = {kind: list(names) for kind, names in data["names"].items() if isinstance(names, list)}
    return _loaded


def save(names: dict) -> None:
    """Remember {registry kind: [names]} for the next process (atomically; silently skipped
    where the cache directory is not writable)."""
    global _loaded
    _loaded = {kind: list(values) for kind, values in names.items()}
    directory = cache_dir()
    path = directory / FILE_NAME
    temp = directory / f".{FILE_NAME}.{os.getpid()}.tmp"
    record = {"key": source_key(), "names": _loaded}
    try:
        try:
            if json.loads(path.read_text()) == record:
                return  # already there
        except (OSError, ValueError):
            pass
        directory.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(record))
        os.replace(temp, path)
    except OSError:
        try:
            temp.unlink()
        except OSError:
            pass

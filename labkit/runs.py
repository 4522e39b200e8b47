"""The run directory: the one place a run's results live (DESIGN 3.3).

    RUN_DIR/config.json     the RunConfig, labkit version, hosts, world size, start time
    RUN_DIR/metrics.jsonl   one JSON object per line, appended while the run goes
    RUN_DIR/summary.json    written at the end: status, accuracy, losses, timings, error
    RUN_DIR/checkpoints/    step-NNNNNNNN.pt, written atomically (temp file + rename)
    RUN_DIR/logs/rank-K.log each rank's own output

Writers (the ranks, the launcher) and readers (the CLI, widgets, dashboards) meet only
here. Every file that is replaced is written to a temporary name and renamed, so a run
killed at any moment leaves either the old file or the new one, never half of one.
Metric lines are appended with a single ``write`` on a file opened with O_APPEND, so the
lines of several ranks never interleave.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import time
from pathlib import Path

import torch

KEEP_CHECKPOINTS = 2


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded (cut short, altered, foreign), or none at all."""


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a temporary file beside ``path``, on disk; nothing is left if it fails."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` at once: the old file or the new one, never half of one,
    and no temporary file left behind when the write fails (full disk, vanished directory)."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n").encode())


def _clean(obj):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class RunDir:
    """Read and write one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"rank-{rank}.log"

    # creation
    def create(self, config_dict: dict, world_size: int, launcher_host: str | None = None) -> None:
        from . import __version__

        self.path.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.checkpoint_dir.mkdir(exist_ok=True)
        atomic_write_json(self.config_path, {
            "config": config_dict, "labkit_version": __version__, "torch_version": torch.__version__,
            "world_size": world_size, "hosts": [launcher_host or socket.gethostname()],
            "start_time": time.time(), "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def read_config(self) -> dict:
        return json.loads(self.config_path.read_text())

    def update_config(self, **fields) -> None:
        data = self.read_config()
        data.update(fields)
        atomic_write_json(self.config_path, data)

    # metrics
    def append_metrics(self, record: dict) -> None:
        line = (json.dumps(_clean(record), separators=(",", ":")) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def metrics(self, kind: str | None = None, rank: int | None = None) -> list[dict]:
        """All complete metric lines (a line cut short by a crash is skipped)."""
        return list(self.iter_metrics(kind, rank))

    def iter_metrics(self, kind=None, rank=None, offset: int = 0):
        for record, _ in self.read_metrics_from(offset):
            if (kind is None or record.get("kind") == kind) and (rank is None or record.get("rank") == rank):
                yield record

    def read_metrics_from(self, offset: int = 0):
        """Yield (record, offset after it) for complete lines from byte ``offset`` on."""
        try:
            with open(self.metrics_path, "rb") as f:
                f.seek(offset)
                for line in f:
                    if not line.endswith(b"\n"):
                        return  # still being written, or cut short
                    offset += len(line)
                    try:
                        yield json.loads(line), offset
                    except json.JSONDecodeError:
                        continue
        except FileNotFoundError:
            return

    def truncate_metrics_after(self, step: int) -> None:
        """Drop metric lines past ``step`` (used when resuming from a checkpoint at ``step``)."""
        kept = [json.dumps(r, separators=(",", ":")) + "\n" for r in self.metrics()
                if r.get("step", 0) <= step]
        atomic_write_bytes(self.metrics_path, "".join(kept).encode())

    # summary
    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):  # missing, unreadable, or not JSON
            return None

    @property
    def status(self) -> str:
        summary = self.read_summary()
        return summary["status"] if summary else "running"

    # checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step-{step:08d}.pt"

    def save_checkpoint(self, step: int, state: dict) -> Path:
        """Write ``state`` for ``step`` with its checksum and keep the newest few checkpoints.

        The payload and its checksum file (``step-N.pt.sha256``: SHA-256 and size) are both
        written to temporary files first and then renamed, the checksum first: a crash at
        any moment leaves either no new checkpoint, or one whose checksum says whether it
        is whole. The previous checkpoints are only pruned once the new one is in place.
        """
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"step": step, **state}, buf)
        data = buf.getvalue()
        path = self.checkpoint_path(step)
        side = checksum_path(path)
        tmp_data = _write_temp(path, data)
        tmp_side = None
        try:
            tmp_side = _write_temp(side, f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode())
            os.replace(tmp_side, side)
            os.replace(tmp_data, path)
        except BaseException:
            _unlink_quietly(tmp_data)
            if tmp_side is not None:
                _unlink_quietly(tmp_side)
            raise
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(self.checkpoint_dir.glob("step-*.pt"))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def verify_checkpoint(self, path: Path) -> tuple[dict | None, str | None]:
        """(state, None) for a whole checkpoint written by labkit, else (None, why not).

        The file is compared with its checksum before it is unpickled, and unpickled with
        ``weights_only=True``: tensors, numbers, strings and containers only, no code.
        """
        path = Path(path)
        side = checksum_path(path)
        try:
            expected = side.read_text().split()
            digest, size = expected[0], int(expected[1])
        except FileNotFoundError:
            return None, "has no checksum file (not written by labkit, or its write was cut short)"
        except (OSError, ValueError, IndexError, UnicodeDecodeError):
            return None, f"has an unreadable checksum file {side.name}"
        try:
            data = path.read_bytes()
        except OSError as e:
            return None, f"cannot be read ({e.strerror or e})"
        if len(data) != size:
            what = "is truncated" if len(data) < size else "has bytes added"
            return None, f"{what} ({len(data)} bytes, its checksum says {size})"
        if hashlib.sha256(data).hexdigest() != digest:
            return None, "does not match its checksum (altered after it was written)"
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use it
            return None, f"is not a labkit checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        expected_step = _step_of(path)
        if not isinstance(state, dict) or state.get("step") != expected_step:
            return None, f"is not a labkit checkpoint of step {expected_step}"
        return state, None

    def find_good_checkpoint(self) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
        """(path, state) of the newest intact checkpoint, and the (path, why) of each newer
        one that is not intact."""
        rejected = []
        for path in reversed(self.checkpoints()):
            state, why = self.verify_checkpoint(path)
            if state is not None:
                return path, state, rejected
            rejected.append((path, why))
        return None, None, rejected

    def set_aside(self, path: Path) -> Path:
        """Move a checkpoint that must not be loaded (and its checksum) to ``checkpoints/rejected/``."""
        where = self.checkpoint_dir / "rejected"
        where.mkdir(exist_ok=True)
        target = where / path.name
        os.replace(path, target)
        side = checksum_path(path)
        if side.exists():
            os.replace(side, where / side.name)
        return target

    def load_checkpoint(self, path: Path | None = None) -> dict:
        """The state of checkpoint ``path``, or of the newest intact one; raises
        :class:`CheckpointError` rather than load a file that fails its checksum."""
        if path is not None:
            state, why = self.verify_checkpoint(path)
            if state is None:
                raise CheckpointError(f"{path} {why}")
            return state
        found, state, rejected = self.find_good_checkpoint()
        if found is None:
            why = "; ".join(f"{p.name} {w}" for p, w in rejected)
            raise CheckpointError(f"{self.checkpoint_dir}: no intact checkpoint" + (f" ({why})" if why else ""))
        return state

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, status={self.status})"


def checksum_path(path: Path) -> Path:
    """The checksum file of checkpoint ``path``: ``step-N.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _step_of(path: Path) -> int | None:
    try:
        return int(Path(path).stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


class MetricsTail:
    """Follows ``metrics.jsonl`` as it grows: each ``read()`` returns the complete lines
    written since the last one. ``offset=None`` starts at the current end of the file
    (a resumed run's earlier lines are skipped)."""

    def __init__(self, run: RunDir | str | os.PathLike, offset: int | None = 0):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        if offset is None:
            offset = self.run.metrics_path.stat().st_size if self.run.metrics_path.exists() else 0
        self.offset = offset

    def read(self) -> list[dict]:
        records = []
        for record, offset in self.run.read_metrics_from(self.offset):
            self.offset = offset
            records.append(record)
        return records


def default_run_dir(model: str, sync: str, workers: int, root: str | os.PathLike | None = None) -> Path:
    """A new directory under ``root`` (default: $LABKIT_RUNS_DIR, else ./runs)."""
    root = root or os.environ.get("LABKIT_RUNS_DIR", "runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{model}-{sync}-w{workers}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path

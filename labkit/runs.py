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

import json
import math
import os
import socket
import time
from pathlib import Path

import torch

KEEP_CHECKPOINTS = 2


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def status(self) -> str:
        summary = self.read_summary()
        return summary["status"] if summary else "running"

    # checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step-{step:08d}.pt"

    def save_checkpoint(self, step: int, state: dict) -> Path:
        """Write ``state`` for ``step`` atomically and keep the newest few checkpoints."""
        import io

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"step": step, **state}, buf)
        path = self.checkpoint_path(step)
        atomic_write_bytes(path, buf.getvalue())
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(self.checkpoint_dir.glob("step-*.pt"))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def load_checkpoint(self, path: Path | None = None) -> dict:
        path = path or self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"{self.checkpoint_dir}: no checkpoint")
        return torch.load(path, map_location="cpu", weights_only=False)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, status={self.status})"


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

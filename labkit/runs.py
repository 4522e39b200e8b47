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
import shlex
import socket
import time
from pathlib import Path

KEEP_CHECKPOINTS = 2
LOCK_NAME = ".lock"  # held (flock) by the process that launched the run, for as long as it runs it


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


def _significant(obj, digits: int = 6):
    if isinstance(obj, float) and math.isfinite(obj):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _significant(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_significant(v, digits) for v in obj]
    return obj


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
        import torch

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
        """Write ``summary.json``; measured numbers are kept to six significant digits (what
        a timing or an accuracy means, not the 16 digits of a float)."""
        atomic_write_json(self.summary_path, _significant(summary))

    def read_summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):  # missing, unreadable, or not JSON
            return None

    @property
    def status(self) -> str:
        summary = self.settle()
        return summary["status"] if summary else "running"

    # a run whose launcher ended without finalizing it
    def ending_summary(self, status: str, error: str | None, world_size: int | None = None) -> dict:
        """The summary of a run that did not complete, from what its files hold: the last
        logged step, the last evaluation, the newest checkpoint and how to resume from it."""
        last_step = max((r.get("step", 0) or 0 for r in self.iter_metrics(kind="train")), default=0)
        evals = self.metrics(kind="eval")
        last_eval = evals[-1] if evals else {}
        try:
            meta = self.read_config()
        except (OSError, ValueError):
            meta = {}
        start = meta.get("start_time")
        ckpt = self.latest_checkpoint()
        return {
            "status": status, "error": error, "steps": last_step,
            "wall_time_s": _last_t(self) if start is None else round(time.time() - start, 3),
            # the last evaluation before the end, and the step it was made at
            "test_accuracy": last_eval.get("accuracy"), "test_loss": last_eval.get("loss"),
            "evaluated_at_step": last_eval.get("step"), "train_loss": None, "samples_per_s": None,
            "bytes_sent": None, "comm_fraction": None, "world_size": world_size or meta.get("world_size"),
            "checkpoint": str(ckpt) if ckpt else None,
            "resume_with": resume_command(self.path) if ckpt else None,
        }

    def settle(self, found_by: str = "a reader", ranks_may_run: bool = False) -> dict | None:
        """The summary, or ``None`` while the run is going. A run whose launching process
        ended without writing the summary (a killed kernel, a closed terminal) and whose
        ranks are all gone is finalized here, by whoever reads it first: ``stopped``, or
        ``failed`` with a rank's own error, naming the cause."""
        summary = self.read_summary()
        if summary is not None:
            return summary
        try:
            launched = self.read_config().get("launched_by")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(launched, dict) or launched.get("host") != socket.gethostname():
            return None  # launched by a batch script, or on another host: nothing to tell from here
        if process_alive(launched):
            return None
        with held_lock(self.path / LOCK_NAME) as held:
            if not held:
                return None  # a new launcher (a resume) holds it
            summary = self.read_summary()
            if summary is not None:
                return summary
            if not ranks_may_run and self.live_ranks():
                return None  # they notice by themselves and end; the next reader finalizes
            summary = self.orphan_summary(launched, found_by)
            try:
                self.write_summary(summary)
            except OSError:
                pass  # a read-only or full directory: the summary is still reported
            return summary

    def orphan_summary(self, launched: dict, found_by: str) -> dict:
        """``stopped`` (or ``failed`` with a rank's own error): the launching process ended."""
        events = self.metrics(kind="event")
        own = [e for e in events if e.get("event") == "error" and not e.get("peer_error")]
        reason = (f"the process that launched the run (pid {launched.get('pid')}) ended before the run did; "
                  f"found by {found_by}")
        if own:
            return self.ending_summary("failed", f"{own[0].get('error')} ({reason})")
        return self.ending_summary("stopped", reason)

    def live_ranks(self) -> list[int]:
        """The ranks on this host that started, have not said goodbye, and still run."""
        host = socket.gethostname()
        pids, ended = {}, set()
        for e in self.iter_metrics(kind="event"):
            if e.get("event") == "started" and e.get("host") == host and "pid" in e:
                pids[e.get("rank")] = e["pid"]
            elif e.get("event") in ("finished", "error", "stopped"):
                ended.add(e.get("rank"))
        return sorted(r for r, pid in pids.items() if r not in ended and process_alive({"pid": pid}))

    def problems(self) -> list[str]:
        """One line per damaged file of the run (for ``labkit show``): a config.json or a
        summary.json that is not JSON, metric lines that are not."""
        found = []
        for path, what in ((self.config_path, "config"), (self.summary_path, "summary")):
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict) or (what == "config" and not isinstance(data.get("config"), dict)):
                    found.append(f"{path} is damaged (not a labkit {what})")
                elif what == "summary" and "status" not in data:
                    found.append(f"{path} is damaged (no status)")
            except FileNotFoundError:
                if what == "config":
                    found.append(f"{path} is missing: not a labkit run directory")
            except (OSError, UnicodeDecodeError) as e:
                found.append(f"{path} cannot be read ({getattr(e, 'strerror', None) or e})")
            except ValueError as e:
                found.append(f"{path} is damaged (not JSON: {str(e).split(':')[0]})")
        bad, first = 0, None
        try:
            with open(self.metrics_path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # being written, or cut short by a crash: not a problem
                    try:
                        ok = isinstance(json.loads(line), dict)
                    except ValueError:
                        ok = False
                    if not ok:
                        bad += 1
                        first = first or number
        except FileNotFoundError:
            pass
        except OSError as e:
            found.append(f"{self.metrics_path} cannot be read ({e.strerror or e})")
        if bad:
            found.append(f"{self.metrics_path}: {bad} line(s) are not JSON (the first at line {first}); "
                         "they are skipped")
        return found

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
        import torch

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
        import torch

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


def resume_command(run_dir) -> str:
    """The command that resumes ``run_dir``, quoted for the shell (spaces, quotes, $)."""
    return f"labkit train --run-dir {shlex.quote(str(run_dir))} --resume"


def _last_t(run: RunDir) -> float | None:
    return max((r.get("t", 0) or 0 for r in run.iter_metrics()), default=None)


def process_identity(pid: int | None = None) -> dict:
    """This process (or ``pid``) as the run directory names it: pid, host, and its start
    time in clock ticks, so that a pid reused by another process is not taken for it."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid)}


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(ident: dict) -> bool:
    """Is the process ``ident`` (from :func:`process_identity`) still running (not a zombie)?"""
    pid = ident.get("pid")
    if not isinstance(pid, int):
        return False
    start = _start_ticks(pid)
    if start is None:
        return False
    return ident.get("start") in (None, start)


class held_lock:
    """``with held_lock(path) as held:`` tries to take the flock of ``path`` without
    waiting; ``held`` says whether it was taken (no file: not held)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self) -> bool:
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            os.close(self.fd)
            self.fd = None
            return False

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


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

"""The handle of a run in progress: ``labkit.launch(config)`` returns a :class:`Run`.

A monitor thread in the :class:`Run` follows the ranks: when one dies it stops the others
(or, in sync modes that survive the loss of a worker, records the loss and goes on) and
writes a ``failed`` summary naming the rank, so that nothing hangs and nothing is left
running.

Every run ends with a status, also when the process that launched it goes away:
SIGTERM, SIGHUP and a second Ctrl-C during ``wait()`` stop it, and so does the
interpreter's exit (an ``atexit`` hook); the ranks watch the launching process and
finalize the run themselves when it is killed outright (``worker.watch_launcher``), and
the next reader of a run directory finalizes what nobody else could (``RunDir.settle``).
The ranks are started from one thread that lives as long as this process, because the
kernel's parent-death signal follows the thread that started a child, not its process: a
run launched from a thread that then ends goes on.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..registry import LAUNCHERS, SYNC_MODES
from ..runs import LOCK_NAME, MetricsTail, RunDir, default_run_dir, process_identity, resume_command
from .base import signal_name

FAILURE_GRACE_S = 15.0  # how long the other ranks get to notice a dead peer and exit by themselves
FINISH_GRACE_S = 60.0  # a Stop after every rank's last step waits this long for the summary


@dataclass
class RunResult:
    """How a run ended: its directory and ``summary.json``."""

    run_dir: Path
    summary: dict

    @property
    def status(self) -> str:
        return self.summary.get("status", "running")

    @property
    def test_accuracy(self) -> float | None:
        return self.summary.get("test_accuracy")

    @property
    def error(self) -> str | None:
        return self.summary.get("error")

    def metrics(self, kind: str | None = None) -> list[dict]:
        return RunDir(self.run_dir).metrics(kind)

    def __repr__(self) -> str:
        acc = f", test_accuracy={self.test_accuracy:.4f}" if self.test_accuracy is not None else ""
        err = f", error={self.error!r}" if self.error else ""
        return f"RunResult({str(self.run_dir)!r}, status={self.status!r}{acc}{err})"


class Run:
    """A run in progress: a handle that never blocks unless asked to."""

    def __init__(self, config, run: RunDir, job, metrics_offset: int = 0, lock: int | None = None):
        self.config = config
        self._lock = lock  # RUN_DIR/.lock, held until the run is finalized
        self._write_error: str | None = None  # why the summary could not be written, if so
        self._files = run  # the RunDir; run_dir is its path
        self.job = job
        self._stop_requested = False
        self._stop_reason = "stopped by request"
        self._hurry = False  # a second interrupt: end the ranks without a grace period
        self._done = threading.Event()
        self._lost_workers: set[int] = set()
        self._ranks = _RankWatch(run, metrics_offset)
        self._first_failure: tuple[int, str] | None = None
        self._vanished_at: dict[int, float] = {}
        self._silent: dict[int, str] = {}  # ranks alive but mute when a peer gave up on them: their state
        self._total_steps = _total_steps(config)
        self._monitor = threading.Thread(target=self._watch, name=f"labkit-run-{run.path.name}", daemon=True)
        self._monitor.start()
        _LIVE.add(self)

    @property
    def run_dir(self) -> Path:
        return self._files.path

    @property
    def status(self) -> str:
        return self._files.status

    def metrics(self, kind: str | None = None) -> list[dict]:
        return self._files.metrics(kind)

    def summary(self) -> dict | None:
        return self._files.read_summary()

    def done(self) -> bool:
        return self._done.is_set()

    # --- watching ---------------------------------------------------------------------
    def _watch(self) -> None:
        survives = SYNC_MODES.entry(self.config.sync).meta.get("survives_worker_loss", False)
        failed_at = finishing_since = None
        try:
            while self.job.poll() is None:
                if self._stop_requested:
                    # a Stop after every rank's last step: let rank 0 write the completed summary
                    if finishing_since is None and not self._hurry and self._all_finished():
                        finishing_since = time.monotonic()
                    if finishing_since is None or self._hurry or \
                            time.monotonic() - finishing_since > FINISH_GRACE_S:
                        self.job.stop(**({"grace": 0.0} if self._hurry else {}))
                        break
                for rank, detail in self._newly_dead():
                    if survives and rank != 0:
                        self._files.append_metrics({
                            "t": time.time() - self._files.read_config()["start_time"], "kind": "event",
                            "event": "worker_lost", "rank": rank, "detail": detail})
                    elif failed_at is None:
                        failed_at = time.monotonic()
                        self._first_failure = (rank, detail)
                        self._silent = self._ranks.silent()
                if failed_at is not None and (time.monotonic() - failed_at > FAILURE_GRACE_S
                                              or self._ranks.only_stopped_left()):
                    self.job.stop()  # the others did not notice by themselves (or cannot): end them
                    break
                if not self.run_dir.is_dir():
                    self._write_error = f"the run directory {self.run_dir} vanished while the run went on"
                    self.job.stop()
                    break
                time.sleep(0.05)
        except OSError as e:  # the run directory cannot be read or written any more
            self._write_error = self._write_problem(e)
            self._stop_quietly()
        finally:
            try:
                self._finish()
            except OSError as e:
                self._write_error = self._write_error or self._write_problem(e)
            except Exception as e:  # noqa: BLE001 - the monitor never dies silently
                self._write_error = self._write_error or f"the run's monitor failed: {type(e).__name__}: {e}"
            finally:
                unlock(self._lock)
                self._lock = None
                self._done.set()

    def _write_problem(self, e: OSError) -> str:
        """One line for a run directory that could not be written (full, vanished, read-only)."""
        if not self.run_dir.is_dir():
            return f"the run directory {self.run_dir} vanished while the run went on"
        where = e.filename or self.run_dir
        return f"cannot write {where}: {e.strerror or e}; the run was ended"

    def _stop_quietly(self) -> None:
        try:
            self.job.stop()
        except Exception:  # noqa: BLE001 - already ending
            pass

    def _newly_dead(self) -> list[tuple[int, str]]:
        """Ranks found dead since the last call: (rank, how), from exit codes or vanished pids."""
        dead = {}
        watched = self._ranks.poll()  # first: a rank seen gone here has its exit code below
        codes = getattr(self.job, "rank_codes", dict)()
        # a rank killed by a signal died first; the others exited after noticing it
        for rank, code in sorted(codes.items(), key=lambda rc: (rc[1] is None or rc[1] >= 0, rc[0])):
            if code not in (None, 0):
                dead[rank] = signal_name(code)
        now = time.monotonic()
        for rank, detail in watched:
            if rank not in dead and codes.get(rank, 0) is None:
                # our own child, seen gone in /proc but not reaped yet: its exit status comes
                # in a moment and says more than "vanished"
                if now - self._vanished_at.setdefault(rank, now) < 1.0:
                    continue
            dead.setdefault(rank, detail)
        new = [(r, d) for r, d in dead.items() if r not in self._lost_workers]
        self._lost_workers.update(r for r, _ in new)
        return new

    def _all_finished(self) -> bool:
        """Has every rank logged its last step (or said it finished)?"""
        return self._ranks.all_finished(self.config.workers, self._total_steps)

    def _finish(self) -> None:
        code = self.job.poll()
        summary = self._files.read_summary()
        if summary and summary.get("status") == "completed":
            return  # it completed, whatever came after (a Stop once every step was done)
        if self._stop_requested:
            status, error = "stopped", self._stop_reason
        else:
            status, error = "failed", self._diagnose(code)
        self._files.write_summary(self._files.ending_summary(status, error, self.config.workers))

    def _diagnose(self, code: int | None) -> str:
        """One line naming the rank that failed first, and why."""
        events = self._files.metrics(kind="event")
        errors = [e for e in events if e.get("event") == "error"]
        own = [e for e in errors if not e.get("peer_error")]
        if own:
            return own[0]["error"]
        # a rank killed, or gone without a goodbye (killed where its exit code cannot be seen,
        # as under torchrun), died first: the others' errors are about it, not about a mute rank
        first_killed = self._first_failure is not None and (
            self._first_failure[1].startswith("killed") or self._first_failure[1] == "its process vanished")
        reported = {e.get("rank") for e in errors}
        silent = {r: how for r, how in self._silent.items() if r not in reported}
        if silent and errors and not first_killed:  # the others gave up waiting on a rank alive but mute
            rank, state = sorted(silent.items())[0]
            waiting = errors[0].get("rank")
            timeout = self.config.timeout
            return (f"rank {rank} stopped answering ({state}): rank {waiting} gave up waiting for it after "
                    f"the {timeout:g} s communication timeout (--timeout {timeout:g}); "
                    f"see {self._files.log_path(rank)}")
        if self._first_failure is not None:
            rank, detail = self._first_failure
            return f"rank {rank} died ({detail}); see {self._files.log_path(rank)}"
        started = {e["rank"] for e in events if e.get("event") == "started"}
        ended = {e["rank"] for e in events if e.get("event") in ("finished", "error", "stopped")}
        silent = sorted(started - ended)
        if silent:
            return f"rank {silent[0]} died without reporting an error; see {self._files.log_path(silent[0])}"
        if errors:
            return errors[0]["error"]
        logs = self._files.log_dir / "launcher.log"
        where = logs if logs.exists() else self._files.log_dir
        return (f"the {self.config.launcher} launcher ended with {signal_name(code or 1)} "
                f"before the ranks reported; see {where}")

    # --- control ------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0, reason: str | None = None) -> RunResult:
        """End every process of the run; the summary says ``stopped`` (with ``reason``), or
        ``completed`` with every number when every rank had already done its last step."""
        self._request_stop(reason)
        self._done.wait(timeout)
        return self.result()

    def _request_stop(self, reason: str | None = None) -> None:
        if not self._done.is_set() and not self._stop_requested:
            self._stop_reason = reason or "stopped by request"
            self._stop_requested = True

    def result(self) -> RunResult:
        summary = self._files.read_summary()
        if self._write_error and (summary is None or summary.get("status") != "completed"):
            # the summary could not be written: the result says why, from memory
            summary = {"status": "failed", "error": self._write_error, "resume_with": None}
        return RunResult(self.run_dir, summary or {"status": "running"})

    def wait(self, timeout: float | None = None, progress: bool = False) -> RunResult:
        """Block until the run ends (or ``timeout`` s); a progress bar with ``progress=True``.

        Interrupting the wait (Ctrl-C, or the notebook's stop button) stops the run.
        """
        from .progress import ProgressBar

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(self) if progress else None
        restore = _catch_termination()
        try:
            while not self._done.wait(0.25):
                if bar:
                    bar.update()
                if deadline is not None and time.monotonic() > deadline:
                    break
        except KeyboardInterrupt as interrupt:
            self._request_stop(getattr(interrupt, "reason", None) or "stopped by request (Ctrl-C)")
            self._wait_for_the_end()
        finally:
            restore()
            if bar:
                bar.update()
                bar.close()
        return self.result()

    def _wait_for_the_end(self) -> None:
        """Wait for the monitor to finalize the run; a second interrupt only hurries it."""
        while True:
            try:
                self._done.wait(60)
                return
            except KeyboardInterrupt:
                self._hurry = True

    def __repr__(self) -> str:
        return f"<Run {self.run_dir} {self.status}>"


class _RankWatch:
    """Follows the ranks' pids (from their ``started`` events) on this host.

    Under mpiexec or torchrun the launcher ends all ranks when one dies; the first rank
    whose process disappeared without a ``finished``/``error``/``stopped`` event is the
    one that died.
    """

    def __init__(self, run: RunDir, offset: int = 0):
        self.run = run
        self.tail = MetricsTail(run, offset)  # a resumed run keeps its earlier attempts' events: skip them
        self.pids: dict[int, int] = {}
        self.ended: set[int] = set()
        self.finished: set[int] = set()
        self.last_step: dict[int, int] = {}
        self.died: list[tuple[int, str]] = []  # in the order the guards reported them
        self.host = socket.gethostname()

    def all_finished(self, world: int, total_steps: int | None) -> bool:
        """Has each of the ``world`` ranks said ``finished``, or logged step ``total_steps``?"""
        self.poll()
        return all(rank in self.finished or (total_steps is not None and self.last_step.get(rank, -1) >= total_steps)
                   for rank in range(world))

    def silent(self) -> dict[int, str]:
        """Ranks whose process runs but that have said nothing final: their state."""
        out = {}
        for rank, pid in sorted(self.pids.items()):
            state = _state(pid) if rank not in self.ended else None
            if state in ("T", "t"):
                out[rank] = "its process was stopped and never continued"
            elif state is not None and state != "Z":
                out[rank] = "its process runs but sends nothing"
        return out

    def only_stopped_left(self) -> bool:
        """Is every rank still running one that is stopped (SIGSTOP), and so will never notice?"""
        left = [pid for rank, pid in self.pids.items() if rank not in self.ended and _alive(pid)]
        return bool(left) and all(_state(pid) in ("T", "t") for pid in left)

    def poll(self) -> list[tuple[int, str]]:
        """(rank, how) of the ranks that died: first those their guards reported, in order,
        then those whose process vanished without saying goodbye."""
        for record in self.tail.read():
            if record.get("kind") == "train" and isinstance(record.get("step"), int):
                rank = record.get("rank")
                self.last_step[rank] = max(self.last_step.get(rank, -1), record["step"])
            if record.get("kind") != "event":
                continue
            if record.get("event") == "started" and record.get("host") == self.host:
                self.pids[record["rank"]] = record["pid"]
            elif record.get("event") in ("finished", "error", "stopped"):
                self.ended.add(record["rank"])
                if record["event"] == "finished":
                    self.finished.add(record["rank"])
            elif record.get("event") == "rank_died":  # reported by the rank's guard
                self.died.append((record["rank"], record["detail"]))
        vanished = [(rank, "its process vanished") for rank, pid in sorted(self.pids.items())
                    if rank not in self.ended and not _alive(pid)]
        return self.died + vanished


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (R, S, T, Z, ...), or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _total_steps(config) -> int | None:
    try:
        from ..data import train_size

        return config.total_steps(train_size(config.dataset, config.data_dir))
    except Exception:  # noqa: BLE001 - only used to tell a finished run; the events tell it too
        return None


# --- the end of the launching process or thread ------------------------------------------
_LIVE: "weakref.WeakSet[Run]" = weakref.WeakSet()


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the process waiting on a run: it stops the run as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__()
        self.reason = f"the process that launched the run received {signal.Signals(signum).name}"


def _catch_termination():
    """While ``wait()`` blocks the main thread, SIGTERM and SIGHUP stop the run (with their
    name as the reason) instead of killing this process under it; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def on_signal(signum, frame):
        raise _Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                previous[sig] = signal.signal(sig, on_signal)
        except (ValueError, OSError):
            pass

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore


@atexit.register
def _stop_live_runs() -> None:
    """The interpreter is exiting with runs still going: stop and finalize each."""
    runs = [run for run in list(_LIVE) if not run.done()]
    for run in runs:
        run._request_stop("the Python process that launched the run exited")
    for run in runs:
        run._done.wait(30)


class _Spawner:
    """One daemon thread, alive as long as this process, from which the ranks are started.

    PR_SET_PDEATHSIG (the kernel ends a child when its parent goes) follows the *thread*
    that forked the child: ranks started from a notebook's worker thread would be killed
    the moment that thread ended. Started from here, they end only with the process."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn, *args):
        if threading.current_thread() is threading.main_thread():
            return fn(*args)  # the main thread lives as long as the process
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="labkit-spawner", daemon=True)
                self._thread.start()
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future.result()

    def _serve(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)


_SPAWNER = _Spawner()


# settings a resumed run must share with its checkpoint: the weights' shapes and the way
# they are split and kept in step depend on them (others, such as --lr, may change)
FIXED_ON_RESUME = ("model", "dataset", "sync", "workers", "parallelism", "data_parallel",
                   "pipeline_stages", "tensor_parallel")
__all__ = ["LOCK_NAME", "Run", "RunResult", "launch", "prepare_run_dir", "resume_command", "train"]


def lock_run_dir(run: RunDir, option: str, claim: bool = True) -> int:
    """Hold ``RUN_DIR/.lock`` (flock) for as long as this process runs the run; the kernel
    lets go when it exits, however it ends. Raises ConfigError naming the holder's pid."""
    import fcntl

    try:
        run.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(run.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(option, f"cannot lock {run.path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(option, f"{run.path} is in use by a run in progress (launched by pid {holder}); "
                                  "wait for it to end or stop it first") from None
    if claim:
        claim_lock(fd)
    return fd


def claim_lock(fd: int) -> None:
    """Write this process's pid into the lock file it holds (named to whoever is refused)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _saved_config(run: RunDir):
    from ..config import RunConfig

    try:
        return RunConfig.from_dict(run.read_config()["config"])
    except FileNotFoundError:
        raise ConfigError("--resume", f"{run.path} has no config.json: not a labkit run directory") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("--resume", f"{run.config_path} is damaged ({e})") from None


def check_resume_settings(config, saved, step: int) -> None:
    """ConfigError naming the first setting of ``config`` that contradicts the checkpoint."""
    from ..data import train_size

    for name in FIXED_ON_RESUME:
        old, new = getattr(saved, name, None), getattr(config, name, None)
        if old != new:
            option = "--" + name.replace("_", "-")
            raise ConfigError(option, f"the checkpoint was made with {option} {old}; a resumed run "
                                      f"must keep it (got {new})")
    total = config.total_steps(train_size(config.dataset, config.data_dir))
    if total < step:
        option = "--steps" if config.steps is not None else "--epochs"
        raise ConfigError(option, f"the run would end at step {total}, below the checkpoint's step {step}")


def prepare_run_dir(config) -> tuple[object, RunDir]:
    """Create (or, with resume, check and reopen) the run directory; return the config it
    will run (for batch scripts that start the ranks themselves)."""
    config, run, lock = _prepare(config)
    unlock(lock)
    return config, run


def _prepare(config) -> tuple[object, RunDir, int]:
    """Lock and create (or, with resume, check and reopen) the run directory; return the
    config it will run, the directory and the lock (release it with :func:`unlock`).

    A resume that is refused changes nothing on disk: every check comes first."""
    if config.run_dir is None:
        config = config.replace(run_dir=str(default_run_dir(config.model, config.sync, config.workers)))
    run = RunDir(config.run_dir)
    if config.resume:
        saved = _saved_config(run)
        lock = lock_run_dir(run, "--resume", claim=False)
        try:
            found, ckpt, rejected = run.find_good_checkpoint()
            if found is None:
                why = "; ".join(f"{p.name} {w}" for p, w in rejected)
                raise ConfigError("--resume", f"{run.path} has no intact checkpoint to resume from"
                                              + (f" ({why})" if why else ""))
            check_resume_settings(config, saved, int(ckpt["step"]))
        except BaseException:
            unlock(lock)
            raise
        # every check has passed: only now is anything on disk changed
        try:
            _reopen(run, config, lock, found, ckpt, rejected)
        except OSError as e:
            unlock(lock)
            raise ConfigError("--run-dir", f"cannot write {e.filename or run.path}: {e.strerror or e}") from None
    else:
        lock = lock_run_dir(run, "--run-dir")
        try:
            run.create(config.to_dict(), config.workers)
        except OSError as e:
            unlock(lock)
            raise ConfigError("--run-dir", f"cannot write {e.filename or run.path}: {e.strerror or e}") from None
        except BaseException:
            unlock(lock)
            raise
    return config, run, lock


def _reopen(run: RunDir, config, lock: int, found, ckpt: dict, rejected) -> None:
    """Take over a checked run directory for its resume."""
    claim_lock(lock)
    for path, _why in rejected:
        run.set_aside(path)
    if rejected:
        print(f"labkit: resume: {'; '.join(f'{p.name} {w}' for p, w in rejected)}; moved to "
              f"{run.checkpoint_dir / 'rejected'}; resuming from {found.name} (step {int(ckpt['step'])})",
              file=sys.stderr, flush=True)
    run.truncate_metrics_after(int(ckpt["step"]))
    kept = run.metrics()
    t_done = max((r.get("t", 0) for r in kept), default=0.0)
    run.summary_path.unlink(missing_ok=True)
    run.update_config(config=config.to_dict(), start_time=time.time() - (t_done if math.isfinite(t_done) else 0),
                      resumed_at=time.time())
    run.log_dir.mkdir(exist_ok=True)


def launch(config) -> Run:
    """Validate ``config``, start its ranks, and return a :class:`Run` handle at once."""
    config.validate()
    config, run, lock = _prepare(config)
    try:
        offset = MetricsTail(run, offset=None).offset
        try:  # the ranks watch this process, and whoever reads the run after it is gone finalizes it
            run.update_config(launched_by=process_identity())
        except OSError as e:
            raise ConfigError("--run-dir", f"cannot write {e.filename or run.path}: {e.strerror or e}") from None
        job = _SPAWNER.call(LAUNCHERS.get(config.launcher), config, run)
    except BaseException:
        unlock(lock)
        raise
    return Run(config, run, job, metrics_offset=offset, lock=lock)


def train(config, progress: bool = True) -> RunResult:
    """Run ``config`` to the end (a progress bar while it goes) and return its result."""
    return launch(config).wait(progress=progress)

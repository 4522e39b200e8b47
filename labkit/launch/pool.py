"""Warm ranks: processes that have already imported torch and labkit, waiting for a run.

A rank started cold spends seconds before its first step: a fresh Python imports torch,
labkit and scikit-learn. A :class:`WarmPool`, kept by a long-lived process (a notebook's
kernel, the dashboard server), starts such processes ahead of time; each imports what a
rank needs and waits on a pipe. When the local launcher starts a run it hands each warm
process one rank: the environment, the working directory and the log file the rank would
have had, and the process becomes exactly what ``python -m labkit.worker RUN_DIR`` would
have been, only later in its life. Each warm process runs one rank and exits; the pool
starts new ones once the run's ranks have ended (never while they train, so a run is not
slowed by the pool refilling).

    from labkit.launch.pool import start_pool
    start_pool()            # in the kernel: labkit.launch() now uses warm ranks

A warm rank gives bitwise the same results as a cold one. Before it runs the rank it puts
back everything a fresh process would have that the waiting could have changed: the
environment (``os.environ`` replaced by the rank's, RANK, MASTER_ADDR/PORT,
OMP_NUM_THREADS and all), torch's thread count (set from OMP_NUM_THREADS, which torch read
at start-up in a cold rank), the random generators (torch's as it was right after
importing torch; Python's and NumPy's freshly seeded from the OS, as at start-up), the
working directory, ``sys.argv`` and ``sys.path[0]`` as ``python -m`` sets them, the umask,
the signal handlers, the logging configuration and the standard streams (stdin from
/dev/null, stdout and stderr appended to the rank's log). A pool whose owner's
environment has changed since it started (a variable set in the notebook) is not used:
its processes were started in another environment, so they are replaced and that run
starts cold.

Cleanup: every warm process dies with its owner, even one killed with SIGKILL: it asks
the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and while it
waits it also reads the pipe from its owner, whose end of file means the owner is gone.

Sizing: ``LABKIT_WARM_RANKS`` = N keeps N warm ranks (0 turns the pool off); by default
the pool holds as many ranks as this process may use cores, at least 4 (the panel's
default run) and at most 16, and no more than a quarter of the free memory allows.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

from .base import die_with_parent, host_cores

SIZE_ENV = "LABKIT_WARM_RANKS"
MIN_SIZE, MAX_SIZE = 4, 16
MAX_FAILED_STARTS = 3  # processes that died before they were ready, in a row: the pool gives up
RANK_MEMORY_BYTES = 400 * 2**20  # what one waiting rank holds (torch and labkit imported), with room
READY = "labkit-warm-rank ready"
SERVE = "from labkit.launch.pool import serve; serve()"

_pool: "WarmPool | None" = None
_pool_lock = threading.Lock()


def default_size() -> int:
    """How many warm ranks this machine keeps: ``LABKIT_WARM_RANKS``, else cores (4 to 16),
    capped by free memory."""
    text = os.environ.get(SIZE_ENV, "").strip()
    if text:
        try:
            size = int(text)
        except ValueError:
            raise ValueError(f"{SIZE_ENV}: expected a whole number of ranks, got {text!r}") from None
        if size < 0:
            raise ValueError(f"{SIZE_ENV}: must be >= 0, got {size}")
        return size
    size = min(MAX_SIZE, max(MIN_SIZE, host_cores()))
    free = _available_memory()
    if free is not None:
        size = min(size, free // 4 // RANK_MEMORY_BYTES)
    return max(0, size)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask() -> int | None:
    """This process's umask, read without changing it (Linux 4.7+)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def start_pool(size: int | None = None) -> "WarmPool | None":
    """Start this process's pool of warm ranks (or return the one already running).

    ``size`` None: :func:`default_size`. Returns None when the size is 0 (the pool is off)."""
    global _pool
    with _pool_lock:
        if _pool is not None and not _pool.closed:
            return _pool
        size = default_size() if size is None else size
        if size <= 0:
            return None
        _pool = WarmPool(size)
        return _pool


def current_pool() -> "WarmPool | None":
    """The pool :func:`start_pool` started in this process, if it is open."""
    pool = _pool
    return pool if pool is not None and not pool.closed else None


def stop_pool() -> None:
    """Close this process's pool: its waiting ranks exit (ranks already running go on)."""
    pool = _pool
    if pool is not None:
        pool.close()


class _Waiting:
    """One warm process, as its owner sees it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.ready = False

    def check_ready(self) -> None:
        if self.ready or self.proc.stdout is None:
            return
        readable, _, _ = select.select([self.proc.stdout], [], [], 0)
        if readable:
            line = self.proc.stdout.readline()
            self.ready = line.decode(errors="replace").strip() == READY


class WarmPool:
    """``size`` processes that have imported torch and labkit, each waiting for one rank.

    A thread of its own starts them (and keeps living while ranks it started run: the
    kernel's parent-death signal follows the thread that started a process)."""

    def __init__(self, size: int):
        self.size = size
        self.env = dict(os.environ)  # the owner's environment the waiting processes started in
        self.closed = False
        self.failed_starts = 0  # waiting processes that died before saying ready, in a row
        self._waiting: list[_Waiting] = []
        self._handed: list[subprocess.Popen] = []  # warm processes now running ranks
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._keeper = threading.Thread(target=self._keep, name="labkit-warm-ranks", daemon=True)
        self._keeper.start()
        atexit.register(self.close)

    # --- what the launcher calls ---------------------------------------------------------
    def take(self, command: list[str], envs: list[dict], logs: list, cwd: str | None = None) -> list:
        """Hand up to ``len(envs)`` warm processes one rank each (rank ``i`` gets ``envs[i]``,
        its output goes to ``logs[i]``); return their ``Popen`` handles, rank 0 first.
        Fewer (or none) when fewer are waiting: the launcher starts the rest cold.

        ``command`` is the rank's command line (``python -m labkit.worker RUN_DIR``): a warm
        process runs exactly that module with those arguments."""
        if command[0] != sys.executable or command[1:3] != ["-m", "labkit.worker"]:
            return []
        spec = {"module": command[2], "argv": command[3:], "cwd": cwd or os.getcwd(), "umask": _umask()}
        taken = []
        with self._lock:
            if self.closed or dict(os.environ) != self.env:
                self._wake.set()  # the keeper replaces processes started in another environment
                return []
            self._waiting.sort(key=lambda w: not w.ready)  # the ready ones first
            while self._waiting and len(taken) < len(envs):
                waiting = self._waiting.pop(0)
                rank = len(taken)
                if waiting.proc.poll() is None and _send(waiting.proc, dict(spec, env=envs[rank],
                                                                            log=str(logs[rank]))):
                    taken.append(waiting.proc)
                    self._handed.append(waiting.proc)
                else:
                    _end(waiting.proc)
        return taken

    def ready(self) -> int:
        """How many warm processes are waiting and have finished importing."""
        with self._lock:
            for waiting in self._waiting:
                waiting.check_ready()
            return sum(w.ready and w.proc.poll() is None for w in self._waiting)

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Block until all ``size`` processes wait ready (True) or ``timeout`` s pass (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready() >= self.size:
                return True
            time.sleep(0.05)
        return False

    def pids(self) -> list[int]:
        """The pids of the processes waiting now."""
        with self._lock:
            return [w.proc.pid for w in self._waiting]

    def close(self) -> None:
        """End the waiting processes (ranks already running are not touched)."""
        with self._lock:
            self.closed = True
            waiting, self._waiting = self._waiting, []
        for w in waiting:
            _end(w.proc)
        self._wake.set()

    def __repr__(self) -> str:
        return f"<WarmPool {self.ready()}/{self.size} ready{' closed' if self.closed else ''}>"

    # --- the keeper thread ------------------------------------------------------------------
    def _keep(self) -> None:
        while True:
            with self._lock:
                self._handed = [p for p in self._handed if p.poll() is None]
                if self.closed:
                    if not self._handed:
                        return
                else:
                    self._refill()
            self._wake.wait(0.5)
            self._wake.clear()

    def _refill(self) -> None:
        """Drop dead processes; replace a pool started in another environment; start new
        processes up to ``size`` once no rank handed out is still running."""
        for waiting in self._waiting:
            waiting.check_ready()
        alive = [w for w in self._waiting if w.proc.poll() is None]
        for gone in set(self._waiting) - set(alive):
            self.failed_starts = 0 if gone.ready else self.failed_starts + 1
            _end(gone.proc)
        if any(w.ready for w in alive):
            self.failed_starts = 0
        self._waiting = alive
        if self.failed_starts >= MAX_FAILED_STARTS:  # they cannot import labkit: stop trying
            self.closed = True
            return
        env = dict(os.environ)
        if env != self.env:
            for w in self._waiting:
                _end(w.proc)
            self._waiting, self.env = [], env
        if self._handed:
            return  # a run is going: do not take cores from it
        while len(self._waiting) < self.size:
            try:
                self._waiting.append(_Waiting(_start_waiting(self.env)))
            except OSError:
                return


def _start_waiting(env: dict) -> subprocess.Popen:
    """A process that imports what a rank needs, says it is ready, and waits for its rank."""
    env = dict(env, PYTHONUNBUFFERED="1")  # every launcher gives a rank unbuffered output
    return subprocess.Popen([sys.executable, "-c", SERVE], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)


def _send(proc: subprocess.Popen, spec: dict) -> bool:
    """Give a waiting process its rank; the owner keeps no pipe to it afterwards."""
    try:
        proc.stdin.write((json.dumps(spec) + "\n").encode())
        proc.stdin.flush()
        ok = True
    except (BrokenPipeError, OSError, ValueError):
        ok = False
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    proc.stdin = proc.stdout = None
    return ok


def _end(proc: subprocess.Popen) -> None:
    """End a waiting process: closing its pipe is enough; SIGKILL if it lingers."""
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    proc.stdin = proc.stdout = None
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# --- inside a warm process -----------------------------------------------------------------
def serve() -> None:
    """The life of a warm process: import, say ready, wait for a rank, become it, run it."""
    import logging
    import signal
    import warnings

    import torch

    _import_rank_modules()
    # the state a cold rank has once it has imported the same modules (they do it too)
    fresh_handlers = {n: signal.getsignal(n) for n in signal.valid_signals()}
    fresh_logging = (list(logging.root.handlers), logging.root.level)
    fresh_warnings = list(warnings.filters)
    fresh_torch_rng = torch.random.get_rng_state()
    try:  # the owner may have handed this process a rank already, and closed the pipe
        os.write(1, f"{READY}\n".encode())
    except OSError:
        pass
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)  # the owner closed the pool, or died
    spec = json.loads(line)

    # the process a cold start would have made, from here on
    _redirect_streams(spec["log"])
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    if spec.get("umask") is not None:
        os.umask(spec["umask"])
    for signum, handler in fresh_handlers.items():
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError, TypeError):
            pass
    logging.root.handlers[:] = fresh_logging[0]
    logging.root.setLevel(fresh_logging[1])
    warnings.filters[:] = fresh_warnings
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    torch.random.set_rng_state(fresh_torch_rng)
    import random

    import numpy

    random.seed()
    numpy.random.seed()
    sys.path[0] = spec["cwd"]  # as ``python -m`` sets it
    sys.argv = ["-m", *spec["argv"]]

    import runpy

    runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)


def _import_rank_modules() -> None:
    """What ``python -m labkit.worker`` imports before its first step (not the worker module
    itself: it runs as ``__main__``, as in a cold start)."""
    import importlib

    import labkit  # noqa: F401 - the registries

    for name in ("labkit.comm", "labkit.compress", "labkit.algorithms", "labkit.parallel", "labkit.models",
                 "labkit.data", "labkit.optim", "labkit.runs", "torch.distributed", "torch._dynamo", "sklearn.datasets",
                 "sklearn.model_selection"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _redirect_streams(log_path: str) -> None:
    """stdin from /dev/null, stdout and stderr appended to the rank's log (as ``spawn`` does)."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)

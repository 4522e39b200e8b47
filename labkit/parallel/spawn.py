"""Run a function as N ranks from Python (a notebook cell, a benchmark), with a deadline.

``run_ranks(fn, n, *args, **kwargs)`` starts N fresh processes (``spawn``), each with the
environment ``labkit.comm.init()`` reads, calls ``fn(comm, *args, **kwargs)`` in each and returns
the N results in rank order. ``fn`` must be importable (defined in a module, not in a
notebook cell). When a rank fails or the deadline passes, every rank is ended and the
error names the rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback

from ..launch.base import free_port


def _rank_main(fn, rank, world, port, backend, threads, results, args, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LABKIT_BACKEND=backend)
    try:
        import torch

        torch.set_num_threads(threads)
        from .. import comm as comm_pkg

        comm = comm_pkg.init()
        value = fn(comm, *args, **kwargs)
        results.put((rank, True, value))
        comm.close()
    except BaseException:
        results.put((rank, False, traceback.format_exc(limit=6)))


def run_ranks(fn, n: int, *args, backend: str = "gloo", timeout: float = 120.0, threads: int = 1, **kwargs) -> list:
    """``[fn(comm, *args, **kwargs) on rank 0, ..., on rank n-1]``; RuntimeError when a rank fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, n, port, backend, threads, results, args, kwargs), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < n:
            try:
                rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run_ranks: ranks {sorted(set(range(n)) - set(out))} did not finish "
                                       f"in {timeout:.0f} s") from None
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"run_ranks: rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                continue
            if not ok:
                raise RuntimeError(f"run_ranks: rank {rank} failed:\n{value}")
            out[rank] = value
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [out[r] for r in range(n)]

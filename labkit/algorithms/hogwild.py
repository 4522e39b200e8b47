"""Hogwild!: lock-free SGD on weights that the processes of one machine share in memory.

From *Deep Learning* (Vadhiyar, document 003), slide "Parallel Algorithms": the
parameter server's "master process uses lock to avoid weight update conflicts, one
worker at a time"; "Hogwild (lock-free) removes the above lock: multiple workers at a
time". You et al. (SC'17, document 000) say the same, and Hoefler's keynote (document
004) recalls where it came from: "Started with Hogwild! [Niu et al. 2011] shared
memory, by chance" (Niu, Recht, Re and Wright, *Hogwild!: A Lock-Free Approach to
Parallelizing Stochastic Gradient Descent*, NIPS 2011).

How it runs here:

- rank 0 writes the weights into ``RUN_DIR/hogwild/weights.f32`` and every rank maps
  that file into its memory with ``torch.from_file(..., shared=True)``. The parameters
  of every rank's model become views into this one piece of memory: there is one set
  of weights, not N copies;
- every rank trains on its own shard: forward and backward on whatever the weights are
  at that moment, then ``optimizer.step()`` writes its update straight into the shared
  weights, while the other ranks read and write them too. Updates of different ranks
  interleave element by element; Niu et al. show that with sparse enough conflicts
  this costs little and removes all waiting. Each rank keeps its own momentum;
- ``--lock`` is the baseline of the slide: an exclusive lock (``fcntl.flock`` on
  ``RUN_DIR/hogwild/lock``) around every update, so that one rank at a time writes.
  The time a rank waits for the lock is its ``wait_s``.

Nothing is communicated while training (``bytes_sent`` is that of one barrier at the
start, and ``comm_s`` stays 0): that is the point of shared memory. Every rank
publishes the number of steps it has done in ``RUN_DIR/hogwild/progress.i64``; rank 0
evaluates and checkpoints the shared weights, and before its last step's bookkeeping it
waits (``wait_s``) until the other ranks have finished, so that the final weights hold
every update.

One machine only: ``validate`` rejects launchers that may place the ranks on several
nodes (slurm), which share no memory, and devices other than the CPU; at start, the
ranks check that they all run on the same host.

Faults: no rank ever waits for another while training, so a lost worker only takes its
own updates with it. Rank 0 stops waiting for a rank that the launcher reported lost
(a ``worker_lost`` event) or that made no progress for ``--timeout`` seconds, logs a
``worker_dropped`` event and lists the rank in ``workers_lost`` in ``summary.json``.
Losing rank 0 ends the run, failed, with a checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from ..registry import SYNC_MODES
from ..runs import MetricsTail, RunDir
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore

SINGLE_MACHINE_LAUNCHERS = ("local", "mpi", "torchrun")  # labkit starts these on this machine


def single_machine(launcher: str, device: str):
    """The ``validate`` check: shared memory exists only within one machine, on the CPU."""
    if launcher not in SINGLE_MACHINE_LAUNCHERS:
        return ("--launcher", f"hogwild shares the weights in the memory of one machine, and the "
                              f"{launcher} launcher may place the ranks on several nodes, which "
                              f"share no memory; use --launcher {', '.join(SINGLE_MACHINE_LAUNCHERS)}")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return ("--device", "hogwild shares the weights in CPU memory between processes; use --device cpu")
    return None


def check_one_host(comm) -> None:
    """Fail clearly if the ranks do not all run on this machine."""
    name = socket.gethostname().encode()[:255].ljust(256, b"\0")
    hosts = comm.allgather(torch.frombuffer(bytearray(name), dtype=torch.uint8))
    names = sorted({bytes(h.tolist()).rstrip(b"\0").decode() for h in hosts})
    if len(names) > 1:
        raise RuntimeError(f"hogwild shares memory between the processes of one machine, but the "
                           f"ranks run on {', '.join(names)}")


class SharedState:
    """The weights and every rank's step count, in files that every rank maps into memory."""

    def __init__(self, folder: Path, numel: int, world: int):
        self.folder = folder
        self.weights = torch.from_file(str(folder / "weights.f32"), shared=True, size=numel,
                                       dtype=torch.float32)
        self.progress = torch.from_file(str(folder / "progress.i64"), shared=True, size=world,
                                        dtype=torch.int64)


def share_parameters(model: torch.nn.Module, weights: torch.Tensor, fill: bool) -> None:
    """Make the parameters of ``model`` views into ``weights`` (copying them in first if ``fill``)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            view = weights[offset:offset + p.numel()].view_as(p)
            if fill:
                view.copy_(p)
            p.data = view
            offset += p.numel()


class LostWorkers:
    """Ranks the launcher reported dead since this object was made (``worker_lost`` events).

    Reading starts at the current end of ``metrics.jsonl``: a resumed run does not
    mistake the losses of its previous attempt for new ones.
    """

    def __init__(self, run: RunDir):
        self.tail = MetricsTail(run, offset=None)
        self.ranks: set[int] = set()

    def poll(self) -> set[int]:
        for record in self.tail.read():
            if record.get("kind") == "event" and record.get("event") == "worker_lost":
                self.ranks.add(record["rank"])
        return self.ranks


class UpdateLock:
    """An exclusive lock for the processes of one machine: ``flock`` on a file."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


@SYNC_MODES.register("hogwild", help="Hogwild!: every rank updates weights shared in memory, "
                                     "without a lock (--lock: with one)",
                     settings=("lock",), validate=single_machine, survives_worker_loss=True)
class Hogwild(SyncMode):
    def __init__(self, lock: bool):
        self.lock = lock

    def run(self, ctx: RankContext) -> dict:
        model = ctx.model
        optimizer = ctx.make_optimizer(model.parameters())
        # Each rank keeps its own momentum; rank 0 carries on with the checkpointed one.
        start = restore(ctx, model, optimizer if ctx.rank == 0 else None)
        check_one_host(ctx.comm)
        folder = ctx.run.path / "hogwild"
        numel = sum(p.numel() for p in model.parameters())
        if ctx.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # what a previous attempt left
            folder.mkdir()
            shared = SharedState(folder, numel, ctx.world)
            share_parameters(model, shared.weights, fill=True)
            shared.progress.fill_(start)
        ctx.comm.barrier()  # the weights are in place: the other ranks map them
        if ctx.rank != 0:
            shared = SharedState(folder, numel, ctx.world)
            share_parameters(model, shared.weights, fill=False)
        lock = UpdateLock(folder / "lock") if self.lock else None
        lost = LostWorkers(ctx.run) if ctx.rank == 0 else None
        lost_ranks: list[int] = []

        meter = TrainMeter(samples=start * ctx.batch_size)
        for step, epoch, x, y in ctx.batches(start):
            loss, correct = ctx.forward_backward(model, x, y)  # on the shared weights as they are now
            if lock is None:
                with ctx.timers.time("compute"):
                    optimizer.step()  # straight into the shared weights, while the others do too
            else:
                with ctx.timers.time("wait"):
                    lock.acquire()
                try:
                    with ctx.timers.time("compute"):
                        optimizer.step()  # one rank at a time
                finally:
                    lock.release()
            meter.add(loss, correct, len(y))
            if ctx.rank == 0 and step == ctx.total_steps:
                with ctx.timers.time("wait"):
                    lost_ranks = self.wait_for_others(ctx, shared, lost)
            end_step(ctx, step, epoch, meter, model, lambda: checkpoint_state(model, optimizer))
            shared.progress[ctx.rank] = step
        results = {"model": model, "train_loss": meter.last_loss}
        if ctx.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # every rank is done with it
            results["workers_lost"] = lost_ranks
        return results

    @staticmethod
    def wait_for_others(ctx: RankContext, shared: SharedState, lost: LostWorkers) -> list[int]:
        """Rank 0 waits until every other rank has done its steps; returns the ranks given up on."""
        dropped: list[int] = []
        last_seen, last_change = shared.progress.clone(), time.monotonic()
        while True:
            running = {r for r in range(1, ctx.world) if shared.progress[r] < ctx.total_steps} - set(dropped)
            if not running:
                return dropped
            if time.monotonic() - last_change > ctx.comm.timeout:
                give_up, reason = running, f"no progress for {ctx.comm.timeout:.0f} s"
            else:
                give_up, reason = running & lost.poll(), "the launcher reported it lost"
            for rank in sorted(give_up):
                ctx.event("worker_dropped", worker=rank, step=ctx.total_steps, error=reason,
                          steps_done=int(shared.progress[rank]))
                dropped.append(rank)
            if not torch.equal(shared.progress, last_seen):
                last_seen, last_change = shared.progress.clone(), time.monotonic()
            time.sleep(0.01)

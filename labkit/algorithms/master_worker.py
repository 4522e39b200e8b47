"""The master–worker protocol of every mode with a master: ps-sync, ps-async, ssp and
the EASGD family.

Rank 0 is the master: it holds the model that is evaluated and checkpointed and trains
on nothing. Ranks 1..N-1 are the workers; worker r trains on shard r-1 of N-1, so
``--epochs`` counts passes of each worker over its own shard.

Every request a worker makes starts with a :class:`Report` (its step and how its batch
went; step ``FINISHED`` when it has no batches left), followed by what the mode sends
(a gradient, or weights). Weights travel flat, as ``parameters_to_vector`` lays them out.
The master of the asynchronous modes (:class:`AsyncMaster`) listens to every worker in
a thread of its own and serves the requests one at a time, first come, first served (the
lock of the slides: "master process uses lock to avoid weight update conflicts, one
worker at a time", Vadhiyar, *Deep Learning*), or each in its listener thread at once,
without a lock (Hogwild). A worker that dies fails only its own thread: the master
drops it and goes on with the others.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..comm import PeerError
from ..data import batches_per_epoch
from .base import RankContext, SyncMode

MASTER = 0
FINISHED = -1  # the step of the report a worker sends when it has no batches left


@dataclass
class Report:
    """What a worker says with each request: its step, and how its batch went."""

    step: int
    epoch: int = 0
    loss: float = 0.0
    correct: int = 0
    samples: int = 0

    def send(self, comm, dst: int = MASTER) -> None:
        comm.send(torch.tensor([self.step, self.epoch, self.loss, self.correct, self.samples],
                               dtype=torch.float64), dst)

    @classmethod
    def recv(cls, comm, src: int | None = None) -> tuple["Report", int]:
        """The next report (from any worker when ``src`` is None) and the rank that sent it."""
        buffer = torch.zeros(5, dtype=torch.float64)
        sender = comm.recv(buffer, src)
        step, epoch, loss, correct, samples = buffer.tolist()
        return cls(int(step), int(epoch), loss, int(correct), int(samples)), sender


def get_weights(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model`` in one flat tensor (a copy)."""
    return parameters_to_vector(model.parameters()).detach().clone()


def set_weights(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Make the parameters of ``model`` views into the flat tensor ``flat``."""
    vector_to_parameters(flat, model.parameters())


# --- layout and steps ---------------------------------------------------------------------
def needs_a_worker(workers: int, sync: str) -> tuple[str, str] | None:
    """The ``validate`` check of the modes with a master: at least one worker besides rank 0."""
    if workers < 2:
        return ("--workers", f"{sync} needs at least 2 ranks: rank 0 is the parameter server and "
                             "ranks 1.. are the workers that train")
    return None


def worker_ranks(ctx: RankContext) -> list[int]:
    return list(range(1, ctx.world))


def use_worker_steps(ctx: RankContext) -> None:
    """Make ``--epochs`` count passes of each worker over its shard, 1/(N-1) of the data.

    The master holds no data, so the training set is split N-1 ways, not N ways;
    ``--steps`` (steps per rank) is taken as it is.
    """
    if not ctx.fixed_steps:
        epochs = ctx.total_steps // ctx.steps_per_epoch
        ctx.total_steps = epochs * batches_per_epoch(len(ctx.data.y_train), ctx.world - 1, ctx.batch_size)
        if ctx.rank == MASTER:  # the progress bar counts to this
            ctx.event("total_steps", steps=ctx.total_steps)


def worker_batches(ctx: RankContext, start: int):
    """Worker r trains on shard r-1 of the N-1 workers (the master has no shard)."""
    return ctx.batches(start, rank=ctx.rank - 1, world=ctx.world - 1)


class MasterWorkerMode(SyncMode):
    """A mode with a master: rank 0 serves (``master``), ranks 1..N-1 train (``worker``)."""

    def run(self, ctx: RankContext) -> dict:
        use_worker_steps(ctx)
        return self.master(ctx) if ctx.rank == MASTER else self.worker(ctx)

    def master(self, ctx: RankContext) -> dict:
        raise NotImplementedError

    def worker(self, ctx: RankContext) -> dict:
        raise NotImplementedError


# --- the master of the asynchronous modes -----------------------------------------------------
class AsyncMaster:
    """One listener thread per worker; requests served one at a time, or at once.

    A mode defines ``receive`` (the rest of a request, after its report; in the
    listener thread), ``serve`` (answer it), and the bookkeeping of the main thread:
    ``served``, ``finished`` and ``lost``. With ``at_once=False`` the listeners queue the
    requests in the order they arrive and the main thread serves them one at a time
    (first come, first served: the lock); with ``at_once=True`` each listener serves its
    own worker's requests itself, at the same time as the others (Hogwild).
    """

    def __init__(self, ctx: RankContext, at_once: bool = False):
        self.ctx = ctx
        self.at_once = at_once
        self.workers = worker_ranks(ctx)

    def receive(self, worker: int, report: Report):
        raise NotImplementedError

    def serve(self, worker: int, report: Report, request) -> None:
        raise NotImplementedError

    def served(self, worker: int, report: Report) -> None:
        """Bookkeeping after a request was served (in the main thread)."""

    def finished(self, worker: int) -> None:
        """``worker`` has done all its steps."""

    def lost(self, worker: int, error: Exception) -> None:
        """Talking to ``worker`` failed (it died): it is dropped. Called once or more."""

    def serve_workers(self) -> None:
        """Serve every worker until each has finished or is lost."""
        events: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=self._listen, args=(worker, events), daemon=True,
                                    name=f"master-listener-{worker}") for worker in self.workers]
        for thread in threads:
            thread.start()
        listening = set(self.workers)
        while listening:
            with self.ctx.timers.time("wait"):  # whoever comes first
                kind, worker, details = events.get()
            if kind == "request":
                report, request = details
                try:
                    self.serve(worker, report, request)
                except PeerError as error:
                    self.lost(worker, error)
                    continue
                self.served(worker, report)
            elif kind == "served":
                self.served(worker, details)
            elif kind == "failed":
                raise details
            else:
                listening.discard(worker)
                self.finished(worker) if kind == "finished" else self.lost(worker, details)
        for thread in threads:
            thread.join()

    def _listen(self, worker: int, events: queue.Queue) -> None:
        """A listener thread: take ``worker``'s requests until it finishes or fails."""
        try:
            while True:
                report, _ = Report.recv(self.ctx.comm, worker)
                if report.step == FINISHED:
                    events.put(("finished", worker, None))
                    return
                request = self.receive(worker, report)
                if self.at_once:
                    self.serve(worker, report, request)
                    events.put(("served", worker, report))
                else:
                    events.put(("request", worker, (report, request)))
        except PeerError as error:
            events.put(("lost", worker, error))
        except Exception as error:  # noqa: BLE001 - the main thread raises it
            events.put(("failed", worker, error))

"""Parameter server: a master keeps the weights, the workers send it gradients.

Two modes, from the slides "Parallelism" and "Parallel Algorithms" of *Deep Learning*
(Vadhiyar, document 003):

``ps-sync``: data parallelism. "Each machine has a copy of a neural network and the
Ws. The master updates W by the sum of all the subgradients, delta, from all the
processors. The master broadcasts W to all machines." Every step, the master waits
for one gradient from every worker, applies their average, and broadcasts the new
weights: mini-batch SGD over (workers x batch) samples.

``ps-async``: "Parameter server or asynchronous SGD. All workers complete their
iteration step (local updates, sending to master, and receiving W from master)
asynchronously. Master process uses lock to avoid weight update conflicts: one worker
at a time." This is Downpour SGD (Dean et al., *Large Scale Distributed Deep
Networks*, NIPS 2012; NTHU chap. 12, "Asynchronous (Downpour) SGD"; You et al.,
SC'17, "Parameter Server (Async SGD)"). The master serves the workers first come,
first served, one gradient at a time: its single loop is the lock of the slide. Each
gradient moves the weights by lr / (N-1), so that a round of one gradient per worker
goes as far as one step of ps-sync (with the full lr, stale gradients and momentum 0.9
made the default run on digits end anywhere between 48 % and 96 % test accuracy; with
lr / (N-1), between 96 % and 97 %). A
worker's gradient was computed on the weights it last received; meanwhile the other
workers' gradients have moved them on. The *staleness* of a gradient is the number of
updates the master applied between sending those weights and applying it (the "stale
gradient problem" of *Deep Learning and Hardware*, document 001). The master counts
it for every gradient: a histogram in the ``staleness`` event and ``mean_staleness``
in ``summary.json``.

Who is who: rank 0 is the master; it trains on nothing, and it evaluates and
checkpoints the weights it keeps. Ranks 1..N-1 are the workers; worker r trains on
shard r-1 of N-1. A run needs at least 2 ranks (``--workers 1`` is rejected: there
would be no worker).

Messages (point to point, tag 0)::

    worker -> master   a Report (step, epoch, loss, correct, samples; float64)
                       the gradient: flat float32, or with --compression one packet per
                       parameter (``send_compressed``), so that PowerSGD sees matrices
                       the running statistics of batch norm, if the model has any
    master -> worker   the weights, flat (ps-sync: a broadcast to all workers)
    worker -> master   ps-async: a Report with step FINISHED when it has no batches left;
                       the master answers with the final weights once every worker is done

Steps: ``--steps`` counts the steps of every worker, ``--epochs`` the passes of every
worker over its own shard (with 4 ranks: 3 workers, 14 steps an epoch on digits). The
master's step s is done when it has applied s gradients of every worker (ps-async:
s x (N-1) gradients, from whichever workers came first); it evaluates and checkpoints
on its own steps.

Timers: the master's time blocked on the next report is ``wait`` (it idles while the
workers compute), receiving gradients and sending weights is ``comm``, applying them is
``compute``. A worker's ``comm`` is everything between its backward pass and the next.

Faults: ps-sync is synchronous, so the loss of any rank ends the run (failed, with a
checkpoint to ``--resume`` from). ps-async keeps going without a lost worker: its master
listens to each worker in a thread of its own, and drops a worker as soon as talking to
it fails (its connection closed, or ``--timeout`` seconds without a word); it logs a
``worker_dropped`` event, lists the worker in ``workers_lost`` in ``summary.json`` and
finishes with the others. Losing the master ends the run (failed, with a checkpoint).
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from ..comm import PeerError
from ..comm.buckets import FlatGradients
from ..compress.communicate import recv_compressed, send_compressed
from ..registry import SYNC_MODES
from .base import (
    MASTER,
    MasterWorkerMode,
    RankContext,
    TrainMeter,
    checkpoint_state,
    end_step,
    master_optimizer,
    needs_a_worker,
    restore,
    worker_batches,
)

FINISHED = -1  # the step of the Report a worker sends when it has no batches left




# --- what travels between workers and master ---------------------------------------------
@dataclass
class Report:
    """What a worker says with each gradient: its step, and how its batch went."""

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


@dataclass
class Gradient:
    """One worker's contribution: its flat gradient, and its batch-norm statistics (or None)."""

    values: torch.Tensor
    statistics: torch.Tensor | None


def statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers of ``model`` (batch norm's running mean and variance)."""
    return [b for b in model.buffers() if b.is_floating_point()]


def get_weights(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model`` in one flat tensor (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def set_weights(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy the flat tensor ``flat`` into the parameters of ``model``."""
    offset = 0
    for p in model.parameters():
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def send_gradient(ctx: RankContext, model: torch.nn.Module, grads: FlatGradients) -> None:
    """Send this worker's gradient (compressed when the run has a compressor) to the master."""
    if ctx.compressor is None:
        ctx.comm.send(grads.buffer, MASTER)
    else:
        for name, p in model.named_parameters():
            send_compressed(ctx.comm, ctx.compressor, p.grad, MASTER, key=name)
    if statistics(model):
        ctx.comm.send(torch.cat([b.reshape(-1) for b in statistics(model)]), MASTER)


def recv_gradient(ctx: RankContext, model: torch.nn.Module, src: int) -> Gradient:
    """Receive what ``send_gradient`` sent from worker ``src``; ``model`` gives the shapes."""
    if ctx.compressor is None:
        values = torch.empty(sum(p.numel() for p in model.parameters()), device=ctx.device)
        ctx.comm.recv(values, src)
    else:
        parts = [recv_compressed(ctx.comm, ctx.compressor, p, src)[0].reshape(-1)
                 for p in model.parameters()]
        values = torch.cat(parts)
    stats = None
    if statistics(model):
        stats = torch.empty(sum(b.numel() for b in statistics(model)), device=ctx.device)
        ctx.comm.recv(stats, src)
    return Gradient(values, stats)


# --- the master's side ------------------------------------------------------------------
@torch.no_grad()
def set_statistics(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy the flat tensor ``flat`` into the batch-norm statistics of ``model``."""
    offset = 0
    for b in statistics(model):
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def apply_mean(model, grads: FlatGradients, optimizer, received: list[Gradient]) -> None:
    """One optimizer step with the average of the workers' gradients, summed in rank order.

    The order is fixed so that ps-sync and ssp with staleness 0 compute bit for bit the
    same weights. Batch-norm statistics are averaged too.
    """
    total = received[0].values.clone()
    for gradient in received[1:]:
        total += gradient.values
    grads.buffer.copy_(total / len(received))
    optimizer.step()
    if received[0].statistics is not None:
        set_statistics(model, sum(g.statistics for g in received) / len(received))


def apply_one(model, grads: FlatGradients, optimizer, gradient: Gradient) -> None:
    """One optimizer step with one worker's gradient (ps-async); adopt its statistics."""
    grads.buffer.copy_(gradient.values)
    optimizer.step()
    if gradient.statistics is not None:
        set_statistics(model, gradient.statistics)


class WorkerReports(TrainMeter):
    """The master's meter: loss and accuracy of the batches behind the gradients it received.

    The master trains on no samples itself, so its ``samples`` stays 0 (the workers count
    theirs, and the summary adds up every rank's).
    """

    def add_report(self, report: Report) -> None:
        self.loss_sum += report.loss
        self.batches += 1
        self.correct += report.correct
        self.count += report.samples


def staleness_summary(histogram: Counter) -> dict:
    """Mean, max and the histogram (staleness -> number of gradients) of a run."""
    applied = sum(histogram.values())
    return {"mean_staleness": sum(s * n for s, n in histogram.items()) / applied if applied else 0.0,
            "max_staleness": max(histogram, default=0),
            "staleness_histogram": {str(s): histogram[s] for s in sorted(histogram)}}






# --- ps-sync ----------------------------------------------------------------------------
@SYNC_MODES.register("ps-sync", help="parameter server, synchronous: the master averages every "
                                     "worker's gradient, updates and broadcasts the weights",
                     validate=needs_a_worker)
class ParameterServerSync(MasterWorkerMode):
    def master(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads, optimizer, start = master_optimizer(ctx)
        meter = WorkerReports()
        for step in range(start + 1, ctx.total_steps + 1):
            received = []
            for worker in range(1, ctx.world):  # "the sum of all the subgradients, from all the processors"
                with ctx.timers.time("wait"):
                    report, _ = Report.recv(ctx.comm, worker)
                with ctx.timers.time("comm"):
                    received.append(recv_gradient(ctx, model, worker))
                meter.add_report(report)
            with ctx.timers.time("compute"):
                apply_mean(model, grads, optimizer, received)
            with ctx.timers.time("comm"):  # "the master broadcasts W to all machines"
                ctx.comm.broadcast(get_weights(model), MASTER)
            end_step(ctx, step, report.epoch, meter, model, lambda: checkpoint_state(model, optimizer))
        return {"model": model, "train_loss": meter.last_loss}

    def worker(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads = FlatGradients(model.parameters())
        start = restore(ctx, model, None)
        meter = TrainMeter(samples=start * ctx.batch_size)
        weights = get_weights(model)
        for step, epoch, x, y in worker_batches(ctx, start):
            loss, correct = ctx.forward_backward(model, x, y)
            with ctx.timers.time("comm"):
                Report(step, epoch, loss, correct, len(y)).send(ctx.comm)
                send_gradient(ctx, model, grads)
                ctx.comm.broadcast(weights, MASTER)
            set_weights(model, weights)
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, model)
        return {"model": model, "train_loss": meter.last_loss}


# --- ps-async ---------------------------------------------------------------------------
class AsyncMaster:
    """The master of ps-async: first come, first served, one gradient at a time.

    One listener thread per worker receives that worker's reports and gradients and
    puts them in a queue, in the order they arrive. The main thread takes them out one
    at a time, applies the gradient and sends that worker the new weights: the weights
    only ever change by one gradient at a time (the lock of the slide). A worker that
    dies makes only its own listener fail, as soon as a receive from it fails (at once
    when its connection closes, or after ``--timeout`` seconds of silence): the master
    drops that worker and goes on with the others.
    """

    def __init__(self, ctx: RankContext):
        self.ctx = ctx
        self.model = ctx.model
        self.grads = FlatGradients(self.model.parameters())
        self.workers = list(range(1, ctx.world))
        self.optimizer = ctx.make_optimizer(self.model.parameters())
        for group in self.optimizer.param_groups:  # a round of N-1 gradients makes one step
            group["lr"] /= len(self.workers)
        self.step = restore(ctx, self.model, self.optimizer)
        saved = ctx.resume_state or {}
        self.version = saved.get("version", 0)  # number of gradients applied so far
        self.delivered = saved.get("delivered", dict.fromkeys(self.workers, 0))  # steps, per worker
        self.staleness = Counter(saved.get("staleness", {}))
        self.computed_on = dict.fromkeys(self.workers, self.version)  # the weights each worker holds
        self.finished: list[int] = []  # workers that have done all their steps
        self.lost: list[int] = []
        self.meter = WorkerReports()
        self.epoch = 0

    def state(self) -> dict:
        return checkpoint_state(self.model, self.optimizer, version=self.version,
                                delivered=dict(self.delivered), staleness=dict(self.staleness))

    def run(self) -> dict:
        ctx = self.ctx
        arrivals: queue.Queue = queue.Queue()
        for worker in self.workers:
            threading.Thread(target=self.listen, args=(worker, arrivals), daemon=True,
                             name=f"ps-async-listener-{worker}").start()
        listening = set(self.workers)
        while listening:
            with ctx.timers.time("wait"):  # whoever comes first
                kind, worker, what = arrivals.get()
            if kind == "gradient":
                self.serve(worker, *what)
                continue
            listening.discard(worker)
            if kind == "finished":
                self.finished.append(worker)
            elif kind == "lost":
                self.drop(worker, what)
            else:
                raise what
        end_step(ctx, ctx.total_steps, self.epoch, self.meter, self.model, self.state)
        for worker in self.finished:  # the workers leave with the final weights
            try:
                with ctx.timers.time("comm"):
                    ctx.comm.send(get_weights(self.model), worker)
            except PeerError as error:
                self.drop(worker, error)
        summary = staleness_summary(self.staleness)
        ctx.event("staleness", histogram=summary["staleness_histogram"],
                  mean=summary["mean_staleness"], max=summary["max_staleness"])
        return {"model": self.model, "train_loss": self.meter.last_loss, **summary,
                "gradients_applied": self.version, "workers_lost": self.lost}

    def listen(self, worker: int, arrivals: queue.Queue) -> None:
        """A listener thread: queue what ``worker`` sends until it finishes or fails."""
        try:
            while True:
                report, _ = Report.recv(self.ctx.comm, worker)
                if report.step == FINISHED:
                    arrivals.put(("finished", worker, None))
                    return
                arrivals.put(("gradient", worker, (report, recv_gradient(self.ctx, self.model, worker))))
        except PeerError as error:
            arrivals.put(("lost", worker, error))
        except Exception as error:  # noqa: BLE001 - the main thread raises it
            arrivals.put(("failed", worker, error))

    def serve(self, worker: int, report: Report, gradient: Gradient) -> None:
        """Apply ``worker``'s gradient and send it the new weights."""
        ctx = self.ctx
        with ctx.timers.time("compute"):
            apply_one(self.model, self.grads, self.optimizer, gradient)
        self.staleness[self.version - self.computed_on[worker]] += 1
        self.version += 1
        self.delivered[worker] = report.step
        self.meter.add_report(report)
        self.epoch = report.epoch
        try:
            with ctx.timers.time("comm"):  # "receiving W from master"
                ctx.comm.send(get_weights(self.model), worker)
            self.computed_on[worker] = self.version
        except PeerError as error:
            self.drop(worker, error)
        workers = len(self.workers)
        while self.version >= (self.step + 1) * workers and self.step + 1 < ctx.total_steps:
            self.step += 1
            end_step(ctx, self.step, self.epoch, self.meter, self.model, self.state)

    def drop(self, worker: int, error: Exception) -> None:
        """Stop serving ``worker`` (talking to it failed): training goes on with the others."""
        if worker not in self.lost:
            self.lost.append(worker)
            self.ctx.event("worker_dropped", worker=worker, step=self.step,
                           error=str(error).splitlines()[0], steps_done=self.delivered[worker])


@SYNC_MODES.register("ps-async", help="parameter server, asynchronous (Downpour): the master "
                                      "applies each gradient as it comes and logs its staleness",
                     validate=needs_a_worker, survives_worker_loss=True)
class ParameterServerAsync(MasterWorkerMode):
    def master(self, ctx: RankContext) -> dict:
        return AsyncMaster(ctx).run()

    def worker(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads = FlatGradients(model.parameters())
        restore(ctx, model, None)
        start = (ctx.resume_state or {}).get("delivered", {}).get(ctx.rank, 0)
        meter = TrainMeter(samples=start * ctx.batch_size)
        weights = get_weights(model)
        for step, epoch, x, y in worker_batches(ctx, start):
            loss, correct = ctx.forward_backward(model, x, y)
            with ctx.timers.time("comm"):  # "sending to master, and receiving W from master"
                Report(step, epoch, loss, correct, len(y)).send(ctx.comm)
                send_gradient(ctx, model, grads)
                ctx.comm.recv(weights, MASTER)
            set_weights(model, weights)
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, model)
        with ctx.timers.time("comm"):
            Report(FINISHED).send(ctx.comm)
        with ctx.timers.time("wait"):  # until the last worker is done too
            ctx.comm.recv(weights, MASTER)
        set_weights(model, weights)
        return {"model": model, "train_loss": meter.last_loss}

"""Parameter server: a master keeps the weights, the workers send it gradients.

Two modes, from the slides "Parallelism" and "Parallel Algorithms" of *Deep Learning*
(Vadhiyar, document 003), on the master–worker protocol of ``master_worker.py``:

``ps-sync``: "The master updates W by the sum of all the subgradients, delta, from all
the processors. The master broadcasts W to all machines." Every step the master waits for
one gradient from every worker, applies their average, and broadcasts the new weights.

``ps-async``: "Parameter server or asynchronous SGD ... Master process uses lock to
avoid weight update conflicts: one worker at a time": Downpour SGD (Dean et al., *Large
Scale Distributed Deep Networks*, NIPS 2012; NTHU chap. 12). The master applies each
gradient as it comes, first come, first served, each moving the weights by lr / (N-1),
and counts its *staleness* (updates applied between sending a worker its weights and
applying its gradient; the "stale gradient problem" of document 001).

A gradient goes through the compressing communicator (``--compression``); the running
statistics of batch norm, if the model has any, follow it uncompressed.
``docs/sync_modes_ps.md`` gives the messages, the timers, the faults and the results.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..comm import PeerError
from ..comm.buckets import FlatGradients
from ..registry import SYNC_MODES
from .base import RankContext, TrainMeter, checkpoint_state, end_step, gradient_pieces, restore
from .master_worker import (
    FINISHED,
    MASTER,
    AsyncMaster,
    MasterWorkerMode,
    Report,
    get_weights,
    needs_a_worker,
    set_weights,
    worker_batches,
)


# --- what travels between workers and master ---------------------------------------------
@dataclass
class Gradient:
    """One worker's contribution: its flat gradient, and its batch-norm statistics (or None)."""

    values: torch.Tensor
    statistics: torch.Tensor | None


def statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers of ``model`` (batch norm's running mean and variance)."""
    return [b for b in model.buffers() if b.is_floating_point()]


def send_gradient(ctx: RankContext, model: torch.nn.Module, grads: FlatGradients) -> None:
    """Send this worker's gradient to the master through the compressing communicator."""
    for key, piece in gradient_pieces(grads.buffer, model, ctx.compressed.compressor):
        ctx.compressed.send(piece, MASTER, key=key)
    if statistics(model):
        ctx.comm.send(torch.cat([b.reshape(-1) for b in statistics(model)]), MASTER)


def recv_gradient(ctx: RankContext, model: torch.nn.Module, src: int) -> Gradient:
    """Receive what ``send_gradient`` sent from worker ``src``; ``model`` gives the shapes."""
    values = torch.empty(sum(p.numel() for p in model.parameters() if p.requires_grad), device=ctx.device)
    for _, piece in gradient_pieces(values, model, ctx.compressed.compressor):
        ctx.compressed.recv(piece, src)
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


def staleness_summary(histogram: Counter) -> dict:
    """Mean, max and the histogram (staleness -> number of gradients) of a run."""
    applied = sum(histogram.values())
    return {"mean_staleness": sum(s * n for s, n in histogram.items()) / applied if applied else 0.0,
            "max_staleness": max(histogram, default=0),
            "staleness_histogram": {str(s): histogram[s] for s in sorted(histogram)}}


def train_worker(ctx: RankContext, start: int, fetch) -> tuple[TrainMeter, torch.Tensor]:
    """A worker's steps in the parameter-server modes: forward and backward, a report and
    the gradient to the master, then ``fetch(step, weights)`` fills in the new weights."""
    model = ctx.model
    grads = FlatGradients(model.parameters())
    meter = TrainMeter(samples=start * ctx.batch_size)
    weights = get_weights(model)
    for step, epoch, x, y in worker_batches(ctx, start):
        loss, correct = ctx.forward_backward(model, x, y)
        with ctx.timers.time("comm"):
            Report(step, epoch, loss, correct, len(y)).send(ctx.comm)
            send_gradient(ctx, model, grads)
        fetch(step, weights)
        set_weights(model, weights)
        meter.add(loss, correct, len(y))
        end_step(ctx, step, epoch, meter, model)
    return meter, weights


def master_optimizer(ctx: RankContext):
    """The master's gradient buffer and optimizer, and the step it starts after (0, or the checkpoint's)."""
    grads = FlatGradients(ctx.model.parameters())
    optimizer = ctx.make_optimizer(ctx.model.parameters())
    return grads, optimizer, restore(ctx, ctx.model, optimizer)


# --- ps-sync ----------------------------------------------------------------------------
@SYNC_MODES.register("ps-sync", help="parameter server, synchronous: the master averages every "
                                     "worker's gradient, updates and broadcasts the weights",
                     validate=needs_a_worker)
class ParameterServerSync(MasterWorkerMode):
    def master(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads, optimizer, start = master_optimizer(ctx)
        meter = TrainMeter()
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
        def fetch(step, weights):
            with ctx.timers.time("comm"):  # "the master broadcasts W to all machines"
                ctx.comm.broadcast(weights, MASTER)

        meter, _ = train_worker(ctx, restore(ctx, ctx.model, None), fetch)
        return {"model": ctx.model, "train_loss": meter.last_loss}


# --- ps-async ---------------------------------------------------------------------------
class PSAsyncMaster(AsyncMaster):
    """The master of ps-async: first come, first served, one gradient at a time.

    Each gradient is applied and answered with the new weights before the next one is
    taken: the weights only ever change by one gradient at a time (the lock of the slide).
    """

    def __init__(self, ctx: RankContext):
        super().__init__(ctx, at_once=False)
        self.model = ctx.model
        self.grads = FlatGradients(self.model.parameters())
        self.optimizer = ctx.make_optimizer(self.model.parameters())
        for group in self.optimizer.param_groups:  # a round of N-1 gradients makes one step
            group["lr"] /= len(self.workers)
        self.step = restore(ctx, self.model, self.optimizer)
        saved = ctx.resume_state or {}
        self.version = saved.get("version", 0)  # number of gradients applied so far
        self.delivered = saved.get("delivered", dict.fromkeys(self.workers, 0))  # steps, per worker
        self.staleness = Counter(saved.get("staleness", {}))
        self.computed_on = dict.fromkeys(self.workers, self.version)  # the weights each worker holds
        self.done: list[int] = []  # workers that have done all their steps
        self.dropped: list[int] = []
        self.meter = TrainMeter()
        self.epoch = 0

    def state(self) -> dict:
        return checkpoint_state(self.model, self.optimizer, version=self.version,
                                delivered=dict(self.delivered), staleness=dict(self.staleness))

    def run(self) -> dict:
        ctx = self.ctx
        self.serve_workers()
        end_step(ctx, ctx.total_steps, self.epoch, self.meter, self.model, self.state)
        for worker in self.done:  # the workers leave with the final weights
            try:
                with ctx.timers.time("comm"):
                    ctx.comm.send(get_weights(self.model), worker)
            except PeerError as error:
                self.lost(worker, error)
        summary = staleness_summary(self.staleness)
        ctx.event("staleness", histogram=summary["staleness_histogram"],
                  mean=summary["mean_staleness"], max=summary["max_staleness"])
        return {"model": self.model, "train_loss": self.meter.last_loss, **summary,
                "gradients_applied": self.version, "workers_lost": self.dropped}

    def receive(self, worker: int, report: Report) -> Gradient:
        return recv_gradient(self.ctx, self.model, worker)

    def serve(self, worker: int, report: Report, gradient: Gradient) -> None:
        """Apply ``worker``'s gradient and send it the new weights ("receiving W from master")."""
        ctx = self.ctx
        with ctx.timers.time("compute"):
            apply_one(self.model, self.grads, self.optimizer, gradient)
        self.staleness[self.version - self.computed_on[worker]] += 1
        self.version += 1
        self.delivered[worker] = report.step
        self.meter.add_report(report)
        self.epoch = report.epoch
        with ctx.timers.time("comm"):
            ctx.comm.send(get_weights(self.model), worker)
        self.computed_on[worker] = self.version

    def served(self, worker: int, report: Report) -> None:
        while self.version >= (self.step + 1) * len(self.workers) and self.step + 1 < self.ctx.total_steps:
            self.step += 1
            end_step(self.ctx, self.step, self.epoch, self.meter, self.model, self.state)

    def finished(self, worker: int) -> None:
        self.done.append(worker)

    def lost(self, worker: int, error: Exception) -> None:
        """Stop serving ``worker`` (talking to it failed): training goes on with the others."""
        if worker not in self.dropped:
            self.dropped.append(worker)
            self.ctx.event("worker_dropped", worker=worker, step=self.step,
                           error=str(error).splitlines()[0], steps_done=self.delivered[worker])


@SYNC_MODES.register("ps-async", help="parameter server, asynchronous (Downpour): the master "
                                      "applies each gradient as it comes and logs its staleness",
                     validate=needs_a_worker, survives_worker_loss=True)
class ParameterServerAsync(MasterWorkerMode):
    def master(self, ctx: RankContext) -> dict:
        return PSAsyncMaster(ctx).run()

    def worker(self, ctx: RankContext) -> dict:
        def fetch(step, weights):
            with ctx.timers.time("comm"):  # "sending to master, and receiving W from master"
                ctx.comm.recv(weights, MASTER)

        restore(ctx, ctx.model, None)
        start = (ctx.resume_state or {}).get("delivered", {}).get(ctx.rank, 0)
        meter, weights = train_worker(ctx, start, fetch)
        model = ctx.model
        with ctx.timers.time("comm"):
            Report(FINISHED).send(ctx.comm)
        with ctx.timers.time("wait"):  # until the last worker is done too
            ctx.comm.recv(weights, MASTER)
        set_weights(model, weights)
        return {"model": model, "train_loss": meter.last_loss}

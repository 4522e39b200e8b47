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
make the default run on digits end near 50 % test accuracy instead of 96 %). A
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

Steps: ``--steps`` / ``--epochs`` count steps of every worker. The master's step s is
done when it has applied s gradients of every worker (ps-async: s x (N-1) gradients,
from whichever workers came first); it evaluates and checkpoints on its own steps.

Timers: the master's time blocked on the next report is ``wait`` (it idles while the
workers compute), receiving gradients and sending weights is ``comm``, applying them is
``compute``. A worker's ``comm`` is everything between its backward pass and the next.

Faults: ps-sync is synchronous, so the loss of any rank ends the run (failed, with a
checkpoint to ``--resume`` from). ps-async keeps going without a lost worker: the
master drops a worker when the launcher reports it lost (a ``worker_lost`` event),
when a message to or from it fails, or when no worker at all has written for
``--timeout`` seconds; it logs a ``worker_dropped`` event and finishes with the others.
(A receive from any worker can fail when one of them dies without saying which: the
master then waits up to LOSS_REPORT_S seconds for the launcher to name it.)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..comm import PeerError
from ..comm.buckets import FlatGradients
from ..compress.communicate import recv_compressed, send_compressed
from ..registry import SYNC_MODES
from ..runs import RunDir
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore

MASTER = 0
FINISHED = -1  # the step of the Report a worker sends when it has no batches left
LOSS_REPORT_S = 10.0  # how long ps-async's master waits for the launcher to name a dead worker


def needs_a_worker(mode: str):
    """The ``validate`` check of the modes with a master: at least one worker besides rank 0."""
    def check(config):
        if config.workers < 2:
            return ("--workers", f"{mode} needs at least 2 ranks: rank 0 is the parameter server "
                                 "and ranks 1.. are the workers that train")
        return None
    return check


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


def worker_batches(ctx: RankContext, start: int):
    """Worker r trains on shard r-1 of the N-1 workers (the master has no shard)."""
    return ctx.batches(start, rank=ctx.rank - 1, world=ctx.world - 1)


# --- ps-sync ----------------------------------------------------------------------------
@SYNC_MODES.register("ps-sync", help="parameter server, synchronous: the master averages every "
                                     "worker's gradient, updates and broadcasts the weights",
                     validate=needs_a_worker("ps-sync"))
class ParameterServerSync(SyncMode):
    def run(self, ctx: RankContext) -> dict:
        return self.master(ctx) if ctx.rank == MASTER else self.worker(ctx)

    def master(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads = FlatGradients(model.parameters())
        optimizer = ctx.make_optimizer(model.parameters())
        start = restore(ctx, model, optimizer)
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
class LostWorkers:
    """Workers the launcher reported dead since this object was made (``worker_lost`` events).

    Reading starts at the current end of ``metrics.jsonl``: a resumed run does not
    mistake the losses of its previous attempt for new ones.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.offset = run.metrics_path.stat().st_size if run.metrics_path.exists() else 0
        self.ranks: set[int] = set()

    def poll(self) -> set[int]:
        for record, offset in self.run.read_metrics_from(self.offset):
            self.offset = offset
            if record.get("kind") == "event" and record.get("event") == "worker_lost":
                self.ranks.add(record["rank"])
        return self.ranks


class AsyncMaster:
    """The master of ps-async: first come, first served, one gradient at a time."""

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
        self.delivered = saved.get("delivered", dict.fromkeys(self.workers, 0))  # per worker
        self.staleness = Counter(saved.get("staleness", {}))
        self.computed_on = dict.fromkeys(self.workers, self.version)  # weights each worker holds
        self.active = set(self.workers)  # workers that may still send
        self.finished: list[int] = []  # workers that have done all their steps
        self.dropped: list[int] = []
        self.meter = WorkerReports()
        self.epoch = 0

    def state(self) -> dict:
        return checkpoint_state(self.model, self.optimizer, version=self.version,
                                delivered=dict(self.delivered), staleness=dict(self.staleness))

    def run(self) -> dict:
        ctx = self.ctx
        lost = LostWorkers(ctx.run)
        while self.active:
            for worker in sorted(self.active & lost.poll()):
                self.drop(worker, "the launcher reported it lost")
            if not self.active:
                break
            started = time.monotonic()
            try:
                with ctx.timers.time("wait"):  # whoever comes first
                    report, sender = Report.recv(ctx.comm)
            except PeerError as e:
                if time.monotonic() - started < ctx.comm.timeout:
                    self.learn_who_died(lost, e)  # a connection broke: a worker died
                    continue
                for worker in sorted(self.active):
                    self.drop(worker, f"no worker sent anything for {ctx.comm.timeout:.0f} s")
                break
            if report.step == FINISHED:
                self.active.discard(sender)
                self.finished.append(sender)
            else:
                self.serve(sender, report)
        end_step(ctx, ctx.total_steps, self.epoch, self.meter, self.model, self.state)
        for worker in self.finished:  # the workers leave with the final weights
            try:
                with ctx.timers.time("comm"):
                    ctx.comm.send(get_weights(self.model), worker)
            except PeerError as e:
                self.drop(worker, str(e))
        summary = staleness_summary(self.staleness)
        ctx.event("staleness", histogram=summary["staleness_histogram"],
                  mean=summary["mean_staleness"], max=summary["max_staleness"])
        return {"model": self.model, "train_loss": self.meter.last_loss, **summary,
                "gradients_applied": self.version, "workers_dropped": self.dropped}

    def learn_who_died(self, lost: LostWorkers, error: PeerError) -> None:
        """A receive from any worker failed: wait for the launcher to report which one died."""
        with self.ctx.timers.time("wait"):
            deadline = time.monotonic() + LOSS_REPORT_S
            while not self.active & lost.poll():
                if time.monotonic() > deadline:
                    raise PeerError(f"a worker died, but none was reported lost within "
                                    f"{LOSS_REPORT_S:.0f} s: {error}") from error
                time.sleep(0.05)

    def serve(self, worker: int, report: Report) -> None:
        """Apply ``worker``'s gradient and send it the new weights."""
        ctx = self.ctx
        try:
            with ctx.timers.time("comm"):
                gradient = recv_gradient(ctx, self.model, worker)
        except PeerError as e:
            self.drop(worker, str(e))
            return
        with ctx.timers.time("compute"):
            apply_one(self.model, self.grads, self.optimizer, gradient)
        self.staleness[self.version - self.computed_on[worker]] += 1
        self.version += 1
        self.delivered[worker] = report.step
        self.meter.add_report(report)
        self.epoch = report.epoch
        try:
            with ctx.timers.time("comm"):
                ctx.comm.send(get_weights(self.model), worker)
            self.computed_on[worker] = self.version
        except PeerError as e:
            self.drop(worker, str(e))
        workers = len(self.workers)
        while self.version >= (self.step + 1) * workers and self.step + 1 < ctx.total_steps:
            self.step += 1
            end_step(ctx, self.step, self.epoch, self.meter, self.model, self.state)

    def drop(self, worker: int, reason: str) -> None:
        """Stop waiting for ``worker``: training goes on with the others."""
        self.active.discard(worker)
        self.dropped.append(worker)
        self.ctx.event("worker_dropped", worker=worker, reason=reason,
                       gradients_applied=self.delivered[worker])


@SYNC_MODES.register("ps-async", help="parameter server, asynchronous (Downpour): the master "
                                      "applies each gradient as it comes and logs its staleness",
                     validate=needs_a_worker("ps-async"), survives_worker_loss=True)
class ParameterServerAsync(SyncMode):
    def run(self, ctx: RankContext) -> dict:
        return AsyncMaster(ctx).run() if ctx.rank == MASTER else self.worker(ctx)

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

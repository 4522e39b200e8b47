"""Elastic Averaging SGD (EASGD): the update rules and the round-robin original.

The EASGD slides (Vadhiyar, *Deep Learning*, slide "EAGSD (round-robin)"; You, Buluç and
Demmel, *Scaling Deep Learning on GPU and Knights Landing Clusters*, SC'17, slide "EASGD
(Round-Robin)"). Worker i keeps its own weights W^i, the master keeps the center W̄, and
ΔW^i_t is the gradient of worker i's mini-batch at W^i_t:

    W^i_{t+1} = W^i_t − η (ΔW^i_t + ρ (W^i_t − W̄_t))          (1)  on each worker
    W̄_{t+1}   = W̄_t + η Σ_i ρ (W^i_t − W̄_t)                     (2)  on the master

Every EASGD mode is built on :func:`worker_update` and :func:`center_update`: round robin
here, the asynchronous family (``easgd_async.py``) and the synchronous variants
(``easgd_sync.py``) beside it. Rank 0 is the master, ranks 1..G the workers
(``master_worker.py``); a worker sends its weights as their difference from the last
center it received (the elastic difference, through the compressing communicator).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector

from ..comm.buckets import FlatGradients
from ..data import batches_per_epoch
from ..registry import SYNC_MODES
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore
from .master_worker import (
    MASTER,
    Report,
    needs_a_worker,
    set_weights,
    use_worker_steps,
    worker_batches,
    worker_ranks,
)

EASGD_SETTINGS = ("lr", "rho")


# --- the update rules --------------------------------------------------------------------------
def worker_update(w, grad, center, lr, rho):
    """Equation (1): a worker's step, its gradient plus the elastic pull toward the center.

        W^i_{t+1} = W^i_t − η (ΔW^i_t + ρ (W^i_t − W̄_t))
    """
    return w - lr * (grad + rho * (w - center))


def momentum_worker_update(w, velocity, grad, center, lr, rho, momentum):
    """Equation (1) with momentum, for Async MEASGD; returns (W^i_{t+1}, V^i_{t+1}).

    The SC'17 slide says "add a momentum parameter V, help accelerate gradient in the right
    direction"; here V accumulates the gradients only (heavy ball) and the elastic pull
    stays as in (1), which this is when μ = 0:

        V^i_{t+1} = μ V^i_t − η ΔW^i_t
        W^i_{t+1} = W^i_t + V^i_{t+1} − η ρ (W^i_t − W̄_t)
    """
    velocity = momentum * velocity - lr * grad
    return w + velocity - lr * rho * (w - center), velocity


def center_update(center, workers, lr, rho):
    """Equation (2): the master's step from the weights of the workers in the list ``workers``.

        W̄_{t+1} = W̄_t + η Σ_i ρ (W^i_t − W̄_t)

    Round robin and the asynchronous modes pass one worker at a time.
    """
    return center + lr * sum(rho * (w - center) for w in workers)


def center_update_reduced(center, difference_sum, lr, rho):
    """Equation (2) when a reduction has already summed the differences Σ_i (W^i_t − W̄_t)."""
    return center + lr * rho * difference_sum


# --- the master's clock -----------------------------------------------------------------------
class CenterClock:
    """The master's step and its bookkeeping: the center is at step s once every live worker
    has sent its step-s weights. Then the master logs (the losses its workers reported),
    evaluates the center and checkpoints it, as every rank does after a step (``end_step``).
    """

    def __init__(self, ctx: RankContext, center, start: int):
        self.ctx = ctx
        self.center = center
        self.step = start
        self.progress = {rank: start for rank in worker_ranks(ctx)}
        self.lost: list[int] = []
        self.meter = TrainMeter()
        self.steps_per_epoch = batches_per_epoch(len(ctx.data.y_train), ctx.world - 1, ctx.batch_size)

    def report(self, worker: int, report: Report) -> None:
        """A worker's report of an exchange the master has served."""
        self.progress[worker] = report.step
        self.meter.add_report(report)
        self.advance()

    def finish(self, worker: int) -> None:
        self.progress[worker] = self.ctx.total_steps
        self.advance()

    def lose(self, worker: int, error: Exception) -> None:
        """Stop waiting for ``worker``: talking to it failed (it died)."""
        if worker in self.lost:
            return
        self.progress.pop(worker, None)
        self.lost.append(worker)
        self.ctx.event("worker_dropped", worker=worker, step=self.step, error=str(error).splitlines()[0])
        self.advance()

    def advance(self) -> None:
        target = min(self.progress.values(), default=self.ctx.total_steps)
        model = self.ctx.model
        while self.step < target:
            self.step += 1
            # a copy: under Hogwild other threads go on writing the center meanwhile
            set_weights(model, self.center.clone().to(self.ctx.device))
            end_step(self.ctx, self.step, (self.step - 1) // self.steps_per_epoch, self.meter, model,
                     lambda: checkpoint_state(model, None))

    def results(self) -> dict:
        return {"model": self.ctx.model, "train_loss": self.meter.last_loss, "workers_lost": self.lost}


def start_master(ctx: RankContext):
    """The master's center (from the initial weights or the checkpoint) and its clock."""
    use_worker_steps(ctx)
    start = restore(ctx, ctx.model, None)
    center = parameters_to_vector(ctx.model.parameters()).detach().clone()
    return center, CenterClock(ctx, center, start)


def start_worker(ctx: RankContext):
    """A worker's first step, weights and gradient buffer; it starts at the center."""
    use_worker_steps(ctx)
    start = restore(ctx, ctx.model, None)
    grads = FlatGradients(ctx.model.parameters())
    weights = parameters_to_vector(ctx.model.parameters()).detach().clone()
    return start, weights, grads


def elastic_step(ctx: RankContext, weights, gradient, center, lr: float, rho: float):
    """Equation (1) on this worker, timed as computation; the model takes the new weights."""
    with ctx.timers.time("compute"):
        weights = worker_update(weights, gradient, center, lr, rho)
        set_weights(ctx.model, weights)
    return weights


def worker_exchange(ctx: RankContext, report: Report, weights, center) -> None:
    """A worker's request: its report, then its weights as the elastic difference."""
    report.send(ctx.comm)
    ctx.compressed.send(weights - center, MASTER)


# --- easgd-rr -------------------------------------------------------------------------------
@SYNC_MODES.register("easgd-rr", help="EASGD round robin: the master serves worker j = t mod G, one at a time",
                     settings=EASGD_SETTINGS, validate=needs_a_worker)
class RoundRobinEASGD(SyncMode):
    """Algorithm 1 of the Vadhiyar slides, "Original EASGD on Multi-GPU system".

    For t = 1..T and j = t mod G: the master (the CPU there, rank 0 here) sends W̄_t to
    worker j (line 9); worker j computes its gradient (line 10); the master gets W^j_t
    (line 11); worker j updates W^j by equation (1) (line 12) and the master updates the
    center by W̄_{t+1} = W̄_t + η ρ (W^j_t − W̄_t), equation (2) for one worker (line 13).
    Only one worker computes at a time: the baseline the redesigns improve on. A step here
    is one round: every worker served once. A lost worker stops the round: the run fails.
    """

    def __init__(self, lr: float, rho: float):
        self.lr, self.rho = lr, rho

    def run(self, ctx: RankContext) -> dict:
        return self.master(ctx) if ctx.rank == MASTER else self.worker(ctx)

    def master(self, ctx: RankContext) -> dict:
        center, clock = start_master(ctx)
        difference = torch.empty_like(center)
        for _ in range(clock.step, ctx.total_steps):
            for worker in worker_ranks(ctx):  # j = t mod G
                with ctx.timers.time("comm"):
                    ctx.comm.send(center, worker)
                with ctx.timers.time("wait"):  # worker j computes meanwhile
                    report, _ = Report.recv(ctx.comm, worker)
                with ctx.timers.time("comm"):
                    ctx.compressed.recv(difference, worker)
                with ctx.timers.time("compute"):
                    center.copy_(center_update(center, [center + difference], self.lr, self.rho))
                clock.report(worker, report)
        return {"model": ctx.model, "train_loss": clock.meter.last_loss}

    def worker(self, ctx: RankContext) -> dict:
        start, weights, grads = start_worker(ctx)
        center = weights.clone()
        meter = TrainMeter(samples=start * ctx.batch_size)
        for step, epoch, x, y in worker_batches(ctx, start):
            with ctx.timers.time("wait"):  # until it is this worker's turn
                ctx.comm.recv(center, MASTER)
            loss, correct = ctx.forward_backward(ctx.model, x, y)
            with ctx.timers.time("comm"):
                worker_exchange(ctx, Report(step, epoch, loss, correct, len(y)), weights, center)
            weights = elastic_step(ctx, weights, grads.buffer, center, self.lr, self.rho)
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, ctx.model)
        return {"model": ctx.model, "train_loss": meter.last_loss}

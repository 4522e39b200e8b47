"""Asynchronous EASGD: Async EASGD, Async MEASGD and Hogwild EASGD (You, Buluç and
Demmel, SC'17, slides "Async EASGD", "Async MEASGD", "Hogwild EASGD").

(1) a worker sends W^i_t to the master and the master returns W̄_t; (2) the worker has
computed its gradient ΔW^i_t; (3) the master updates the center by equation (2) and the
worker its weights by equation (1) (with momentum for MEASGD). The master listens to
every worker (``master_worker.AsyncMaster``): Async EASGD serves them first come, first
served, one at a time ("use FCFS strategy to process multiple workers"); Hogwild EASGD
"removes the lock": each listener applies (2) to the shared center as soon as its
worker's weights arrive (after Niu et al., NIPS'11). A lost worker is dropped.
"""

from __future__ import annotations

import torch

from ..registry import SYNC_MODES
from .base import RankContext, SyncMode, TrainMeter, end_step
from .easgd import (
    EASGD_SETTINGS,
    center_update,
    momentum_worker_update,
    start_master,
    start_worker,
    worker_exchange,
    worker_update,
)
from .master_worker import (
    FINISHED,
    MASTER,
    AsyncMaster,
    Report,
    needs_a_worker,
    set_weights,
    worker_batches,
    worker_ranks,
)


def run_async_worker(ctx: RankContext, lr: float, rho: float, momentum: float) -> dict:
    """A worker of Async EASGD / MEASGD and Hogwild EASGD. W^i_t goes as its difference
    from the last center this worker received, which the master remembers."""
    start, weights, grads = start_worker(ctx)
    center = weights.clone()
    velocity = torch.zeros_like(weights)
    meter = TrainMeter(samples=start * ctx.batch_size)
    for step, epoch, x, y in worker_batches(ctx, start):
        loss, correct = ctx.forward_backward(ctx.model, x, y)
        with ctx.timers.time("comm"):
            worker_exchange(ctx, Report(step, epoch, loss, correct, len(y)), weights, center)
        with ctx.timers.time("wait"):  # the master serves the requests in turn
            ctx.comm.recv(center, MASTER)
        with ctx.timers.time("compute"):
            if momentum:
                weights, velocity = momentum_worker_update(weights, velocity, grads.buffer, center, lr, rho,
                                                           momentum)
            else:
                weights = worker_update(weights, grads.buffer, center, lr, rho)
            set_weights(ctx.model, weights)
        meter.add(loss, correct, len(y))
        end_step(ctx, step, epoch, meter, ctx.model)
    Report(FINISHED).send(ctx.comm)
    return {"model": ctx.model, "train_loss": meter.last_loss}


class CenterMaster(AsyncMaster):
    """The master of Async EASGD (one request at a time) and Hogwild EASGD (``at_once``)."""

    def __init__(self, ctx: RankContext, lr: float, rho: float, at_once: bool):
        super().__init__(ctx, at_once)
        self.lr, self.rho = lr, rho
        self.center, self.clock = start_master(ctx)
        self.last_sent = {worker: self.center.clone() for worker in worker_ranks(ctx)}

    def receive(self, worker: int, report: Report):
        difference = torch.empty_like(self.center)
        self.ctx.compressed.recv(difference, worker)
        return difference

    def serve(self, worker: int, report: Report, difference) -> None:
        """W^i_t in (as its difference from the last center sent to worker i), W̄_t out,
        then equation (2)."""
        weights = self.last_sent[worker] + difference
        reply = self.center.clone()
        self.last_sent[worker] = reply
        with self.ctx.timers.time("comm"):
            self.ctx.comm.send(reply, worker)
        self.center.copy_(center_update(self.center, [weights], self.lr, self.rho))

    def served(self, worker: int, report: Report) -> None:
        self.clock.report(worker, report)

    def finished(self, worker: int) -> None:
        self.clock.finish(worker)

    def lost(self, worker: int, error: Exception) -> None:
        self.clock.lose(worker, error)

    def run(self) -> dict:
        self.serve_workers()
        return self.clock.results()


class AsyncEASGDFamily(SyncMode):
    at_once = False

    def __init__(self, lr: float, rho: float, momentum: float = 0.0):
        self.lr, self.rho, self.momentum = lr, rho, momentum

    def run(self, ctx: RankContext) -> dict:
        if ctx.rank == MASTER:
            return CenterMaster(ctx, self.lr, self.rho, self.at_once).run()
        return run_async_worker(ctx, self.lr, self.rho, self.momentum)


@SYNC_MODES.register("easgd-async", help="Async EASGD: the master serves the workers first come, first served",
                     settings=EASGD_SETTINGS, survives_worker_loss=True, validate=needs_a_worker)
class AsyncEASGD(AsyncEASGDFamily):
    """Async EASGD (SC'17): parameter-server updates instead of round robin."""


@SYNC_MODES.register("measgd-async", help="Async MEASGD: Async EASGD with momentum on the workers",
                     settings=(*EASGD_SETTINGS, "momentum"), survives_worker_loss=True,
                     validate=needs_a_worker)
class AsyncMEASGD(AsyncEASGDFamily):
    """Async MEASGD (SC'17): "add a momentum parameter V, help accelerate gradient in the
    right direction"; the workers follow :func:`momentum_worker_update` with ``--momentum``."""


@SYNC_MODES.register("easgd-hogwild", help="Hogwild EASGD: one master thread per worker, center updated without a lock",
                     settings=EASGD_SETTINGS, survives_worker_loss=True, validate=needs_a_worker)
class HogwildEASGD(AsyncEASGDFamily):
    """Hogwild EASGD (SC'17): "remove the lock for faster convergence". While one thread
    computes ``center_update`` from the center it read, another may write it, and one of
    the two updates is lost: Hogwild's bet that such collisions are rare and cheap."""

    at_once = True

"""Elastic Averaging SGD (EASGD): the round-robin original and its redesigns.

The EASGD slides (Vadhiyar, *Deep Learning*, slide "EAGSD (round-robin)"; You, Buluç and
Demmel, *Scaling Deep Learning on GPU and Knights Landing Clusters*, SC'17, slide "EASGD
(Round-Robin)") give two update rules. Worker i keeps its own weights W^i, the master
keeps the center W̄, and ΔW^i_t is the gradient of worker i's mini-batch at W^i_t:

    W^i_{t+1} = W^i_t − η (ΔW^i_t + ρ (W^i_t − W̄_t))          (1)  on each worker
    W̄_{t+1}   = W̄_t + η Σ_i ρ (W^i_t − W̄_t)                     (2)  on the master

The elastic force ρ (W^i − W̄) pulls each worker toward the center and the center toward
the workers: the workers explore, the center averages them, and the center is the model
that is evaluated. :func:`worker_update` and :func:`center_update` are (1) and (2) as
written (:func:`center_update_reduced` is (2) from a reduced sum, for Sync EASGD); every
mode in this file is built on them.

The modes (``--sync``), in the order of the SC'17 paper:

- ``easgd-rr``: Algorithm 1 of the Vadhiyar slides ("Original EASGD on a multi-GPU
  system"): at iteration t the master serves worker j = t mod G only. Ordered, and slow.
- ``easgd-async``: Async EASGD: the master serves whichever worker asks first (first
  come, first served), one at a time, as if under a lock.
- ``measgd-async``: Async MEASGD: the same, with momentum on the workers (``--momentum``).
- ``easgd-hogwild``: Hogwild EASGD: the lock is removed; the master's threads (one per
  worker) update the center as their workers' weights arrive, all at the same time.
- ``easgd-sync``: Sync EASGD: every worker takes a step, then the master broadcasts W̄_t and
  a reduction brings it Σ_i (W^i_t − W̄_t); ``--easgd-variant`` 1, 2 or 3 as on the slides
  "Multi-GPU Optimization" (see :class:`SyncEASGD`).

Layout, the same in every mode: rank 0 is the master and holds the center; ranks 1..G
(G = N − 1) are the workers, each with its own weights and a 1/G shard of the training
set. ``--epochs`` counts passes of each worker over its shard. A run that is resumed
restarts every worker from the checkpointed center, as the run itself started them all
from the same weights.

What crosses the wire in the master-worker modes: a worker sends a small report (step,
loss, correct answers, samples), then its weights as a difference from the last center it
received (the elastic difference, compressed with ``--compression``); the master answers
with the center.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..comm import PeerError
from ..comm.buckets import FlatGradients
from ..compress.communicate import recv_compressed, send_compressed
from ..data import batches_per_epoch
from ..registry import SYNC_MODES
from .base import (
    RankContext,
    SyncMode,
    TrainMeter,
    checkpoint_state,
    end_step,
    needs_a_worker,
    restore,
    use_worker_steps,
    worker_batches,
)


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


# --- layout: rank 0 the master, ranks 1..G the workers ------------------------------------------
MASTER = 0
FINISHED = -1  # the step a worker reports once it has logged its last step and leaves




def worker_ranks(ctx: RankContext) -> list[int]:
    return list(range(1, ctx.world))






def send_tensor(ctx: RankContext, tensor, dst: int, compressed: bool = False) -> None:
    """Send ``tensor`` as it is, or, with ``compressed`` and a compressor, as a packet."""
    if compressed and ctx.compressor is not None:
        send_compressed(ctx.comm, ctx.compressor, tensor, dst, key="elastic")
    else:
        ctx.comm.send(tensor, dst)


def recv_tensor(ctx: RankContext, like, src: int, compressed: bool = False):
    """Receive what :func:`send_tensor` sent from ``src`` (shape and dtype of ``like``)."""
    if compressed and ctx.compressor is not None:
        return recv_compressed(ctx.comm, ctx.compressor, like, src)[0]
    out = torch.empty_like(like)
    ctx.comm.recv(out, src)
    return out


def send_report(ctx: RankContext, step: int, loss: float = 0.0, correct: int = 0, samples: int = 0) -> None:
    ctx.comm.send(torch.tensor([step, loss, correct, samples], dtype=torch.float64), MASTER)


def new_report():
    return torch.zeros(4, dtype=torch.float64)


class ReportedMeter(TrainMeter):
    """The master's meter: the loss and accuracy its workers report.

    The master trains on no samples itself, so it counts none (the workers count theirs).
    """

    def add(self, loss: float, correct: int, n: int):
        self.loss_sum += loss
        self.batches += 1
        self.correct += correct
        self.count += n


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
        self.finished: set[int] = set()
        self.lost: list[int] = []
        self.meter = ReportedMeter()
        self.steps_per_epoch = batches_per_epoch(len(ctx.data.y_train), ctx.world - 1, ctx.batch_size)

    @property
    def unfinished(self) -> list[int]:
        return [rank for rank in self.progress if rank not in self.finished]

    def report(self, worker: int, report) -> None:
        """A worker's report (step, loss, correct, samples) of an exchange the master has served."""
        step, loss, correct, samples = report.tolist()
        self.progress[worker] = int(step)
        self.meter.add(loss, int(correct), int(samples))
        self.advance()

    def finish(self, worker: int) -> None:
        self.finished.add(worker)
        self.progress[worker] = self.ctx.total_steps
        self.advance()

    def lose(self, worker: int, error: Exception) -> None:
        """Stop waiting for ``worker``: talking to it failed (it died)."""
        if worker in self.lost:
            return
        self.progress.pop(worker)
        self.finished.discard(worker)
        self.lost.append(worker)
        self.ctx.event("worker_dropped", worker=worker, step=self.step, error=str(error).splitlines()[0])
        self.advance()

    def advance(self) -> None:
        target = min(self.progress.values(), default=self.ctx.total_steps)
        model = self.ctx.model
        while self.step < target:
            self.step += 1
            # a copy: under Hogwild other threads go on writing the center meanwhile
            vector_to_parameters(self.center.clone().to(self.ctx.device), model.parameters())
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


def set_weights(ctx: RankContext, weights) -> None:
    vector_to_parameters(weights, ctx.model.parameters())


# --- easgd-rr -------------------------------------------------------------------------------
@SYNC_MODES.register("easgd-rr", help="EASGD round robin: the master serves worker j = t mod G, one at a time",
                     validate=needs_a_worker)
class RoundRobinEASGD(SyncMode):
    """Algorithm 1 of the Vadhiyar slides, "Original EASGD on Multi-GPU system".

    For t = 1..T and j = t mod G: the master (the CPU there, rank 0 here) sends W̄_t to
    worker j (line 9); worker j computes its gradient (line 10); the master gets W^j_t
    (line 11); worker j updates W^j by equation (1) (line 12) and the master updates the
    center by W̄_{t+1} = W̄_t + η ρ (W^j_t − W̄_t), equation (2) for one worker (line 13).
    Only one worker computes at a time: the baseline the redesigns improve on. A step here
    is one round: every worker served once. A lost worker stops the round: the run fails.
    """

    def run(self, ctx: RankContext) -> dict:
        lr, rho = ctx.options["lr"], ctx.options["rho"]
        if ctx.rank == MASTER:
            center, clock = start_master(ctx)
            for _ in range(clock.step, ctx.total_steps):
                for worker in worker_ranks(ctx):  # j = t mod G
                    report = new_report()
                    with ctx.timers.time("comm"):
                        ctx.comm.send(center, worker)
                    with ctx.timers.time("wait"):  # worker j computes meanwhile
                        ctx.comm.recv(report, worker)
                    with ctx.timers.time("comm"):
                        weights = center + recv_tensor(ctx, center, worker, compressed=True)
                    with ctx.timers.time("compute"):
                        center.copy_(center_update(center, [weights], lr, rho))
                    clock.report(worker, report)
            return {"model": ctx.model, "train_loss": clock.meter.last_loss}

        start, weights, grads = start_worker(ctx)
        center = weights.clone()
        meter = TrainMeter(samples=start * ctx.batch_size)
        for step, epoch, x, y in worker_batches(ctx, start):
            with ctx.timers.time("wait"):  # until it is this worker's turn
                ctx.comm.recv(center, MASTER)
            loss, correct = ctx.forward_backward(ctx.model, x, y)
            with ctx.timers.time("comm"):
                send_report(ctx, step, loss, correct, len(y))
                send_tensor(ctx, weights - center, MASTER, compressed=True)
            with ctx.timers.time("compute"):
                weights = worker_update(weights, grads.buffer, center, lr, rho)
                set_weights(ctx, weights)
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, ctx.model)
        return {"model": ctx.model, "train_loss": meter.last_loss}


# --- easgd-async, measgd-async, easgd-hogwild: the worker side ---------------------------------
def run_async_worker(ctx: RankContext, momentum: float) -> dict:
    """A worker of Async EASGD / MEASGD and Hogwild EASGD (SC'17, "Async EASGD"):

    (1) the worker sends W^i_t to the master and the master returns W̄_t; (2) the worker has
    computed its gradient ΔW^i_t; (3) the master updates the center by equation (2) and the
    worker its weights by equation (1) (with momentum for MEASGD). W^i_t goes as its
    difference from the last center this worker received, which the master remembers.
    """
    lr, rho = ctx.options["lr"], ctx.options["rho"]
    start, weights, grads = start_worker(ctx)
    center = weights.clone()
    velocity = torch.zeros_like(weights)
    meter = TrainMeter(samples=start * ctx.batch_size)
    for step, epoch, x, y in worker_batches(ctx, start):
        loss, correct = ctx.forward_backward(ctx.model, x, y)
        with ctx.timers.time("comm"):
            send_report(ctx, step, loss, correct, len(y))
            send_tensor(ctx, weights - center, MASTER, compressed=True)
        with ctx.timers.time("wait"):  # the master serves the requests in turn
            ctx.comm.recv(center, MASTER)
        with ctx.timers.time("compute"):
            if momentum:
                weights, velocity = momentum_worker_update(weights, velocity, grads.buffer, center, lr, rho,
                                                           momentum)
            else:
                weights = worker_update(weights, grads.buffer, center, lr, rho)
            set_weights(ctx, weights)
        meter.add(loss, correct, len(y))
        end_step(ctx, step, epoch, meter, ctx.model)
    send_report(ctx, FINISHED)
    return {"model": ctx.model, "train_loss": meter.last_loss}


# --- easgd-async, measgd-async, easgd-hogwild: the master side ----------------------------------
def serve(ctx: RankContext, worker: int, difference, center, last_sent: dict) -> None:
    """The master's half of one exchange: W^i_t in (as its difference from the last center
    sent to worker i), W̄_t out, then equation (2)."""
    lr, rho = ctx.options["lr"], ctx.options["rho"]
    weights = last_sent[worker] + difference
    reply = center.clone()
    last_sent[worker] = reply
    ctx.comm.send(reply, worker)
    center.copy_(center_update(center, [weights], lr, rho))


def listen_to_worker(ctx: RankContext, worker: int, center, last_sent: dict, events: queue.Queue,
                     serve_at_once: bool) -> None:
    """A thread of the master: receive ``worker``'s requests until it finishes or dies.

    With ``serve_at_once`` (Hogwild) the thread serves each request itself; otherwise it
    queues the request for the master's main thread.
    """
    try:
        while True:
            report = new_report()
            ctx.comm.recv(report, worker)
            if report[0] == FINISHED:
                events.put(("finished", worker))
                return
            difference = recv_tensor(ctx, center, worker, compressed=True)
            if serve_at_once:
                serve(ctx, worker, difference, center, last_sent)
                events.put(("served", worker, report))
            else:
                events.put(("request", worker, report, difference))
    except PeerError as error:
        events.put(("lost", worker, error))


def run_master(ctx: RankContext, lock_free: bool) -> dict:
    """The master of Async EASGD (``lock_free=False``) and of Hogwild EASGD (``lock_free=True``).

    One thread per worker receives that worker's requests; a worker that dies makes only
    its own thread fail, and the master drops it and goes on with the others.

    Async EASGD ("use FCFS strategy to process multiple workers"): the threads put the
    requests in one queue, in the order they arrive, and the main thread serves them one
    at a time: first come, first served, and the center is only ever changed by one
    exchange at a time (the lock of the slides).

    Hogwild EASGD: each thread serves its worker's requests itself, at once, with no lock:
    the threads read and write the shared center at the same time.
    """
    center, clock = start_master(ctx)
    last_sent = {worker: center.clone() for worker in worker_ranks(ctx)}
    events: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=listen_to_worker, name=f"easgd-master-worker-{worker}", daemon=True,
                                args=(ctx, worker, center, last_sent, events, lock_free))
               for worker in worker_ranks(ctx)]
    for thread in threads:
        thread.start()
    while clock.unfinished:
        with ctx.timers.time("wait"):
            kind, worker, *details = events.get()
        if kind == "request":
            report, difference = details
            try:
                with ctx.timers.time("comm"):
                    serve(ctx, worker, difference, center, last_sent)
            except PeerError as error:
                clock.lose(worker, error)
                continue
            clock.report(worker, report)
        elif kind == "served":
            clock.report(worker, *details)
        elif kind == "finished":
            clock.finish(worker)
        else:
            clock.lose(worker, *details)
    for thread in threads:
        thread.join()
    return clock.results()


@SYNC_MODES.register("easgd-async", help="Async EASGD: the master serves the workers first come, first served",
                     survives_worker_loss=True, validate=needs_a_worker)
class AsyncEASGD(SyncMode):
    """Async EASGD (You, Buluç, Demmel, SC'17): parameter-server updates instead of round robin."""

    def run(self, ctx: RankContext) -> dict:
        if ctx.rank == MASTER:
            return run_master(ctx, lock_free=False)
        return run_async_worker(ctx, momentum=0.0)


@SYNC_MODES.register("measgd-async", help="Async MEASGD: Async EASGD with momentum on the workers",
                     survives_worker_loss=True, validate=needs_a_worker)
class AsyncMEASGD(SyncMode):
    """Async MEASGD (SC'17): "add a momentum parameter V, help accelerate gradient in the
    right direction"; the workers follow :func:`momentum_worker_update` with ``--momentum``."""

    def run(self, ctx: RankContext) -> dict:
        if ctx.rank == MASTER:
            return run_master(ctx, lock_free=False)
        return run_async_worker(ctx, momentum=ctx.options["momentum"])


@SYNC_MODES.register("easgd-hogwild", help="Hogwild EASGD: one master thread per worker, center updated without a lock",
                     survives_worker_loss=True, validate=needs_a_worker)
class HogwildEASGD(SyncMode):
    """Hogwild EASGD (SC'17): "remove the lock for faster convergence".

    Each of the master's threads applies equation (2) to the shared center as soon as its
    worker's weights arrive, with no lock: while one thread computes ``center_update`` from
    the center it read, another may write the center, and one of the two updates is then
    lost (Hogwild's bet, after Niu et al., NIPS'11: such collisions are rare and cost
    little). The threads run truly at once: tensor operations and communication release
    Python's interpreter lock. Evaluation and checkpoints read the center without a lock as
    well; the master's main thread only keeps the clock from what the threads report.
    """

    def run(self, ctx: RankContext) -> dict:
        if ctx.rank == MASTER:
            return run_master(ctx, lock_free=True)
        return run_async_worker(ctx, momentum=0.0)


# --- easgd-sync ---------------------------------------------------------------------------------
def tree_reduce(ctx: RankContext, tensor, compressed: bool = False):
    """The sum of ``tensor`` over all ranks, on rank 0, along a binomial tree (None elsewhere).

    Sync EASGD 1: "P blocking send/receive operations can be efficiently processed by a
    tree-reduction operation (standard MPI reduction)": ceil(log2 N) rounds instead of P
    receives in a row at the master. In the round of distance d (1, 2, 4, ...), a rank r
    with r mod 2d = d hands its partial sum to r − d and is done; a rank r with r mod 2d = 0
    adds what r + d hands it.
    """
    partial, distance = tensor, 1
    while distance < ctx.world:
        if ctx.rank % (2 * distance) == distance:
            send_tensor(ctx, partial, ctx.rank - distance, compressed)
            return None
        if ctx.rank + distance < ctx.world:
            partial = partial + recv_tensor(ctx, partial, ctx.rank + distance, compressed)
        distance *= 2
    return partial


@SYNC_MODES.register("easgd-sync", help="Sync EASGD: broadcast of the center, tree reduction of the workers "
                                        "(--easgd-variant 1, 2 or 3)", validate=needs_a_worker)
class SyncEASGD(SyncMode):
    """Sync EASGD (SC'17; Algorithm 3 of the slides). Each step t:

    (1) every worker computes its gradient ΔW^i_t; (2) the master broadcasts W̄_t; (3) a
    reduction brings the master Σ_i (W^i_t − W̄_t) (the elastic differences, compressed with
    ``--compression``); (4) every worker updates W^i by equation (1); (5) the master updates
    W̄ by equation (2). The three variants of the slides "Multi-GPU Optimization":

    1. the reduction is a tree (:func:`tree_reduce`), not P receives in a row; the center
       lives on the host, as the CPU master of Algorithm 1 keeps it;
    2. all data stays on the host and each batch is copied to the device when it is needed,
       while every weight, the center included, lives on the device (``--device``): only
       the batches cross between host and device, no parameters. On a machine without a GPU
       host and device are the same memory: variant 2 runs the same code with device=cpu
       and does exactly what variant 1 does;
    3. variant 2 with the communication of step t (2, 3) overlapped with the computation
       of step t (1): a background thread broadcasts and reduces while the worker's main
       thread runs forward and backward. Neither needs the other's result, so variant 3
       computes the very same weights, only sooner ("overlap critical path 7-10 and 11-12").

    The master (rank 0) holds no data; the workers also reduce their losses to it, so that
    it logs the training loss. A lost rank stops the step everywhere: the run fails and
    ``--resume`` continues it from the last checkpoint.
    """

    def run(self, ctx: RankContext) -> dict:
        lr, rho = ctx.options["lr"], ctx.options["rho"]
        variant = ctx.options["easgd_variant"]
        use_worker_steps(ctx)
        start = restore(ctx, ctx.model, None)
        home = torch.device("cpu") if variant == 1 else ctx.device  # where the center lives
        weights = parameters_to_vector(ctx.model.parameters()).detach().clone()
        center = weights.to(home, copy=True)  # the master's center; the broadcast buffer elsewhere

        if ctx.rank == MASTER:
            meter = ReportedMeter()
            per_epoch = batches_per_epoch(len(ctx.data.y_train), ctx.world - 1, ctx.batch_size)
            for step in range(start + 1, ctx.total_steps + 1):
                with ctx.timers.time("comm"):  # waits for the workers' gradients too
                    ctx.comm.broadcast(center, MASTER)
                    differences = tree_reduce(ctx, torch.zeros_like(center), compressed=True)
                    loss_sum, correct, samples = tree_reduce(ctx, torch.zeros(3, dtype=torch.float64)).tolist()
                with ctx.timers.time("compute"):
                    center.copy_(center_update_reduced(center, differences, lr, rho))
                meter.add(loss_sum / (ctx.world - 1), int(correct), int(samples))
                vector_to_parameters(center.to(ctx.device, copy=True), ctx.model.parameters())
                end_step(ctx, step, (step - 1) // per_epoch, meter, ctx.model,
                         lambda: checkpoint_state(ctx.model, None))
            return {"model": ctx.model, "train_loss": meter.last_loss}

        def exchange(weights_t):
            """Steps (2) and (3) on a worker: W̄_t from the master, W^i_t − W̄_t to the reduction."""
            with ctx.timers.time("comm"):
                ctx.comm.broadcast(center, MASTER)
                tree_reduce(ctx, weights_t.to(home) - center, compressed=True)
            return center.to(ctx.device)

        grads = FlatGradients(ctx.model.parameters())
        meter = TrainMeter(samples=start * ctx.batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="easgd-sync-exchange") as background:
            for step, epoch, x, y in worker_batches(ctx, start):
                if variant == 3:
                    in_flight = background.submit(exchange, weights)
                    loss, correct = ctx.forward_backward(ctx.model, x, y)
                    with ctx.timers.time("wait"):
                        center_t = in_flight.result()
                else:
                    loss, correct = ctx.forward_backward(ctx.model, x, y)
                    center_t = exchange(weights)
                with ctx.timers.time("comm"):
                    tree_reduce(ctx, torch.tensor([loss, correct, len(y)], dtype=torch.float64))
                with ctx.timers.time("compute"):
                    weights = worker_update(weights, grads.buffer, center_t, lr, rho)
                    set_weights(ctx, weights)
                meter.add(loss, correct, len(y))
                end_step(ctx, step, epoch, meter, ctx.model)
        return {"model": ctx.model, "train_loss": meter.last_loss}

"""Sync EASGD (You, Buluç and Demmel, SC'17; Algorithm 3 of the slides) and its three
variants of the slides "Multi-GPU Optimization".

Each step t: (1) every worker computes its gradient ΔW^i_t; (2) the master broadcasts
W̄_t; (3) a tree reduction (``comm.collectives.tree_reduce``) brings the master
Σ_i (W^i_t − W̄_t), through the compressing communicator; (4) every worker updates W^i by
equation (1); (5) the master updates W̄ by equation (2). Variant 1 keeps the center on
the host; variant 2 keeps every weight on the device and copies only batches (on a CPU
machine it is variant 1); variant 3 overlaps the communication of step t with its
computation in a background thread ("overlap critical path 7-10 and 11-12") and computes
the very same weights. A lost rank stops the step everywhere: the run fails.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch.nn.utils import parameters_to_vector

from ..comm.buckets import FlatGradients
from ..comm.collectives import tree_reduce
from ..data import batches_per_epoch
from ..registry import SYNC_MODES
from . import master_worker
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore
from .easgd import EASGD_SETTINGS, center_update_reduced, elastic_step
from .master_worker import MASTER, Report, needs_a_worker, set_weights, use_worker_steps


@SYNC_MODES.register("easgd-sync", help="Sync EASGD: broadcast of the center, tree reduction of the workers "
                                        "(--easgd-variant 1, 2 or 3)",
                     settings=(*EASGD_SETTINGS, "easgd_variant"), validate=needs_a_worker)
class SyncEASGD(SyncMode):
    """The master (rank 0) holds no data; the workers also reduce their losses to it, so
    that it logs the training loss."""

    def __init__(self, lr: float, rho: float, easgd_variant: int):
        self.lr, self.rho, self.variant = lr, rho, easgd_variant

    def run(self, ctx: RankContext) -> dict:
        use_worker_steps(ctx)
        start = restore(ctx, ctx.model, None)
        home = torch.device("cpu") if self.variant == 1 else ctx.device  # where the center lives
        weights = parameters_to_vector(ctx.model.parameters()).detach().clone()
        center = weights.to(home, copy=True)  # the master's center; the broadcast buffer elsewhere
        if ctx.rank == MASTER:
            return self.master(ctx, start, center)
        return self.worker(ctx, start, weights, center, home)

    def master(self, ctx: RankContext, start: int, center) -> dict:
        meter = TrainMeter()
        per_epoch = batches_per_epoch(len(ctx.data.y_train), ctx.world - 1, ctx.batch_size)
        for step in range(start + 1, ctx.total_steps + 1):
            with ctx.timers.time("comm"):  # waits for the workers' gradients too
                ctx.comm.broadcast(center, MASTER)
                differences = tree_reduce(ctx.compressed, torch.zeros_like(center))
                loss_sum, correct, samples = tree_reduce(ctx.comm, torch.zeros(3, dtype=torch.float64)).tolist()
            with ctx.timers.time("compute"):
                center.copy_(center_update_reduced(center, differences, self.lr, self.rho))
            meter.add_report(Report(step, 0, loss_sum / (ctx.world - 1), int(correct), int(samples)))
            set_weights(ctx.model, center.to(ctx.device, copy=True))
            end_step(ctx, step, (step - 1) // per_epoch, meter, ctx.model,
                     lambda: checkpoint_state(ctx.model, None))
        return {"model": ctx.model, "train_loss": meter.last_loss}

    def worker(self, ctx: RankContext, start: int, weights, center, home) -> dict:
        def exchange(weights_t):
            """Steps (2) and (3) on a worker: W̄_t from the master, W^i_t − W̄_t to the reduction."""
            with ctx.timers.time("comm"):
                ctx.comm.broadcast(center, MASTER)
                tree_reduce(ctx.compressed, weights_t.to(home) - center)
            return center.to(ctx.device)

        grads = FlatGradients(ctx.model.parameters())
        meter = TrainMeter(samples=start * ctx.batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="easgd-sync-exchange") as background:
            for step, epoch, x, y in master_worker.worker_batches(ctx, start):
                if self.variant == 3:
                    in_flight = background.submit(exchange, weights)
                    loss, correct = ctx.forward_backward(ctx.model, x, y)
                    with ctx.timers.time("wait"):
                        center_t = in_flight.result()
                else:
                    loss, correct = ctx.forward_backward(ctx.model, x, y)
                    center_t = exchange(weights)
                with ctx.timers.time("comm"):
                    tree_reduce(ctx.comm, torch.tensor([loss, correct, len(y)], dtype=torch.float64))
                weights = elastic_step(ctx, weights, grads.buffer, center_t, self.lr, self.rho)
                meter.add(loss, correct, len(y))
                end_step(ctx, step, epoch, meter, ctx.model)
        return {"model": ctx.model, "train_loss": meter.last_loss}

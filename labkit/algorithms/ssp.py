"""Stale-synchronous parallel SGD (SSP): a parameter server with bounded staleness.

*Distributed & Parallel Computing for Deep Learning* (NTHU, chap. 12), slide "3. Stale
Synchronous SGD": "Staleness threshold s defines the acceptance range for delays: changes
no later than s iterations ago are guaranteed to be seen; readers may wait for stragglers
if it is more than s iterations behind" (Ho et al., NIPS 2013; Zhang et al., *Poseidon*,
2015); "bounded staleness" in Hoefler's keynote (document 004).

The layout and the messages are those of ps-sync (``master_worker.py``, ``ps.py``). The
master applies the gradients of clock c, averaged in rank order as ps-sync does, once
every worker has sent its gradient of clock c; a worker may start step c + 1 only if it
is at most S = ``--staleness`` clocks ahead of the slowest, and otherwise waits. S = 0 is
ps-sync, bit for bit. Two details keep stale gradients from hurting: read-my-writes (Ho
et al.: a worker's weights include its own gradients still waiting for their clock) and
the staleness-dependent learning rate of Zhang et al. (IJCAI 2016: a gradient k clocks
behind counts 1 / (1 + k)). ``docs/sync_modes_ps.md`` gives the results.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..registry import SYNC_MODES
from .base import RankContext, TrainMeter, checkpoint_state, end_step, restore
from .master_worker import MASTER, MasterWorkerMode, Report, get_weights, needs_a_worker
from .ps import (
    Gradient,
    apply_mean,
    master_optimizer,
    recv_gradient,
    staleness_summary,
    train_worker,
)


def may_go_on(clock: int, slowest: int, staleness: int, last: int) -> bool:
    """The SSP rule: a worker at ``clock`` starts its next step if it is at most S ahead.

    After the ``last`` step there is no next step: the worker waits for the final
    weights, which exist once the slowest has finished too.
    """
    if clock == last:
        return slowest == last
    return clock - slowest <= staleness


@SYNC_MODES.register("ssp", help="stale-synchronous parallel: a parameter server where a worker "
                                 "may run at most --staleness steps ahead of the slowest",
                     settings=("staleness",), validate=needs_a_worker)
class StaleSynchronous(MasterWorkerMode):
    def __init__(self, staleness: int):
        self.staleness = staleness

    def master(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads, optimizer, slowest = master_optimizer(ctx)  # a checkpoint holds the slowest clock's weights
        staleness_limit = self.staleness
        workers = list(range(1, ctx.world))
        clock = dict.fromkeys(workers, slowest)
        computed_on = dict.fromkeys(workers, slowest)  # the clock of the weights each worker holds
        pending: dict[int, dict[int, Gradient]] = {}  # clock -> {worker: gradient}, until complete
        waiting: set[int] = set()  # workers too far ahead, waiting for newer weights
        staleness = Counter()
        meter = TrainMeter()

        def send_weights(worker: int) -> None:
            """The weights of the slowest clock, with the worker's own waiting gradients (read-my-writes)."""
            weights = get_weights(model)
            step_size = optimizer.param_groups[0]["lr"] / len(workers)
            for gradients in pending.values():
                if worker in gradients:
                    weights.add_(gradients[worker].values, alpha=-step_size)
            with ctx.timers.time("comm"):
                ctx.comm.send(weights, worker)
            computed_on[worker] = slowest

        while slowest < ctx.total_steps:
            with ctx.timers.time("wait"):
                report, sender = Report.recv(ctx.comm)
            with ctx.timers.time("comm"):
                gradient = recv_gradient(ctx, model, sender)
            clock[sender] = report.step
            behind = report.step - 1 - computed_on[sender]  # clocks missing from its weights
            staleness[behind] += 1
            if behind:  # a stale gradient counts 1 / (1 + staleness)
                gradient.values /= 1 + behind
            pending.setdefault(report.step, {})[sender] = gradient
            meter.add_report(report)
            # Apply every clock that all workers have finished: the slowest clock moves on.
            while len(pending.get(slowest + 1, {})) == len(workers):
                received = pending.pop(slowest + 1)
                with ctx.timers.time("compute"):
                    apply_mean(model, grads, optimizer, [received[w] for w in workers])
                slowest += 1
                end_step(ctx, slowest, report.epoch, meter, model, lambda: checkpoint_state(model, optimizer))
            with ctx.timers.time("comm"):
                ctx.comm.send(torch.tensor([slowest]), sender)
            waiting.add(sender)
            for worker in sorted(waiting):
                if may_go_on(clock[worker], slowest, staleness_limit, ctx.total_steps):
                    send_weights(worker)
                    waiting.discard(worker)
        summary = staleness_summary(staleness)
        ctx.event("staleness", histogram=summary["staleness_histogram"],
                  mean=summary["mean_staleness"], max=summary["max_staleness"])
        return {"model": model, "train_loss": meter.last_loss, **summary}

    def worker(self, ctx: RankContext) -> dict:
        slowest = torch.zeros(1, dtype=torch.int64)

        def fetch(step, weights):
            with ctx.timers.time("comm"):
                ctx.comm.recv(slowest, MASTER)
            # More than S clocks ahead of the slowest: wait for the stragglers.
            timer = "comm" if may_go_on(step, int(slowest), self.staleness, ctx.total_steps) else "wait"
            with ctx.timers.time(timer):
                ctx.comm.recv(weights, MASTER)

        meter, _ = train_worker(ctx, restore(ctx, ctx.model, None), fetch)
        return {"model": ctx.model, "train_loss": meter.last_loss}

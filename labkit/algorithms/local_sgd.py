"""Local SGD: every rank trains its own replica, and the replicas are averaged every H steps.

Model averaging after Su, Chen and Xu, *Experiments on Parallel Training of Deep Neural
Network using Model Averaging* (2015), as on the slides of Chuangsuwanich, *Deep Learning
and Hardware*: "Some merges at the model level. A form of model averaging/model ensemble.
Merge after several steps to reduce transfer overhead."

Each rank takes plain local steps of the run's optimizer (SGD with ``--momentum``) on its
own shard; every H = ``--sync-every`` steps one allreduce replaces every replica by the
average of all of them. H = 1 averages after every step; a larger H sends H times fewer
bytes, and the replicas drift apart in between. The ranks average what they changed since
the last average, which is the same as averaging the weights and is what compression
(``--compression``) needs: the changes are small, the weights are not.

The model that rank 0 evaluates and checkpoints is the last average. A checkpoint is also
a point where the replicas are averaged (as is the last step), so that a checkpoint holds
the state of every rank: the average, and rank 0's momentum, which every rank takes up on
``--resume``. A lost rank stops the next allreduce: the run fails, ``--resume`` finishes it.
"""

from __future__ import annotations

import copy

from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..registry import SYNC_MODES
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore


def average_over_ranks(ctx: RankContext, tensor):
    """The average of ``tensor`` over all ranks (compressed with ``--compression``)."""
    with ctx.timers.time("comm"):
        total = ctx.compressed.allreduce(tensor, key="model-change")
    return total / ctx.world


def is_averaging_step(ctx: RankContext, step: int, every: int) -> bool:
    """Every H steps, at every checkpoint and at the last step."""
    checkpoint = ctx.checkpoint_every and step % ctx.checkpoint_every == 0
    return step % every == 0 or checkpoint or step == ctx.total_steps


@SYNC_MODES.register("local-sgd", help="local SGD: the ranks train on their own and average their models "
                                       "every --sync-every H steps", settings=("sync_every",))
class LocalSGD(SyncMode):
    def __init__(self, sync_every: int):
        self.every = sync_every

    def run(self, ctx: RankContext) -> dict:
        every = self.every
        model = ctx.model
        optimizer = ctx.make_optimizer(model.parameters())
        start = restore(ctx, model, optimizer)
        average = copy.deepcopy(model)  # the last average: what rank 0 evaluates and checkpoints
        last_average = parameters_to_vector(model.parameters()).detach().clone()
        meter = TrainMeter(samples=start * ctx.batch_size)
        for step, epoch, x, y in ctx.batches(start):
            loss, correct = ctx.forward_backward(model, x, y)
            with ctx.timers.time("compute"):
                optimizer.step()
            meter.add(loss, correct, len(y))
            if is_averaging_step(ctx, step, every):
                change = parameters_to_vector(model.parameters()).detach() - last_average
                last_average = last_average + average_over_ranks(ctx, change)
                vector_to_parameters(last_average.clone(), model.parameters())
                vector_to_parameters(last_average.clone(), average.parameters())
            end_step(ctx, step, epoch, meter, average, lambda: checkpoint_state(average, optimizer))
        return {"model": average, "train_loss": meter.last_loss}

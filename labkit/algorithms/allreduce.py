"""Synchronous data-parallel SGD with one allreduce per step.

Every rank computes the gradient of its own mini-batch; the gradients are summed by an
allreduce and divided by the number of ranks, and every rank applies the same update, so
the weights stay identical everywhere (mini-batch SGD over N x batch samples). The
gradients live in one flat buffer and go out in a single call: the "single layer
communication" of You et al. (SC'17). The allreduce is the library's, or one written by
hand (``--allreduce-algorithm``, ``labkit/comm/collectives.py``): the ring of the Horovod
slides (NTHU, chap. 12), a tree, or recursive doubling.
"""

from __future__ import annotations

from ..comm.buckets import FlatGradients
from ..comm.collectives import using_allreduce
from ..registry import SYNC_MODES
from .base import (
    RankContext,
    SyncMode,
    TrainMeter,
    checkpoint_state,
    end_step,
    gradient_pieces,
    restore,
)


def average_gradients(ctx: RankContext, comm, flat, model) -> None:
    """Replace ``flat`` (this rank's gradient) by the average over all ranks, through the
    compressing communicator ``comm`` (the flat buffer at once, or layer by layer for a
    ``layerwise`` compressor)."""
    with ctx.timers.time("comm"):
        for key, piece in gradient_pieces(flat, model, comm.compressor):
            comm.allreduce(piece, key=key)
        flat.div_(ctx.world)


@SYNC_MODES.register("allreduce", help="synchronous SGD: one allreduce of the packed gradients per step",
                     settings=("allreduce_algorithm",))
class AllreduceSGD(SyncMode):
    def __init__(self, allreduce_algorithm: str = "library"):
        self.algorithm = allreduce_algorithm

    def run(self, ctx: RankContext) -> dict:
        model = ctx.model
        comm = ctx.compressed.over(using_allreduce(ctx.comm, self.algorithm))
        grads = FlatGradients(model.parameters())
        optimizer = ctx.make_optimizer(model.parameters())
        start = restore(ctx, model, optimizer)
        meter = TrainMeter(samples=start * ctx.batch_size)
        for step, epoch, x, y in ctx.batches(start):
            loss, correct = ctx.forward_backward(model, x, y)
            average_gradients(ctx, comm, grads.buffer, model)
            with ctx.timers.time("compute"):
                optimizer.step()
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, model, lambda: checkpoint_state(model, optimizer))
        return {"model": model, "train_loss": meter.last_loss}

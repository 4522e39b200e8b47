"""Synchronous data-parallel SGD with one allreduce per step.

Every rank computes the gradient of its own mini-batch; the gradients are summed by an
allreduce and divided by the number of ranks, and every rank applies the same update,
so the weights stay identical everywhere (mini-batch SGD over N x batch samples).

The gradients live in one flat buffer and go out in a single call: the "single layer
communication" of You et al., *Scaling Deep Learning on GPU and Knights Landing
Clusters* (SC'17). The allreduce itself is the ring algorithm of the Horovod slides in
"Distributed & Parallel Computing for Deep Learning" (NTHU, chap. 12), as run by the
backend; `labkit/comm/collectives.py` writes it out by hand.
"""

from __future__ import annotations

from ..comm.buckets import FlatGradients
from ..registry import SYNC_MODES
from .base import RankContext, SyncMode, TrainMeter, checkpoint_state, end_step, restore


def average_gradients(ctx: RankContext, flat, model=None) -> None:
    """Replace ``flat`` (this rank's gradient) by the average over all ranks.

    With a compressor, the flat buffer is compressed as one tensor, except for a
    ``layerwise`` compressor (PowerSGD), which needs each weight matrix's own shape:
    then each of ``model``'s gradients (views into ``flat``) goes on its own, keyed by name.
    """
    if ctx.world == 1 and ctx.compressor is None:
        return
    with ctx.timers.time("comm"):
        if ctx.compressor is None:
            ctx.comm.allreduce(flat)
        else:
            from ..compress.communicate import allreduce_compressed

            if ctx.compressor.layerwise:
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.grad.copy_(allreduce_compressed(ctx.comm, ctx.compressor, p.grad, key=name))
            else:
                flat.copy_(allreduce_compressed(ctx.comm, ctx.compressor, flat, key="grad"))
        flat.div_(ctx.world)


@SYNC_MODES.register("allreduce", help="synchronous SGD: one allreduce of the packed gradients per step")
class AllreduceSGD(SyncMode):
    def run(self, ctx: RankContext) -> dict:
        model = ctx.model
        grads = FlatGradients(model.parameters())
        optimizer = ctx.make_optimizer(model.parameters())
        start = restore(ctx, model, optimizer)
        meter = TrainMeter(samples=start * ctx.batch_size)
        for step, epoch, x, y in ctx.batches(start):
            loss, correct = ctx.forward_backward(model, x, y)
            average_gradients(ctx, grads.buffer, model)
            with ctx.timers.time("compute"):
                optimizer.step()
            meter.add(loss, correct, len(y))
            end_step(ctx, step, epoch, meter, model, lambda: checkpoint_state(model, optimizer))
        return {"model": model, "train_loss": meter.last_loss}

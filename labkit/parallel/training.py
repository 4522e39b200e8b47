"""A training run with a split model: what a rank runs for ``labkit train --parallelism
model|pipeline|tensor|hybrid`` (and ``data`` with ``--data-parallel naive|bucketed``).

The rank builds the whole model from the seed (as every rank does), keeps its piece
(``ParallelModel``), and trains on its data replica's batches: each data replica takes
``--batch-size`` samples per step, so the global batch is D × batch size. Metrics go to the
run directory like any run's; pipelines also write each rank's timeline as ``timeline``
events (forward, backward, send, recv with their times), which the panel draws as a Gantt
chart. For evaluation and checkpoints the pieces are gathered into the whole model on
every rank (``ParallelModel.full_state``). The summary gains ``grid``, and for pipelines
``bubble_fraction`` (measured: the ranks' mean idle share of a step) beside
``bubble_fraction_model`` ((p−1)/(m+p−1)) and ``stashed_peak``. The run's compressor
(``--compression``, with its error feedback) compresses the gradients averaged over the data group.
Bucketed data parallelism writes, at each logged step, a ``buckets`` event per rank: the step's
record (``DataParallelBucketed.last_record``: backward's start and end, and when each bucket was
ready, left and came back, in order) and ``overlapped``, the buckets that left before backward ended.
"""

from __future__ import annotations

import copy
import statistics

import torch

from ..algorithms.base import TrainMeter, checkpoint_state
from ..data import batches_per_epoch
from .build import ParallelModel


class ParallelRun:
    def __init__(self, parallelism: str, microbatches: int = 4, schedule: str = "1f1b", pipeline_stages: int = 0,
                 tensor_parallel: int = 0, data_parallel: str = "flat", bucket_mb: float = 25.0):
        self.parallelism = parallelism
        self.settings = dict(microbatches=microbatches, schedule=schedule, pipeline_stages=pipeline_stages,
                             tensor_parallel_size=tensor_parallel, data_parallel=data_parallel, bucket_mb=bucket_mb)

    def run(self, ctx) -> dict:
        eval_model = copy.deepcopy(ctx.model)  # the whole model, for evaluation and checkpoints
        parallel = ParallelModel(self.parallelism, ctx.model, ctx.comm, ctx.data.input_shape,
                                 compressor=ctx.compressed.compressor, **self.settings)
        grid, shape = parallel.grid, parallel.shape
        n = len(ctx.data.y_train)
        if not ctx.fixed_steps:  # --epochs: count the epochs over D replicas, not over all workers
            epochs = max(1, ctx.total_steps // batches_per_epoch(n, ctx.world, ctx.batch_size))
            ctx.total_steps = epochs * batches_per_epoch(n, shape.data, ctx.batch_size)
            if ctx.rank == 0:  # the progress bar and the panel count to it
                ctx.event("total_steps", steps=ctx.total_steps)
        optimizer = ctx.make_optimizer(list(parallel.parameters()))
        counts = grid.stage == 0 and grid.tensor_index == 0  # one rank per replica counts its samples
        meter = TrainMeter()
        bubbles, stashed, comm_inside = [], 0, 0.0
        comms = {id(c): c for c in (grid.data_comm, grid.pipeline_comm, grid.tensor_comm)}.values()
        for step, epoch, x, y in ctx.batches(0, rank=grid.data_index, world=shape.data):
            optimizer.zero_grad(set_to_none=False)
            before = sum(c.stats.comm_s for c in comms)
            with ctx.timers.time("compute"):  # less the communication inside it, below
                loss = parallel.forward_backward_replica(x, y)
                optimizer.step()
            comm_inside += sum(c.stats.comm_s for c in comms) - before
            loss, correct = parallel.global_totals(loss, parallel.last_correct)
            meter.add(loss, correct if counts else 0, len(x) if counts else 0)
            if not counts:
                meter.count += len(x)  # the accuracy is over the whole global batch all the same
            stats = parallel.pipeline_stats()
            if stats:
                bubbles.append(stats["bubble_fraction"])
                stashed = max(stashed, stats["stashed_peak"])
            last = step == ctx.total_steps
            if step % ctx.log_every == 0 or last:
                _log(ctx, parallel, step, epoch, meter, sum(c.stats.comm_s for c in comms), comm_inside, stats)
            evaluate = step % ctx.eval_every == 0 and not last
            save = last or (ctx.checkpoint_every and step % ctx.checkpoint_every == 0)
            if evaluate or save:
                eval_model.load_state_dict(parallel.full_state())  # every rank takes part
                if ctx.rank == 0 and evaluate:
                    ctx.log_eval(step, epoch, eval_model)
                if ctx.rank == 0 and save:
                    ctx.run.save_checkpoint(step, checkpoint_state(eval_model, None, step=step))
        results = {"model": eval_model, "train_loss": meter.last_loss, "parallelism": self.parallelism,
                   "grid": shape.as_dict()}
        if bubbles:
            totals = torch.tensor([statistics.mean(bubbles)], dtype=torch.float64)
            ctx.comm.allreduce(totals)
            peak = torch.tensor([float(stashed)], dtype=torch.float64)
            ctx.comm.allreduce(peak, op="max")
            results.update(bubble_fraction=float(totals) / ctx.world,
                           bubble_fraction_model=parallel.pipeline_stats()["bubble_fraction_model"],
                           stashed_peak=int(peak), microbatches=parallel.microbatches,
                           schedule=parallel.schedule if self.parallelism != "model" else "gpipe")
        return results


def _log(ctx, parallel, step, epoch, meter, comm_s, comm_inside, stats) -> None:
    """A ``train`` line, and the step's ``buckets`` and pipeline ``timeline`` events."""
    grid = parallel.grid
    mean_loss, accuracy = meter.read()
    meter.last_loss = mean_loss
    ctx.log_train(step, epoch, mean_loss, accuracy, meter.samples, bytes_sent=parallel.bytes_sent(),
                  comm_s=comm_s, compute_s=max(0.0, ctx.timers.compute_s - comm_inside),
                  grid=parallel.shape.as_dict())
    record = getattr(parallel.sync, "last_record", None)
    if record:
        ctx.event("buckets", step=step, data_index=grid.data_index, events=record,
                  buckets=len(parallel.sync.buckets), overlapped=overlapped_buckets(record))
    if stats:
        ctx.event("timeline", step=step, stage=grid.stage, data_index=grid.data_index,
                  tensor_index=grid.tensor_index, span=stats["span"], events=stats["events"],
                  bubble_fraction=stats["bubble_fraction"], stashed_peak=stats["stashed_peak"])


def overlapped_buckets(record: list[dict]) -> int:
    """How many buckets of a step's record left before backward ended."""
    ended = next((i for i, e in enumerate(record) if e["kind"] == "backward_end"), len(record))
    return sum(1 for e in record[:ended] if e["kind"] == "exchange_start")

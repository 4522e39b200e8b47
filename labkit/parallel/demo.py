"""Rank functions for the walk-through and the dashboards (call them through
``spawn.run_ranks``): short training runs of several parallelisms on the same model and
batches, and a sweep of the pipeline over the number of micro-batches."""

from __future__ import annotations

import statistics

import torch

from .build import ParallelModel
from .reference import digits_batches, make_mlp


def _grid_bytes(parallel) -> int:
    grid, seen, total = parallel.grid, set(), 0
    for c in (grid.data_comm, grid.pipeline_comm, grid.tensor_comm):
        if id(c) not in seen:
            seen.add(id(c))
            total += c.stats.bytes_sent
    return total


def train_curves(comm, cases: dict, steps: int = 30, batch: int = 32, lr: float = 0.05) -> dict:
    """case name -> {losses (global, per step), grid, param_bytes, bytes_per_step, events of
    the last step, pipeline stats} for each ``ParallelModel`` setting in ``cases``."""
    out = {}
    for name, settings in cases.items():
        parallel = ParallelModel(model=make_mlp(), comm=comm, input_shape=(1, 8, 8), **settings)
        optimizer = torch.optim.SGD(parallel.parameters(), lr=lr)
        losses, start = [], _grid_bytes(parallel)
        for x, y in digits_batches(batch, steps):
            optimizer.zero_grad()
            losses.append(parallel.global_loss(parallel.forward_backward(x, y)))
            optimizer.step()
        s = parallel.shape
        out[name] = {"losses": losses, "grid": s.as_dict(), "param_bytes": parallel.parameter_bytes(),
                     "bytes_per_step": (_grid_bytes(parallel) - start) / steps,
                     "pipeline": parallel.pipeline_stats(), "rank": comm.rank}
    return out


def pipeline_sweep(comm, microbatches: list[int], schedules=("gpipe", "1f1b"), batch: int = 256,
                   hidden=(512, 512, 512), steps: int = 6) -> dict:
    """(schedule, m) -> this rank's median idle share over ``steps`` steps (the first not
    counted), the formula, the stash peaks and the last step's events."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    out = {}
    for schedule in schedules:
        for m in microbatches:
            parallel = ParallelModel("pipeline", make_mlp(hidden=hidden), comm, (1, 8, 8), microbatches=m,
                                     schedule=schedule)
            bubbles, spans = [], []
            for step in range(steps):
                comm.barrier()
                parallel.forward_backward(x, y)
                stats = parallel.pipeline_stats()
                if step:
                    bubbles.append(stats["bubble_fraction"])
                    spans.append(stats["span"])
            out[(schedule, m)] = {"bubble": statistics.median(bubbles), "bubble_model": stats["bubble_fraction_model"],
                                  "step_s": statistics.median(spans), "stashed_peak": stats["stashed_peak"],
                                  "stashed_bytes_peak": stats["stashed_bytes_peak"], "events": stats["events"],
                                  "param_bytes": parallel.parameter_bytes()}
    return out

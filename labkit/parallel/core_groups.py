"""Knights Landing divide and conquer: core groups, each with its own local weights.

"68 cores or 72 cores, data locality, divide-and-conquer method. Divide: replicating data
and copying weights; Conquer: sum up the gradients from all partitions" (Scaling Deep
Learning on GPU and Knights Landing Clusters, fig. 12: "partitioning a KNL chip into groups
and making each group process one local weight can improve the performance").

Here a group is one rank pinned to a disjoint set of this machine's cores
(``os.sched_setaffinity``) with torch's thread count set to the group's size; each rank
keeps its own copy of the weights and the copies are kept equal by summing (averaging)
the gradients of the groups every step (``DataParallelFlat``). ``epoch_time`` trains one
epoch of digits that way; ``labkit bench parallel`` and the walk-through tabulate it
against the number of groups.
"""

from __future__ import annotations

import os
import time

import torch


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def core_groups(groups: int, cores: list[int] | None = None) -> list[list[int]]:
    """``cores`` (default: the ones this process may use) dealt into ``groups`` disjoint,
    contiguous sets of nearly equal size."""
    cores = sorted(cores if cores is not None else available_cores())
    if not 1 <= groups <= len(cores):
        raise ValueError(f"core groups: {groups} groups for {len(cores)} cores (1..{len(cores)})")
    base, extra = divmod(len(cores), groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(cores[start:start + size])
        start += size
    return out


def pin_to_group(rank: int, groups: int, cores: list[int] | None = None) -> list[int]:
    """Pin this process to the cores of group ``rank`` and use that many torch threads."""
    mine = core_groups(groups, cores)[rank]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine


def epoch_time(comm, cores: list[int], batch: int = 64, epochs: int = 1, hidden=(256, 256)) -> dict:
    """One rank of a core-group run (call it through ``spawn.run_ranks``): pin, then train
    ``epochs`` epochs of digits on this group's shard with gradients averaged over the
    groups. Returns the rank's cores, the wall time and the final loss."""
    from torch.nn import functional as F

    from ..data import load_digits, shard_indices
    from .data_naive import DataParallelFlat
    from .reference import make_mlp

    mine = pin_to_group(comm.rank, comm.size, cores)
    data = load_digits()
    model = make_mlp(hidden=hidden)
    parallel = DataParallelFlat(model, comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    share = batch // comm.size
    steps = len(data.y_train) // comm.size // share  # the same on every rank
    comm.barrier()
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for epoch in range(epochs):
        idx = torch.as_tensor(shard_indices(len(data.y_train), comm.rank, comm.size, epoch, seed=0))
        for step in range(steps):
            rows = idx[step * share:(step + 1) * share]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x_train[rows]), data.y_train[rows])
            loss.backward()
            parallel.sync_gradients()
            optimizer.step()
    comm.barrier()
    return {"cores": mine, "seconds": time.perf_counter() - t0, "loss": float(loss.detach())}

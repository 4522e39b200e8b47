"""The alpha-beta (latency-bandwidth) model of communication time.

One message of ``n`` bytes from one rank to another takes

    T(n) = alpha + beta * n

``alpha`` is the latency (seconds per message, whatever its size) and ``beta`` the
inverse bandwidth (seconds per byte). Source: Hockney, "The communication challenge for
MPP: Intel Paragon and Meiko CS-2", Parallel Computing 1994; the per-algorithm costs
below are those of Thakur, Rabenseifner & Gropp, "Optimization of collective
communication operations in MPICH", IJHPCA 2005, for the schedules of
:mod:`labkit.comm.collectives`.

An allreduce of S bytes over N ranks is a chain of messages that wait for each other
(the critical path): ``steps`` messages of ``m`` bytes each, so

    T = steps * alpha + steps * m * beta

==================  ==================  ==================  =========
collective          steps, full duplex  steps, half duplex  m (bytes)
==================  ==================  ==================  =========
ring                2(N-1)              4(N-1)              S/N
tree                tree_steps(N)       tree_steps(N)       S
recursive_doubling  log2(P) + f         2 log2(P) + f       S
parameter_server    2(N-1)              2(N-1)              S
library             as ring             as ring             S/N
==================  ==================  ==================  =========

``tree_steps(N)`` is the critical path of the binary tree's schedule (2 for N=2, 4 for
N=3, 5 for N=4); P is the largest power of two <= N, and f = 2 (fold in, fold out) when
N != P, else 0. The library is modelled as a ring: gloo and MPICH use one for large
messages; the parameter server's 2(N-1) messages all go through the root.

So the ring is 2(N-1)alpha + 2(N-1)/N * S * beta: its bandwidth term hardly grows with N,
while the tree and the parameter server move the whole S on every step.

Full duplex is the textbook assumption: in a step where a rank both sends and receives
(the ring, recursive doubling), the two overlap. Half duplex counts them one after the
other. That is the right count when sends block until received, as in labkit's
hand-written collectives, and on one machine, where the cores copy the bytes of both
directions. The tree and the parameter server never send and receive in the same step.
The model counts neither the additions nor the time a rank waits for a core.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .base import Communicator
from .collectives import tree_children

COLLECTIVES = ("ring", "tree", "recursive_doubling", "parameter_server", "library")
PING_TAG = 201


def tree_steps(n: int) -> int:
    """Messages on the critical path of :func:`~labkit.comm.collectives.tree_allreduce`.

    Each message takes one step, and a rank handles its messages one after another:
    a parent receives from its children in turn (reduce), then sends to them in turn
    (broadcast).
    """
    if n == 1:
        return 0
    # Reduce: the step at which each rank holds its subtree's sum. Children have larger
    # ranks than their parent, so go from the last rank down.
    ready = [0] * n
    for rank in reversed(range(n)):
        for child in tree_children(rank, n):
            ready[rank] = max(ready[rank], ready[child]) + 1
    # Broadcast: the step at which each rank has received the total.
    arrival = [0] * n
    arrival[0] = ready[0]
    for rank in range(n):
        for k, child in enumerate(tree_children(rank, n), start=1):
            arrival[child] = arrival[rank] + k
    return max(arrival)


def critical_path(collective: str, nbytes: float, n: int, full_duplex: bool = True) -> tuple[int, float]:
    """(number of messages, bytes per message) along the collective's critical path."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    if n < 1:
        raise ValueError(f"world size must be >= 1, got {n}")
    if n == 1:
        return 0, 0.0
    per_exchange = 1 if full_duplex else 2  # messages in a step that sends and receives
    if collective in ("ring", "library"):
        return 2 * (n - 1) * per_exchange, nbytes / n
    if collective == "tree":
        return tree_steps(n), nbytes
    if collective == "recursive_doubling":
        active = 1 << (n.bit_length() - 1)
        fold = 2 if active != n else 0  # one message in, one message out
        return (active.bit_length() - 1) * per_exchange + fold, nbytes
    return 2 * (n - 1), nbytes  # parameter_server


def predict(collective: str, nbytes: float, n: int, alpha: float, beta: float,
            full_duplex: bool = True) -> float:
    """Predicted seconds for an allreduce of ``nbytes`` over ``n`` ranks (see the table above)."""
    steps, message = critical_path(collective, nbytes, n, full_duplex)
    return steps * alpha + steps * message * beta


def least_squares(sizes, times) -> tuple[float, float]:
    """``(alpha, beta)`` that best fit ``time = alpha + beta * size``.

    The residuals are taken relative to each time, so that a 4 KB message (where alpha
    dominates) weighs as much as a 64 MB one (where beta does); with plain residuals the
    largest messages alone would decide alpha. Exact when the times lie on a line.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    if len(np.unique(sizes)) < 2:
        raise ValueError("fitting alpha and beta needs at least two different message sizes")
    rows = np.stack([1.0 / times, sizes / times], axis=1)  # (alpha + beta*s) / t = 1
    (alpha, beta), *_ = np.linalg.lstsq(rows, np.ones_like(times), rcond=None)
    return float(alpha), float(beta)


def ping_pong(comm: Communicator, nbytes: int, repeats: int) -> float:
    """One-way time (s) of ``nbytes`` to and from the partner rank (``rank ^ 1``).

    Half the median round trip of ``repeats``, after one warm-up. Both ranks of the pair
    must call it; the even one sends first.
    """
    message = torch.zeros(nbytes, dtype=torch.uint8)
    peer = comm.rank ^ 1
    round_trips = []
    for _ in range(repeats + 1):  # the first round trip is a warm-up
        start = time.perf_counter()
        if comm.rank % 2 == 0:
            comm.send(message, peer, PING_TAG)
            comm.recv(message, peer, PING_TAG)
        else:
            comm.recv(message, peer, PING_TAG)
            comm.send(message, peer, PING_TAG)
        round_trips.append(time.perf_counter() - start)
    return statistics.median(round_trips[1:]) / 2


def fit_alpha_beta(comm: Communicator, sizes, repeats: int = 9) -> tuple[float, float]:
    """Measure a ping-pong between ranks 0 and 1 at each size and fit ``(alpha, beta)``.

    Ranks 2 and 3, 4 and 5, ... ping-pong at the same time (with an odd N the last rank
    waits), so that the links are measured as busy as in a collective, where every rank
    communicates at once: on one machine the ranks share its cores and memory, on a
    cluster the ranks of a node share its network card. Every rank of ``comm`` must call
    it (N >= 2); all get rank 0's fit.
    """
    if comm.size < 2:
        raise ValueError("a ping-pong needs at least two ranks")
    sizes = [int(s) for s in sizes]
    if min(sizes) < 1:
        raise ValueError("ping-pong message sizes must be >= 1 byte")
    times = []
    for size in sizes:
        comm.barrier()  # every pair starts each size together
        if comm.rank ^ 1 < comm.size:
            times.append(ping_pong(comm, size, repeats))
    fit = torch.zeros(2, dtype=torch.float64)
    if comm.rank == 0:
        fit[:] = torch.tensor(least_squares(sizes, times))
    comm.broadcast(fit, src=0)
    return float(fit[0]), float(fit[1])

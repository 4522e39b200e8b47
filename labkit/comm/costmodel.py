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

==================  ===================================  ==========
collective          steps                                m (bytes)
==================  ===================================  ==========
ring                2(N-1)                               S/N
tree                critical path of the binary tree     S
                    (2 for N=2, 4 for N=3, 5 for N=4)
recursive_doubling  log2(P), +2 if N != P                S
                    (P: the largest power of two <= N)
parameter_server    2(N-1) (all through the root)        S
library             as ring (gloo and MPICH use a ring
                    for large messages)
==================  ===================================  ==========

So the ring is 2(N-1)alpha + 2(N-1)/N * S * beta: its bandwidth term hardly grows with N,
while the tree and the parameter server move the whole S on every step. The model
counts neither the additions nor contention between ranks that share a machine.
"""

from __future__ import annotations

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


def critical_path(collective: str, nbytes: float, n: int) -> tuple[int, float]:
    """(number of messages, bytes per message) along the collective's critical path."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    if n < 1:
        raise ValueError(f"world size must be >= 1, got {n}")
    if n == 1:
        return 0, 0.0
    if collective in ("ring", "library"):
        return 2 * (n - 1), nbytes / n
    if collective == "tree":
        return tree_steps(n), nbytes
    if collective == "recursive_doubling":
        active = 1 << (n.bit_length() - 1)
        return active.bit_length() - 1 + (2 if active != n else 0), nbytes
    return 2 * (n - 1), nbytes  # parameter_server


def predict(collective: str, nbytes: float, n: int, alpha: float, beta: float) -> float:
    """Predicted seconds for an allreduce of ``nbytes`` over ``n`` ranks (see the table above)."""
    steps, message = critical_path(collective, nbytes, n)
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
    """One-way time (s) of ``nbytes`` between ranks 0 and 1: half the fastest round trip.

    The fastest, because on a shared machine other work only ever adds time (Python's
    ``timeit`` takes the minimum for the same reason). Ranks 0 and 1 must both call it;
    other ranks must not.
    """
    message = torch.zeros(nbytes, dtype=torch.uint8)
    peer = 1 - comm.rank
    round_trips = []
    for _ in range(repeats + 1):  # the first round trip is a warm-up
        start = time.perf_counter()
        if comm.rank == 0:
            comm.send(message, peer, PING_TAG)
            comm.recv(message, peer, PING_TAG)
        else:
            comm.recv(message, peer, PING_TAG)
            comm.send(message, peer, PING_TAG)
        round_trips.append(time.perf_counter() - start)
    return min(round_trips[1:]) / 2


def fit_alpha_beta(comm: Communicator, sizes, repeats: int = 5) -> tuple[float, float]:
    """Measure a ping-pong between ranks 0 and 1 at each size and fit ``(alpha, beta)``.

    Every rank of ``comm`` must call it (N >= 2); all get rank 0's fit.
    """
    if comm.size < 2:
        raise ValueError("a ping-pong needs at least two ranks")
    sizes = [int(s) for s in sizes]
    if min(sizes) < 1:
        raise ValueError("ping-pong message sizes must be >= 1 byte")
    fit = torch.zeros(2, dtype=torch.float64)
    if comm.rank in (0, 1):
        times = [ping_pong(comm, s, repeats) for s in sizes]
        if comm.rank == 0:
            fit[:] = torch.tensor(least_squares(sizes, times))
    comm.broadcast(fit, src=0)
    return float(fit[0]), float(fit[1])

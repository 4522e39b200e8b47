"""The Communicator: what every rank uses to talk to the others.

One interface, several backends (torch.distributed with gloo or NCCL, MPI through
mpi4py, and a trivial one for a single process). Everything above this layer (sync
modes, compressors, hand-written collectives) talks only to this interface, so any
algorithm runs on any backend.

Every method that waits on another rank gives up after ``timeout`` seconds with a
:class:`PeerError` instead of hanging: a rank stuck in a collective would otherwise
freeze a notebook forever.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


class PeerError(RuntimeError):
    """Another rank died or stopped answering."""


@dataclass
class CommStats:
    """What this rank has sent: bytes on the wire and number of messages.

    ``comm_s`` accumulates the wall time spent inside communication calls.
    """

    bytes_sent: int = 0
    messages_sent: int = 0
    comm_s: float = 0.0
    by_op: dict = field(default_factory=dict)
    # threads of one rank (an asynchronous master serving several workers) share the counts
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, op: str, nbytes: int, messages: int = 1, seconds: float = 0.0) -> None:
        with self.lock:
            self.bytes_sent += int(nbytes)
            self.messages_sent += int(messages)
            self.comm_s += seconds
            b, m = self.by_op.get(op, (0, 0))
            self.by_op[op] = (b + int(nbytes), m + int(messages))

    def add_time(self, seconds: float) -> None:
        with self.lock:
            self.comm_s += seconds


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Request:
    """A send or receive under way (``isend`` / ``irecv``). ``wait()`` blocks until it is
    done and returns the peer's rank; like the blocking calls it raises :class:`PeerError`
    when the peer died or ``timeout`` seconds pass, counted from the call to ``wait()``."""

    def __init__(self, wait, stats: CommStats):
        self._wait = wait
        self._stats = stats
        self._peer: int | None = None
        self._done = False

    def wait(self) -> int:
        if not self._done:
            t0 = time.perf_counter()
            self._peer = self._wait()
            self._done = True
            self._stats.add_time(time.perf_counter() - t0)
        return self._peer


class Communicator:
    """Abstract communicator. Subclasses implement the ``_``-prefixed primitives.

    Byte accounting follows what this rank puts on the wire for the algorithm the
    backend uses (for library collectives: the ring algorithm's 2(N-1)/N * S for
    allreduce, (N-1)/N * S for allgather, S for the root of a broadcast).
    """

    backend = "abstract"

    def __init__(self, rank: int, size: int, timeout: float = 120.0):
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.stats = CommStats()
        self.lost: set[int] = set()  # ranks known to be dead (see mark_lost)

    def mark_lost(self, ranks) -> None:
        """Note ranks known to be dead, so that waits on them fail at once.

        gloo and NCCL see a closed connection by themselves; MPI does not, so a rank that
        learns of a death from its launcher (mpiexec's SIGUSR1) tells its communicator.
        """
        self.lost.update(int(r) for r in ranks if int(r) != self.rank)

    # --- point to point ---------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        """Send ``tensor`` to rank ``dst`` (blocking until it is handed over)."""
        self._check_peer(dst, "dst")
        t0 = time.perf_counter()
        self._send(tensor.contiguous(), dst, tag)
        self.stats.add("send", nbytes(tensor), seconds=time.perf_counter() - t0)

    def recv(self, tensor: torch.Tensor, src: int | None = None, tag: int = 0) -> int:
        """Receive into ``tensor`` from ``src`` (any rank when None); return the sender."""
        if src is not None:
            self._check_peer(src, "src")
        t0 = time.perf_counter()
        sender = self._recv(tensor, src, tag)
        self.stats.add_time(time.perf_counter() - t0)
        return sender

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Request:
        """Start sending ``tensor`` to ``dst`` and return at once; do not touch ``tensor``
        until ``wait()`` has returned."""
        self._check_peer(dst, "dst")
        if not tensor.is_contiguous():
            raise ValueError("isend needs a contiguous tensor (it is sent from its own memory)")
        request = Request(self._isend(tensor, dst, tag), self.stats)
        self.stats.add("send", nbytes(tensor))
        return request

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Request:
        """Start receiving into ``tensor`` from ``src``; it holds the message once ``wait()`` returns."""
        self._check_peer(src, "src")
        if not tensor.is_contiguous():
            raise ValueError("irecv needs a contiguous tensor (it is received in place)")
        return Request(self._irecv(tensor, src, tag), self.stats)

    # --- collectives ------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max/min) ``tensor`` across all ranks, in place; returns it."""
        if op not in ("sum", "max", "min"):
            raise ValueError(f"allreduce op must be sum, max or min, got {op!r}")
        if self.size == 1:
            return tensor
        t0 = time.perf_counter()
        self._allreduce(tensor, op)
        self.stats.add("allreduce", 2 * (self.size - 1) * nbytes(tensor) // self.size,
                       2 * (self.size - 1), seconds=time.perf_counter() - t0)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy ``tensor`` from rank ``src`` to every rank, in place; returns it."""
        self._check_peer(src, "src")
        if self.size == 1:
            return tensor
        t0 = time.perf_counter()
        self._broadcast(tensor, src)
        self.stats.add("broadcast", nbytes(tensor) if self.rank == src else 0,
                       1 if self.rank == src else 0, seconds=time.perf_counter() - t0)
        return tensor

    def allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather ``tensor`` (same shape and dtype on every rank) from all ranks."""
        if self.size == 1:
            return [tensor.clone()]
        t0 = time.perf_counter()
        out = self._allgather(tensor.contiguous())
        self.stats.add("allgather", (self.size - 1) * nbytes(tensor), self.size - 1,
                       seconds=time.perf_counter() - t0)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            t0 = time.perf_counter()
            self._barrier()
            self.stats.add_time(time.perf_counter() - t0)

    def new_group(self, ranks: list[int]) -> "Communicator | None":
        """A communicator over ``ranks`` (for hybrid parallelism).

        Every rank of this communicator must call it with the same list; ranks not in
        the list get None.
        """
        ranks = sorted(set(int(r) for r in ranks))
        for r in ranks:
            self._check_peer(r, "ranks")
        return self._new_group(ranks)

    def close(self) -> None:
        """Release the backend's resources (idempotent)."""

    # --- backends implement these ------------------------------------------------
    def _send(self, tensor, dst, tag):
        raise NotImplementedError

    def _recv(self, tensor, src, tag) -> int:
        raise NotImplementedError

    def _isend(self, tensor, dst, tag):
        """Start the send; return a function that waits for it and returns ``dst``."""
        raise NotImplementedError

    def _irecv(self, tensor, src, tag):
        """Start the receive; return a function that waits for it and returns ``src``."""
        raise NotImplementedError

    def _allreduce(self, tensor, op):
        raise NotImplementedError

    def _broadcast(self, tensor, src):
        raise NotImplementedError

    def _allgather(self, tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _barrier(self):
        raise NotImplementedError

    def _new_group(self, ranks):
        raise NotImplementedError

    def _check_peer(self, r, what):
        if not 0 <= r < self.size:
            raise ValueError(f"{what}={r} is not a rank of this communicator (0..{self.size - 1})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class SingleProcessCommunicator(Communicator):
    """The communicator of a run with one rank: every collective is the identity."""

    backend = "single"

    def __init__(self, timeout: float = 120.0):
        super().__init__(0, 1, timeout)

    def _send(self, tensor, dst, tag):
        raise RuntimeError("send: a single-process run has no other rank to talk to")

    _recv = _isend = _irecv = _send

    def _barrier(self):
        pass

    def _new_group(self, ranks):
        return self if ranks == [0] else None

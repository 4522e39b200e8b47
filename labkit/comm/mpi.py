"""Communicator over MPI (mpi4py), sharing memory with torch tensors.

CPU tensors are handed to MPI as NumPy views of their own memory, so nothing is copied.
MPI calls cannot be cancelled, so every wait is a non-blocking request polled until a
deadline: a rank stuck on a dead peer raises :class:`PeerError` instead of hanging.

``iallreduce`` / ``iallgather`` start a collective and return at once, so that a bucket's sum
can travel while backward computes the next bucket (``labkit/compress/communicate.py``).
MPICH moves a non-blocking collective forward only inside ``Test`` or ``Wait``: started and
left alone, it would sit still until the caller waits. These collectives therefore run on
the communicator's one collective thread (mpi4py asks for ``MPI_THREAD_MULTIPLE``), in the
order they were started, on a duplicate of the communicator made for them, so that their
messages can never meet the caller's own collectives.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from .base import Communicator, PeerError

ALL = "all"  # the peer of a collective: every rank
_REDUCIBLE = {torch.float32, torch.float64, torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8}


def _mpi():
    from mpi4py import MPI

    return MPI


def _as_bytes(tensor: torch.Tensor):
    """A NumPy uint8 view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, comm=None, timeout: float = 120.0):
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), timeout)
        self._behind = None  # (duplicate communicator, its thread), made by the first iallreduce
        self._behind_lock = threading.Lock()

    # --- collectives started without waiting -------------------------------------------------
    @property
    def collectives_in_background(self) -> bool:
        """Whether a started collective goes on while the caller computes (MPI_THREAD_MULTIPLE)."""
        MPI = _mpi()
        return self.size > 1 and MPI.Query_thread() >= MPI.THREAD_MULTIPLE

    def _background(self):
        """The duplicate communicator and the one thread that run started collectives.

        The first call is collective (``Dup``): every rank makes it at the same point, the
        first ``iallreduce`` or ``iallgather``."""
        with self._behind_lock:
            if self._behind is None:
                from concurrent.futures import ThreadPoolExecutor

                twin = MPICommunicator(self.comm.Dup(), self.timeout)
                twin.lost = self.lost  # a death this rank learns of fails the started ones too
                self._behind = twin, ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-mpi-collectives")
            return self._behind

    def _start(self, op: str, run, nbytes: int, messages: int, result):
        """Run ``run(twin)`` on the collective thread; a handle whose ``wait()`` gives ``result``."""
        if not self.collectives_in_background:  # one rank, or no MPI_THREAD_MULTIPLE: at once
            t0 = time.perf_counter()
            run(self)
            self.stats.add(op, nbytes, messages, seconds=time.perf_counter() - t0)
            return _Started(None, self, op, result)
        twin, thread = self._background()
        self.stats.add(op, nbytes, messages)
        return _Started(thread.submit(run, twin), self, op, result)

    def iallreduce(self, tensor: torch.Tensor, op: str = "sum"):
        """Start summing ``tensor`` in place; ``wait()`` returns it. Leave it alone until then."""
        self._check_cpu(tensor)
        n = self.size
        return self._start("allreduce", lambda comm: comm._allreduce(tensor, op),
                           2 * (n - 1) * tensor.numel() * tensor.element_size() // n, 2 * (n - 1), tensor)

    def iallgather(self, tensor: torch.Tensor):
        """Start gathering ``tensor`` from every rank; ``wait()`` returns the list in rank order."""
        tensor = tensor.contiguous()
        self._check_cpu(tensor)
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype)
        return self._start("allgather", lambda comm: comm._allgather_into(tensor, out),
                           (self.size - 1) * tensor.numel() * tensor.element_size(), self.size - 1,
                           list(out.unbind(0)))

    def _wait(self, request, op: str, peer: int | None = ALL):
        """Poll ``request`` until done; PeerError after ``timeout`` seconds.

        ``peer`` is the rank the operation waits on (``ALL`` for a collective, None for a
        receive from any rank): when it is known to be dead (``mark_lost``), PeerError at once.
        """
        MPI = _mpi()
        status = MPI.Status()
        start = time.monotonic()
        deadline = start + self.timeout
        # MPICH progresses non-blocking collectives only inside Test: poll eagerly (yielding
        # the core) for the first 20 ms, then back off to short sleeps.
        while not self._test(request, status, op):
            if self.lost and (peer == ALL or peer in self.lost):
                gone = min(self.lost) if peer == ALL else peer
                raise PeerError(f"{op}: rank {gone} is gone (its process died)")
            now = time.monotonic()
            if now - start < 0.02:
                os.sched_yield()
            else:
                time.sleep(0.0005)
            if now > deadline:
                raise PeerError(f"{op}: no answer from the other ranks in {self.timeout:.0f} s "
                                "(a rank died or is stuck)")
        return status

    @staticmethod
    def _test(request, status, op: str) -> bool:
        """``request.Test``; an MPI error (a peer's process is gone) becomes PeerError."""
        MPI = _mpi()
        try:
            return request.Test(status)
        except MPI.Exception as error:
            reason = (error.Get_error_string() or str(error)).splitlines()[0]
            raise PeerError(f"{op}: MPI error from a peer rank ({reason}); a rank died or left") from None

    @staticmethod
    def _check_cpu(tensor):
        if tensor.device.type != "cpu":
            raise ValueError("the mpi backend moves CPU tensors; use --backend nccl for GPU tensors")
        if not tensor.is_contiguous():
            raise ValueError("the mpi backend needs contiguous tensors")

    def _send(self, tensor, dst, tag):
        self._check_cpu(tensor)
        self._wait(self.comm.Isend(_as_bytes(tensor), dest=dst, tag=tag), "send", dst)

    def _recv(self, tensor, src, tag):
        self._check_cpu(tensor)
        MPI = _mpi()
        source = MPI.ANY_SOURCE if src is None else src
        status = self._wait(self.comm.Irecv(_as_bytes(tensor), source=source, tag=tag), "recv", src)
        return status.Get_source()

    def _isend(self, tensor, dst, tag):
        self._check_cpu(tensor)
        buffer = _as_bytes(tensor)
        request = self.comm.Isend(buffer, dest=dst, tag=tag)

        def wait(buffer=buffer):  # the buffer stays alive until the send is done
            self._wait(request, "isend", dst)
            return dst
        return wait

    def _irecv(self, tensor, src, tag):
        self._check_cpu(tensor)
        buffer = _as_bytes(tensor)
        request = self.comm.Irecv(buffer, source=src, tag=tag)

        def wait(buffer=buffer):
            self._wait(request, "irecv", src)
            return src
        return wait

    def _allreduce(self, tensor, op):
        MPI = _mpi()
        mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        self._check_cpu(tensor)
        if tensor.dtype in _REDUCIBLE:
            self._wait(self.comm.Iallreduce(MPI.IN_PLACE, tensor.numpy(), op=mpi_op), "allreduce")
        else:  # float16 / bfloat16: NumPy or MPI has no such type, reduce in float32
            wide = tensor.float()
            self._wait(self.comm.Iallreduce(MPI.IN_PLACE, wide.numpy(), op=mpi_op), "allreduce")
            tensor.copy_(wide)

    def _broadcast(self, tensor, src):
        self._check_cpu(tensor)
        self._wait(self.comm.Ibcast(_as_bytes(tensor), root=src), "broadcast")

    def _allgather(self, tensor):
        self._check_cpu(tensor)
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype)
        self._allgather_into(tensor, out)
        return list(out.unbind(0))

    def _allgather_into(self, tensor, out):
        self._wait(self.comm.Iallgather(_as_bytes(tensor), _as_bytes(out)), "allgather")

    def _barrier(self):
        self._wait(self.comm.Ibarrier(), "barrier")

    def _new_group(self, ranks):
        MPI = _mpi()
        color = 0 if self.rank in ranks else MPI.UNDEFINED
        sub = self.comm.Split(color, key=self.rank)
        if sub == MPI.COMM_NULL:
            return None
        return MPICommunicator(sub, self.timeout)

    def close(self):
        MPI = _mpi()
        if self._behind is not None:
            twin, thread = self._behind
            thread.shutdown(wait=True)
            twin.close()
            self._behind = None
        if self.comm not in (MPI.COMM_WORLD, MPI.COMM_SELF) and self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.comm = MPI.COMM_NULL


class _Started:
    """A collective started by ``iallreduce`` / ``iallgather``: ``wait()`` returns its result
    (PeerError as the blocking call would raise it) and counts the time waited."""

    def __init__(self, future, comm: MPICommunicator, op: str, result):
        self.future, self.comm, self.op, self.result = future, comm, op, result
        self.asynchronous = future is not None

    def wait(self):
        if self.future is not None:
            t0 = time.perf_counter()
            self.future.result()  # the collective thread's own deadline bounds the wait
            self.comm.stats.add_time(time.perf_counter() - t0)
            self.future = None
        return self.result


def abort(code: int = 1) -> None:
    """End every rank of the MPI job (used when this rank fails)."""
    MPI = _mpi()
    MPI.COMM_WORLD.Abort(code)


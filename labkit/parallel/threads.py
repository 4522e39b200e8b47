"""T ranks as T threads of one process: a communicator for trying tensor parallelism in a
notebook or a grading cell without starting processes.

``run_threads(T, fn)`` runs ``fn(comm)`` in T threads and returns their results in rank
order; ``comm`` has ``rank``, ``size``, ``allreduce`` (in place, sum), ``allgather`` and
``broadcast``, like a real ``Communicator``. Every collective is a meeting at a barrier;
when one thread fails the barrier is broken, so the others fail at once instead of
waiting, and the first error is raised.
"""

from __future__ import annotations

import threading

import torch


class _Meeting:
    def __init__(self, size: int, timeout: float):
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)


class ThreadComm:
    def __init__(self, rank: int, meeting: _Meeting):
        self.rank, self.size, self._meeting = rank, meeting.size, meeting

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        m = self._meeting
        m.slots[self.rank] = tensor.detach().clone()
        m.barrier.wait()
        values = list(m.slots)
        m.barrier.wait()  # nobody writes the next collective's slot before all have read
        return values

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op != "sum":
            raise ValueError("ThreadComm.allreduce: only sum")
        values = self._exchange(tensor)
        total = values[0].clone()
        for v in values[1:]:  # rank order: the same sum on every thread
            total += v
        with torch.no_grad():
            tensor.copy_(total)
        return tensor

    def allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        values = self._exchange(tensor)
        with torch.no_grad():
            tensor.copy_(values[src])
        return tensor

    def barrier(self) -> None:
        self._meeting.barrier.wait()


def run_threads(size: int, fn, timeout: float = 30.0) -> list:
    """``[fn(comm) for each of size ranks]``, the ranks being threads of this process."""
    if size < 1:
        raise ValueError(f"need at least one rank, got {size}")
    meeting = _Meeting(size, timeout)
    results: list = [None] * size
    errors: list = [None] * size

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(rank, meeting))
        except BaseException as error:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors[rank] = error
            meeting.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"run_threads: a rank did not finish in {timeout:.0f} s")
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise first
    return results

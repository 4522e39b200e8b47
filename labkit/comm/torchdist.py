"""Communicator over torch.distributed: gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .base import Communicator, PeerError

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _lost(op: str, err: Exception) -> PeerError:
    return PeerError(f"{op} failed: another rank died or stopped answering ({str(err).splitlines()[0]})")


class TorchDistCommunicator(Communicator):
    """torch.distributed process group (``env://`` rendezvous: MASTER_ADDR, MASTER_PORT)."""

    def __init__(self, backend: str, rank: int, size: int, timeout: float = 120.0, group=None,
                 global_ranks: list[int] | None = None, group_deadline: bool = False):
        super().__init__(rank, size, timeout)
        self.backend = backend
        self.group = group
        self.global_ranks = global_ranks or list(range(size))
        self.device = torch.device("cpu")
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.device.type == "cuda"
        self._deadline = datetime.timedelta(seconds=timeout)
        # gloo gives up on a send or receive after the group's own timeout. When labkit made
        # the group with this communicator's timeout, a plain wait() keeps the deadline, and
        # it is cheaper than a timed one (a few per cent of a 16 MB ring allreduce).
        self._group_deadline = group_deadline and backend == "gloo"

    @classmethod
    def from_env(cls, backend: str, rank: int, size: int, timeout: float) -> "TorchDistCommunicator":
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local % torch.cuda.device_count())
        made_here = not dist.is_initialized()
        if made_here:
            try:
                dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                        timeout=datetime.timedelta(seconds=timeout))
            except Exception as e:  # rendezvous never completed
                raise PeerError(f"rendezvous of {size} ranks at {os.environ.get('MASTER_ADDR')}:"
                                f"{os.environ.get('MASTER_PORT')} failed: {str(e).splitlines()[0]}") from e
        return cls(backend, rank, size, timeout, group_deadline=made_here)

    def _on_device(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda == self._cuda

    def _call(self, op: str, fn, tensor: torch.Tensor | None = None):
        """Run a torch.distributed call on this backend's device, translating failures."""
        try:
            if tensor is None or self._on_device(tensor):
                return fn(tensor)
            moved = tensor.to(self.device)
            out = fn(moved)
            tensor.copy_(moved)
            return out
        except (RuntimeError, dist.DistBackendError) as e:
            raise _lost(op, e) from e

    def _send(self, tensor, dst, tag):
        self._call("send", lambda t: dist.send(t, self.global_ranks[dst], group=self.group, tag=tag), tensor)

    def _recv(self, tensor, src, tag):
        peer = None if src is None else self.global_ranks[src]
        sender = self._call("recv", lambda t: dist.recv(t, peer, group=self.group, tag=tag), tensor)
        return self.global_ranks.index(sender)

    def _post(self, op: str, start, tensor, peer: int, tag: int):
        """``dist.isend`` or ``dist.irecv`` (``start``) of ``tensor`` with ``peer``: its request."""
        try:
            return start(tensor, self.global_ranks[peer], group=self.group, tag=tag)
        except (RuntimeError, dist.DistBackendError) as e:
            raise _lost(op, e) from e

    def _isend(self, tensor, dst, tag):
        moved = tensor if self._on_device(tensor) else tensor.to(self.device)
        work = self._post("isend", dist.isend, moved, dst, tag)

        def wait():
            self._wait_work(work, "isend", dst)
            return dst
        return wait

    def _irecv(self, tensor, src, tag):
        moved = tensor if self._on_device(tensor) else torch.empty_like(tensor, device=self.device)
        work = self._post("irecv", dist.irecv, moved, src, tag)

        def wait():
            self._wait_work(work, "irecv", src)
            if moved is not tensor:
                tensor.copy_(moved)
            return src
        return wait

    def _wait_work(self, work, op: str, peer: int) -> None:
        """Wait for a torch.distributed request until the deadline; PeerError if it fails."""
        try:
            done = work.wait() if self._group_deadline else work.wait(self._deadline)
        except (RuntimeError, dist.DistBackendError) as e:
            raise _lost(op, e) from e
        if done is False:
            raise PeerError(f"{op}: no answer from rank {peer} in {self.timeout:.0f} s (it died or is stuck)")

    def _allreduce(self, tensor, op):
        self._call("allreduce", lambda t: dist.all_reduce(t, _OPS[op], group=self.group), tensor)

    def _broadcast(self, tensor, src):
        self._call("broadcast", lambda t: dist.broadcast(t, self.global_ranks[src], group=self.group), tensor)

    def _allgather(self, tensor):
        local = tensor if self._on_device(tensor) else tensor.to(self.device)
        out = [torch.empty_like(local) for _ in range(self.size)]
        self._call("allgather", lambda _: dist.all_gather(out, local, group=self.group))
        return [o.to(tensor.device) for o in out]

    def _barrier(self):
        if self.backend == "gloo":
            # monitored_barrier names the ranks that did not arrive
            self._call("barrier", lambda _: dist.monitored_barrier(
                group=self.group, timeout=datetime.timedelta(seconds=self.timeout)))
        else:
            self._call("barrier", lambda _: dist.barrier(group=self.group))

    def _new_group(self, ranks):
        global_ranks = [self.global_ranks[r] for r in ranks]
        group = dist.new_group(global_ranks, timeout=datetime.timedelta(seconds=self.timeout))
        if self.rank not in ranks:
            return None
        sub = TorchDistCommunicator(self.backend, ranks.index(self.rank), len(ranks), self.timeout,
                                    group=group, global_ranks=global_ranks, group_deadline=True)
        return sub

    def close(self):
        if self.group is None and dist.is_initialized():
            dist.destroy_process_group()

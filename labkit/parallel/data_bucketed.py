"""Data parallelism with the allreduce overlapped with the backward pass, as torch DDP does.

The gradients are grouped in buckets of at most ``bucket_mb`` MiB, last layers first
(``comm.buckets.GradientBuckets``: one flat buffer per bucket, and a view into it for each
parameter). Backward produces the gradients of the last layers first; a hook on each
parameter (``register_post_accumulate_grad_hook``) puts its gradient into its bucket (one
copy, scaled by 1/N on the way as DDP does, after which ``p.grad`` is the bucket's view,
so nothing is copied back) and counts the bucket's gradients; as soon as a bucket is
complete its allreduce starts, asynchronously, while backward goes on with the earlier
layers. ``sync_gradients`` then only waits for what is still on the wire. (Li et al.,
"PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020.)

The allreduce is started without waiting through ``start_allreduce``
(``labkit/compress/communicate.py``): torch.distributed's ``async_op=True`` on a
torch.distributed communicator, the MPI communicator's collective thread under ``--backend mpi``;
with a hand-written allreduce (``--allreduce-algorithm``) it runs at once (still one message per
bucket, only without the overlap).

With a compressor (``--compression``), a complete bucket goes through the compressing
communicator's ``start_allreduce``, as a DDP communication hook (torch's PowerSGD hook) does
it: the bucket is compressed in the hook, with its own error feedback (key ``bucket<b>``; per
parameter for a layerwise compressor), and its exchange starts without waiting, an
asynchronous allreduce of the packet's fields for a compressor whose packets add up (fp16,
bf16), an asynchronous allgather of the packets for the others (top-k, 1-bit, QSGD, ...);
backward goes on with the earlier layers while the packets are on the wire, and
``sync_gradients`` decompresses and adds up what each bucket received, in rank order, then
divides by N. The compressor's own code does both halves (``compress/communicate.py``), so the
overlapped sum is the blocking one, step for step: the same weights with ``overlap=False``,
which exchanges every bucket after backward, in the same order. A compressor whose protocol
has rounds that depend on each other (PowerSGD: P is summed before Q is computed) runs it on the
compressing communicator's background thread, bucket after bucket, while backward goes on (torch's
PowerSGD hook chains the rounds with futures to the same end). The gradient is compressed as this rank computed it and the sum divided by
N afterwards, as the flat buffer of the ``allreduce`` sync mode is, so with one bucket the two
take the very same steps.

Each step leaves its record in ``last_record``: in the order they happened, ``backward_start``,
``bucket_ready`` and ``exchange_start`` (with ``asynchronous``) of each bucket,
``backward_end`` (backward has returned), and ``exchange_end`` of each bucket once its sum is
in place, each with its time in seconds since the step began. Communication overlaps
backward when a bucket's ``exchange_start`` comes before ``backward_end``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..comm.buckets import GradientBuckets
from ..compress.communicate import start_allreduce
from .data_naive import _DataParallel

__all__ = ["DataParallelBucketed", "start_allreduce"]


class _Exchange:
    """The exchange of one bucket: its sums under way; ``wait()`` puts the mean in place."""

    def __init__(self, pendings, after=None):
        self.pendings, self.after = pendings, after
        self.asynchronous = any(getattr(p, "asynchronous", False) for p in pendings)

    def wait(self):
        for pending in self.pendings:
            pending.wait()
        if self.after is not None:
            self.after()


class DataParallelBucketed(_DataParallel):
    """Buckets of gradients, each exchanged as soon as backward has filled it
    (``overlap=False``: every bucket after backward, the baseline the overlap is measured against)."""

    def __init__(self, module: nn.Module, comm, bucket_mb: float = 25.0, compressor=None, overlap: bool = True):
        super().__init__(module, comm, compressor)
        self.buckets = GradientBuckets(module.parameters(), cap_bytes=max(1, int(bucket_mb * 2**20)))
        self.scale = 1.0 / comm.size
        self.overlap = overlap
        names = {p: getattr(p, "full_name", name) for name, p in module.named_parameters()}
        self.view_of, self.bucket_of, self.key_of = {}, {}, {}
        for b, group in enumerate(self.buckets.groups):
            for p in group:
                self.view_of[p] = p.grad  # GradientBuckets made every p.grad a view into its bucket
                self.bucket_of[p] = b
                self.key_of[p] = names[p]
                p.register_post_accumulate_grad_hook(self._ready)
        self.pending = [len(group) for group in self.buckets.groups]
        self.ready: list[int] = []  # buckets in the order backward completed them
        self.handles: dict = {}
        self.events: list[tuple] = []  # (kind, bucket, time, asynchronous): cheap while backward runs
        self._last: list[tuple] = []

    def mark(self, kind: str, bucket: int | None = None, asynchronous: bool | None = None) -> None:
        """Add an event to this step's record."""
        self.events.append((kind, bucket, time.perf_counter(), asynchronous))

    @property
    def last_record(self) -> list[dict]:
        """The events of the last step, in order, with their times since its first event."""
        if not self._last:
            return []
        t0, out = self._last[0][2], []
        for kind, bucket, t, asynchronous in self._last:
            event = {"kind": kind, "t": round(t - t0, 6)}
            if bucket is not None:
                event["bucket"] = bucket
            if asynchronous is not None:
                event["asynchronous"] = asynchronous
            out.append(event)
        return out

    def _ready(self, p: torch.Tensor) -> None:
        """Backward has accumulated ``p.grad``: into the bucket with it; start a full bucket."""
        view = self.view_of[p]
        if p.grad.data_ptr() != view.data_ptr():  # zero_grad(set_to_none=True): a fresh tensor
            if self.lossless:
                torch.mul(p.grad, self.scale, out=view)  # DDP's copy and 1/N in one pass
            else:
                view.copy_(p.grad)
            p.grad = view
        elif self.lossless:
            view.mul_(self.scale)
        b = self.bucket_of[p]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self.pending[b] = len(self.buckets.groups[b])  # ready for the next backward
            self.ready.append(b)
            self.mark("bucket_ready", b)
            if self.overlap:
                self.handles[b] = self._exchange(b)
                self.mark("exchange_start", b, asynchronous=getattr(self.handles[b], "asynchronous", True))

    def _exchange(self, b: int, asynchronous: bool = True) -> _Exchange:
        """Start the exchange of bucket ``b`` (``asynchronous=False``: do it now, blocking)."""
        buffer = self.buckets.buffers[b]
        if self.lossless:
            return start_allreduce(self.comm, buffer, asynchronous)  # the sum is the mean: scaled in the hook
        if self.comm.size == 1:
            return _Exchange([])
        pieces = ([(self.view_of[p], self.key_of[p]) for p in self.buckets.groups[b]]
                  if self.compressed.compressor.layerwise else [(buffer, f"bucket{b}")])

        def mean():
            buffer.div_(self.comm.size)
        if not asynchronous:
            for tensor, key in pieces:
                self.compressed.allreduce(tensor, key=key)
            return _Exchange([], mean)
        return _Exchange([self.compressed.start_allreduce(tensor, key=key) for tensor, key in pieces], mean)

    def sync_gradients(self) -> None:
        self.mark("backward_end")
        ready, handles, self.ready, self.handles = self.ready, self.handles, [], {}
        try:
            if len(ready) != len(self.buckets):
                self.pending = [len(group) for group in self.buckets.groups]
                raise RuntimeError(f"only {len(ready)} of {len(self.buckets)} gradient buckets were "
                                   "filled: some parameter got no gradient")
            for b in ready:
                if not self.overlap:
                    self.mark("exchange_start", b, asynchronous=False)
                    handle = self._exchange(b, asynchronous=False)
                else:
                    handle = handles[b]
                handle.wait()
                self.mark("exchange_end", b)
        finally:
            self._last, self.events = self.events, []

"""Moving compressed tensors between ranks: the Communicator role of GRACE.

:class:`CompressedCommunicator` is the one sync point every mode talks to, the way a
DDP communication hook plugs into one place: it wraps a labkit ``Communicator`` and a
compressor and offers ``allreduce``, ``broadcast``, ``send`` and ``recv``, each going
through the compressor's own protocol (``Compressor.allreduce`` / ``send`` / ``recv`` /
``broadcast``), so any compressor works in any mode and this module names none of them.

The protocol every compressor inherits, here:

- a sum across ranks: summable packets (none, fp16, bf16) are allreduced field by field
  as they are, on 2 or 4 bytes per value; every other packet goes to every rank by
  allgather of its wire bytes, and each rank decompresses all of them and adds them up,
  in rank order, so that every rank gets the very same sum. Packets whose size depends
  on the values (threshold) are padded to the largest, after an allgather of the sizes;
- point to point and broadcast: one packet, its size first, then its bytes.

The communicator's ``stats.bytes_sent`` counts exactly those bytes.

The one-round sum comes in two halves, as a DDP communication hook does it:
:func:`start_allreduce_packets` compresses at once (error feedback included) and starts the
exchange without waiting (an asynchronous allreduce of the summable fields, or an
asynchronous allgather of the packets' wire bytes); ``wait()`` on what it returns
decompresses and adds up. The blocking :func:`allreduce_packets` is the two halves one after
the other, so an overlapped sum and a blocking one take the very same steps.
``CompressedCommunicator.start_allreduce`` offers it for any compressor: one with its own
protocol of several dependent rounds (PowerSGD) runs that protocol on a background thread instead,
the sums in the order they were started.
"""

from __future__ import annotations

from operator import attrgetter

import torch
import torch.distributed as dist

from .base import Compressor, Packet


def allreduce_compressed(comm, compressor: Compressor, tensor: torch.Tensor, key=None) -> torch.Tensor:
    """The sum over all ranks of each rank's decompressed ``tensor`` (a new tensor)."""
    return compressor.allreduce(comm, tensor, key)


def allreduce_packets(comm, compressor: Compressor, tensor: torch.Tensor, key=None) -> torch.Tensor:
    """The protocol of a one-round compressor: summed fields, or gathered packets."""
    return start_allreduce_packets(comm, compressor, tensor, key, asynchronous=False).wait()


class PendingSum:
    """A compressed sum under way: ``wait()`` returns the sum over the ranks (a new tensor).

    ``asynchronous`` says whether the exchange was still on the wire when the start returned
    (False where the communicator has no asynchronous collective, or for a protocol of
    several rounds, which ran at once)."""

    def __init__(self, finish, asynchronous: bool):
        self._finish, self.asynchronous = finish, asynchronous
        self._total = None

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            self._total, self._finish = self._finish(), None
        return self._total


def start_allreduce_packets(comm, compressor: Compressor, tensor: torch.Tensor, key=None,
                            asynchronous: bool = True) -> PendingSum:
    """Compress ``tensor`` now and start the one-round exchange of the packet without waiting:
    an asynchronous allreduce of each field when packets add up field by field, else an
    asynchronous allgather of every rank's wire bytes (after a blocking allgather of the
    sizes when they vary). ``asynchronous=False``: the communicator's blocking calls, the
    exchange done before it returns."""
    packet = compressor.compress(tensor, key)
    if compressor.summable:
        works = [start_allreduce(comm, field, asynchronous) for field in packet.fields]

        def finish():
            for work in works:
                work.wait()
            return compressor.decompress(packet)
        return PendingSum(finish, any(w.asynchronous for w in works))
    gathering = start_allgather_packets(comm, packet, compressor.variable_size, asynchronous)

    def finish():
        packets = gathering.wait()
        total = compressor.decompress(packets[0]).clone()
        for other in packets[1:]:
            total += compressor.decompress(other)
        return total
    return PendingSum(finish, gathering.asynchronous)


def allgather_packets(comm, packet: Packet, variable_size: bool) -> list[Packet]:
    """Every rank's packet, in rank order."""
    return start_allgather_packets(comm, packet, variable_size, asynchronous=False).wait()


def start_allgather_packets(comm, packet: Packet, variable_size: bool, asynchronous: bool = True) -> PendingSum:
    """Start gathering every rank's packet; ``wait()`` returns them in rank order."""
    wire = packet.to_wire()
    if variable_size:
        sizes = [int(size) for size in comm.allgather(torch.tensor([wire.numel()]))]
        wire = torch.cat([wire, wire.new_zeros(max(sizes) - wire.numel())])
    else:
        sizes = [wire.numel()] * comm.size
    work = start_allgather(comm, wire, asynchronous)

    def finish():
        return [Packet.from_wire(buffer[:size]) for buffer, size in zip(work.wait(), sizes)]
    return PendingSum(finish, work.asynchronous)


# --- collectives started without waiting ------------------------------------------------------
class _Done:
    """A collective that already ran (one rank, or a communicator without asynchronous calls)."""

    asynchronous = False

    def __init__(self, result=None):
        self.result = result

    def wait(self):
        return self.result


class _TorchWork:
    """A torch.distributed request (``async_op=True``): ``wait()`` gives up after the
    communicator's timeout, and counts the time spent waiting as communication."""

    asynchronous = True

    def __init__(self, work, comm, op: str, result=None):
        self.work, self.comm, self.op, self.result = work, comm, op, result

    def wait(self):
        import datetime
        import time

        from ..comm.base import PeerError

        t0 = time.perf_counter()
        try:
            done = self.work.wait(datetime.timedelta(seconds=self.comm.timeout))
        except (RuntimeError, dist.DistBackendError) as e:
            raise PeerError(f"{self.op} failed: another rank died or stopped answering "
                            f"({str(e).splitlines()[0]})") from e
        if done is False:
            raise PeerError(f"{self.op}: no answer in {self.comm.timeout:.0f} s (a rank died or is stuck)")
        self.comm.stats.add_time(time.perf_counter() - t0)
        return self.result


def _issue(comm, op: str, start):
    """Start a torch.distributed request; a failure to start names the lost peer as the
    blocking calls do."""
    from ..comm.base import PeerError

    try:
        return start()
    except (RuntimeError, dist.DistBackendError) as e:
        raise PeerError(f"{op} failed: another rank died or stopped answering ({str(e).splitlines()[0]})") from e


_TORCH_COMMUNICATOR = []  # the class, imported on first use


def _torch_async(comm, tensor: torch.Tensor) -> bool:
    """Whether ``comm`` is a torch.distributed communicator (gloo, NCCL) holding ``tensor``'s
    device, which runs collectives asynchronously (``async_op=True``)."""
    if not _TORCH_COMMUNICATOR:
        from ..comm.torchdist import TorchDistCommunicator

        _TORCH_COMMUNICATOR.append(TorchDistCommunicator)
    return isinstance(comm, _TORCH_COMMUNICATOR[0]) and tensor.device.type == comm.device.type


def _overlaps(comm, tensor: torch.Tensor) -> bool:
    """Whether a collective started on ``comm`` goes on while the caller computes: torch's
    asynchronous requests, or MPI's collective thread (``labkit/comm/mpi.py``)."""
    return _torch_async(comm, tensor) or bool(getattr(comm, "collectives_in_background", False))


def start_allreduce(comm, tensor: torch.Tensor, asynchronous: bool = True):
    """Start summing ``tensor`` over ``comm`` in place; returns a handle with ``wait()`` and
    ``asynchronous``. torch.distributed's ``async_op=True`` on a gloo or NCCL communicator,
    the communicator's own ``iallreduce`` where it has one (MPI: on its collective thread);
    with a hand-written allreduce, or with ``asynchronous=False``, the communicator's blocking
    allreduce runs at once."""
    if comm.size == 1:
        return _Done(tensor)
    if asynchronous and hasattr(comm, "iallreduce"):
        return comm.iallreduce(tensor)
    if asynchronous and _torch_async(comm, tensor):
        work = _issue(comm, "allreduce", lambda: dist.all_reduce(tensor, group=comm.group, async_op=True))
        n = comm.size
        comm.stats.add("allreduce", 2 * (n - 1) * tensor.numel() * tensor.element_size() // n, 2 * (n - 1))
        return _TorchWork(work, comm, "allreduce", tensor)
    comm.allreduce(tensor)
    return _Done(tensor)


def start_allgather(comm, tensor: torch.Tensor, asynchronous: bool = True):
    """Start gathering ``tensor`` (the same shape on every rank) from every rank; ``wait()``
    returns the list in rank order. Asynchronous where ``start_allreduce`` is."""
    if comm.size == 1:
        return _Done([tensor.clone()])
    if asynchronous and hasattr(comm, "iallgather"):
        return comm.iallgather(tensor)
    if asynchronous and _torch_async(comm, tensor):
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(comm.size)]
        work = _issue(comm, "allgather", lambda: dist.all_gather(out, tensor, group=comm.group, async_op=True))
        comm.stats.add("allgather", (comm.size - 1) * tensor.numel() * tensor.element_size(), comm.size - 1)
        return _TorchWork(work, comm, "allgather", out)
    return _Done(comm.allgather(tensor))


def send_compressed(comm, compressor: Compressor, tensor: torch.Tensor, dst: int, key=None,
                    tag: int = 0) -> Packet:
    """Compress ``tensor`` and send the packet to rank ``dst``: its size, then its bytes."""
    packet = compressor.compress(tensor, key)
    wire = packet.to_wire()
    comm.send(torch.tensor([wire.numel()]), dst, tag)
    comm.send(wire, dst, tag)
    return packet


def recv_compressed(comm, compressor: Compressor, like: torch.Tensor, src: int | None = None,
                    tag: int = 0) -> tuple[torch.Tensor, int]:
    """Receive a packet sent by ``send_compressed`` (from any rank when ``src`` is None).

    Returns the decompressed tensor (shape and dtype of ``like``) and the sender's rank.
    """
    size = torch.zeros(1, dtype=torch.int64, device=like.device)
    sender = comm.recv(size, src, tag)
    wire = torch.empty(int(size), dtype=torch.uint8, device=like.device)
    comm.recv(wire, sender, tag)
    tensor = compressor.decompress(Packet.from_wire(wire))
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise ValueError(f"recv_compressed: rank {sender} sent a {tuple(tensor.shape)} {tensor.dtype} "
                         f"tensor, expected {tuple(like.shape)} {like.dtype}")
    return tensor, sender


def broadcast_compressed(comm, compressor: Compressor, tensor: torch.Tensor, src: int = 0,
                         key=None) -> torch.Tensor:
    """Rank ``src``'s ``tensor``, compressed, on every rank (decompressed; a new tensor)."""
    if comm.rank == src:
        packet = compressor.compress(tensor, key)
        wire = packet.to_wire()
        size = torch.tensor([wire.numel()])
    else:
        size = torch.zeros(1, dtype=torch.int64)
    comm.broadcast(size, src)
    if comm.rank != src:
        wire = torch.empty(int(size), dtype=torch.uint8)
    comm.broadcast(wire, src)
    return compressor.decompress(packet if comm.rank == src else Packet.from_wire(wire))


class CompressedCommunicator:
    """A communicator that compresses what it sends with ``compressor`` (``none``: as it is).

    ``allreduce`` and ``broadcast`` work in place and return the tensor, ``recv`` receives
    into the tensor it is given and returns the sender, as the plain communicator's do;
    ``key`` names the tensor for error feedback (one residual per key).
    """

    def __init__(self, comm, compressor: Compressor):
        self.comm = comm
        self.compressor = compressor
        self._thread = None

    def _rounds(self):
        """The one thread that runs the protocols of several rounds started by ``start_allreduce``."""
        if self._thread is None:
            from concurrent.futures import ThreadPoolExecutor

            # the caller's intra-op threads: MKL and OpenMP keep that setting per thread, and a
            # matrix product split otherwise would round differently from the blocking sum's
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-compressed-rounds",
                                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        return self._thread

    # what the communicator underneath knows: who this rank is, how many there are, what was sent
    rank = property(attrgetter("comm.rank"))
    size = property(attrgetter("comm.size"))
    stats = property(attrgetter("comm.stats"))

    def over(self, comm) -> "CompressedCommunicator":
        """The same compressor (and its error feedback) over another communicator."""
        return CompressedCommunicator(comm, self.compressor)

    def allreduce(self, tensor: torch.Tensor, key=None) -> torch.Tensor:
        total = self.compressor.allreduce(self.comm, tensor, key)
        if total is not tensor:
            tensor.copy_(total)
        return tensor

    def start_allreduce(self, tensor: torch.Tensor, key=None) -> PendingSum:
        """Start the sum of ``allreduce`` without waiting: ``wait()`` on the result writes the
        sum into ``tensor`` and returns it; leave ``tensor`` alone until then.

        A one-round compressor compresses now and leaves its exchange on the wire. A compressor
        with a protocol of its own, whose rounds depend on each other (PowerSGD sums P before it
        computes Q), runs that protocol, blocking call after blocking call, on this
        communicator's one background thread, in the order the sums were started (so every rank
        issues the same collectives in the same order); where the communicator has no
        asynchronous collectives (a hand-written allreduce) it runs it now."""
        if type(self.compressor).allreduce is Compressor.allreduce:
            pending = start_allreduce_packets(self.comm, self.compressor, tensor, key)
        elif _overlaps(self.comm, tensor) and self.comm.size > 1:
            future = self._rounds().submit(self.compressor.allreduce, self.comm, tensor, key)
            pending = PendingSum(future.result, True)
        else:
            total = self.compressor.allreduce(self.comm, tensor, key)
            pending = PendingSum(lambda: total, False)

        def finish():
            total = pending.wait()
            if total is not tensor:
                tensor.copy_(total)
            return tensor
        return PendingSum(finish, pending.asynchronous)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, key=None) -> torch.Tensor:
        received = self.compressor.broadcast(self.comm, tensor, src, key)
        if received is not tensor:
            tensor.copy_(received)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, key=None, tag: int = 0) -> None:
        self.compressor.send(self.comm, tensor, dst, key, tag)

    def recv(self, tensor: torch.Tensor, src: int | None = None, tag: int = 0) -> int:
        received, sender = self.compressor.recv(self.comm, tensor, src, tag)
        tensor.copy_(received)
        return sender

    def __repr__(self) -> str:
        return f"<CompressedCommunicator {self.compressor.name!r} over {self.comm!r}>"

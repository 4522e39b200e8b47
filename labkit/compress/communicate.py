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
"""

from __future__ import annotations

import torch

from .base import Compressor, Packet


def allreduce_compressed(comm, compressor: Compressor, tensor: torch.Tensor, key=None) -> torch.Tensor:
    """The sum over all ranks of each rank's decompressed ``tensor`` (a new tensor)."""
    return compressor.allreduce(comm, tensor, key)


def allreduce_packets(comm, compressor: Compressor, tensor: torch.Tensor, key=None) -> torch.Tensor:
    """The protocol of a one-round compressor: summed fields, or gathered packets."""
    packet = compressor.compress(tensor, key)
    if compressor.summable:
        for field in packet.fields:
            comm.allreduce(field)
        return compressor.decompress(packet)
    packets = allgather_packets(comm, packet, compressor.variable_size)
    total = compressor.decompress(packets[0]).clone()
    for other in packets[1:]:
        total += compressor.decompress(other)
    return total


def allgather_packets(comm, packet: Packet, variable_size: bool) -> list[Packet]:
    """Every rank's packet, in rank order."""
    wire = packet.to_wire()
    if variable_size:
        sizes = [int(size) for size in comm.allgather(torch.tensor([wire.numel()]))]
        wire = torch.cat([wire, wire.new_zeros(max(sizes) - wire.numel())])
    else:
        sizes = [wire.numel()] * comm.size
    return [Packet.from_wire(buffer[:size]) for buffer, size in zip(comm.allgather(wire), sizes)]


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

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def stats(self):
        return self.comm.stats

    def over(self, comm) -> "CompressedCommunicator":
        """The same compressor (and its error feedback) over another communicator."""
        return CompressedCommunicator(comm, self.compressor)

    def allreduce(self, tensor: torch.Tensor, key=None) -> torch.Tensor:
        total = self.compressor.allreduce(self.comm, tensor, key)
        if total is not tensor:
            tensor.copy_(total)
        return tensor

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

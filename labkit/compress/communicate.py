"""Moving packets between ranks: the Communicator role of GRACE.

Any compressor works over any communicator (``labkit.comm``: gloo, NCCL, MPI, or one
process), through three paths for a sum across ranks:

- summable packets (none, fp16, bf16) are allreduced field by field as they are: the
  ring allreduce of the NTHU slides, on 2 or 4 bytes per value;
- PowerSGD's factors are summable too, in two rounds (P, then Q);
- every other packet goes to every rank by allgather of its wire bytes, and each rank
  decompresses all of them and adds them up, in rank order, so that every rank gets the
  very same sum. Packets whose size depends on the values (threshold) are padded to the
  largest, after an allgather of the sizes.

For the parameter-server modes, ``send_compressed`` / ``recv_compressed`` send one
packet point to point: its size first, then its bytes. The communicator's
``stats.bytes_sent`` counts exactly those bytes.
"""

from __future__ import annotations

import torch

from .base import Compressor, Packet
from .powersgd import PowerSGDCompressor


def allreduce_compressed(comm, compressor: Compressor, tensor: torch.Tensor, key=None) -> torch.Tensor:
    """The sum over all ranks of each rank's decompressed ``tensor`` (a new tensor)."""
    if isinstance(compressor, PowerSGDCompressor):
        return _allreduce_powersgd(comm, compressor, tensor, key)
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


def _allreduce_powersgd(comm, compressor: PowerSGDCompressor, tensor, key):
    """Algorithm 1 of the PowerSGD paper with error feedback: two allreduce rounds."""
    memory = compressor.memory
    compensated = tensor if memory is None else memory.compensate(tensor, key)
    if tensor.dim() < 2:
        return comm.allreduce(compensated.clone())
    matrix = compressor.as_matrix(compensated)
    p = compressor.first_factor(matrix, key)
    comm.allreduce(p)  # round 1: P = (sum of M_i) Q, the same on every rank
    q = compressor.second_factor(matrix, p, key)  # this rank's Q_i = M_i^T P
    packet = Packet(tensor.shape, tensor.dtype, [p, q])
    if memory is not None:
        memory.update(compensated, compressor.decompress(packet), key)
    comm.allreduce(q)  # round 2: sum of Q_i, in place, so it is also every rank's warm start
    return compressor.decompress(packet)


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

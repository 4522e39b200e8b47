"""No compression: the baseline every other compressor is measured against."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, register_compressor


@register_compressor("none", help="no compression: the tensor as it is (the baseline)",
                     params={}, summable=True, unbiased=True)
class NoCompression(Compressor):
    """Send the tensor unchanged: 4 bytes per float32 value.

    The baseline of every comparison: plain synchronous data-parallel SGD, as in Goyal
    et al., *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour* (2017), cited in
    Chuangsuwanich's *Deep Learning and Hardware*, and on the NTHU slides ("Distributed &
    Parallel Computing for Deep Learning", chap. 12). Error feedback has nothing to
    keep: the residual stays zero. Point to point and broadcast, the tensor goes as it is
    (no header); a sum is the allreduce of the one field, which is the tensor.
    """

    def send(self, comm, tensor, dst, key=None, tag=0):
        comm.send(tensor, dst, tag)

    def recv(self, comm, like, src=None, tag=0):
        out = torch.empty_like(like)
        return out, comm.recv(out, src, tag)

    def broadcast(self, comm, tensor, src=0, key=None):
        return comm.broadcast(tensor, src)

    def encode(self, tensor, key):
        return Packet(tensor.shape, tensor.dtype, [tensor.reshape(-1).clone()])

    def decompress(self, packet):
        (values,) = packet.fields
        return values.view(packet.shape)

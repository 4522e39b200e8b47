"""No compression: the baseline every other compressor is measured against."""

from __future__ import annotations

from .base import Compressor, Packet, register_compressor


@register_compressor("none", help="no compression: the tensor as it is (the baseline)",
                     params={}, summable=True, unbiased=True)
class NoCompression(Compressor):
    """Send the tensor unchanged: 4 bytes per float32 value.

    The baseline of every comparison: plain synchronous data-parallel SGD, as in Goyal
    et al., *Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour* (2017), cited in
    Chuangsuwanich's *Deep Learning and Hardware*, and on the NTHU slides ("Distributed &
    Parallel Computing for Deep Learning", chap. 12). Error feedback has nothing to
    keep: the residual stays zero.
    """

    def encode(self, tensor, key):
        return Packet(tensor.shape, tensor.dtype, [tensor.reshape(-1).clone()])

    def decompress(self, packet):
        (values,) = packet.fields
        return values.view(packet.shape)

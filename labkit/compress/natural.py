"""Natural compression: every value rounded at random to a power of two, unbiased."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, pack_bits, register_compressor, unpack_bits


@register_compressor("natural", help="natural compression: sign and power-of-two exponent, 9 bits per value (unbiased)",
                     params={}, summable=False, unbiased=True)
class NaturalCompressor(Compressor):
    """Natural compression (Horváth et al., *Natural Compression for Distributed Deep
    Learning*, 2019): stochastic rounding ("the main trick", Hoefler's keynote slide
    "Communication optimizations") to the two nearest powers of two.

    For 2**e <= |x| < 2**(e+1), |x| becomes 2**(e+1) with probability |x| / 2**e - 1 and
    2**e otherwise, so E = |x|. In float32 bits this is the mantissa m (23 bits): the
    exponent goes up by one with probability m / 2**23 and the mantissa is dropped.
    Denormals round to 0 or 2**-126 the same way; zero stays zero.

    On the wire: the 8-bit biased exponent of float32 per value (0 means zero) and the
    sign bits, eight to a byte: 9 bits per value.
    """

    def encode(self, tensor, key):
        bits = tensor.reshape(-1).float().view(torch.int32)
        exponent = (bits >> 23) & 0xFF
        mantissa = bits & 0x7FFFFF
        round_up = torch.rand(mantissa.shape, device=mantissa.device) * 2**23 < mantissa
        exponent = (exponent + round_up).to(torch.uint8)
        return Packet(tensor.shape, tensor.dtype, [exponent, pack_bits(bits < 0, 1)])

    def decompress(self, packet):
        exponent, signs = packet.fields
        negative = unpack_bits(signs, 1, packet.shape.numel()).to(torch.int32)
        bits = (negative << 31) | (exponent.to(torch.int32) << 23)
        return bits.view(torch.float32).to(packet.dtype).view(packet.shape)

"""8-bit quantization: 255 evenly spaced levels between -max|x| and +max|x|."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, register_compressor


@register_compressor("8bit", help="uniform 8-bit integers with one float32 scale per tensor: 1 byte per value",
                     params={}, summable=False, unbiased=False)
class EightBitCompressor(Compressor):
    """Uniform 8-bit quantization with a per-tensor scale, the fixed-point arithmetic of
    Chuangsuwanich's *Deep Learning and Hardware* ("quantization from floating point to
    fixed-point") applied to gradients, as in Dettmers, *8-Bit Approximations for
    Parallelism in Deep Learning* (ICLR 2016), who uses a non-uniform 8-bit code.

    With scale = max |x| / 127, x_i is sent as round(x_i / scale), an int8 in [-127, 127],
    and comes back as that integer times the scale: every value is off by at most
    scale / 2. Rounding to nearest is biased; error feedback carries the rounding error
    to the next step.

    On the wire: the scale (float32), then one int8 per value.
    """

    def encode(self, tensor, key):
        flat = tensor.reshape(-1).float()
        scale = flat.abs().max() / 127
        quantized = flat.div(scale.clamp_min(torch.finfo(torch.float32).tiny)).round_().to(torch.int8)
        return Packet(tensor.shape, tensor.dtype, [scale.reshape(1), quantized])

    def decompress(self, packet):
        scale, quantized = packet.fields
        return quantized.float().mul_(scale).to(packet.dtype).view(packet.shape)

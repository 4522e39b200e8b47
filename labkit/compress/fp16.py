"""Half precision: every value as an IEEE 754 binary16 float, 2 bytes instead of 4."""

from __future__ import annotations

import torch

from .base import Compressor, Packet, register_compressor


@register_compressor("fp16", help="half-precision floats (IEEE binary16): 2 bytes per value",
                     params={}, summable=True, unbiased=False)
class FP16Compressor(Compressor):
    """Cast to float16 before sending, back to the original dtype after.

    Mixed precision (Micikevicius et al., *Mixed Precision Training*, ICLR 2018), on the
    NTHU slides' "GPU / TensorCore / mixed precision" and Hoefler's keynote ("low
    precision (half, quarter) to become standard"). PyTorch's DDP ships the same idea
    as its ``fp16_compress_hook``. Half-precision packets add up directly, so an
    allreduce sums them without decompressing. Values beyond 65504 overflow to inf.
    """

    wire_dtype = torch.float16

    def encode(self, tensor, key):
        return Packet(tensor.shape, tensor.dtype, [tensor.reshape(-1).to(self.wire_dtype, copy=True)])

    def decompress(self, packet):
        (values,) = packet.fields
        return values.to(packet.dtype).view(packet.shape)

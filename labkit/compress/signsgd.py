"""signSGD: send only the sign of each value, one bit."""

from __future__ import annotations

from .base import Compressor, Packet, pack_bits, register_compressor, unpack_bits


@register_compressor("signsgd", help="signSGD: only the sign of each value (+1 or -1), one bit each",
                     params={}, summable=False, unbiased=False)
class SignSGDCompressor(Compressor):
    """signSGD (Bernstein et al., *signSGD: Compressed Optimisation for Non-Convex
    Problems*, ICML 2018): the 1-bit idea of the "1-Bit SGD" slides (NTHU chapter,
    Hoefler's keynote) taken to its end, without any magnitude.

    Each value becomes +1 (x >= 0) or -1; the learning rate sets the step length. The
    sum over ranks that ``allreduce_compressed`` returns is the vote of the paper's
    majority-vote variant (its sign is the majority). The paper runs without error
    feedback (pass ``error_feedback=False``); with it, the signs carry the magnitudes
    over time as a sigma-delta modulator does. ``efsignsgd`` is the scaled variant made
    for error feedback.

    On the wire: one bit per value, eight to a byte.
    """

    def encode(self, tensor, key):
        return Packet(tensor.shape, tensor.dtype, [pack_bits(tensor.reshape(-1) >= 0, 1)])

    def decompress(self, packet):
        (bits,) = packet.fields
        signs = unpack_bits(bits, 1, packet.shape.numel()).to(packet.dtype) * 2 - 1
        return signs.view(packet.shape)

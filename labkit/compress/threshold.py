"""Threshold sparsification: send every value whose magnitude reaches a threshold."""

from __future__ import annotations

from .base import SparseCompressor, register_compressor


@register_compressor("threshold", help="threshold: every value with |x| >= `threshold`, with its index "
                                       "(packet size varies)",
                     params={"threshold": 0.01}, summable=False, unbiased=False)
class ThresholdCompressor(SparseCompressor):
    """Threshold sparsification (Strom, *Scalable Distributed DNN Training Using Commodity
    GPU Cloud Computing*, Interspeech 2015): "do not send small weight updates"
    (Hoefler's keynote, slide "Communication optimizations"), and accumulate them
    locally with error feedback until they cross the threshold.

    Strom sends each selected value as +-threshold in one bit with its index; here the
    values go as they are. The number of values sent depends on the gradient, so
    packets of different ranks differ in size.

    On the wire: the indices (the smallest integer type that fits), then the values in
    the tensor's dtype.
    """

    variable_size = True

    def __init__(self, threshold: float, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.check("threshold", threshold, threshold >= 0, "a number >= 0")
        self.threshold = threshold

    def select(self, flat, key):
        return (flat.abs() >= self.threshold).nonzero().squeeze(1)

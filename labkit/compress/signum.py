"""Signum: signSGD on the momentum instead of the gradient."""

from __future__ import annotations

import torch

from .base import register_compressor
from .signsgd import SignSGDCompressor


@register_compressor("signum", help="Signum: the sign of a momentum average of the gradients, one bit each",
                     params={"momentum": 0.9}, summable=False, unbiased=False)
class SignumCompressor(SignSGDCompressor):
    """Signum (Bernstein et al., *signSGD: Compressed Optimisation for Non-Convex
    Problems*, ICML 2018, section 4): keep m = beta * m + (1 - beta) * g for each key and
    send the sign of m. The momentum (SGD with momentum in Hoefler's keynote, "SGD and
    optimizers") smooths the noise that plain signs pass on.

    On the wire: one bit per value, as signSGD; the momentum stays on the sender.
    """

    def __init__(self, momentum: float, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        self.momentum = momentum
        self.averages: dict = {}

    def encode(self, tensor, key):
        average = self.averages.get(key)
        if average is None or average.shape != tensor.shape:
            average = self.averages[key] = torch.zeros_like(tensor)
        average.mul_(self.momentum).add_(tensor, alpha=1 - self.momentum)
        return super().encode(average, key)

"""Deep Gradient Compression: top-k with momentum correction and a sparsity warm-up."""

from __future__ import annotations

from .base import ResidualMemory, SparseCompressor, kept_count, register_compressor
from .topk import largest_magnitudes


class MomentumCorrectedMemory(ResidualMemory):
    """Local accumulation of DGC: the velocity u = momentum * u + g is what accumulates.

    compensate() returns v = residual + u, the paper's accumulated velocity; update()
    keeps what was not sent as the new residual and zeroes the momentum of what was
    sent ("momentum factor masking"), so stale momentum does not push those values
    again.
    """

    def __init__(self, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.velocities: dict = {}

    def compensate(self, tensor, key):
        velocity = self.velocities.get(key)
        if velocity is None or velocity.shape != tensor.shape:
            velocity = self.velocities[key] = tensor.clone()
        else:
            velocity.mul_(self.momentum).add_(tensor)
        return super().compensate(velocity, key)

    def update(self, compensated, sent, key):
        super().update(compensated, sent, key)
        self.velocities[key][sent != 0] = 0


@register_compressor("dgc", help="Deep Gradient Compression: top-k of momentum-corrected accumulated "
                                 "gradients, sparsity ramped up over `warmup_steps`",
                     params={"ratio": 0.001, "momentum": 0.9, "warmup_steps": 50},
                     summable=False, unbiased=False)
class DGCCompressor(SparseCompressor):
    """Deep Gradient Compression (Lin et al., *Deep Gradient Compression: Reducing the
    Communication Bandwidth for Distributed Training*, ICLR 2018): top-k sparsification
    with local accumulation (Hoefler's keynote, "only send top-k, accumulate omitted
    gradients locally"), made to work with momentum SGD:

    - momentum correction: what accumulates is the velocity, not the gradient (the
      memory above), so the sparse update matches what momentum SGD would have done;
      give the optimizer no momentum of its own;
    - warm-up: the kept fraction starts at 25 % and shrinks exponentially to ``ratio``
      over the first ``warmup_steps`` steps of each key (the paper: 75 %, 93.75 %, ...
      99.9 % sparsity over four epochs).

    Without error feedback there is no accumulation and no momentum correction: what is
    left is top-k with a warm-up. The paper's local gradient clipping is left to the
    optimizer.

    On the wire: the indices (the smallest integer type that fits), then the values.
    """

    def __init__(self, ratio: float, momentum: float, warmup_steps: int, error_feedback: bool = True):
        self.check("ratio", ratio, 0 < ratio <= 1, "a fraction in (0, 1]")
        self.check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        self.check("warmup_steps", warmup_steps, warmup_steps >= 0, "a whole number >= 0")
        self.ratio, self.momentum, self.warmup_steps = ratio, momentum, warmup_steps
        self.steps: dict = {}
        super().__init__(error_feedback)

    def make_memory(self):
        return MomentumCorrectedMemory(self.momentum)

    def density(self, step: int) -> float:
        """The fraction of values kept at ``step`` (counted from 0) of the warm-up."""
        if step >= self.warmup_steps or self.ratio >= 0.25:
            return self.ratio
        return 0.25 * (self.ratio / 0.25) ** (step / self.warmup_steps)

    def select(self, flat, key):
        step = self.steps.get(key, 0)
        self.steps[key] = step + 1
        return largest_magnitudes(flat, kept_count(self.density(step), flat.numel()))

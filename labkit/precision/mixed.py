"""Mixed precision: low-precision arithmetic where it is cheap, fp32 where it matters
(TensorCores multiply in fp16/bf16 and accumulate in fp32: "Chap. 12", GPU slides; "how little
precision training needs": Hoefler, SC'19).

- :func:`autocast`: the matmuls and convolutions of a forward pass in bf16 (CPU or GPU) or
  fp16 (GPU only), the weights kept in fp32 ("master weights");
- :class:`LossScaler`: dynamic loss scaling for fp16, whose small gradients would flush to
  zero: multiply the loss by S before backward, divide the gradients by S, skip the step and
  halve S when a gradient is inf or NaN, double S after ``growth_interval`` good steps. The
  same rule as ``torch.amp.GradScaler`` (a test checks the two step for step);
- :func:`train_step`: one step with both, for a ``precision`` of ``fp32``, ``bf16`` or ``fp16``.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device="cpu"):
    """A context in which matmuls and convolutions run in ``precision`` (fp32: no change)."""
    _check_precision(precision)
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision 'fp16' needs a GPU; use 'bf16' on a CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling (Micikevicius et al., *Mixed Precision Training*, ICLR'18)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients and step, unless one is inf/NaN; update the scale. True if stepped."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            for g in grads:
                g.div_(self.scale)
            optimizer.step()
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
        return finite


def train_step(model, optimizer, loss_fn, x, y, precision: str = "fp32",
               scaler: LossScaler | None = None) -> float:
    """One training step: forward under :func:`autocast`, backward (scaled when a scaler is
    given), optimizer step in fp32. Returns the loss."""
    device = next(model.parameters()).device
    optimizer.zero_grad()
    with autocast(precision, device):
        loss = loss_fn(model(x), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale_loss(loss.float()).backward()
        scaler.step(optimizer)
    return float(loss)

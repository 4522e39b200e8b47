"""Training a small MLP in the logarithmic number system: the table of "Deep Learning and
Hardware" (Chuangsuwanich, "Simple feed forward network on MNIST", validation error rate):

    normal DNN 2.14 %, matrix multiply with LNS 2.12 %, LNS everywhere 3.62 %,
    LNS everywhere with Kahan sum 2.29 %

The network is input → hidden (ReLU) → classes with softmax cross-entropy, trained by plain
SGD; forward and backward are written out (three matmuls a layer), so that every arithmetic
step can be put in LNS:

- ``normal``: float32 throughout;
- ``lns_matmul``: every matmul (forward, the two of backward) in LNS (:func:`lns_matmul`),
  everything else float32;
- ``lns_everywhere``: also the weights are LNS numbers, the bias adds and bias-gradient sums
  are LNS adds, and the update w ← w − η·∇w is an LNS multiply and an LNS add: "smaller weight
  updates are getting ignored by the low precision";
- ``lns_everywhere_kahan``: as above, the updates accumulated with Kahan's compensation, itself
  computed in LNS arithmetic ("one addition becomes two additions and two subtractions").

The softmax and the loss stay in float in every mode (the slides do not say; a division of
the exponentials by their sum is an LNS subtraction and would change little).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import lns
from .lns import LNSFormat

MODES = ("normal", "lns_matmul", "lns_everywhere", "lns_everywhere_kahan")
# The seed document's validation error rates (MNIST), as fractions.
DOCUMENT_TABLE = {"normal": 0.0214, "lns_matmul": 0.0212, "lns_everywhere": 0.0362,
                  "lns_everywhere_kahan": 0.0229}


@dataclass
class LNSRun:
    mode: str
    validation_error: float
    epoch_losses: list = field(default_factory=list)
    seconds: float = 0.0


class _Arithmetic:
    """The operations of one mode: matmul, bias add, column sum, weight update."""

    def __init__(self, mode: str, fmt: LNSFormat):
        self.mode, self.fmt = mode, fmt
        self.everywhere = mode.startswith("lns_everywhere")
        self.kahan = mode == "lns_everywhere_kahan"

    def matmul(self, a, b):
        if self.mode == "normal":
            return a @ b
        return lns.lns_matmul(a, b, self.fmt)

    def add_bias(self, z, bias):
        if not self.everywhere:
            return z + bias
        return lns.decode(lns.add(lns.encode(z, self.fmt), lns.encode(bias.expand_as(z), self.fmt)), torch.float32)

    def column_sum(self, g):
        if not self.everywhere:
            return g.sum(0)
        return lns.decode(lns._pairwise_sum(lns.encode(g, self.fmt), dim=0), torch.float32)

    def start(self, weight: torch.Tensor):
        """The stored form of a weight: a float tensor, or LNS (with a Kahan compensation)."""
        if not self.everywhere:
            return weight
        stored = lns.encode(weight, self.fmt)
        compensation = lns.encode(torch.zeros_like(weight), self.fmt) if self.kahan else None
        return [stored, compensation]

    def value(self, stored) -> torch.Tensor:
        return stored if not self.everywhere else lns.decode(stored[0], torch.float32)

    def update(self, stored, grad: torch.Tensor, lr: float):
        """w ← w − lr·grad, in the mode's arithmetic."""
        if not self.everywhere:
            return stored - lr * grad
        w, compensation = stored
        step = lns.mul(lns.encode(torch.full_like(grad, -lr), self.fmt), lns.encode(grad, self.fmt))
        if not self.kahan:
            return [lns.add(w, step), None]
        y = lns.add(step, lns.negate(compensation))  # y = x − c
        t = lns.add(w, y)  # t = s + y
        compensation = lns.add(lns.add(t, lns.negate(w)), lns.negate(y))  # c = (t − s) − y
        return [t, compensation]


def train_mlp(data, mode: str, fmt: LNSFormat = LNSFormat(frac_bits=8), hidden: int = 32,
              epochs: int = 8, batch_size: int = 64, lr: float = 0.1, final_lr: float | None = None,
              seed: int = 0) -> LNSRun:
    """Train the MLP on ``data`` (a labkit Dataset) in ``mode``; the validation error on its test set.

    The learning rate goes linearly from ``lr`` to ``final_lr`` (default: constant) over the
    epochs: the late, small updates are the ones low precision loses.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    for name, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    final_lr = lr if final_lr is None else final_lr
    if not 0 < final_lr <= lr:
        raise ValueError(f"final_lr must be in (0, lr], got {final_lr!r}")
    start_time = time.perf_counter()
    x_train = data.x_train.reshape(len(data.y_train), -1)
    x_test = data.x_test.reshape(len(data.y_test), -1)
    generator = torch.Generator().manual_seed(seed)
    n_in, n_out = x_train.shape[1], data.num_classes
    bound1, bound2 = (6 / (n_in + hidden)) ** 0.5, (6 / (hidden + n_out)) ** 0.5  # Xavier
    init = [(torch.rand(n_in, hidden, generator=generator) * 2 - 1) * bound1, torch.zeros(hidden),
            (torch.rand(hidden, n_out, generator=generator) * 2 - 1) * bound2, torch.zeros(n_out)]
    ops = _Arithmetic(mode, fmt)
    params = [ops.start(p) for p in init]

    def forward(x):
        w1, b1, w2, b2 = (ops.value(p) for p in params)
        h = torch.relu(ops.add_bias(ops.matmul(x, w1), b1))
        return h, ops.add_bias(ops.matmul(h, w2), b2)

    run = LNSRun(mode, 1.0)
    for epoch in range(epochs):
        epoch_lr = lr + (final_lr - lr) * epoch / max(1, epochs - 1)
        order = torch.randperm(len(data.y_train), generator=generator)
        total, batches = 0.0, 0
        for idx in order.split(batch_size):
            x, y = x_train[idx], data.y_train[idx]
            h, logits = forward(x)
            probs = torch.softmax(logits, dim=1)
            total += float(torch.nn.functional.cross_entropy(logits, y))
            batches += 1
            d_logits = (probs - torch.nn.functional.one_hot(y, n_out).float()) / len(y)
            w2 = ops.value(params[2])
            grads = [None, None, ops.matmul(h.T.contiguous(), d_logits), ops.column_sum(d_logits)]
            d_hidden = ops.matmul(d_logits, w2.T.contiguous()) * (h > 0)
            grads[0] = ops.matmul(x.T.contiguous(), d_hidden)
            grads[1] = ops.column_sum(d_hidden)
            params = [ops.update(p, g, epoch_lr) for p, g in zip(params, grads)]
        run.epoch_losses.append(total / batches)
    with torch.no_grad():
        _, logits = forward(x_test)
    run.validation_error = float((logits.argmax(1) != data.y_test).float().mean())
    run.seconds = time.perf_counter() - start_time
    return run


def lns_table(data, fmt: LNSFormat = LNSFormat(frac_bits=8), **settings) -> dict[str, LNSRun]:
    """The four rows of the table, each trained from the same initial weights and batches."""
    return {mode: train_mlp(data, mode, fmt, **settings) for mode in MODES}

"""Memory of training one rank: the layer storage formula and microbatching.

**Layer storage** (Hoefler, SC'19, "Stochastic Gradient Descent"): training layer l keeps

    |w_l| + |f_l(o_{l-1})| + |∇w_l| + |∇o_l|

its weights, its output (kept for the backward pass), the weights' gradient and the gradient
with respect to its output. :func:`layer_storage` computes the formula from the layers' shapes;
:func:`measured_layer_storage` runs a real forward and backward and adds up the bytes of the
tensors that are really there; a test checks that the two agree.

**Microbatching** (µ-cuDNN: Oyama, Ben-Nun, Hoefler, Matsuoka, Cluster 2018): a convolution's
speed depends on the algorithm and on how much workspace (temporary memory) it may use; the
workspace grows with the batch. Splitting the mini-batch into micro-batches bounds the
workspace, and the results (outputs, and gradients accumulated over the micro-batches) are
the same. :func:`plan_microbatches` measures, for each layer, every (algorithm, micro-batch
size) on this machine and picks the fastest whose workspace fits a budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .conv import ALGORITHMS, check_arguments, conv2d


@dataclass
class LayerStorage:
    layer: str
    weights: int  # bytes of |w_l|
    output: int  # |f_l(o_{l-1})|
    weight_grads: int  # |∇w_l|
    output_grads: int  # |∇o_l|

    @property
    def total(self) -> int:
        return self.weights + self.output + self.weight_grads + self.output_grads


def _leaf_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def _check_batch(input_shape, batch_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not all(isinstance(v, int) and v > 0 for v in input_shape):
        raise ValueError(f"input_shape must be positive integers (C, H, W), got {input_shape!r}")


def layer_storage(model: nn.Module, input_shape, batch_size: int, dtype=torch.float32) -> list[LayerStorage]:
    """The formula, layer by layer, from the layers' shapes (found on the meta device: no memory)."""
    _check_batch(input_shape, batch_size)
    item = torch.empty((), dtype=dtype).element_size()
    shapes = {}
    meta = _copy_to_meta(model)
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, out.shape))
             for name, m in _leaf_layers(meta)]
    try:
        meta(torch.empty(batch_size, *input_shape, device="meta", dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in _leaf_layers(model):
        weights = sum(p.numel() for p in m.parameters()) * item
        outputs = _numel(shapes[name]) * item
        rows.append(LayerStorage(name, weights, outputs, weights, outputs))
    return rows


def _copy_to_meta(model):
    import copy

    return copy.deepcopy(model).to("meta")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def measured_layer_storage(model: nn.Module, input_shape, batch_size: int, dtype=torch.float32,
                           seed: int = 0) -> list[LayerStorage]:
    """The same four terms, as the bytes of the real tensors of one forward and backward pass."""
    _check_batch(input_shape, batch_size)
    model = model.to(dtype)
    outputs, output_grads = {}, {}
    hooks = []
    for name, m in _leaf_layers(model):
        hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out)))
        hooks.append(m.register_full_backward_hook(
            lambda mod, gin, gout, name=name: output_grads.__setitem__(name, gout[0])))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=generator, dtype=dtype, requires_grad=True)
    model.zero_grad(set_to_none=True)
    try:
        model(x).square().mean().backward()
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in _leaf_layers(model):
        weights = sum(p.nbytes for p in m.parameters())
        grads = sum(p.grad.nbytes for p in m.parameters() if p.grad is not None)
        rows.append(LayerStorage(name, weights, outputs[name].nbytes, grads, output_grads[name].nbytes))
    return rows


# --- microbatching ------------------------------------------------------------------------------

def microbatch_gradients(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, micro_batch: int):
    """Gradients of the mean loss over (x, y), computed micro-batch by micro-batch and accumulated
    (each weighted by its share of the batch). Leaves them in ``p.grad``; returns the loss."""
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    model.zero_grad(set_to_none=True)
    total = 0.0
    for xs, ys in zip(x.split(micro_batch), y.split(micro_batch)):
        loss = loss_fn(model(xs), ys) * (len(xs) / len(x))
        loss.backward()
        total += loss.item()
    return total


def conv2d_microbatched(x, weight, stride=1, padding=0, algorithm="direct", micro_batch=None,
                        stats: dict | None = None, **kwargs):
    """:func:`labkit.conv.conv2d` over micro-batches of ``micro_batch`` samples; ``stats`` gets the
    workspace of one micro-batch (buffers are freed between them) and the multiplications."""
    micro_batch = micro_batch or x.shape[0]
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    parts, workspace, multiplications = [], 0, 0
    for chunk in x.split(micro_batch):
        record = {}
        parts.append(conv2d(chunk, weight, stride, padding, algorithm, stats=record, **kwargs))
        workspace = max(workspace, record["workspace_bytes"])
        multiplications += record["multiplications"]
    if stats is not None:
        stats.update(workspace_bytes=workspace, multiplications=multiplications)
    return torch.cat(parts)


@dataclass
class ConvLayer:
    name: str
    x_shape: tuple  # (N, C_in, H, W)
    w_shape: tuple  # (C_out, C_in, K, K)
    stride: int = 1
    padding: int = 0


@dataclass
class Choice:
    layer: str
    algorithm: str
    micro_batch: int
    workspace_bytes: int
    seconds: float


def measure_choices(layer: ConvLayer, algorithms=ALGORITHMS, micro_batches=None, repeats: int = 3,
                    dtype=torch.float32, seed: int = 0) -> list[Choice]:
    """Time (median of ``repeats``) and workspace of every (algorithm, micro-batch size) for the layer."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    n = layer.x_shape[0]
    micro_batches = micro_batches or sorted({n >> i for i in range(n.bit_length()) if n >> i >= 1})
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*layer.x_shape, generator=generator, dtype=dtype)
    w = torch.randn(*layer.w_shape, generator=generator, dtype=dtype)
    out = []
    for algorithm in algorithms:
        try:
            check_arguments(layer.x_shape, layer.w_shape, layer.stride, layer.padding, algorithm)
        except ValueError:
            continue  # e.g. Winograd on a 5x5 kernel: not a choice for this layer
        for b in micro_batches:
            stats, times = {}, []
            conv2d_microbatched(x, w, layer.stride, layer.padding, algorithm, b, stats=stats)
            for _ in range(repeats):
                start = time.perf_counter()
                conv2d_microbatched(x, w, layer.stride, layer.padding, algorithm, b)
                times.append(time.perf_counter() - start)
            out.append(Choice(layer.name, algorithm, b, stats["workspace_bytes"], sorted(times)[len(times) // 2]))
    return out


def plan_microbatches(choices: list[Choice], workspace_limit: int) -> dict[str, Choice]:
    """Per layer, the fastest measured choice whose workspace fits ``workspace_limit`` bytes."""
    if not isinstance(workspace_limit, int) or workspace_limit < 0:
        raise ValueError(f"workspace_limit must be an integer number of bytes >= 0, got {workspace_limit!r}")
    plan = {}
    for choice in choices:
        if choice.workspace_bytes <= workspace_limit:
            best = plan.get(choice.layer)
            if best is None or choice.seconds < best.seconds:
                plan[choice.layer] = choice
    return plan

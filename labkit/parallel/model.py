"""Model (layer) parallelism: the network split by layers over the ranks.

"Model parallelism partitions the neural network into P pieces whereas data parallelism
replicates the neural network itself in each processor" (Scaling Deep Learning on GPU and
Knights Landing Clusters, fig. 4; "Model Parallelism" in Distributed & Parallel Computing
for Deep Learning, chap. 12). Rank s holds stage s, a run of consecutive layers; the
activations go forward with send/recv and their gradients come back the same way. With
one mini-batch at a time only one rank computes while the others wait: that idle time is
what pipelining (``pipeline.py``) cuts down.

Every rank builds the whole model from the same seed and keeps its stage, so the split
network starts from exactly the weights of the single-process one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..models import flops_per_sample
from .timeline import Timeline

# models whose forward is their parts applied one after the other
_SEQUENTIAL_PARTS = {"LeNet": ("features", "classifier"), "ResNet": ("stem", "blocks", "head")}


def name_parameters(model: nn.Module) -> nn.Module:
    """Tag every parameter with its name in the whole model (``p.full_name``), so that a
    piece of it on some rank can still say which weight it is."""
    for name, p in model.named_parameters():
        p.full_name = name
    for name, b in model.named_buffers():  # batch-norm statistics travel with the weights
        b.full_name = name
    return model


def as_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a flat list of modules applied one after the other."""
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in as_layers(child)]
    parts = _SEQUENTIAL_PARTS.get(type(model).__name__)
    if parts:
        return [leaf for part in parts for leaf in as_layers(getattr(model, part))]
    return [model]


def layer_units(model: nn.Module) -> list[list[nn.Module]]:
    """The layers a split may cut between: each module with weights, with the modules
    without weights that follow it (ReLU, pooling); leading ones join the first."""
    units: list[list[nn.Module]] = []
    pending: list[nn.Module] = []
    for module in as_layers(model):
        if any(True for _ in module.parameters()):
            units.append(pending + [module])
            pending = []
        elif units:
            units[-1].append(module)
        else:
            pending.append(module)
    if pending:
        raise ValueError(f"{type(model).__name__} has no layer with weights to split")
    return units


def count_layers(model: nn.Module) -> int:
    return len(layer_units(model))


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Cut points of a contiguous split of ``costs`` into ``parts`` runs that minimizes the
    largest run (linear partition, by dynamic programming). Returns the start of each part."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def split_stages(model: nn.Module, stages: int, input_shape) -> list[nn.Sequential]:
    """``model`` cut into ``stages`` runs of consecutive layers, balanced by forward FLOPs.

    Raises ValueError naming the number of layers when there are fewer layers than stages.
    """
    units = layer_units(model)
    if stages > len(units):
        raise ValueError(f"{stages} pipeline stages but {type(model).__name__} has only {len(units)} layers")
    costs, shape = [], tuple(input_shape)
    with torch.no_grad():
        for unit in units:
            block = nn.Sequential(*unit)
            costs.append(flops_per_sample(block, shape) + 1)
            shape = tuple(block(torch.zeros(1, *shape)).shape[1:])
    starts = balanced_split(costs, stages) + [len(units)]
    return [nn.Sequential(*[m for unit in units[a:b] for m in unit]) for a, b in zip(starts, starts[1:])]


def boundary_shapes(stages: list[nn.Module], input_shape) -> list[tuple]:
    """Per-sample shape of the input of every stage (and of the output of the last)."""
    shapes, shape = [tuple(input_shape)], tuple(input_shape)
    with torch.no_grad():
        for stage in stages:
            was = stage.training
            stage.eval()
            shape = tuple(stage(torch.zeros(1, *shape)).shape[1:])
            stage.train(was)
            shapes.append(shape)
    return shapes


def stage_loss(output: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """Cross-entropy summed over a (micro-)batch and divided by the whole batch: the
    gradients of the micro-batches add up to those of the mean over the batch."""
    return F.cross_entropy(output, y, reduction="sum") / batch


class ModelParallel:
    """Layer parallelism, one mini-batch at a time (no pipelining).

    Rank s holds stage s. ``forward_backward(x, y)`` takes the whole mini-batch on every
    rank (rank 0 reads x, the last rank reads y), leaves the gradients of the stage in
    ``.grad`` and returns the mean loss (broadcast from the last rank).
    """

    def __init__(self, model: nn.Module, comm, input_shape):
        self.comm = comm
        self.stage_index, self.stages = comm.rank, comm.size
        name_parameters(model)
        stages = split_stages(model, self.stages, input_shape)
        self.shapes = boundary_shapes(stages, input_shape)
        self.module = stages[self.stage_index]
        self.timeline = Timeline()
        self.last_correct = 0  # correctly classified samples of the last batch

    def parameters(self):
        return self.module.parameters()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        s, last, batch = self.stage_index, self.stages - 1, len(x)
        record = self.timeline.record
        self.timeline.start()
        if s > 0:  # the activation of the previous stage
            x = torch.empty(batch, *self.shapes[s], dtype=x.dtype)
            with record("recv", 0):
                self.comm.recv(x, s - 1)
            x.requires_grad_(True)
        with record("forward", 0):
            out = self.module(x)
            loss = stage_loss(out, y, batch) if s == last else None
        correct = int((out.argmax(1) == y).sum()) if s == last else 0
        if s < last:
            with record("send", 0):
                self.comm.send(out.detach(), s + 1)
            grad = torch.empty_like(out)
            with record("recv", 0):
                self.comm.recv(grad, s + 1)  # the gradient of our output
            with record("backward", 0):
                out.backward(grad)
        else:
            with record("backward", 0):
                loss.backward()
        if s > 0:
            with record("send", 0):
                self.comm.send(x.grad, s - 1)
        value = torch.tensor([0.0 if loss is None else float(loss.detach()), correct], dtype=torch.float64)
        self.comm.broadcast(value, last)
        self.timeline.stop()
        self.last_correct = int(value[1])
        return float(value[0])

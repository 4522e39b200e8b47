"""One object for every parallelism: ``ParallelModel(kind, model, comm, ...)``.

It lays the ranks on a grid (``grid.py``), keeps this rank's piece of the model (the
whole model, a pipeline stage, a tensor slice, or a slice of a stage) and averages the
gradients over the data group in the chosen way (naive, flat or bucketed). Each rank
calls ``forward_backward(x, y)`` with the whole global batch; it takes the rows of its
data replica. After it the gradients of the rank's piece, in ``.grad``, are those of the
mean loss over the global batch, exactly as one process would compute them on the whole
model, and ``optimizer.step()`` on ``parameters()`` takes the same step. A ``compressor``
(``labkit.compress``) compresses what goes over the data group, whichever way it is averaged.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from .data_bucketed import DataParallelBucketed
from .data_naive import DataParallelFlat, DataParallelNaive
from .grid import ProcessGrid, grid_shape
from .model import ModelParallel, count_layers, name_parameters
from .pipeline import PipelineParallel, bubble_fraction_model
from .tensor import TensorParallel, tensor_parallel

KINDS = ("data", "model", "pipeline", "tensor", "hybrid")
DATA_PARALLEL = {"naive": DataParallelNaive, "flat": DataParallelFlat, "bucketed": DataParallelBucketed}
SCHEDULE_NAMES = ("gpipe", "1f1b")


class _Whole:
    """The whole model on one rank (the inner piece of plain data parallelism)."""

    def __init__(self, module):
        self.module = module

    def forward_backward(self, x, y):
        loss = nn.functional.cross_entropy(self.module(x), y)
        loss.backward()
        return float(loss.detach())


class ParallelModel:
    def __init__(self, kind: str, model: nn.Module, comm, input_shape, *, data_parallel: str = "flat",
                 microbatches: int = 1, schedule: str = "1f1b", pipeline_stages: int = 0,
                 tensor_parallel_size: int = 0, bucket_mb: float = 25.0, compressor=None):
        if kind not in KINDS:
            raise ValueError(f"--parallelism {kind!r}: choose one of {', '.join(KINDS)}")
        if data_parallel not in DATA_PARALLEL:
            raise ValueError(f"--data-parallel {data_parallel!r}: choose one of {', '.join(DATA_PARALLEL)}")
        self.kind = kind
        self.shape = grid_shape(comm.size, kind, pipeline_stages, tensor_parallel_size, layers=count_layers(model))
        self.grid = ProcessGrid(comm, self.shape)
        name_parameters(model)
        self.microbatches = 1 if kind == "model" else microbatches
        self.schedule = schedule
        if kind == "model" and self.shape.tensor == 1:  # the plain lesson: one mini-batch at a time
            self.inner = ModelParallel(model, self.grid.pipeline_comm, input_shape)
        elif self.shape.pipeline > 1:
            transform = None
            if self.shape.tensor > 1:
                def transform(stage):
                    return tensor_parallel(stage, self.grid.tensor_comm)
            self.inner = PipelineParallel(model, self.grid.pipeline_comm, input_shape, self.microbatches,
                                          schedule if kind != "model" else "gpipe", transform=transform)
        elif self.shape.tensor > 1:
            self.inner = TensorParallel(model, self.grid.tensor_comm)
        else:
            self.inner = _Whole(model)
        self.module = self.inner.module
        if data_parallel == "bucketed" and self.shape.pipeline > 1:
            raise ValueError("--data-parallel bucketed: gradients of several micro-batches add up in the same "
                             "buckets; use flat or naive with a pipeline")
        self.data_parallel = data_parallel
        factory = DATA_PARALLEL[data_parallel]
        extra = {"bucket_mb": bucket_mb} if data_parallel == "bucketed" else {}
        self.sync = factory(self.module, self.grid.data_comm, compressor=compressor, **extra)

    def parameters(self):
        return self.module.parameters()

    def replica_rows(self, batch: int) -> slice:
        """The rows of a global batch this rank's data replica takes."""
        d, n = self.grid.data_index, self.shape.data
        if batch % n:
            raise ValueError(f"--batch-size {batch} is not divisible by the {n} data-parallel replicas")
        return slice(d * batch // n, (d + 1) * batch // n)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One forward and backward pass on the global batch ``x, y``: returns the mean loss
        of this rank's replica; the gradients are averaged over the data group."""
        rows = self.replica_rows(len(x))
        return self.forward_backward_replica(x[rows], y[rows])

    def forward_backward_replica(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The same on this replica's share of the batch (every rank of the replica gives the same)."""
        if isinstance(self.inner, _Whole):
            loss = self.sync.forward_backward(x, y)
            self.last_correct = self.sync.last_correct
            return loss
        loss = self.inner.forward_backward(x, y)
        self.last_correct = self.inner.last_correct
        self.sync.sync_gradients()
        return loss

    def global_totals(self, replica_loss: float, correct: int) -> tuple[float, int]:
        """(mean loss, correct samples) over the data replicas (one small allreduce)."""
        value = torch.tensor([replica_loss, correct], dtype=torch.float64)
        self.grid.data_comm.allreduce(value)
        return float(value[0]) / self.shape.data, int(value[1])

    def bytes_sent(self) -> int:
        """Bytes this rank has sent over its data, pipeline and tensor groups."""
        seen, total = set(), 0
        for c in (self.grid.data_comm, self.grid.pipeline_comm, self.grid.tensor_comm):
            if id(c) not in seen:
                seen.add(id(c))
                total += c.stats.bytes_sent
        return total

    def full_state(self) -> dict:
        """The whole model's weights, put together from every rank's piece (call on every rank)."""
        return gather_full_state(self.grid.comm, self.module)

    def global_loss(self, replica_loss: float) -> float:
        """The mean over the data replicas (one small allreduce)."""
        value = torch.tensor([replica_loss], dtype=torch.float64)
        self.grid.data_comm.allreduce(value)
        return float(value) / self.shape.data

    def local_gradients(self) -> dict:
        """full parameter name -> (gradient, shard): shard is None for a whole tensor, else
        (dim, index, count) of this rank's slice."""
        return {p.full_name: (p.grad.detach().clone(), getattr(p, "shard", None)) for p in self.module.parameters()}

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def pipeline_stats(self) -> dict:
        """This rank's measured idle share, the formula's, the stash peak (pipelines only)."""
        inner = self.inner
        if not isinstance(inner, (PipelineParallel, ModelParallel)):
            return {}
        return {"bubble_fraction": inner.timeline.idle_fraction(),
                "bubble_fraction_model": bubble_fraction_model(self.shape.pipeline, self.microbatches),
                "stashed_peak": getattr(inner, "stashed_peak", 1),
                "stashed_bytes_peak": getattr(inner, "stashed_bytes_peak", None),
                "events": [e.as_dict() for e in inner.timeline.events], "span": inner.timeline.span}


def gather_full_state(comm, module: nn.Module) -> dict:
    """Every rank's parameters (by ``full_name``, with their shard) gathered to every rank and
    put together into the whole model's state (``reference.assemble``). The pieces travel as
    ``torch.save`` bytes and are read back with ``weights_only=True`` (tensors only)."""
    from .reference import assemble

    pieces = {"params": {p.full_name: (p.detach().cpu().clone(), getattr(p, "shard", None))
                         for p in module.parameters()},
              # batch-norm statistics differ between data replicas: the first rank's are kept
              "buffers": {b.full_name: b.detach().cpu().clone() for b in module.buffers() if hasattr(b, "full_name")}}
    buffer = io.BytesIO()
    torch.save(pieces, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    sizes = comm.allgather(torch.tensor([data.numel()], dtype=torch.int64))
    longest = int(max(int(n) for n in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    gathered = comm.allgather(padded)
    states = [torch.load(io.BytesIO(g[:int(n)].numpy().tobytes()), weights_only=True)
              for g, n in zip(gathered, sizes)]
    full = assemble([state["params"] for state in states])
    for state in reversed(states):
        full.update(state["buffers"])
    return full

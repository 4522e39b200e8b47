"""Hybrid parallelism: the ranks laid out on a data × pipeline × tensor grid.

"Data + model parallelism: most commonly used solution in practice" (Distributed &
Parallel Computing for Deep Learning, chap. 12); "enables arbitrary combinations of data,
model, and pipeline parallelism – very powerful!" (Ben-Nun & Hoefler, after Krizhevsky's
"One weird trick for parallelizing convolutional neural networks").

Rank r sits at (d, p, t) with r = (d·P + p)·T + t: the tensor index varies fastest, so
the ranks of a tensor group (which talk at every layer) are neighbours, as on the GPUs of
one node. Each rank belongs to three groups, each a communicator of its own:

- its **tensor group** (same d and p): the T ranks that split the same layers;
- its **pipeline group** (same d and t): the P stages one micro-batch flows through;
- its **data group** (same p and t): the D replicas of the same piece of the model,
  which average their gradients (the sync mode and compressor act on this group).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..comm.base import SingleProcessCommunicator


@dataclass(frozen=True)
class GridShape:
    data: int
    pipeline: int
    tensor: int

    @property
    def world(self) -> int:
        return self.data * self.pipeline * self.tensor

    def coords(self, rank: int) -> tuple[int, int, int]:
        t = rank % self.tensor
        p = (rank // self.tensor) % self.pipeline
        d = rank // (self.tensor * self.pipeline)
        return d, p, t

    def rank(self, d: int, p: int, t: int) -> int:
        return (d * self.pipeline + p) * self.tensor + t

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along ``axis`` (data, pipeline or tensor), as lists of ranks."""
        ranges = {"data": range(self.data), "pipeline": range(self.pipeline), "tensor": range(self.tensor)}
        others = [a for a in ("data", "pipeline", "tensor") if a != axis]
        out = []
        for i in ranges[others[0]]:
            for j in ranges[others[1]]:
                group = []
                for k in ranges[axis]:
                    c = {others[0]: i, others[1]: j, axis: k}
                    group.append(self.rank(c["data"], c["pipeline"], c["tensor"]))
                out.append(group)
        return out

    def as_dict(self) -> dict:
        return {"data": self.data, "pipeline": self.pipeline, "tensor": self.tensor}


def grid_shape(workers: int, parallelism: str, pipeline_stages: int = 0, tensor_parallel: int = 0,
               layers: int | None = None) -> GridShape:
    """The grid a run uses, or ValueError with one line naming the option at fault.

    ``data``: workers × 1 × 1; ``model`` and ``pipeline``: 1 × workers × 1 (unless
    ``pipeline_stages`` says fewer, the rest data-parallel); ``tensor``: 1 × 1 × workers;
    ``hybrid``: P = ``pipeline_stages``, T = ``tensor_parallel``, D = workers / (P·T); with
    neither given, 2 data × workers/2 pipeline.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    for option, value in (("--pipeline-stages", pipeline_stages), ("--tensor-parallel", tensor_parallel)):
        if value < 0:
            raise ValueError(f"{option} must be 0 (automatic) or more, got {value}")
    if parallelism == "data":
        p, t = 1, 1
    elif parallelism in ("model", "pipeline"):
        p, t = pipeline_stages or workers, 1
    elif parallelism == "tensor":
        p, t = 1, tensor_parallel or workers
    elif parallelism == "hybrid":
        if not pipeline_stages and not tensor_parallel:
            if workers % 2 or workers < 4:
                raise ValueError(f"--parallelism: hybrid with {workers} workers needs --pipeline-stages or "
                                 "--tensor-parallel (the default grid, 2 data x workers/2 stages, needs an even "
                                 "number of at least 4 workers)")
            p, t = workers // 2, 1
        else:
            p, t = pipeline_stages or 1, tensor_parallel or 1
    else:
        raise ValueError(f"--parallelism {parallelism!r}: choose one of data, model, pipeline, tensor, hybrid")
    if workers % (p * t):
        option = "--pipeline-stages" if t == 1 else "--tensor-parallel" if p == 1 else "--pipeline-stages"
        raise ValueError(f"{option}: {workers} workers do not divide into {p} stages x {t} tensor ranks")
    if layers is not None and p > layers:
        raise ValueError(f"--pipeline-stages: {p} stages but the model has only {layers} layers")
    return GridShape(workers // (p * t), p, t)


class ProcessGrid:
    """This rank's place on the grid and its three communicators.

    Every rank of ``comm`` must build the grid (groups are created collectively). A group
    of one rank is a ``SingleProcessCommunicator``: no messages at all.
    """

    def __init__(self, comm, shape: GridShape):
        if shape.world != comm.size:
            raise ValueError(f"a {shape.data}x{shape.pipeline}x{shape.tensor} grid needs {shape.world} ranks, "
                             f"the run has {comm.size}")
        self.comm, self.shape = comm, shape
        self.data_index, self.stage, self.tensor_index = shape.coords(comm.rank)
        self.data_comm = self._group(comm, shape, "data")
        self.pipeline_comm = self._group(comm, shape, "pipeline")
        self.tensor_comm = self._group(comm, shape, "tensor")

    @staticmethod
    def _group(comm, shape, axis):
        groups = shape.groups(axis)
        if len(groups[0]) == 1:
            return SingleProcessCommunicator(comm.timeout)
        if len(groups) == 1:
            return comm
        mine = None
        for ranks in groups:  # every rank takes part in creating every group
            sub = comm.new_group(ranks)
            if sub is not None:
                mine = sub
        return mine

    def __repr__(self) -> str:
        s = self.shape
        return (f"<rank {self.comm.rank}: data {self.data_index}/{s.data}, stage {self.stage}/{s.pipeline}, "
                f"tensor {self.tensor_index}/{s.tensor}>")

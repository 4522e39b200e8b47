"""One rank of the parallelism tests: ``labkit launch -n N -- python tests/parallel_rank.py OUT``.

Runs every case that fits the world size on the same model, batches and seed, and saves, per
rank, the gradients of its piece after the first step, the global loss of every step and (for
data parallelism and torch DDP) the weights after DDP_STEPS steps, in OUT/rank-K.pt. The test
compares them with one process training the whole model (tests/test_parallel_training.py).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from labkit import comm as comm_pkg
from labkit.parallel.build import ParallelModel
from labkit.parallel.reference import digits_batches, make_mlp

LR = 0.05
BATCH = 32
DDP_STEPS = 20


def cases(world: int) -> dict:
    """name -> ParallelModel keyword arguments, for this world size."""
    out = {
        "data-naive": dict(kind="data", data_parallel="naive"),
        "data-flat": dict(kind="data", data_parallel="flat"),
        "data-bucketed": dict(kind="data", data_parallel="bucketed", bucket_mb=0.01),
        "model": dict(kind="model"),
        "pipeline-gpipe": dict(kind="pipeline", microbatches=4, schedule="gpipe"),
        "pipeline-1f1b": dict(kind="pipeline", microbatches=4, schedule="1f1b"),
        "tensor": dict(kind="tensor"),
    }
    if world == 4:
        out["hybrid-data-pipeline"] = dict(kind="hybrid")  # the default: 2 data x 2 pipeline
        out["hybrid-data-tensor"] = dict(kind="hybrid", tensor_parallel_size=2)
        out["hybrid-pipeline-tensor"] = dict(kind="hybrid", pipeline_stages=2, tensor_parallel_size=2,
                                             microbatches=2, schedule="1f1b")
    return out


def flat_weights(module) -> dict:
    return {p.full_name if hasattr(p, "full_name") else name: p.detach().clone()
            for name, p in module.named_parameters()}


def run_case(comm, steps: int, **settings) -> dict:
    model = make_mlp()
    parallel = ParallelModel(model=model, comm=comm, input_shape=(1, 8, 8), **settings)
    optimizer = torch.optim.SGD(parallel.parameters(), lr=LR)
    result = {"losses": [], "grid": parallel.shape.as_dict()}
    for step, (x, y) in enumerate(digits_batches(BATCH, steps), start=1):
        optimizer.zero_grad()
        loss = parallel.global_loss(parallel.forward_backward(x, y))
        result["losses"].append(loss)
        if step == 1:
            result["grads"] = parallel.local_gradients()
            result["pipeline"] = parallel.pipeline_stats()
        optimizer.step()
        if step == DDP_STEPS:
            result["weights"] = flat_weights(parallel.module)
    return result


def run_ddp(comm) -> dict:
    """torch DDP on the same model, data and seed."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_mlp()
    names = {p: n for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model, process_group=comm.group)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    rows = slice(comm.rank * BATCH // comm.size, (comm.rank + 1) * BATCH // comm.size)
    for x, y in digits_batches(BATCH, DDP_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[rows]), y[rows]).backward()
        optimizer.step()
    return {"weights": {names[p]: p.detach().clone() for p in model.parameters()}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = comm_pkg.init()
    results, seconds = {}, {}
    for name, settings in cases(comm.size).items():
        if args.only and name not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        results[name] = run_case(comm, args.steps, **settings)
        seconds[name] = time.perf_counter() - t0
    if comm.backend in ("gloo", "nccl") and not args.only:
        results["ddp"] = run_ddp(comm)
    results["seconds"] = seconds
    torch.save(results, os.path.join(args.out, f"rank-{comm.rank}.pt"))
    if comm.size > 1 and dist.is_initialized():
        comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

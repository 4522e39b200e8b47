"""Ways to split the work of training across ranks (see docs/parallelism.md).

Each parallelism is registered in ``PARALLELISMS`` with the RunConfig settings it takes
(the panel shows only those) and a check of the combination, which ``RunConfig.validate()``
runs (one line naming the option at fault, exit 2 from the CLI).
"""

from __future__ import annotations

from functools import partial

from ..registry import PARALLELISMS

SETTINGS = {
    "data": ("data_parallel", "bucket_mb"),
    "model": ("pipeline_stages",),
    "pipeline": ("pipeline_stages", "microbatches", "schedule"),
    "tensor": ("tensor_parallel",),
    "hybrid": ("pipeline_stages", "tensor_parallel", "microbatches", "schedule"),
}
HELP = {
    "data": "data parallelism: every rank holds the whole model and a shard of the data",
    "model": "model (layer) parallelism: the layers split over the ranks, one mini-batch at a time",
    "pipeline": "pipeline parallelism: the layer split fed with micro-batches (GPipe or 1F1B)",
    "tensor": "tensor parallelism (Megatron): every layer's weights split over the ranks",
    "hybrid": "a data x pipeline x tensor grid (--pipeline-stages, --tensor-parallel)",
}
# a model's input shape per dataset, to count its layers without loading the data
_INPUT_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "synthetic": (1, 16, 16)}


def uses_sync_mode(parallelism: str, data_parallel: str) -> bool:
    """Whether the run is plain data parallelism trained by the sync mode (``--sync``), with
    gradients in one flat buffer; every other choice is trained by ``training.ParallelRun``."""
    return parallelism == "data" and data_parallel == "flat"


# The sync modes that cannot average gradients in buckets, by why not (``sync_refusal``).
MASTER_MODES = ("ps-sync", "ps-async", "ssp", "easgd-rr", "easgd-async", "measgd-async", "easgd-hogwild", "easgd-sync")
WEIGHT_SCHEDULES = {"local-sgd": "every --sync-every steps", "fedavg": "once a round, after --local-epochs of "
                    "local training", "gossip": "with its two ring neighbours after every local step"}


def sync_reason(sync: str) -> str:
    """Why ``sync`` has no per-step gradient average among equal ranks for buckets to carry."""
    if sync in MASTER_MODES:
        sends = "gradients" if sync in ("ps-sync", "ps-async", "ssp") else "weights"
        return (f"rank 0 is its master (it holds the weights and trains on nothing) and each worker sends it "
                f"{sends}, so no gradient is averaged among the ranks")
    if sync in WEIGHT_SCHEDULES:
        return f"it averages weights, not gradients, {WEIGHT_SCHEDULES[sync]}"
    if sync == "hogwild":
        return "its ranks update weights shared in memory and exchange nothing"
    return "it does not average the gradients of every step by allreduce"


def sync_refusal(sync: str, parallelism: str, data_parallel: str) -> str:
    """One line: why ``--sync sync`` cannot train this parallelism, and what to use."""
    if parallelism == "data":
        return (f"{sync} cannot combine with --data-parallel {data_parallel}: {sync_reason(sync)}; use "
                f"--data-parallel flat (the default, where --sync {sync} runs as it is), or --sync allreduce "
                f"to keep --data-parallel {data_parallel}")
    return (f"{sync} cannot combine with --parallelism {parallelism}: {sync_reason(sync)}, while a split model "
            "averages its gradients over the data group with allreduce (--sync allreduce)")


def check(parallelism, workers, model, dataset, pipeline_stages, tensor_parallel, microbatches, batch_size,
          sync, compression, data_parallel, bucket_mb, resume, allreduce_algorithm="library"):
    """(option, problem) for a combination that cannot work, else None.

    A split model (and data parallelism naive or bucketed) averages its gradients over the
    data group by the library's allreduce, through the compressing communicator: any
    ``--compression`` applies, and of the sync modes only ``allreduce`` (the others exchange
    weights, or talk to a master, on their own schedule, or share the weights in memory:
    ``sync_refusal`` says which, and what to use)."""
    from ..models import build_model
    from .grid import grid_shape
    from .model import count_layers

    if microbatches < 1:
        return "--microbatches", f"must be at least 1, got {microbatches}"
    if bucket_mb <= 0:
        return "--bucket-mb", f"must be > 0, got {bucket_mb}"
    if parallelism == "data":
        if pipeline_stages or tensor_parallel:
            option = "--pipeline-stages" if pipeline_stages else "--tensor-parallel"
            return option, "splits the model: use --parallelism pipeline, tensor or hybrid"
        if uses_sync_mode(parallelism, data_parallel):
            return None
    if sync != "allreduce":
        return "--sync", sync_refusal(sync, parallelism, data_parallel)
    if allreduce_algorithm != "library":
        where, other = ((f"--data-parallel {data_parallel}", ", or --data-parallel flat") if parallelism == "data"
                        else (f"--parallelism {parallelism}", ""))
        return "--allreduce-algorithm", (f"{allreduce_algorithm} sums the one flat buffer of --data-parallel flat; "
                                         f"{where} sums with the library's allreduce: use --allreduce-algorithm "
                                         f"library{other}")
    if resume:
        return "--resume", f"not available with --parallelism {parallelism} --data-parallel {data_parallel}"
    shape = _INPUT_SHAPES.get(dataset, (1, 8, 8))
    try:
        layers = count_layers(build_model(model, shape, 10))
        grid = grid_shape(workers, parallelism, pipeline_stages, tensor_parallel, layers=layers)
    except ValueError as error:
        option, _, message = str(error).partition(": ")
        return (option, message) if option.startswith("--") else ("--parallelism", str(error))
    if grid.pipeline > 1 and data_parallel == "bucketed":
        return "--data-parallel", "bucketed: the micro-batches of a pipeline add up in the same buckets; use flat"
    if grid.pipeline > 1 and parallelism != "model" and batch_size % microbatches:
        return "--microbatches", f"{microbatches} does not divide --batch-size {batch_size}"
    if compression != "none" and grid.data == 1:
        return "--compression", (f"{compression} compresses the gradients exchanged between data replicas, and a "
                                 f"{grid.data}x{grid.pipeline}x{grid.tensor} grid has one: add workers "
                                 "(--parallelism hybrid) or leave --compression none")
    return None


def _register():
    from .training import ParallelRun

    for name in SETTINGS:
        PARALLELISMS.register(name, partial(ParallelRun, name), help=HELP[name], settings=SETTINGS[name],
                              validate=check)


_register()

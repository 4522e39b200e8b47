"""Communicators: how ranks talk, over torch.distributed (gloo, NCCL) or MPI (mpi4py).

    comm = labkit.comm.init()          # inside a rank started by any labkit launcher
    comm.allreduce(grad)               # sum over ranks, in place
    comm.stats.bytes_sent              # what this rank has put on the wire

``init()`` reads the rank and world size from the environment that the launchers set
(torchrun's RANK/WORLD_SIZE, MPI's PMI_RANK/PMI_SIZE, SLURM's SLURM_PROCID/SLURM_NTASKS)
and the backend from LABKIT_BACKEND (default gloo).
"""

from __future__ import annotations

import atexit
import os
import shutil

from ..registry import BACKENDS
from .base import CommStats, Communicator, PeerError, SingleProcessCommunicator

__all__ = ["init", "Communicator", "CommStats", "PeerError", "SingleProcessCommunicator",
           "env_rank", "env_world_size", "env_local_rank"]

_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
_LOCAL_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def _first_int(names, default):
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return default


def env_rank() -> int:
    return _first_int(_RANK_VARS, 0)


def env_world_size() -> int:
    return _first_int(_SIZE_VARS, 1)


def env_local_rank() -> int:
    return _first_int(_LOCAL_VARS, env_rank())


def _torch_available(backend):
    def check():
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            return "this torch build has no torch.distributed"
        if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
            return "NCCL needs CUDA GPUs and a torch build with NCCL; use gloo or mpi on CPU"
        return None
    return check


def _mpi_available():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    return None


BACKENDS.register("gloo", "gloo", help="torch.distributed with gloo (CPU tensors)",
                  available=_torch_available("gloo"))
BACKENDS.register("mpi", "mpi", help="MPI through mpi4py (CPU tensors, zero-copy)",
                  available=_mpi_available)
BACKENDS.register("nccl", "nccl", help="torch.distributed with NCCL (GPU tensors)",
                  available=_torch_available("nccl"))


def init(backend: str | None = None, timeout: float | None = None) -> Communicator:
    """The communicator of this rank, for the backend the launcher chose."""
    backend = backend or os.environ.get("LABKIT_BACKEND", "gloo")
    timeout = float(timeout if timeout is not None else os.environ.get("LABKIT_TIMEOUT", 120))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS.names())}")
    if backend == "mpi":
        from .mpi import MPICommunicator

        comm = MPICommunicator(timeout=timeout)
        return comm if comm.size > 1 else SingleProcessCommunicator(timeout)
    size = env_world_size()
    if size == 1:
        return SingleProcessCommunicator(timeout)
    from .torchdist import TorchDistCommunicator

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise PeerError("MASTER_ADDR and MASTER_PORT are not set: start the ranks with "
                        "`labkit launch`, torchrun or a labkit SLURM script")
    comm = TorchDistCommunicator.from_env(backend, env_rank(), size, timeout)
    atexit.register(comm.close)  # gloo aborts at exit if the group was never destroyed
    return comm


def mpiexec_path() -> str | None:
    """The mpiexec next to this Python (the mpich wheel) or on PATH."""
    import sys

    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")

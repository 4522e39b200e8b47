"""One rank of the MPI overlap test: ``labkit launch -n 2 --launcher mpi --backend mpi -- python
tests/overlap_rank.py OUT``. Runs ``overlap_ranks`` of tests/test_parallel_overlap.py on this
rank's communicator and saves what it returns in OUT/rank-K.pt."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import comm as comm_pkg  # noqa: E402
from tests.test_parallel_overlap import overlap_ranks  # noqa: E402

if __name__ == "__main__":
    comm = comm_pkg.init()
    if not getattr(comm, "collectives_in_background", False):
        sys.exit(f"rank {comm.rank}: the {comm.backend} communicator runs no collective in the background")
    torch.save(overlap_ranks(comm), Path(sys.argv[1]) / f"rank-{comm.rank}.pt")
    comm.close()

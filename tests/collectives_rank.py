"""One rank of the collectives tests, started N times by ``labkit launch`` (or directly).

    python tests/collectives_rank.py check OUT_DIR   every case; writes OUT_DIR/rank-K.json
    python tests/collectives_rank.py loop OUT_DIR    ring allreduce forever, until a peer fails

``check`` runs every hand-written allreduce on every case in one launch and records, per
case, whether the result equals the library's ``comm.allreduce`` and how many bytes this
rank sent. The test process compares the bytes with the formulas.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

import labkit.comm
from labkit.comm import PeerError
from labkit.comm.collectives import ALLREDUCE_ALGORITHMS, ring_allreduce


def shapes_for(n: int) -> list[tuple[int, ...]]:
    """Lengths below N, equal to N, divisible by N, not divisible by N, and a matrix."""
    lengths = sorted({1, max(1, n - 1), n, 7 * n, 7 * n + 3, 1000 * n + n // 2 + 1})
    return [(length,) for length in lengths] + [(5, 2 * n + 1)]


def integer_data(shape, dtype, rank: int, seed: int) -> torch.Tensor:
    """Whole numbers: every summation order gives exactly the same float result."""
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randint(-50, 50, shape, generator=generator).to(dtype)


def check_case(comm, name, algorithm, data, exact, **record):
    """Run ``algorithm`` on ``data`` and compare with the library allreduce of a copy."""
    expected = comm.allreduce(data.contiguous().clone())
    before = comm.stats.bytes_sent
    result = algorithm(comm, data)
    sent = comm.stats.bytes_sent - before
    if exact:
        ok = bool(torch.equal(result, expected))
    else:
        ok = bool(torch.allclose(result, expected, rtol=1e-5, atol=1e-5))
    return dict(record, algorithm=name, numel=data.numel(), itemsize=data.element_size(),
                in_place=result is data, ok=ok, max_error=float((result - expected).abs().max()),
                bytes_sent=sent)


def run_cases(comm) -> list[dict]:
    cases, seed = [], 0
    for name, algorithm in ALLREDUCE_ALGORITHMS.items():
        for dtype in (torch.float32, torch.float64):
            for shape in shapes_for(comm.size):
                seed += 1
                data = integer_data(shape, dtype, comm.rank, seed)
                cases.append(check_case(comm, name, algorithm, data, True, shape=list(shape),
                                        dtype=str(dtype), layout="contiguous"))
            seed += 1  # a transposed (non-contiguous) matrix
            data = integer_data((2 * comm.size + 1, 5), dtype, comm.rank, seed).t()
            cases.append(check_case(comm, name, algorithm, data, True, shape=list(data.shape),
                                    dtype=str(dtype), layout="transposed"))
            seed += 1  # random normal numbers: equal up to rounding
            generator = torch.Generator().manual_seed(1000 * seed + comm.rank)
            data = torch.randn(3 * comm.size + 2, generator=generator, dtype=dtype)
            cases.append(check_case(comm, name, algorithm, data, False, shape=[data.numel()],
                                    dtype=str(dtype), layout="random"))
    last = comm.size - 1  # the parameter server on the last rank instead of rank 0
    data = integer_data((4 * comm.size + 1,), torch.float32, comm.rank, seed + 1)
    cases.append(check_case(comm, "parameter_server",
                            lambda c, t: ALLREDUCE_ALGORITHMS["parameter_server"](c, t, root=last),
                            data, True, shape=[data.numel()], dtype="torch.float32",
                            layout="contiguous", root=last))
    return cases


def run_group(comm) -> dict:
    """Every algorithm on the sub-communicator of the even ranks."""
    members = list(range(0, comm.size, 2))
    group = comm.new_group(members)
    if group is None:
        return {"member": False}
    cases = []
    for k, (name, algorithm) in enumerate(ALLREDUCE_ALGORITHMS.items()):
        shape = (3 * group.size + 1,)
        data = integer_data(shape, torch.float32, comm.rank, 500 + k)
        case = check_case(group, name, algorithm, data, True)
        # the members' data can be rebuilt here: the sum must be over them and no one else
        members_sum = sum(integer_data(shape, torch.float32, r, 500 + k) for r in members)
        case["members_sum_ok"] = bool(torch.equal(data, members_sum))
        cases.append(case)
    return {"member": True, "group_rank": group.rank, "group_size": group.size, "cases": cases}


def check(out_dir: str) -> None:
    comm = labkit.comm.init()
    report = {"rank": comm.rank, "size": comm.size, "backend": comm.backend,
              "cases": run_cases(comm)}
    if comm.size >= 3:
        report["group"] = run_group(comm)
    with open(os.path.join(out_dir, f"rank-{comm.rank}.json"), "w") as f:
        json.dump(report, f)
    comm.barrier()
    comm.close()


def loop(out_dir: str) -> None:
    """Ring allreduce until a peer fails; then record what was raised and exit at once."""
    comm = labkit.comm.init()
    data = torch.ones(2**20)
    path = os.path.join(out_dir, f"rank-{comm.rank}.json")
    try:
        ring_allreduce(comm, data)
        open(os.path.join(out_dir, f"started-{comm.rank}"), "w").close()
        while True:
            ring_allreduce(comm, data.fill_(1.0))
    except PeerError as e:
        outcome = {"error": "PeerError", "message": str(e)}
    except Exception as e:  # anything else is a failure of the test
        outcome = {"error": type(e).__name__, "message": traceback.format_exc()}
    with open(path, "w") as f:
        json.dump(outcome, f)
    os._exit(0)  # the process group is broken: do not wait on it at exit


if __name__ == "__main__":
    {"check": check, "loop": loop}[sys.argv[1]](sys.argv[2])

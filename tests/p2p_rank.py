"""One rank of the point-to-point and fast-ring tests (``tests/test_p2p.py``).

    python tests/p2p_rank.py both OUT_DIR   isend and irecv both ways at once; the fast ring
                                           against the library allreduce
    python tests/p2p_rank.py dead OUT_DIR   rank 1 leaves; rank 0 waits on it with irecv and isend

Each rank writes OUT_DIR/rank-K.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import labkit.comm
from labkit.comm import PeerError
from labkit.comm.collectives import fast_ring_allreduce

TIMEOUT_S = 5.0


def both_ways(comm) -> dict:
    """Every rank sends 4 MB to its right and receives from its left, all posted at once."""
    n, rank = comm.size, comm.rank
    right, left = (rank + 1) % n, (rank - 1) % n
    outgoing = torch.arange(2**20, dtype=torch.float32) + 1000 * rank
    incoming = torch.empty_like(outgoing)
    backwards, back_in = outgoing * 2, torch.empty_like(outgoing)
    requests = [comm.irecv(incoming, left, tag=1), comm.irecv(back_in, right, tag=2),
                comm.isend(outgoing, right, tag=1), comm.isend(backwards, left, tag=2)]
    peers = [request.wait() for request in requests]
    return {"peers": peers, "right": right, "left": left,
            "from_left_ok": bool(torch.equal(incoming, torch.arange(2**20, dtype=torch.float32) + 1000 * left)),
            "from_right_ok": bool(torch.equal(back_in, (torch.arange(2**20, dtype=torch.float32) + 1000 * right) * 2))}


def fast_ring_cases(comm) -> list[dict]:
    """Whole numbers, so that every summation order gives exactly the library's sum."""
    cases = []
    for seed, numel in enumerate([1, comm.size, 2 * comm.size * 1000, 7 * comm.size + 3, 300_001]):
        for segment_bytes in (64, 1 << 20):
            generator = torch.Generator().manual_seed(1000 * seed + comm.rank)
            data = torch.randint(-50, 50, (numel,), generator=generator).float()
            expected = comm.allreduce(data.clone())
            before = comm.stats.bytes_sent
            result = fast_ring_allreduce(comm, data, segment_bytes=segment_bytes)
            cases.append({"numel": numel, "segment_bytes": segment_bytes, "ok": bool(torch.equal(result, expected)),
                          "in_place": result is data, "bytes_sent": comm.stats.bytes_sent - before})
    return cases


def dead_peer(comm) -> dict:
    """Rank 1 leaves without a word; rank 0 waits on it."""
    comm.barrier()
    if comm.rank == 1:
        os._exit(0)
    outcome = {}
    time.sleep(0.5)  # rank 1 is gone
    for op in ("irecv", "isend"):
        start = time.monotonic()
        try:
            tensor = torch.zeros(2**22)
            request = comm.irecv(tensor, 1, tag=3) if op == "irecv" else comm.isend(tensor, 1, tag=4)
            request.wait()
            outcome[op] = {"error": None}
        except PeerError as error:
            outcome[op] = {"error": "PeerError", "message": str(error)}
        except Exception as error:  # noqa: BLE001 - anything else fails the test
            outcome[op] = {"error": type(error).__name__, "message": str(error)}
        outcome[op]["seconds"] = time.monotonic() - start
    return outcome


def main(what: str, out_dir: str) -> None:
    comm = labkit.comm.init(timeout=TIMEOUT_S)
    if what == "both":
        report = {"both_ways": both_ways(comm), "fast_ring": fast_ring_cases(comm), "size": comm.size}
    else:
        report = dead_peer(comm)
    with open(os.path.join(out_dir, f"rank-{comm.rank}.json"), "w") as f:
        json.dump(report, f)
    if what == "dead":
        os._exit(0)  # the group lost a rank: do not wait on it at exit
    comm.barrier()
    comm.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""One rank of the point-to-point and fast-ring tests (``tests/test_p2p.py``).

    python tests/p2p_rank.py both OUT_DIR   isend and irecv both ways at once; the fast ring
                                           against the library allreduce
    python tests/p2p_rank.py dead OUT_DIR   rank 1 leaves; rank 0 waits on it with irecv and isend
    python tests/p2p_rank.py silent OUT_DIR rank 1 stays but says nothing; rank 0 waits the same way

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
        # small segments: many per chunk, with the pipeline's depth and receives posted ahead
        for segment_bytes, depth, ahead in ((64, 2, 0), (64, 1, 2), (64, 2, 2), (1 << 20, 2, 0)):
            generator = torch.Generator().manual_seed(1000 * seed + comm.rank)
            data = torch.randint(-50, 50, (numel,), generator=generator).float()
            expected = comm.allreduce(data.clone())
            before = comm.stats.bytes_sent
            result = fast_ring_allreduce(comm, data, segment_bytes=segment_bytes, depth=depth, ahead=ahead)
            cases.append({"numel": numel, "segment_bytes": segment_bytes, "depth": depth, "ahead": ahead,
                          "ok": bool(torch.equal(result, expected)),
                          "in_place": result is data, "bytes_sent": comm.stats.bytes_sent - before})
    return cases


def dead_peer(comm, silent: bool = False) -> dict:
    """Rank 1 leaves without a word (or, ``silent``, stays alive and mute); rank 0 waits on it."""
    comm.barrier()
    if comm.rank == 1:
        if silent:
            time.sleep(2 * TIMEOUT_S + 4)  # alive through both of rank 0's waits
        os._exit(0)
    outcome = {}
    time.sleep(0.5)  # rank 1 is gone, or busy elsewhere
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
        report = dead_peer(comm, silent=what == "silent")
    with open(os.path.join(out_dir, f"rank-{comm.rank}.json"), "w") as f:
        json.dump(report, f)
    if what in ("dead", "silent"):
        os._exit(0)  # the group lost a rank: do not wait on it at exit
    comm.barrier()
    comm.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Running your ring and tree allreduce (ps4_allreduce.py) on real ranks.

    python ps4_ranks.py OUT_DIR LENGTH:DTYPE [LENGTH:DTYPE ...]

is what every rank runs, started by ``run_allreduce`` through ``labkit launch`` on the course's
launcher (``LABKIT_LAUNCHER``: local by default, SLURM on a cluster). For each case every rank
builds its own tensor of LENGTH values, sums it with the library's ``comm.allreduce`` for the
answer, then with your ``ring_allreduce`` and ``tree_allreduce``, and writes to
OUT_DIR/rank-R.json whether it got the sum, in place, and what it sent (``comm.stats``: bytes and
messages per operation).
"""

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

MODULE = "ps4_allreduce.py"
ALGORITHMS = ("ring_allreduce", "tree_allreduce")


def load_module(path=MODULE):
    """Your module, loaded fresh from the file."""
    spec = importlib.util.spec_from_file_location("ps4_allreduce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_one_rank(module):
    """Both functions on a single rank, in this process: the sum of one rank is its own tensor."""
    from labkit.comm import SingleProcessCommunicator

    for name in ALGORITHMS:
        tensor = torch.arange(5.0)
        result = getattr(module, name)(SingleProcessCommunicator(), tensor)
        assert torch.equal(tensor, torch.arange(5.0)) and result is tensor, f"{name} on one rank"


def run_allreduce(ranks, cases, timeout=90):
    """Run both allreduces as `ranks` real ranks on each case; one report per rank."""
    from labkit.grading.ranks import run_ranks

    check_one_rank(load_module())
    with tempfile.TemporaryDirectory(prefix="ps4-") as out:
        status, output = run_ranks(ranks, __file__, out, *cases, timeout=timeout)
        reports = [Path(out, f"rank-{r}.json") for r in range(ranks)]
        if status != 0 or not all(p.is_file() for p in reports):
            lines = [line for line in output.splitlines() if line.strip()][-8:]
            raise AssertionError(f"the ranks failed (exit {status}):\n" + "\n".join(lines))
        return [json.loads(p.read_text()) for p in reports]


def _delta(after, before):
    return {op: [after[op][0] - before.get(op, (0, 0))[0], after[op][1] - before.get(op, (0, 0))[1]]
            for op in after if tuple(after[op]) != tuple(before.get(op, (0, 0)))}


def main(out_dir, *cases):
    import labkit.comm

    comm = labkit.comm.init()
    module = load_module()
    report = []
    for case in cases:
        length, dtype = case.split(":")
        dtype = getattr(torch, dtype)
        for name in ALGORITHMS:
            generator = torch.Generator().manual_seed(1000 * comm.rank + int(length))
            tensor = (torch.randn(int(length), generator=generator, dtype=torch.float64) * 100).to(dtype)
            expected = comm.allreduce(tensor.clone())
            comm.barrier()
            before = {op: tuple(v) for op, v in comm.stats.by_op.items()}
            result = getattr(module, name)(comm, tensor)
            comm.barrier()
            report.append({
                "case": case, "algorithm": name, "in_place": result is tensor,
                "sum": bool(torch.allclose(tensor.double(), expected.double(), rtol=1e-5, atol=1e-3)),
                "tensor_bytes": tensor.numel() * tensor.element_size(),
                "sent": _delta(comm.stats.by_op, before),
            })
    Path(out_dir, f"rank-{comm.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    sys.path.insert(0, str(Path.cwd()))
    main(*sys.argv[1:])

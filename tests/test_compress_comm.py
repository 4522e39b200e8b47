"""Compressed communication across ranks: allreduce_compressed, send/recv_compressed.

Most tests run the ranks as threads of this process over a small in-memory
communicator; the last one runs two real processes over torch.distributed (gloo).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from labkit.comm.base import Communicator
from labkit.compress import (
    Packet,
    allreduce_compressed,
    available_compressors,
    make_compressor,
    recv_compressed,
    send_compressed,
)

ALL = available_compressors()
STOCHASTIC = {"qsgd", "terngrad", "natural", "randomk"}  # draw random numbers: no exact expectation
TIMEOUT = 20.0


class ThreadWorld:
    """What the ranks of one threaded run share: mailboxes and a rendezvous for collectives."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)
        self.slots: list = [None] * size
        self.mail = [[] for _ in range(size)]  # per destination: (source, tag, tensor)
        self.arrived = [threading.Condition() for _ in range(size)]


class ThreadCommunicator(Communicator):
    """A communicator between threads; the byte accounting is the base class's."""

    backend = "threads"

    def __init__(self, world: ThreadWorld, rank: int):
        super().__init__(rank, world.size, timeout=TIMEOUT)
        self.world = world

    def _send(self, tensor, dst, tag):
        with self.world.arrived[dst]:
            self.world.mail[dst].append((self.rank, tag, tensor.clone()))
            self.world.arrived[dst].notify_all()

    def _recv(self, tensor, src, tag):
        def find():
            for i, (source, message_tag, _) in enumerate(mail):
                if message_tag == tag and src in (None, source):
                    return i
            return None

        mail, arrived = self.world.mail[self.rank], self.world.arrived[self.rank]
        with arrived:
            assert arrived.wait_for(lambda: find() is not None, timeout=TIMEOUT), "recv timed out"
            source, _, payload = mail.pop(find())
        tensor.copy_(payload)
        return source

    def _exchange(self, tensor):
        """Every rank's tensor, in rank order."""
        self.world.slots[self.rank] = tensor.clone()
        self.world.barrier.wait()
        everyone = [t.clone() for t in self.world.slots]
        self.world.barrier.wait()  # all have read before the slots are reused
        return everyone

    def _allreduce(self, tensor, op):
        everyone = self._exchange(tensor)
        result = everyone[0]
        for other in everyone[1:]:
            result = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op](result, other)
        tensor.copy_(result)

    def _broadcast(self, tensor, src):
        tensor.copy_(self._exchange(tensor)[src])

    def _allgather(self, tensor):
        return self._exchange(tensor)

    def _barrier(self):
        self.world.barrier.wait()


def run_ranks(size, fn):
    """Run fn(comm) on ``size`` threads; return the results in rank order."""
    world = ThreadWorld(size)
    results, errors = [None] * size, []

    def main(rank):
        try:
            results[rank] = fn(ThreadCommunicator(world, rank))
        except BaseException as error:  # reported in the test's thread
            errors.append(error)
            world.barrier.abort()

    threads = [threading.Thread(target=main, args=(rank,), daemon=True) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    return results


def local_tensor(rank, shape=(6, 10), dtype=torch.float32):
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) * 0.05


# --- the threaded communicator itself ---------------------------------------------------------
def test_the_thread_communicator_works():
    def body(comm):
        t = torch.full((3,), float(comm.rank + 1))
        comm.allreduce(t)
        gathered = comm.allgather(torch.tensor([comm.rank]))
        if comm.rank == 0:
            got = [comm.recv(torch.zeros(1), None) for _ in range(comm.size - 1)]
        else:
            comm.send(torch.tensor([float(comm.rank)]), 0)
            got = []
        return t, [int(g) for g in gathered], sorted(got)

    results = run_ranks(3, body)
    for t, gathered, _ in results:
        assert torch.equal(t, torch.full((3,), 6.0)) and gathered == [0, 1, 2]
    assert results[0][2] == [1, 2]


# --- allreduce_compressed, for every compressor ----------------------------------------------------
def recording(compressor, wires):
    """Let ``compressor`` keep a copy of the wire bytes of every packet it makes."""
    compress = compressor.compress

    def compress_and_record(tensor, key=None):
        packet = compress(tensor, key)
        wires.append(packet.to_wire())
        return packet

    compressor.compress = compress_and_record
    return compressor


@pytest.mark.parametrize("name", [name for name in ALL if name != "powersgd"])
def test_allreduce_compressed_sums_every_ranks_packet(name):
    size = 3
    torch.manual_seed(0)
    wires = [[] for _ in range(size)]

    def body(comm):
        compressor = recording(make_compressor(name, error_feedback=False), wires[comm.rank])
        return allreduce_compressed(comm, compressor, local_tensor(comm.rank), key="w")

    results = run_ranks(size, body)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    assert results[0].shape == (6, 10) and results[0].dtype == torch.float32

    decompressor = make_compressor(name)
    contributions = [decompressor.decompress(Packet.from_wire(w)) for (w,) in wires]
    exact = sum(local_tensor(rank) for rank in range(size))
    # fp16 and bf16 are summed in their own precision on the wire
    tolerance = 1e-2 * exact.abs().max() if name in ("fp16", "bf16") else 1e-6
    assert torch.allclose(results[0], sum(contributions), rtol=0, atol=tolerance)
    if name not in STOCHASTIC:  # and each packet is what one process alone would send
        for rank, contribution in enumerate(contributions):
            alone = make_compressor(name, error_feedback=False)
            assert torch.equal(contribution, alone.decompress(alone.compress(local_tensor(rank), key="w")))


def test_powersgd_allreduce_projects_the_sum_on_a_shared_basis():
    size = 3
    results = run_ranks(size, lambda comm: allreduce_compressed(
        comm, make_compressor("powersgd", error_feedback=False), local_tensor(comm.rank), key="w"))
    for other in results[1:]:
        assert torch.equal(other, results[0])
    # P: orthonormal basis of (sum M_i) Q0, Q0 drawn from the seed every rank shares; result P P^T sum M_i
    exact = sum(local_tensor(rank) for rank in range(size))
    q0 = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    basis, _ = torch.linalg.qr(exact @ q0)
    assert torch.allclose(results[0], basis @ basis.T @ exact, atol=1e-6)


@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
def test_summable_packets_are_allreduced_as_they_are(name):
    size = 4
    x = local_tensor(0, (1000,))
    results = run_ranks(size, lambda comm: (
        allreduce_compressed(comm, make_compressor(name, error_feedback=False), x), comm.stats))
    payload = make_compressor(name).compress(x).payload_nbytes
    for _, stats in results:
        assert stats.bytes_sent == 2 * (size - 1) * payload // size
        assert list(stats.by_op) == ["allreduce"]
    if name != "none":  # the sum is taken in the reduced precision
        wire_dtype = torch.float16 if name == "fp16" else torch.bfloat16
        assert torch.equal(results[0][0], (x.to(wire_dtype) * 4).float())


@pytest.mark.parametrize("name", ["8bit", "qsgd", "onebit", "signsgd", "topk", "randomk", "dgc"])
def test_gathered_packets_cost_exactly_their_bytes(name):
    size = 3
    x = local_tensor(0, (50, 40))
    results = run_ranks(size, lambda comm: (
        allreduce_compressed(comm, make_compressor(name), local_tensor(comm.rank, (50, 40)), key="w"),
        comm.stats))
    nbytes = make_compressor(name).compress(x, key="w").nbytes
    for _, stats in results:
        assert stats.bytes_sent == (size - 1) * nbytes
        assert list(stats.by_op) == ["allgather"]


def test_packets_of_different_sizes_are_padded_and_summed():
    """threshold: rank r has 5 * (r + 1) values above the threshold."""
    size = 3

    def tensor(rank):
        t = torch.zeros(200)
        t[rank:5 * (rank + 1) * 3:3] = 1.0 + rank
        return t

    results = run_ranks(size, lambda comm: (
        allreduce_compressed(comm, make_compressor("threshold", threshold=0.5), tensor(comm.rank), key="w"),
        comm.stats))
    expected = sum(tensor(rank) for rank in range(size))
    largest = make_compressor("threshold", threshold=0.5).compress(tensor(size - 1)).nbytes
    for total, stats in results:
        assert torch.equal(total, expected)
        assert stats.bytes_sent == (size - 1) * 8 + (size - 1) * largest


def test_powersgd_two_rounds_share_p_and_the_warm_start():
    size = 3
    rows, cols, rank = 20, 12, 2

    def body(comm):
        compressor = make_compressor("powersgd", rank=rank)
        matrix = local_tensor(comm.rank, (rows, cols))
        for _ in range(3):
            total = allreduce_compressed(comm, compressor, matrix, key="w")
        return total, compressor.warm_start["w"], comm.stats

    results = run_ranks(size, body)
    for total, warm_start, stats in results:
        assert torch.equal(total, results[0][0]) and torch.equal(warm_start, results[0][1])
        per_step = 2 * (size - 1) * (rows * rank * 4) // size + 2 * (size - 1) * (cols * rank * 4) // size
        assert stats.bytes_sent == 3 * per_step


def test_powersgd_sends_vectors_uncompressed():
    results = run_ranks(2, lambda comm: allreduce_compressed(
        comm, make_compressor("powersgd"), local_tensor(comm.rank, (17,)), key="bias"))
    assert torch.allclose(results[1], local_tensor(0, (17,)) + local_tensor(1, (17,)))


@pytest.mark.parametrize("name", ["onebit", "topk", "qsgd", "threshold", "powersgd", "fp16", "dgc"])
def test_error_feedback_across_ranks_loses_nothing(name):
    """Sum over steps of the allreduced results + every rank's residual = sum of all inputs."""
    size, steps = 3, 4
    params = {"momentum": 0.0} if name == "dgc" else {}

    def body(comm):
        compressor = make_compressor(name, **params)
        inputs = [local_tensor(10 * step + comm.rank, (8, 9), torch.float64) for step in range(steps)]
        total = sum(allreduce_compressed(comm, compressor, x, key="w") for x in inputs)
        residual = compressor.residual("w")
        return total, (0 if residual is None else residual), sum(inputs)

    results = run_ranks(size, body)
    inputs = sum(r[2] for r in results)
    residuals = sum(r[1] for r in results)
    tolerance = 1e-2 if name == "fp16" else 1e-9  # fp16 sums in half precision on the wire
    assert torch.allclose(results[0][0] + residuals, inputs, rtol=0, atol=tolerance)


# --- point to point --------------------------------------------------------------------------------
def test_send_and_recv_compressed_from_any_rank():
    size = 3
    like = torch.zeros(30, 7)

    def body(comm):
        compressor = make_compressor("topk", ratio=0.1, error_feedback=False)
        if comm.rank == 0:
            received = dict(tuple(reversed(recv_compressed(comm, compressor, like))) for _ in range(size - 1))
            return received, comm.stats.bytes_sent
        packet = send_compressed(comm, compressor, local_tensor(comm.rank, (30, 7)), dst=0, key="w")
        return packet.nbytes, comm.stats.bytes_sent

    results = run_ranks(size, body)
    received, _ = results[0]
    assert sorted(received) == [1, 2]
    for rank in (1, 2):
        compressor = make_compressor("topk", ratio=0.1, error_feedback=False)
        expected = compressor.decompress(compressor.compress(local_tensor(rank, (30, 7))))
        assert torch.equal(received[rank], expected)
        nbytes, sent = results[rank]
        assert sent == 8 + nbytes  # the size, then exactly the packet


def test_recv_compressed_checks_the_shape():
    def body(comm):
        compressor = make_compressor("fp16")
        if comm.rank == 1:
            send_compressed(comm, compressor, torch.ones(4), dst=0)
            return None
        with pytest.raises(ValueError, match="expected \\(5,\\)"):
            recv_compressed(comm, compressor, torch.zeros(5), src=1)
        return "checked"

    assert run_ranks(2, body)[0] == "checked"


# --- two real processes over gloo ---------------------------------------------------------------------
GLOO_RANK = textwrap.dedent("""
    import torch
    import labkit.comm
    from labkit.compress import allreduce_compressed, make_compressor, recv_compressed, send_compressed

    def local(rank):
        return torch.randn(6, 10, generator=torch.Generator().manual_seed(rank)) * 0.05

    comm = labkit.comm.init("gloo", timeout=30)
    exact = local(0) + local(1)
    for name in ("fp16", "bf16", "onebit", "threshold", "powersgd"):
        total = allreduce_compressed(comm, make_compressor(name, error_feedback=False), local(comm.rank), "w")
        gathered = comm.allgather(total)
        assert torch.equal(gathered[0], gathered[1]), name
        assert (total - exact).norm() < exact.norm(), name
    compressor = make_compressor("qsgd", error_feedback=False)
    if comm.rank == 1:
        send_compressed(comm, compressor, local(1), dst=0)
    else:
        received, sender = recv_compressed(comm, compressor, local(0))
        assert sender == 1 and (received - local(1)).abs().max() < local(1).norm() / 127
    comm.close()
    print("rank", comm.rank, "ok")
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_processes(tmp_path):
    pytest.importorskip("torch.distributed")
    script = tmp_path / "rank.py"
    script.write_text(GLOO_RANK)
    port = str(free_port())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    try:
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, PYTHONPATH=root, OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, output
        assert f"rank {rank} ok" in output

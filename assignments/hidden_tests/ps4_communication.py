"""Hidden tests of ps4_communication: the instructor's side only (never released; see docs/grading.md).

The allreduce check launches the student's ps4_allreduce.py as 3 real ranks (labkit launch, on the
course's launcher, through ps4_ranks.run_allreduce: nbgrader puts the instructor's ps4_ranks.py
beside the notebook) and checks the sum, the bytes and the messages of every rank.
Messages say which case failed, never the expected answer.
"""

import math

RANKS = 3
CASES = ["10:float64", "7:int64", "30:float32"]


def allreduce():
    from ps4_ranks import run_allreduce

    reports = run_allreduce(RANKS, CASES)
    n = RANKS
    for case in CASES:
        length = int(case.split(":")[0])
        for algorithm in ("ring_allreduce", "tree_allreduce"):
            entries = [next(e for e in report if e["case"] == case and e["algorithm"] == algorithm)
                       for report in reports]
            what = f"{algorithm}, {n} ranks, {case.replace(':', ' values of ')}"
            for rank, entry in enumerate(entries):
                assert entry["sum"], f"{what}: rank {rank} does not hold the sum"
                assert entry["in_place"], f"{what}: rank {rank} did not return the tensor it was given"
                assert set(entry["sent"]) <= {"send"}, f"{what}: rank {rank} used {sorted(entry['sent'])}"
            size = entries[0]["tensor_bytes"]
            item = size // length
            sent = [entry["sent"].get("send", [0, 0]) for entry in entries]
            total_bytes = sum(b for b, _ in sent)
            assert total_bytes == 2 * (n - 1) * size, f"{what}: the ranks sent {total_bytes} bytes in all"
            if algorithm == "ring_allreduce":
                low, high = (2 * (n - 1) * math.floor(length / n) * item, 2 * (n - 1) * math.ceil(length / n) * item)
                for rank, (nbytes, messages) in enumerate(sent):
                    assert low <= nbytes <= high, f"{what}: rank {rank} sent {nbytes} bytes, not 2(N-1)/N * S"
                    assert messages == 2 * (n - 1), f"{what}: rank {rank} took {messages} steps, not 2(N-1)"
            else:
                assert sum(m for _, m in sent) == 2 * (n - 1), f"{what}: a tree sends 2(N-1) messages in all"


def traffic(ps_traffic, ring_traffic, transfer_seconds, send_seconds, placement, ring_seconds):
    for S, workers, servers in [(4e6, 2, 1), (1e9, 64, 8), (123.0, 5, 5)]:
        got = tuple(ps_traffic(S, workers, servers))
        assert all(math.isclose(a, b) for a, b in zip(got, (S, workers * S / servers))), (
            f"PS traffic, {workers} workers, {servers} servers")
        assert math.isclose(ring_traffic(S, workers), 2 * (workers - 1) / workers * S), f"ring traffic, {workers} ranks"
    assert math.isclose(transfer_seconds(5e8, 25), 0.02) and math.isclose(transfer_seconds(1, 1), 1e-9), "link time"
    layers = [400, 4000, 40, 4]
    for packed, messages in ((True, 1), (False, 4)):
        assert math.isclose(send_seconds(layers, 2e-6, 1e8, packed), messages * 2e-6 + sum(layers) / 1e8), (
            f"send_seconds, packed={packed}")
    assert placement(6, 4, "pack") == [0, 0, 0, 0, 1, 1], "pack 6 ranks, 4 cores per socket"
    assert placement(5, 8, "spread") == [0, 1, 0, 1, 0], "spread 5 ranks"
    assert math.isclose(ring_seconds([0, 0, 0, 0, 1, 1], 6e6, 50, 10), 10 * 1e6 / 10e9), "a ring crossing sockets"
    assert math.isclose(ring_seconds([1, 1, 1], 3e6, 50, 10), 4 * 1e6 / 50e9), "a ring on one socket"
    assert ring_seconds([0], 1e6, 50, 10) == 0, "one rank sends nothing"


def scaling(scaled_lr, warmup_lr, tf_strategy_setting):
    import labkit

    assert math.isclose(scaled_lr(0.05, 32, 512), 0.8) and math.isclose(scaled_lr(0.4, 1024, 256), 0.1), (
        "the linear scaling rule, up and down")
    for step, want in [(0, 0.01), (5, 0.055), (9, 0.091), (10, 0.1), (11, 0.1)]:
        assert math.isclose(warmup_lr(step, 10, 0.1, 0.01), want), f"warm-up at step {step} of 10"
    want = {"MirroredStrategy": ("allreduce", True), "MultiWorkerMirroredStrategy": ("allreduce", False),
            "CentralStorageStrategy": ("ps-sync", True), "ParameterServerStrategy": ("ps-async", False)}
    for name, (sync, one_machine) in want.items():
        setting = tf_strategy_setting(name)
        assert setting.get("sync") == sync, f"{name}: the sync mode"
        assert (setting.get("launcher") == "local") == one_machine, f"{name}: one machine or many"
        labkit.RunConfig(**{**setting, "launcher": "local"}, workers=3).validate()

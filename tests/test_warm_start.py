"""Warm ranks (labkit.launch.pool) and a light command line.

A run whose ranks come from the pool gives bitwise the same weights as a cold one; the
pool's processes end with their owner, however it ends; `labkit bench --help` lists every
benchmark; `labkit train --help` imports no torch and still lists every choice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from labkit import RunConfig
from labkit.bench import BENCHMARKS
from labkit.launch import launch
from labkit.launch.pool import current_pool, start_pool, stop_pool
from labkit.registry import (
    BACKENDS,
    COMPRESSORS,
    DATASETS,
    LAUNCHERS,
    MODELS,
    OPTIMIZERS,
    PARALLELISMS,
    SYNC_MODES,
)
from labkit.runs import RunDir

LABKIT = str(Path(sys.executable).with_name("labkit"))


def final_weights(run_dir) -> dict:
    return RunDir(run_dir).load_checkpoint()["model"]


def test_a_run_from_the_pool_gives_the_same_weights_as_a_cold_run(tmp_path):
    assert current_pool() is None
    config = RunConfig(workers=2, steps=6, batch_size=16, log_every=1, eval_every=10**6, checkpoint_every=0)
    cold = launch(config.replace(run_dir=str(tmp_path / "cold")))
    assert cold.job.warm == 0
    pool = start_pool(2)  # its processes start while the cold run goes (the cold run's ranks are all started)
    try:
        assert cold.wait(timeout=120).status == "completed"
        assert pool.wait_ready(timeout=120), pool
        waiting = pool.pids()
        warm = launch(config.replace(run_dir=str(tmp_path / "warm")))
        assert warm.job.warm == 2 and [p.pid for p in warm.job.procs] == waiting
        assert warm.wait(timeout=120).status == "completed"
        # the ranks that ran were the pool's processes, not new ones
        started = {e["rank"]: e["pid"] for e in warm.metrics("event") if e.get("event") == "started"}
        assert sorted(started.values()) == sorted(waiting)

        a, b = final_weights(cold.run_dir), final_weights(warm.run_dir)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name

        # an owner whose environment changed since the pool started gets no warm rank
        os.environ["LABKIT_TEST_CHANGED"] = "1"
        try:
            assert pool.take([sys.executable, "-m", "labkit.worker", "x"], [{}], [tmp_path / "log"]) == []
        finally:
            del os.environ["LABKIT_TEST_CHANGED"]
    finally:
        stop_pool()
    assert current_pool() is None


OWNER = textwrap.dedent("""
    import sys, time
    from labkit.launch.pool import start_pool
    pool = start_pool(1)
    while not pool.pids():
        time.sleep(0.02)
    print(*pool.pids(), flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
""")


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_the_pool_ends_with_its_owner():
    """One owner exits by itself, the other is killed (SIGKILL: no atexit, no cleanup at all)."""
    owners = {how: subprocess.Popen([sys.executable, "-c", OWNER, how], stdout=subprocess.PIPE, text=True)
              for how in ("exit", "wait")}
    try:
        pids = {how: [int(p) for p in owner.stdout.readline().split()] for how, owner in owners.items()}
        assert pids["exit"] and pids["wait"]
        owners["wait"].send_signal(signal.SIGKILL)
        assert owners["exit"].wait(timeout=120) == 0
        assert owners["wait"].wait(timeout=120) == -signal.SIGKILL
        for how, waiting in pids.items():
            for pid in waiting:
                assert _gone(pid), f"warm rank {pid} outlived its owner ({how})"
    finally:
        for owner in owners.values():
            if owner.poll() is None:
                owner.kill()
                owner.wait()


def test_bench_help_lists_every_benchmark():
    done = subprocess.run([LABKIT, "bench", "--help"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0, done.stderr
    for name, (_module, description) in BENCHMARKS.items():
        assert f"{name}  " in done.stdout and description in done.stdout, name
    bare = subprocess.run([LABKIT, "bench"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "start" in bare.stderr
    assert bare.stderr.strip().splitlines()[-1].startswith("labkit: error: bench:")


HELP_WITHOUT_TORCH = textwrap.dedent("""
    import sys
    from labkit.cli import main
    try:
        main(["train", "--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
    print("TORCH IMPORTED" if "torch" in sys.modules else "NO TORCH", file=sys.stderr)
""")


def test_train_help_imports_no_torch_and_lists_every_choice(tmp_path):
    env = dict(os.environ, LABKIT_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="1000")
    first = subprocess.run([LABKIT, "train", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True,
                           timeout=60, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().endswith("NO TORCH"), again.stderr
    assert again.stdout == first.stdout  # the remembered choices are the registered ones
    text = " ".join(again.stdout.split())
    for registry in (MODELS, DATASETS, SYNC_MODES, COMPRESSORS, LAUNCHERS, BACKENDS, PARALLELISMS, OPTIMIZERS):
        choices = f"({', '.join(registry.names())}; default "
        assert choices in text, f"{registry.option}: --help does not list {choices}"

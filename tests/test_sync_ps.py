"""The parameter-server family: ps-sync, ps-async, hogwild and ssp (docs/sync_modes_ps.md).

Every mode trains the MLP on digits with 4 ranks to 93 % test accuracy with the default
settings, logs the metrics every mode logs, and behaves as documented when a rank dies.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from labkit.config import ConfigError, RunConfig
from labkit.registry import LAUNCHERS, SYNC_MODES
from labkit.runs import RunDir

from .conftest import LABKIT, run_cli

MODES = [
    pytest.param("ps-sync", [], id="ps-sync"),
    pytest.param("ps-async", [], id="ps-async"),
    pytest.param("ssp", [], id="ssp"),
    pytest.param("hogwild", [], id="hogwild"),
    pytest.param("hogwild", ["--lock"], id="hogwild-lock"),
]
WORKERS = 4
MLP_PARAMETERS = 17_226  # the MLP on 8x8 digits: 64*128 + 128 + 128*64 + 64 + 64*10 + 10


def train(run_dir, sync, *extra, timeout=170):
    out = run_cli("train", "--quiet", "--workers", WORKERS, "--sync", sync, "--run-dir", run_dir,
                  *extra, timeout=timeout)
    return out, RunDir(run_dir).read_summary()


def check_completed_run(run_dir, out, summary, sync):
    """What every mode promises: the accuracy, and the metrics allreduce logs."""
    assert out.returncode == 0, out.stderr + (summary or {}).get("error", "")
    assert summary["status"] == "completed"
    assert summary["test_accuracy"] >= 0.93, summary
    run = RunDir(run_dir)
    steps = summary["steps"]
    last = {}
    for record in run.metrics(kind="train"):
        for key in ("loss", "accuracy", "samples", "bytes_sent", "compute_s", "comm_s", "wait_s"):
            assert key in record, (key, record)
        last[record["rank"]] = record
    assert sorted(last) == list(range(WORKERS)), "every rank logs its training metrics"
    assert all(r["step"] == steps for r in last.values())
    assert [r["step"] for r in run.metrics(kind="eval")][-1] == steps
    assert run.latest_checkpoint() == run.checkpoint_path(steps)
    if sync == "hogwild":  # shared memory: nothing to communicate while training
        assert summary["comm_fraction"] == 0
    else:  # the parameter server's workers send gradients, the master weights
        assert all(last[r]["bytes_sent"] > 0 for r in range(WORKERS))
    assert summary["bytes_sent"] == sum(r["bytes_sent"] for r in last.values())


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sync, extra", MODES)
def test_reaches_93_percent_with_the_local_launcher(tmp_path, no_leftovers, sync, extra):
    run_dir = tmp_path / "run"
    out, summary = train(run_dir, sync, *extra)
    check_completed_run(run_dir, out, summary, sync)
    if sync == "ps-async":  # with 3 workers, only one gradient can be fresh at a time
        assert summary["mean_staleness"] > 0
        assert sum(summary["staleness_histogram"].values()) == summary["gradients_applied"]
        assert summary["gradients_applied"] == (WORKERS - 1) * summary["steps"]
        (event,) = [e for e in RunDir(run_dir).metrics(kind="event") if e["event"] == "staleness"]
        assert event["histogram"] == summary["staleness_histogram"]
    if sync == "ssp":  # the default --staleness 2 bounds how old a gradient's weights are
        assert 0 < summary["max_staleness"] <= 2


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("sync, extra", MODES + [pytest.param("ps-async", ["--backend", "mpi"], id="ps-async-mpi-backend")])
def test_reaches_93_percent_with_the_mpi_launcher(tmp_path, no_leftovers, sync, extra):
    if "mpi" not in LAUNCHERS or LAUNCHERS.entry("mpi").meta["available"]():
        pytest.skip("the mpi launcher is not available here")
    run_dir = tmp_path / "run"
    out, summary = train(run_dir, sync, "--launcher", "mpi", *extra)
    check_completed_run(run_dir, out, summary, sync)


def final_weights(run_dir, step):
    return RunDir(run_dir).load_checkpoint(RunDir(run_dir).checkpoint_path(step))["model"]


@pytest.mark.timeout(200)
def test_ssp_with_staleness_0_follows_ps_sync(tmp_path, no_leftovers):
    common = ["--steps", "30", "--checkpoint-every", "10", "--eval-every", "10", "--seed", "3"]
    runs = {}
    for name, sync, extra in (("ps-sync", "ps-sync", []), ("ssp0", "ssp", ["--staleness", "0"]),
                              ("ssp2", "ssp", ["--staleness", "2"])):
        out, summary = train(tmp_path / name, sync, *common, *extra)
        assert out.returncode == 0, out.stderr
        runs[name] = summary
    for step in (20, 30):  # the two checkpoints a run keeps
        reference = final_weights(tmp_path / "ps-sync", step)
        same = final_weights(tmp_path / "ssp0", step)
        assert all(torch.equal(reference[k], same[k]) for k in reference), f"step {step}"
    evals = {name: [r["loss"] for r in RunDir(tmp_path / name).metrics(kind="eval")] for name in runs}
    assert evals["ps-sync"] == evals["ssp0"]
    assert runs["ssp0"]["max_staleness"] == 0
    # With staleness 2 the first worker served never waits: it computes on older weights.
    assert 0 < runs["ssp2"]["max_staleness"] <= 2
    stale = final_weights(tmp_path / "ssp2", 30)
    assert not all(torch.equal(reference[k], stale[k]) for k in reference)


@pytest.mark.timeout(150)
def test_ps_compresses_what_the_workers_send(tmp_path, no_leftovers):
    steps = 20
    out, summary = train(tmp_path / "fp16", "ps-async", "--steps", steps, "--compression", "fp16")
    assert out.returncode == 0, out.stderr
    worker = [r for r in RunDir(tmp_path / "fp16").metrics(kind="train") if r["rank"] == 1][-1]
    uncompressed = steps * MLP_PARAMETERS * 4  # float32 gradients
    assert worker["bytes_sent"] < 0.55 * uncompressed  # 2 bytes a value, plus small headers
    assert summary["test_accuracy"] > 0.5


@pytest.mark.parametrize("sync", ["ps-sync", "ps-async", "ssp"])
def test_modes_with_a_master_need_a_worker(sync, tmp_path):
    with pytest.raises(ConfigError, match="--workers.*rank 0 is the parameter server"):
        RunConfig(sync=sync, workers=1).validate()
    RunConfig(sync=sync, workers=2).validate()
    out = run_cli("train", "--sync", sync, "--run-dir", tmp_path / "run")  # --workers 1 by default
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.strip().splitlines() == [f"labkit: error: --workers: {sync} needs at least 2 ranks: "
                                               "rank 0 is the parameter server and ranks 1.. are the "
                                               "workers that train"]


def test_hogwild_stays_on_one_machine():
    check = SYNC_MODES.entry("hogwild").meta["validate"]
    for launcher in ("local", "mpi", "torchrun"):
        assert check(launcher=launcher, device="cpu") is None
    option, message = check(launcher="slurm", device="cpu")
    assert option == "--launcher" and "several nodes, which share no memory" in message
    option, message = check(launcher="local", device="cuda")
    assert option == "--device" and "CPU memory" in message


@pytest.mark.timeout(60)
def test_hogwild_weights_are_shared_between_processes(tmp_path):
    from labkit.algorithms.hogwild import SharedState, share_parameters
    from labkit.models import build_model

    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    numel = sum(p.numel() for p in model.parameters())
    shared = SharedState(tmp_path, numel, world=2)
    share_parameters(model, shared.weights, fill=True)
    before = model[1].weight.detach().clone()
    other_process = (
        "import sys, torch\n"
        "from labkit.algorithms.hogwild import SharedState\n"
        "shared = SharedState(__import__('pathlib').Path(sys.argv[1]), int(sys.argv[2]), world=2)\n"
        "shared.weights.add_(1.0)\n"
        "shared.progress[1] = 7\n")
    subprocess.run([sys.executable, "-c", other_process, str(tmp_path), str(numel)], check=True, timeout=50)
    assert torch.equal(model[1].weight.detach(), before + 1.0)  # this process sees the other's update
    assert int(shared.progress[1]) == 7


# --- faults ------------------------------------------------------------------------------
def start_run(run_dir, sync, *extra):
    return subprocess.Popen([*LABKIT, "train", "--quiet", "--workers", str(WORKERS), "--sync", sync,
                             "--run-dir", str(run_dir), *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_rank_when(proc, run_dir, rank, ready, timeout=150):
    """SIGKILL ``rank`` (its pid from its ``started`` event) once ``ready()`` is true."""
    run = RunDir(run_dir)
    deadline = time.monotonic() + timeout
    while not ready(run):
        assert proc.poll() is None, "the run ended before a rank could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    (started,) = [e for e in run.metrics(kind="event") if e["event"] == "started" and e["rank"] == rank]
    os.kill(started["pid"], signal.SIGKILL)


def master_step_at_least(step):
    return lambda run: any(r["rank"] == 0 and r["step"] >= step for r in run.iter_metrics(kind="train"))


def finish(proc, run_dir, timeout=170):
    """The run's exit status and stderr; if it does not end in ``timeout`` s, what each rank was doing."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end in {timeout} s\n" + where_it_stands(run_dir))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def where_it_stands(run_dir):
    run = RunDir(run_dir)
    events = run.metrics(kind="event")
    last_steps = {record["rank"]: record["step"] for record in run.iter_metrics(kind="train")}
    logs = []
    for log in sorted(run.log_dir.glob("*.log")):
        logs.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-8:]))
    return "\n".join([f"events: {events}", f"last train step per rank: {last_steps}", *logs])


@pytest.mark.slow
@pytest.mark.timeout(250)
@pytest.mark.parametrize("sync", ["ps-async", "hogwild"])
def test_async_modes_survive_a_lost_worker(tmp_path, no_leftovers, sync):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, sync, "--steps", 150)
    kill_rank_when(proc, run_dir, 2, master_step_at_least(20))
    code, err = finish(proc, run_dir)
    summary = RunDir(run_dir).read_summary()
    assert code == 0, err + summary.get("error", "")
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.9
    assert summary["workers_lost"] == [2]
    events = RunDir(run_dir).metrics(kind="event")
    assert any(e["event"] == "worker_lost" and e["rank"] == 2 for e in events)
    (dropped,) = [e for e in events if e["event"] == "worker_dropped"]
    assert dropped["worker"] == 2 and dropped["rank"] == 0


@pytest.mark.slow
@pytest.mark.timeout(250)
@pytest.mark.parametrize("sync, backend", [("ps-async", "mpi"), ("easgd-async", "gloo"), ("gossip", "mpi")])
def test_async_modes_survive_a_lost_worker_under_mpiexec(tmp_path, no_leftovers, sync, backend):
    """mpiexec ends a whole job when one rank dies, unless told not to (-disable-auto-cleanup).

    With the mpi backend the survivors learn which rank died from mpiexec's SIGUSR1 and
    the guard's event; MPI itself would have them wait on it until the timeout.
    """
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = start_run(run_dir, sync, "--steps", 150, "--launcher", "mpi", "--backend", backend)
    kill_rank_when(proc, run_dir, 2, master_step_at_least(20))
    code, err = finish(proc, run_dir)
    summary = RunDir(run_dir).read_summary()
    seen = (summary, [e for e in RunDir(run_dir).metrics(kind="event") if e["event"] != "started"])
    assert code == 0, err + summary.get("error", "")
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.9, seen
    assert summary.get("workers_lost", summary.get("ranks_lost")) == [2], seen
    assert time.monotonic() - start < 60, seen  # nobody waited for the dead rank's timeout (120 s)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sync, rank, exact", [("ps-sync", 2, True), ("ssp", 2, False), ("ps-async", 0, False)],
                         ids=["ps-sync-worker", "ssp-worker", "ps-async-master"])
def test_a_lost_rank_fails_the_run_and_resume_finishes_it(tmp_path, no_leftovers, sync, rank, exact):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, sync, "--checkpoint-every", 20)
    kill_rank_when(proc, run_dir, rank, lambda run: run.checkpoint_path(20).exists())
    code, _ = finish(proc, run_dir)
    summary = RunDir(run_dir).read_summary()
    assert code == 1 and summary["status"] == "failed"
    assert f"rank {rank} died" in summary["error"]
    assert summary["resume_with"] == f"labkit train --run-dir {run_dir} --resume"

    out = run_cli("train", "--quiet", "--run-dir", run_dir, "--resume", timeout=170)
    assert out.returncode == 0, out.stderr
    resumed = RunDir(run_dir).read_summary()
    assert resumed["status"] == "completed" and resumed["test_accuracy"] >= 0.93
    assert RunDir(run_dir).latest_checkpoint() == RunDir(run_dir).checkpoint_path(resumed["steps"])
    resumed_from = [e["resumed_from"] for e in RunDir(run_dir).metrics(kind="event")
                    if e["event"] == "started" and e["resumed_from"]]
    assert len(resumed_from) == WORKERS and min(resumed_from) >= 20
    if exact:  # the same weights as a run that was never interrupted
        out, straight = train(tmp_path / "straight", sync)
        assert out.returncode == 0, out.stderr
        reference = final_weights(tmp_path / "straight", straight["steps"])
        weights = final_weights(run_dir, resumed["steps"])
        assert all(torch.equal(reference[k], weights[k]) for k in reference)


def test_a_rank_learns_of_a_death_from_the_metrics_without_the_signal(tmp_path):
    """Under mpiexec a survivor learns of a death from the guard's ``rank_died`` event even
    when SIGUSR1 never comes; deaths from before its launch (a resumed run) do not count."""
    from labkit.comm.base import Communicator
    from labkit.worker import _learn_deaths

    run = RunDir(tmp_path)
    died = {"kind": "event", "event": "rank_died", "t": 1.0, "detail": "killed by SIGKILL"}
    run.append_metrics({**died, "rank": 3})  # the run before a resume
    comm = Communicator(rank=0, size=4)
    before = signal.getsignal(signal.SIGUSR1)
    try:
        _learn_deaths(comm, run, run.metrics_path.stat().st_size, follow_metrics=True)
        time.sleep(0.5)
        assert comm.lost == set()
        run.append_metrics({**died, "rank": 2})
        deadline = time.monotonic() + 5
        while not comm.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert comm.lost == {2}
    finally:
        signal.signal(signal.SIGUSR1, before)

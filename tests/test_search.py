"""Search (labkit.search): ES with real ranks that send only scalars, PBT over labkit runs that
survives a killed member, regularized evolution and the swarm's steps, and bad options."""

import json
import os
import random
import signal
import time

import pytest
import torch

from labkit.search.es import NoiseTable, centered_ranks, es_gradient
from labkit.search.evolution import age_out, mutate, tournament
from labkit.search.pbt import PbtConfig, exploit_explore, run_pbt
from labkit.search.pso import pso_step

from .conftest import run_cli


def cli(*argv):
    """``labkit ARGV`` in this process: (exit status, what it wrote to stderr)."""
    import contextlib
    import io

    from labkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def test_centered_ranks():
    x = torch.tensor([[3.0, -1.0], [10.0, 0.5]])
    # ranks 2, 0, 3, 1 of 4 values, scaled to [-0.5, 0.5]
    assert torch.allclose(centered_ranks(x), torch.tensor([[2 / 3, 0.0], [1.0, 1 / 3]]) - 0.5)


def test_es_gradient_is_the_rank_weighted_sum_of_the_noise():
    noise = NoiseTable(seed=3, size=1000)
    assert torch.equal(noise.noise, NoiseTable(seed=3, size=1000).noise)  # every rank builds the same table
    pairs = torch.tensor([[10, 1.0, 0.0], [200, -2.0, 5.0], [7, 0.3, 0.2]], dtype=torch.float64)
    dim, sigma = 5, 0.1
    ranks = centered_ranks(pairs[:, 1:])
    expected = sum((ranks[k, 0] - ranks[k, 1]).float() * noise.noise[int(i):int(i) + dim]
                   for k, i in enumerate(pairs[:, 0])) / (2 * 3 * sigma)
    assert torch.allclose(es_gradient(pairs, noise, dim, sigma), expected)


@pytest.mark.timeout(200)
def test_es_with_two_ranks_sends_only_scalars(tmp_path, no_leftovers):
    run = tmp_path / "es"
    pairs, gens = 6, 40
    result = run_cli("es", "--workers", "2", "--generations", gens, "--pairs", pairs, "--timeout", "150",
                     "--run-dir", run, "--quiet", timeout=190)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ranks_agree"]
    # one allgather of (index, r+, r-) float64 per pair and generation, counted by the communicator
    per_generation = (2 - 1) * pairs * 3 * 8
    assert summary["bytes_per_generation_per_rank"] == per_generation
    assert per_generation < summary["parameter_bytes_per_generation_per_rank"]
    finished = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"finished"' in line]
    assert sorted(f["rank"] for f in finished) == [0, 1]
    assert all(f["bytes_sent"] == gens * per_generation for f in finished)
    assert summary["test_accuracy"] > 0.6  # 40 generations of a linear classifier on digits


def test_exploit_explore_truncation():
    rng = random.Random(0)
    scores = [0.5, 0.9, float("-inf"), 0.7, 0.8, 0.1, 0.95, 0.6, 0.3, 0.85]
    hp = [{"lr": 0.01 * (i + 1), "momentum": 0.5, "batch_size": 32} for i in range(10)]
    changes = exploit_explore(scores, hp, rng, fraction=0.2, resample_probability=0.0)
    assert sorted(m for m, _, _ in changes) == [2, 5]  # the bottom 20 %
    for _member, parent, new in changes:
        assert parent in (6, 1)  # the top 20 %
        assert new["lr"] / hp[parent]["lr"] == pytest.approx(0.8) or new["lr"] / hp[parent]["lr"] == pytest.approx(1.2)
        assert new["batch_size"] in (26, 38)


def test_regularized_evolution_steps():
    rng = random.Random(1)
    pop = [{"id": i, "score": s} for i, s in enumerate([0.2, 0.9, 0.5])]
    assert tournament(pop, 3, rng)["id"] == 1
    cands = [("a", "b"), ("a", "b", "c")]
    child = mutate(["a", "c"], cands, rng)
    assert sum(x != y for x, y in zip(child, ["a", "c"])) == 1
    import collections

    q = collections.deque(pop)
    assert age_out(q, {"id": 3, "score": 0.0})["id"] == 0  # the oldest goes, not the worst
    assert [m["id"] for m in q] == [1, 2, 3]


def test_pso_step_moves_towards_the_bests_and_stays_in_the_cube():
    rng = random.Random(2)
    x, v = [0.5, 0.5], [0.0, 0.0]
    nx, nv = pso_step(x, v, [0.5, 0.5], [1.0, 0.0], rng)
    assert nx[0] > 0.5 and nx[1] < 0.5 and all(0 <= c <= 1 for c in nx)
    big, _ = pso_step([0.9], [5.0], [0.9], [0.9], rng, inertia=1.0)
    assert big == [1.0]


@pytest.mark.timeout(400)
def test_pbt_over_runs_survives_a_killed_member(tmp_path, no_leftovers):
    killed = {}

    def kill_member_1(generation, runs):
        if generation != 0:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            started = [r for r in runs[1].metrics(kind="event") if r.get("event") == "started"]
            if started:
                os.kill(started[0]["pid"], signal.SIGKILL)
                killed["pid"] = started[0]["pid"]
                return
            time.sleep(0.1)

    config = PbtConfig(population=4, generations=2, steps_per_generation=20, seed=1, run_dir=str(tmp_path / "pbt"),
                       timeout=300)
    summary = run_pbt(config, on_start=kill_member_1)
    assert killed and summary["status"] == "completed"
    root = tmp_path / "pbt"
    events = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    first = [e for e in events if e.get("event") == "generation"][0]
    assert first["status"][1] == "failed" and first["scores"][1] is None
    (exploit,) = [e for e in events if e.get("event") == "exploit"]
    assert exploit["member"] == 1 and exploit["step"] == 20
    assert summary["lineage"][1][-1]["parent"] == exploit["parent"]
    # every member is a run directory that finished the second generation from a checkpoint
    for k, member in enumerate(summary["members"]):
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            assert os.path.isfile(os.path.join(member, name)), (member, name)
        member_summary = json.loads(open(os.path.join(member, "summary.json")).read())
        assert member_summary["status"] == "completed" and member_summary["steps"] == 40, (k, member_summary)
    shown = run_cli("show", *summary["members"], root, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("completed") == 5


@pytest.mark.parametrize("args, message", [
    (["es", "--workers", "0"], "--workers: must be >= 1"),
    (["es", "--sigma", "nan"], "--sigma: expected a finite number"),
    (["es", "--backend", "carrier-pigeon"], "--backend: 'carrier-pigeon' is not one of gloo, mpi"),
    (["search", "pbt", "--space", "lr,colour"], "--space: unknown hyperparameter 'colour'"),
    (["search", "pbt", "--population", "1"], "--population: must be >= 2"),
    (["search", "pbt", "--model", "gpt5"], "--model: unknown model 'gpt5'"),
    (["search", "evolution", "--sample-size", "9"], "--sample-size: must be <= 4"),
    (["search", "pso", "--steps", "2.5"], "--steps: expected a whole number"),
    (["search", "anneal"], "invalid choice: 'anneal'"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    code, err = cli(*args, "--run-dir", tmp_path / "run") if args != ["search", "anneal"] else cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labkit: error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_bad_option_from_the_real_command(tmp_path):
    result = run_cli("search", "pso", "--particles", "0", "--run-dir", tmp_path / "run", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["labkit: error: --particles: must be >= 1, got 0"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_evolution_members_are_run_directories(tmp_path, no_leftovers):
    run = tmp_path / "evo"
    result = run_cli("search", "evolution", "--population", "2", "--cycles", "1", "--epochs", "1",
                     "--run-dir", run, "--quiet", timeout=380)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["history"]) == 3 and summary["history"][2]["parent"] in (0, 1)
    for member in summary["history"]:
        assert json.loads(open(os.path.join(member["run_dir"], "summary.json")).read())["status"] == "completed"

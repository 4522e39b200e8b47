"""Regularized evolution (Real, Aggarwal, Huang, Le: "Regularized Evolution for Image Classifier
Architecture Search", 2018) over the small architectures of the ProxylessNAS space.

A population of P architectures (one operation per block) is trained; then, cycle after cycle,
S members are *sampled* at random, the best of the sample is *mutated* (one block gets another
operation), the child is trained and joins the population, and the *oldest* member is removed:
aging, not the worst, which is what "regularized" means. Each member is a labkit run directory
trained by its own process under ``labkit launch`` (local, mpiexec, torchrun or SLURM).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .common import SearchError, SearchRun, check_new_run_dir, check_number


def tournament(population: list[dict], sample_size: int, rng: random.Random) -> dict:
    """The best (highest ``score``) of ``sample_size`` members drawn at random."""
    sample = rng.sample(population, min(sample_size, len(population)))
    return max(sample, key=lambda m: m["score"])


def mutate(architecture: list[str], candidates: list[tuple[str, ...]], rng: random.Random) -> list[str]:
    """One block gets a different operation."""
    child = list(architecture)
    block = rng.randrange(len(child))
    child[block] = rng.choice([op for op in candidates[block] if op != child[block]])
    return child


def age_out(population: collections.deque, child: dict) -> dict:
    """Add the child, remove and return the oldest member."""
    population.append(child)
    return population.popleft()


@dataclass
class EvolutionConfig:
    population: int = field(default=4, metadata={"help": "members kept alive (P)"})
    sample_size: int = field(default=2, metadata={"help": "members drawn per tournament (S)"})
    cycles: int = field(default=4, metadata={"help": "children to train after the first population"})
    parallel: int = field(default=2, metadata={"help": "members trained at once"})
    epochs: int = field(default=3, metadata={"help": "training epochs of each member"})
    batch_size: int = field(default=64, metadata={"help": "batch size of each member"})
    lr: float = field(default=0.05, metadata={"help": "learning rate of each member"})
    launcher: str = field(default="local", metadata={"help": "labkit launch launcher"})
    seed: int = field(default=0, metadata={"help": "random seed of the search"})
    timeout: float = field(default=600.0, metadata={"help": "seconds one member may take"})
    run_dir: str | None = field(default=None, metadata={"help": "the search's run directory"})

    def validate(self) -> "EvolutionConfig":
        check_number(self, "population", whole=True, low=2)
        check_number(self, "sample_size", whole=True, low=1, high=self.population)
        for name in ("cycles", "parallel", "epochs", "batch_size"):
            check_number(self, name, whole=True, low=1)
        check_number(self, "seed", whole=True, low=0)
        check_number(self, "lr", positive=True)
        check_number(self, "timeout", positive=True)
        if self.launcher not in ("local", "mpi", "torchrun", "slurm"):
            raise SearchError("--launcher", f"{self.launcher!r} is not one of local, mpi, torchrun, slurm")
        if self.run_dir is not None:
            check_new_run_dir(self.run_dir)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_members(search: SearchRun, config: EvolutionConfig, members: list[dict]) -> None:
    """Train members (dicts with ``id`` and ``architecture``) as separate labkit processes, a few
    at a time; fill in each one's ``score`` (held-out accuracy) and ``summary``."""
    from ..runs import RunDir

    pending = list(members)
    running: list[tuple[dict, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < config.parallel:
            m = pending.pop(0)
            path = search.members / f"member-{m['id']:03d}"
            RunDir(path).create({"command": "search member", "sync": "evolution", "compression": "none",
                                 "workers": 1, "model": "-".join(m["architecture"]), "dataset": "digits",
                                 "architecture": m["architecture"], "epochs": config.epochs,
                                 "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed + m["id"],
                                 "parent": m.get("parent")}, 1)
            m["run_dir"] = str(path)
            cmd = [sys.executable, "-m", "labkit.cli", "launch", "-n", "1", "--launcher", config.launcher,
                   "--timeout", str(config.timeout), "--", sys.executable, "-m", "labkit.search.member", str(path)]
            log = open(path / "logs" / "launcher.log", "wb")
            running.append((m, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                            time.monotonic()))
            log.close()
        time.sleep(0.2)
        for item in list(running):
            m, proc, started = item
            if proc.poll() is None and time.monotonic() - started < config.timeout + 30:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            running.remove(item)
            summary = RunDir(m["run_dir"]).read_summary()
            if summary is None:
                summary = {"status": "failed", "error": f"the member's process ended with status {proc.returncode}"}
                RunDir(m["run_dir"]).write_summary(summary)
            m["summary"] = summary
            ok = summary.get("status") == "completed"
            m["score"] = summary["validation_accuracy"] if ok else float("-inf")
            search.event("member", member=m["id"], parent=m.get("parent"), architecture=m["architecture"],
                         score=m["score"] if ok else None, test_accuracy=summary.get("test_accuracy"),
                         status=summary.get("status"))


def run_evolution(config: EvolutionConfig, progress: bool = False) -> dict:
    from ..nas.supernet import candidates_for, default_layout

    config.validate()
    rng = random.Random(config.seed)
    candidates = [candidates_for(cin, cout, s) for cin, cout, s in default_layout((1, 8, 8))]
    search = SearchRun("evolution", config.to_dict(), config.run_dir, config.population)
    next_id = 0
    first = []
    for _ in range(config.population):
        first.append({"id": next_id, "architecture": [rng.choice(c) for c in candidates], "parent": None})
        next_id += 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.population + config.cycles, desc="evolution", unit="member", dynamic_ncols=True)
    train_members(search, config, first)
    if bar:
        bar.update(len(first))
    population = collections.deque(first)
    history = list(first)
    done = 0
    while done < config.cycles:
        children = []
        for _ in range(min(config.parallel, config.cycles - done)):
            parent = tournament(list(population), config.sample_size, rng)
            children.append({"id": next_id, "architecture": mutate(parent["architecture"], candidates, rng),
                             "parent": parent["id"]})
            next_id += 1
        train_members(search, config, children)
        for child in children:
            removed = age_out(population, child)
            search.event("age_out", member=removed["id"], child=child["id"])
        history += children
        done += len(children)
        if bar:
            bar.update(len(children))
    if bar:
        bar.close()
    best = max(history, key=lambda m: m["score"])
    return search.finish({
        "best_member": best["id"], "best_run_dir": best["run_dir"], "architecture": best["architecture"],
        "validation_accuracy": best["score"], "test_accuracy": best["summary"].get("test_accuracy"),
        "population": [m["id"] for m in population], "steps": len(history),
        "history": [{"id": m["id"], "parent": m["parent"], "architecture": m["architecture"],
                     "score": m["score"] if m["score"] != float("-inf") else None, "run_dir": m["run_dir"]}
                    for m in history],
    })

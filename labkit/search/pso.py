"""A particle swarm over hyperparameters (Lorenzo, Nalepa, Kawulok, Ramos, Pastor: "Hyper-parameter
Selection in Deep Neural Networks Using Parallel Particle Swarm Optimization", GECCO 2017).

Each particle is a point in the unit cube of the search space (learning rate and batch size on
log scales, momentum linear); every iteration evaluates all particles at once as labkit runs,
then moves each one:

    v ← w·v + c1·r1·(best_own − x) + c2·r2·(best_swarm − x),   x ← clip(x + v, 0, 1)
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from .common import SearchRun, check_new_run_dir, check_number
from .runs import (
    SPACE,
    base_config,
    check_space,
    config_for,
    from_unit,
    run_members,
    score,
    space_names,
)


def pso_step(x, v, own_best, swarm_best, rng: random.Random, inertia=0.5, c1=1.5, c2=1.5):
    """One move of one particle: its new position and velocity (lists of floats in [0, 1])."""
    new_v = [inertia * vi + c1 * rng.random() * (pi - xi) + c2 * rng.random() * (gi - xi)
             for xi, vi, pi, gi in zip(x, v, own_best, swarm_best)]
    new_x = [min(max(xi + vi, 0.0), 1.0) for xi, vi in zip(x, new_v)]
    return new_x, new_v


@dataclass
class PsoConfig:
    particles: int = field(default=4, metadata={"help": "particles (runs per iteration)"})
    iterations: int = field(default=3, metadata={"help": "iterations of the swarm"})
    steps: int = field(default=40, metadata={"help": "optimizer steps of each run"})
    space: str = field(default="lr,momentum,batch_size", metadata={"help": f"hyperparameters ({', '.join(SPACE)})"})
    inertia: float = field(default=0.5, metadata={"help": "w, how much of its velocity a particle keeps"})
    model: str = field(default="mlp", metadata={"help": "model of every run"})
    dataset: str = field(default="digits", metadata={"help": "dataset of every run"})
    launcher: str = field(default="local", metadata={"help": "launcher of the runs"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    timeout: float = field(default=600.0, metadata={"help": "seconds an iteration may take"})
    run_dir: str | None = field(default=None, metadata={"help": "the search's run directory"})

    def validate(self) -> "PsoConfig":
        for name in ("particles", "iterations", "steps"):
            check_number(self, name, whole=True, low=1)
        check_number(self, "seed", whole=True, low=0)
        check_number(self, "inertia", low=0, high=1)
        check_number(self, "timeout", positive=True)
        check_space(self.space_list())
        if self.run_dir is not None:
            check_new_run_dir(self.run_dir)
        self.base_config(Path("/nonexistent-labkit-check"))
        return self

    def space_list(self) -> list[str]:
        return space_names(self.space)

    def base_config(self, run_dir):
        return base_config(self.space_list(), run_dir, model=self.model, dataset=self.dataset, launcher=self.launcher,
                           steps=self.steps, eval_every=self.steps, checkpoint_every=0,
                           log_every=max(1, self.steps // 4), seed=self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_pso(config: PsoConfig, progress: bool = False) -> dict:
    config.validate()
    rng = random.Random(config.seed)
    names = config.space_list()
    search = SearchRun("pso", config.to_dict(), config.run_dir, config.particles)
    x = [[rng.random() for _ in names] for _ in range(config.particles)]
    v = [[0.0 for _ in names] for _ in range(config.particles)]
    own_best = [list(p) for p in x]
    own_score = [float("-inf")] * config.particles
    swarm_best, swarm_score, best_dir = list(x[0]), float("-inf"), None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.iterations, desc="pso", unit="iteration", dynamic_ncols=True)
    for it in range(config.iterations):
        hparams = [{n: from_unit(n, u) for n, u in zip(names, p)} for p in x]
        dirs = [search.members / f"particle-{k}-it{it}" for k in range(config.particles)]
        configs = [config_for(config.base_config(d), h) for d, h in zip(dirs, hparams)]
        scores = [score(s) for s in run_members(configs, config.timeout)]
        for k, s in enumerate(scores):
            if s > own_score[k]:
                own_score[k], own_best[k] = s, list(x[k])
            if s > swarm_score:
                swarm_score, swarm_best, best_dir = s, list(x[k]), str(dirs[k])
        search.event("iteration", iteration=it, positions=x, hparams=hparams,
                     scores=[s if s != float("-inf") else None for s in scores], best=swarm_score)
        for k in range(config.particles):
            x[k], v[k] = pso_step(x[k], v[k], own_best[k], swarm_best, rng, config.inertia)
        if bar:
            bar.update(1)
            bar.set_postfix(best=f"{swarm_score:.3f}")
    if bar:
        bar.close()
    return search.finish({"test_accuracy": swarm_score if swarm_score != float("-inf") else None,
                          "best_run_dir": best_dir, "steps": config.iterations * config.steps,
                          "best_hparams": {n: from_unit(n, u) for n, u in zip(names, swarm_best)}})

"""Population-based training (Jaderberg et al.: "Population Based Training of Neural Networks", 2017).

P members train at once, each a labkit run of its own (a run directory under ``members/``).
Every ``--steps-per-generation`` steps the population is ranked; with *truncation selection*
the bottom 20 % copy the weights (the checkpoint) of a member of the top 20 % (**exploit**) and
change its hyperparameters: each is multiplied by 0.8 or 1.2, or, with probability
``--resample``, drawn again from its prior (**explore**). Then every member resumes from its
checkpoint. The lineage (who copied whom, when, with which hyperparameters) is recorded in the
search's ``metrics.jsonl`` and ``summary.json``. A member whose process dies scores -inf and is
replaced at the next exploit step; the search goes on.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import SearchRun, check_new_run_dir, check_number
from .runs import (
    SPACE,
    base_config,
    check_space,
    clip,
    config_for,
    run_members,
    sample,
    score,
    space_names,
)


def exploit_explore(scores: list[float], hparams: list[dict], rng: random.Random, fraction: float = 0.2,
                    resample_probability: float = 0.25, space: list[str] | None = None) -> list[tuple[int, int, dict]]:
    """PBT's truncation step: [(member, parent, new hyperparameters)] for each member of the bottom
    ``fraction`` (at least one), which copies a random member of the top ``fraction``."""
    n = len(scores)
    cut = max(1, int(round(fraction * n)))
    order = sorted(range(n), key=lambda i: (scores[i], -i))  # worst first; ties: the later member is worse
    bottom, top = order[:cut], order[-cut:]
    changes = []
    for member in bottom:
        parent = rng.choice(top)
        new = {}
        for name, value in hparams[parent].items():
            if space is not None and name not in space:
                new[name] = value
            elif rng.random() < resample_probability:
                new[name] = sample([name], rng)[name]
            else:
                new[name] = clip(name, value * rng.choice((0.8, 1.2)))
        changes.append((member, parent, new))
    return changes


def copy_checkpoint(parent_dir: Path, child_dir: Path, hparams: dict) -> int:
    """The parent's newest checkpoint becomes the child's, with the child's learning rate and
    momentum written into the optimizer state it will resume from; returns its step."""
    from ..runs import RunDir

    parent, child = RunDir(parent_dir), RunDir(child_dir)
    state = parent.load_checkpoint()
    step = int(state.pop("step"))
    optimizer = state.get("optimizer")
    if isinstance(optimizer, dict):
        for group in optimizer.get("param_groups", []):
            if "lr" in hparams:
                group["lr"] = hparams["lr"]
            if "momentum" in hparams and "momentum" in group:
                group["momentum"] = hparams["momentum"]
    for old in child.checkpoints():
        old.unlink()
    child.save_checkpoint(step, state)
    return step


@dataclass
class PbtConfig:
    population: int = field(default=4, metadata={"help": "members training at once"})
    generations: int = field(default=3, metadata={"help": "rounds of training between exploit steps"})
    steps_per_generation: int = field(default=40, metadata={"help": "optimizer steps of each member per round"})
    space: str = field(default="lr,momentum,batch_size", metadata={
        "help": f"hyperparameters to search, comma-separated ({', '.join(SPACE)})"})
    truncation: float = field(default=0.2, metadata={"help": "fraction at the bottom that copies the top"})
    resample: float = field(default=0.25, metadata={"help": "probability of resampling instead of ×0.8/×1.2"})
    model: str = field(default="mlp", metadata={"help": "model of every member"})
    dataset: str = field(default="digits", metadata={"help": "dataset of every member"})
    workers: int = field(default=1, metadata={"help": "ranks of each member"})
    launcher: str = field(default="local", metadata={"help": "launcher of the members (local, mpi, torchrun, slurm)"})
    seed: int = field(default=0, metadata={"help": "random seed of the search"})
    timeout: float = field(default=600.0, metadata={"help": "seconds a round may take"})
    run_dir: str | None = field(default=None, metadata={"help": "the search's run directory"})

    def validate(self) -> "PbtConfig":
        check_number(self, "population", whole=True, low=2)
        for name in ("generations", "steps_per_generation", "workers"):
            check_number(self, name, whole=True, low=1)
        check_number(self, "seed", whole=True, low=0)
        check_number(self, "truncation", positive=True, high=0.5)
        check_number(self, "resample", low=0, high=1)
        check_number(self, "timeout", positive=True)
        check_space(self.space_list())
        if self.run_dir is not None:
            check_new_run_dir(self.run_dir)
        self.base_config(Path("/nonexistent-labkit-check"))  # model, dataset, launcher, batch sizes
        return self

    def space_list(self) -> list[str]:
        return space_names(self.space)

    def base_config(self, run_dir: Path, member: int = 0):
        steps = self.steps_per_generation
        return base_config(self.space_list(), run_dir, model=self.model, dataset=self.dataset, workers=self.workers,
                           launcher=self.launcher, steps=steps, eval_every=steps, checkpoint_every=steps,
                           seed=self.seed + member, log_every=max(1, steps // 4))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_pbt(config: PbtConfig, progress: bool = False, on_start=None, log=None) -> dict:
    """Run the whole search; return its summary (best member, lineage, schedules)."""
    config.validate()
    rng = random.Random(config.seed)
    space = config.space_list()
    search = SearchRun("pbt", config.to_dict(), config.run_dir, config.population)
    dirs = [search.members / f"member-{k}" for k in range(config.population)]
    hparams = [sample(space, rng) for _ in range(config.population)]
    lineage = [[{"generation": 0, "parent": None, "hparams": dict(h)}] for h in hparams]
    for k, h in enumerate(hparams):
        search.event("member", generation=0, member=k, hparams=h)
    T = config.steps_per_generation
    summaries = []
    bar = _bar(config.generations, "pbt") if progress else None
    for gen in range(config.generations):
        configs = []
        for k in range(config.population):
            base = config.base_config(dirs[k], k)
            changes = {"steps": (gen + 1) * T}
            if gen > 0:
                changes["resume"] = True
            configs.append(config_for(base, hparams[k], **changes))
        summaries = run_members(configs, config.timeout, on_start=(lambda runs, g=gen: on_start(g, runs))
                                if on_start else None)
        scores = [score(s) for s in summaries]
        search.event("generation", generation=gen, step=(gen + 1) * T, scores=[_finite(s) for s in scores],
                     hparams=hparams, status=[(s or {}).get("status") for s in summaries])
        if log:
            log(f"generation {gen}: " + ", ".join(f"{_finite(s)}" for s in scores))
        if bar:
            bar.update(1)
            bar.set_postfix(best=f"{max(scores):.3f}")
        if gen == config.generations - 1:
            break
        for member, parent, new in exploit_explore(scores, hparams, rng, config.truncation, config.resample, space):
            step = copy_checkpoint(dirs[parent], dirs[member], new)
            search.event("exploit", generation=gen + 1, member=member, parent=parent, step=step,
                         before=hparams[member], after=new, parent_score=_finite(scores[parent]),
                         member_score=_finite(scores[member]))
            hparams[member] = new
            lineage[member].append({"generation": gen + 1, "parent": parent, "step": step, "hparams": dict(new)})
    if bar:
        bar.close()
    scores = [score(s) for s in summaries]
    best = max(range(config.population), key=lambda k: scores[k])
    return search.finish({
        "best_member": best, "best_run_dir": str(dirs[best]), "test_accuracy": _finite(scores[best]),
        "scores": [_finite(s) for s in scores], "hparams": hparams, "lineage": lineage,
        "members": [str(d) for d in dirs], "steps": config.generations * T,
        "member_status": [(s or {}).get("status") for s in summaries],
    })


def _finite(x: float):
    return x if math.isfinite(x) else None


def _bar(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="generation", dynamic_ncols=True)


def schedules(search_dir) -> dict:
    """member -> [(step, hyperparameters)] over the search, read from its metrics: PBT's schedules."""
    from ..runs import RunDir

    out: dict[int, list] = {}
    for record in RunDir(search_dir).metrics(kind="event"):
        if record.get("event") == "member":
            out.setdefault(record["member"], []).append((0, record["hparams"]))
        elif record.get("event") == "exploit":
            out.setdefault(record["member"], []).append((record["step"], record["after"]))
    return out


__all__ = ["PbtConfig", "run_pbt", "exploit_explore", "copy_checkpoint", "schedules", "time"]

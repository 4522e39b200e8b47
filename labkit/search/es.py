"""Evolution strategies (Salimans, Ho, Chen, Sidor, Sutskever: "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning", 2017), with ranks that exchange only scalars.

Every rank builds the same noise table from one seed. In each generation a rank draws its own
indices into the table, evaluates the mirrored pair θ + σε, θ − σε for each (ε = the slice of the
table at the index), and shares only ``(index, return⁺, return⁻)``: three numbers per pair,
gathered by one allgather. Each rank then rebuilds every ε from the indices, turns all returns
into centred ranks, and takes the same Adam step on

    g = Σ_i (R(return⁺_i) − R(return⁻_i)) · ε_i / (2 n σ)

so the parameters never cross the wire: O(population) scalars per generation instead of
O(parameters).

    labkit es --workers 4          # a classifier on digits, 4 ranks under `labkit launch`
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

PAIR_FIELDS = 3  # index, return of θ + σε, return of θ − σε
SCALAR_BYTES = 8  # float64: an index up to 2^53 is exact


class NoiseTable:
    """One block of Gaussian noise that every rank builds from the same seed."""

    def __init__(self, seed: int, size: int):
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(size, generator=g)

    def __len__(self) -> int:
        return len(self.noise)

    def get(self, index: int, dim: int) -> torch.Tensor:
        return self.noise[index:index + dim]

    def sample_indices(self, count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.noise) - dim + 1, (count,), generator=generator)


def centered_ranks(x: torch.Tensor) -> torch.Tensor:
    """The rank of every value, scaled to [-0.5, 0.5] (Salimans et al., section 2.3)."""
    flat = x.reshape(-1)
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.arange(len(flat), dtype=flat.dtype)
    if len(flat) > 1:
        ranks = ranks / (len(flat) - 1) - 0.5
    else:
        ranks.zero_()
    return ranks.reshape(x.shape)


def es_gradient(pairs: torch.Tensor, noise: NoiseTable, dim: int, sigma: float) -> torch.Tensor:
    """The ascent direction from all ranks' (index, return⁺, return⁻) rows."""
    indices = pairs[:, 0].long()
    ranks = centered_ranks(pairs[:, 1:].double())
    weights = (ranks[:, 0] - ranks[:, 1]).float()
    g = torch.zeros(dim)
    for w, i in zip(weights, indices.tolist()):
        g += w * noise.get(i, dim)
    return g / (2 * len(pairs) * sigma)


# --- the model: a flat parameter vector ---------------------------------------------------------
def shapes_of(input_dim: int, hidden: int, classes: int) -> list[tuple[int, ...]]:
    if hidden == 0:
        return [(classes, input_dim), (classes,)]
    return [(hidden, input_dim), (hidden,), (classes, hidden), (classes,)]


def forward(theta: torch.Tensor, x: torch.Tensor, shapes) -> torch.Tensor:
    params, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        params.append(theta[offset:offset + n].view(shape))
        offset += n
    x = x.reshape(len(x), -1)
    if len(params) == 2:
        return F.linear(x, *params)
    return F.linear(torch.tanh(F.linear(x, params[0], params[1])), params[2], params[3])


def reward(theta, x, y, shapes) -> float:
    """The return of one parameter vector: minus the cross-entropy on the generation's batch."""
    return -float(F.cross_entropy(forward(theta, x, shapes), y))


@dataclass
class EsConfig:
    """Every setting of ``labkit es``."""

    workers: int = field(default=4, metadata={"help": "ranks (processes)"})
    generations: int = field(default=200, metadata={"help": "generations (updates)"})
    pairs: int = field(default=8, metadata={"help": "mirrored pairs each rank evaluates per generation"})
    sigma: float = field(default=0.05, metadata={"help": "noise standard deviation σ"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 coefficient"})
    batch_size: int = field(default=256, metadata={"help": "training samples each return is measured on"})
    hidden: int = field(default=0, metadata={"help": "hidden units (0: a linear classifier)"})
    table_size: int = field(default=1_000_000, metadata={"help": "floats in the shared noise table"})
    eval_every: int = field(default=20, metadata={"help": "test accuracy every N generations"})
    seed: int = field(default=0, metadata={"help": "seed of the noise table, the data and the start"})
    launcher: str = field(default="local", metadata={"help": "labkit launch launcher (local, mpi, torchrun, slurm)"})
    backend: str = field(default="gloo", metadata={"help": "communication backend (gloo, mpi)"})
    timeout: float = field(default=300.0, metadata={"help": "seconds before the ranks are ended"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<time>-es)"})

    def validate(self) -> "EsConfig":
        from .common import SearchError, check_number

        for name in ("workers", "generations", "pairs", "batch_size", "eval_every", "table_size"):
            check_number(self, name, whole=True, low=1)
        check_number(self, "hidden", whole=True, low=0)
        check_number(self, "seed", whole=True, low=0)
        for name in ("sigma", "lr", "timeout"):
            check_number(self, name, positive=True)
        check_number(self, "weight_decay", low=0)
        if self.launcher not in ("local", "mpi", "torchrun", "slurm"):
            raise SearchError("--launcher", f"{self.launcher!r} is not one of local, mpi, torchrun, slurm")
        if self.backend not in ("gloo", "mpi"):
            raise SearchError("--backend", f"{self.backend!r} is not one of gloo, mpi")
        dim = sum(math.prod(s) for s in shapes_of(64, self.hidden, 10))
        if self.table_size < 10 * dim:
            raise SearchError("--table-size", f"{self.table_size} floats is too small for {dim} parameters "
                                              f"(at least {10 * dim})")
        if self.run_dir is not None:
            from .common import check_new_run_dir

            check_new_run_dir(self.run_dir)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- one rank ---------------------------------------------------------------------------------
def rank_main(run_dir: str) -> int:
    """What each rank runs (under ``labkit launch``): generations of ES, scalars only on the wire."""
    import json

    from .. import comm as lkcomm
    from ..data import load_dataset
    from ..runs import RunDir

    torch.set_num_threads(1)
    run = RunDir(run_dir)
    meta = json.loads((Path(run_dir) / "config.json").read_text())
    cfg = EsConfig(**{k: v for k, v in meta["config"].items() if k in {f.name for f in dataclasses.fields(EsConfig)}})
    start = meta["start_time"]
    comm = lkcomm.init(timeout=cfg.timeout)
    data = load_dataset("digits")
    x_train, y_train = data.x_train.reshape(len(data.x_train), -1), data.y_train
    x_test, y_test = data.x_test.reshape(len(data.x_test), -1), data.y_test
    shapes = shapes_of(x_train.shape[1], cfg.hidden, data.num_classes)
    dim = sum(math.prod(s) for s in shapes)
    noise = NoiseTable(cfg.seed, cfg.table_size)
    theta = torch.zeros(dim, requires_grad=True)
    if cfg.hidden:
        with torch.no_grad():
            theta.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(cfg.seed + 1)) * 0.1)
    optimizer = torch.optim.Adam([theta], lr=cfg.lr)
    run.append_metrics({"t": time.time() - start, "kind": "event", "event": "started", "rank": comm.rank,
                        "pid": os.getpid(), "host": os.uname().nodename, "world_size": comm.size,
                        "parameters": dim})
    bytes_per_generation = []
    for gen in range(1, cfg.generations + 1):
        batch = torch.randint(0, len(x_train), (cfg.batch_size,),
                              generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + gen))
        xb, yb = x_train[batch], y_train[batch]
        g_rank = torch.Generator().manual_seed((cfg.seed * 7919 + gen) * 1009 + comm.rank)
        indices = noise.sample_indices(cfg.pairs, dim, g_rank)
        rows = _antithetic_rewards(theta, noise, indices, cfg.sigma, xb, yb, shapes)
        before = comm.stats.bytes_sent
        everyone = torch.cat(comm.allgather(rows))  # the only message: (index, r+, r-) of every pair
        bytes_per_generation.append(comm.stats.bytes_sent - before)
        g = es_gradient(everyone, noise, dim, cfg.sigma)
        optimizer.zero_grad()
        with torch.no_grad():
            theta.grad = -g + cfg.weight_decay * theta
        optimizer.step()
        if comm.rank == 0:
            with torch.no_grad():
                loss = -reward(theta, xb, yb, shapes)
            record = {"t": time.time() - start, "kind": "train", "rank": 0, "step": gen, "loss": loss,
                      "mean_return": float(everyone[:, 1:].mean()), "population": 2 * len(everyone),
                      "samples": 2 * len(everyone) * cfg.batch_size, "bytes_sent": comm.stats.bytes_sent}
            run.append_metrics(record)
            if gen % cfg.eval_every == 0 or gen == cfg.generations:
                run.append_metrics({"t": time.time() - start, "kind": "eval", "rank": 0, "step": gen,
                                    **_test(theta, x_test, y_test, shapes)})
    _finish(run, start, comm, cfg, theta, dim, bytes_per_generation, lambda: _test(theta, x_test, y_test, shapes))
    return 0


def _antithetic_rewards(theta, noise, indices, sigma, xb, yb, shapes) -> torch.Tensor:
    """(index, r(θ + σε), r(θ − σε)) of each of this rank's pairs: all it sends."""
    rows = torch.zeros(len(indices), PAIR_FIELDS, dtype=torch.float64)
    with torch.no_grad():
        for k, i in enumerate(indices.tolist()):
            eps = noise.get(i, len(theta))
            rows[k] = torch.tensor([i, reward(theta + sigma * eps, xb, yb, shapes),
                                    reward(theta - sigma * eps, xb, yb, shapes)], dtype=torch.float64)
    return rows


def _test(theta, x_test, y_test, shapes) -> dict:
    with torch.no_grad():
        out = forward(theta, x_test, shapes)
    return {"accuracy": float((out.argmax(1) == y_test).float().mean()), "loss": float(F.cross_entropy(out, y_test))}


def _finish(run, start, comm, cfg, theta, dim, bytes_per_generation, evaluate) -> None:
    """The ``finished`` event; every rank's θ compared; rank 0 evaluates (``evaluate()``) and
    writes the summary."""
    sent = comm.stats.bytes_sent
    run.append_metrics({"t": time.time() - start, "kind": "event", "event": "finished", "rank": comm.rank,
                        "bytes_sent": sent, "generations": cfg.generations,
                        "bytes_per_generation": max(bytes_per_generation),
                        "scalars_per_generation": cfg.pairs * PAIR_FIELDS * comm.size})
    # every rank holds the same θ: check it (one hash each), then rank 0 writes the summary
    check = torch.tensor([float(theta.detach().double().sum()), float(sent)], dtype=torch.float64)
    gathered = torch.stack(comm.allgather(check))
    if comm.rank == 0:
        test = evaluate()
        same = bool(torch.allclose(gathered[:, 0], gathered[0, 0], rtol=0, atol=1e-9))
        params_bytes = 2 * (comm.size - 1) / comm.size * dim * 4  # an allreduce of fp32 gradients
        run.write_summary({
            "status": "completed", "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "steps": cfg.generations,
            "generations": cfg.generations, "wall_time_s": time.time() - start, "world_size": comm.size,
            "population": 2 * cfg.pairs * comm.size, "parameters": dim,
            "bytes_sent": int(gathered[:, 1].sum()), "bytes_sent_per_rank": [int(b) for b in gathered[:, 1]],
            "bytes_per_generation_per_rank": max(bytes_per_generation),
            "parameter_bytes_per_generation_per_rank": params_bytes,
            "ranks_agree": same, "comm_fraction": None,
        })
    comm.barrier()
    comm.close()


# --- the driver: `labkit es` ------------------------------------------------------------------------
def run_es(config: EsConfig, progress: bool = False) -> dict:
    """Start the ranks under ``labkit launch``, follow them, return ``summary.json``."""
    from ..runs import RunDir, default_run_dir

    config.validate()
    if config.run_dir is None:
        config = dataclasses.replace(config, run_dir=str(default_run_dir("linear" if not config.hidden else "mlp",
                                                                         "es", config.workers)))
    run = RunDir(config.run_dir)
    run.create({**config.to_dict(), "command": "es", "sync": "es", "compression": "none",
                "model": "linear" if not config.hidden else f"mlp{config.hidden}"}, config.workers)
    command = [sys.executable, "-m", "labkit.cli", "launch", "-n", str(config.workers), "--launcher", config.launcher,
               "--backend", config.backend, "--timeout", str(config.timeout), "--",
               sys.executable, "-m", "labkit.search.es", str(run.path)]
    log = open(run.log_dir / "launcher.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.generations, desc=f"es x{config.workers}", unit="gen", dynamic_ncols=True)
    done, offset = 0, 0
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if bar:
                for record, next_offset in run.read_metrics_from(offset):
                    offset = next_offset
                    if record.get("kind") == "train":
                        bar.update(record["step"] - done)
                        done = record["step"]
                        bar.set_postfix(loss=f"{record['loss']:.3f}")
    except KeyboardInterrupt:
        _end(proc)
        raise
    finally:
        if bar:
            bar.close()
        log.close()
        _end(proc)
    summary = run.read_summary()
    if summary is None or proc.returncode != 0:
        lines = (run.log_dir / "launcher.log").read_text(errors="replace").strip().splitlines()
        summary = {"status": "failed", "world_size": config.workers,
                   "error": f"labkit launch ended with status {proc.returncode}: "
                            f"{lines[-1] if lines else 'no output'} (see {run.log_dir / 'launcher.log'})"}
        run.write_summary(summary)
    return {**summary, "run_dir": str(run.path)}


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))

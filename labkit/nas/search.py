"""The ProxylessNAS search on this machine: alternate weight and α steps, derive, retrain, time.

    labkit nas --latency-weight 0.5            # search on digits, retrain, measure latency

One search is one run directory (``config.json``, ``metrics.jsonl``, ``summary.json``,
``latency_table.json``), so ``labkit show`` and the panel read it like any run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .latency import (
    LatencyModel,
    load_table,
    measure_network,
    measure_table,
    measure_with_parts,
    save_table,
)
from .supernet import ChildNet, SuperNet

LATENCY_FORMS = ("add", "mul")


class NasError(ValueError):
    """A bad setting of a search; ``option`` is the command-line flag at fault."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


@dataclass
class NasConfig:
    """Every setting of one search (each is an option of ``labkit nas``)."""

    dataset: str = field(default="digits", metadata={"help": "dataset (digits, or cifar10 with --data-dir)"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with the dataset's files"})
    epochs: int = field(default=6, metadata={"help": "search epochs (weights and α)"})
    warmup_epochs: int = field(default=1, metadata={"help": "first epochs train the weights only"})
    retrain_epochs: int = field(default=8, metadata={"help": "epochs to train the derived network from scratch"})
    batch_size: int = field(default=64, metadata={"help": "samples per step"})
    lr: float = field(default=0.05, metadata={"help": "learning rate of the weights (SGD, momentum 0.9)"})
    arch_lr: float = field(default=0.05, metadata={"help": "learning rate of α (Adam)"})
    weight_l2: float = field(default=4e-5, metadata={"help": "λ1, the weight of ‖w‖² in the loss"})
    latency_weight: float = field(default=0.0, metadata={"help": "λ2, the weight of E[latency] (ms) in the loss"})
    latency_form: str = field(default="add", metadata={
        "help": "add: CE + λ2·E[lat]; mul: CE·(log E[lat] / log T)^λ2, the paper's multiplicative form"})
    latency_target: float | None = field(default=None, metadata={
        "help": "T of the mul form, in ms (default: E[lat] of the untrained supernet)"})
    latency_table: str | None = field(default=None, metadata={"help": "a latency table (JSON) to use instead of measuring one"})
    holdout: float = field(default=0.2, metadata={"help": "fraction of the training data that trains α"})
    threads: int = field(default=1, metadata={"help": "CPU threads for training and for timing (batch 1)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    run_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<time>-nas)"})

    def validate(self) -> "NasConfig":
        for name in ("epochs", "retrain_epochs", "batch_size", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NasError(_flag(name), f"must be a whole number >= 1, got {v!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) \
                or not 0 <= self.warmup_epochs < self.epochs:
            raise NasError("--warmup-epochs", f"must be a whole number from 0 to epochs-1 ({self.epochs - 1}), "
                                              f"got {self.warmup_epochs!r}")
        for name in ("lr", "arch_lr"):
            v = getattr(self, name)
            if not _finite(v) or v <= 0:
                raise NasError(_flag(name), f"must be a number > 0, got {v!r}")
        for name in ("weight_l2", "latency_weight"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise NasError(_flag(name), f"must be a number >= 0, got {v!r}")
        if self.latency_form not in LATENCY_FORMS:
            raise NasError("--latency-form", f"{self.latency_form!r} is not one of {', '.join(LATENCY_FORMS)}")
        if self.latency_target is not None and (not _finite(self.latency_target) or self.latency_target <= 1e-3):
            raise NasError("--latency-target", f"must be a number of ms > 0.001, got {self.latency_target!r}")
        if not _finite(self.holdout) or not 0.05 <= self.holdout <= 0.5:
            raise NasError("--holdout", f"must be between 0.05 and 0.5, got {self.holdout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise NasError("--seed", f"must be a whole number >= 0, got {self.seed!r}")
        if self.latency_table is not None and not Path(self.latency_table).is_file():
            raise NasError("--latency-table", f"{self.latency_table}: no such file")
        if self.run_dir is not None:
            path = Path(self.run_dir)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise NasError("--run-dir", f"{self.run_dir} already exists and is not an empty directory")
        _check_dataset(self.dataset, self.data_dir)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_dataset(name: str, data_dir: str | None) -> None:
    from ..data import DataError, check_data_dir
    from ..registry import DATASETS

    if name not in DATASETS:
        raise NasError("--dataset", f"unknown dataset {name!r}; choose one of {', '.join(DATASETS.names())}")
    try:
        check_data_dir(name, data_dir)
    except DataError as e:
        raise NasError("--data-dir", str(e)) from None


# --- the search ---------------------------------------------------------------------------------
def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the weights' part and the held-out part (for α) of the training set."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    cut = int(round(n * fraction))
    return order[cut:], order[:cut]


def _batches(x, y, indices, batch_size, generator):
    order = indices[torch.randperm(len(indices), generator=generator)]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def latency_penalty(expected_ms: torch.Tensor, weight: float, form: str, target_ms: float) -> tuple:
    """(how to combine with CE, the factor): add → CE + λ2·E[lat]; mul → CE·(log E[lat]/log T)^λ2.

    The mul form works in microseconds, so that log E[lat] > 0 for latencies above 1 µs.
    """
    if form == "add":
        return "add", weight * expected_ms
    ratio = torch.log(expected_ms * 1000) / math.log(target_ms * 1000)
    return "mul", ratio ** weight


def l2_of(params) -> torch.Tensor:
    return sum((p * p).sum() for p in params)


def evaluate(model, x, y, batch_size: int = 512) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = model(x[start:start + batch_size])
            loss += float(F.cross_entropy(out, y[start:start + batch_size], reduction="sum"))
            correct += int((out.argmax(1) == y[start:start + batch_size]).sum())
    model.train()
    return correct / len(x), loss / len(x)


def train_child(architecture, data, epochs: int, batch_size: int, lr: float, weight_l2: float, seed: int,
                on_epoch=None) -> ChildNet:
    """Train a derived architecture from scratch on the whole training set."""
    torch.manual_seed(seed)
    model = ChildNet(tuple(data.x_train.shape[1:]), data.num_classes, architecture)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed + 1)
    all_idx = torch.arange(len(data.x_train))
    for epoch in range(epochs):
        for xb, yb in _batches(data.x_train, data.y_train, all_idx, batch_size, g):
            loss = F.cross_entropy(model(xb), yb) + weight_l2 * l2_of(model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if on_epoch:
            on_epoch(epoch, float(loss.detach()))
    return model


def run_search(config: NasConfig, progress: bool = False, log=print) -> dict:
    """Search, derive, retrain, time; write the run directory; return the summary."""
    from ..data import load_dataset
    from ..models import parameter_count
    from ..runs import RunDir, default_run_dir
    from .latency import LatencyTableError

    config.validate()
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data_dir)
    net = SuperNet(tuple(data.x_train.shape[1:]), data.num_classes)
    table = None
    if config.latency_table:  # untrusted: checked before anything is written
        try:
            table = load_table(config.latency_table)
            LatencyModel(table, net)
        except LatencyTableError as e:
            raise NasError("--latency-table", str(e)) from None
    if config.run_dir is None:
        config = dataclasses.replace(config, run_dir=str(default_run_dir("supernet", "nas", 1)))
    run = RunDir(config.run_dir)
    # sync/compression/workers: what `labkit show` lists for every run directory
    run.create({**config.to_dict(), "command": "nas", "sync": "nas", "compression": "none", "workers": 1,
                "model": "supernet"}, 1)
    start = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # more threads than free cores make small convolutions crawl
    try:
        summary = _search(config, run, start, progress, log, data, net, table, parameter_count)
    except Exception as e:
        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}", "wall_time_s": time.time() - start}
        run.write_summary(summary)
        raise
    finally:
        torch.set_num_threads(threads)
    run.write_summary(summary)
    return {**summary, "run_dir": str(run.path)}


def _search(config, run, start, progress, log, data, net, table, parameter_count) -> dict:
    # the latency table: this machine's, or the one handed in (checked in run_search)
    if table is None:
        table = measure_table(net, threads=config.threads)
        table["_file"] = str(save_table(table, run.path / "latency_table.json"))
    if config.latency_table:
        save_table({k: v for k, v in table.items() if k != "_file"}, run.path / "latency_table.json")
    latency = LatencyModel(table, net)
    target = config.latency_target or float(latency.expected(net).detach())

    w_idx, a_idx = split_holdout(len(data.x_train), config.holdout, config.seed)
    weights_opt = torch.optim.SGD(net.weight_parameters(), lr=config.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(weights_opt, config.epochs)
    arch_opt = torch.optim.Adam(net.arch_parameters(), lr=config.arch_lr, betas=(0.0, 0.999), eps=1e-8)
    g_w = torch.Generator().manual_seed(config.seed + 11)
    g_a = torch.Generator().manual_seed(config.seed + 12)
    steps_per_epoch = len(w_idx) // config.batch_size
    bar = _bar(config.epochs * steps_per_epoch, "search") if progress else None
    step = 0
    for epoch in range(config.epochs):
        arch_batches = iter(())
        for xb, yb in _batches(data.x_train, data.y_train, w_idx, config.batch_size, g_w):
            # 1. the weights, one sampled path per block (equations (2) and (3))
            net.set_mode("weights")
            ce = F.cross_entropy(net(xb), yb)
            loss = ce + config.weight_l2 * l2_of(net.weight_parameters())
            weights_opt.zero_grad()
            loss.backward()
            weights_opt.step()
            step += 1
            arch_loss = None
            if epoch >= config.warmup_epochs:
                # 2. α on held-out data, two sampled paths per block, gradient through the gates
                try:
                    xa, ya = next(arch_batches)
                except StopIteration:
                    arch_batches = _batches(data.x_train, data.y_train, a_idx, min(config.batch_size, len(a_idx)), g_a)
                    xa, ya = next(arch_batches)
                arch_loss = _architecture_step(net, xa, ya, latency, target, config, arch_opt, weights_opt)
            if bar:
                bar.update(1)
            if step % 5 == 0:
                run.append_metrics({
                    "t": time.time() - start, "kind": "train", "rank": 0, "step": step, "epoch": epoch,
                    "loss": float(ce.detach()), "arch_loss": None if arch_loss is None else float(arch_loss.detach()),
                    "expected_latency_ms": float(latency.expected(net).detach()),
                    "probs": [[round(float(p), 5) for p in b.probs().detach()] for b in net.blocks]})
        sched.step()
        net.set_mode("weights")
        acc, val_loss = evaluate(net, data.x_train[a_idx], data.y_train[a_idx])
        run.append_metrics({"t": time.time() - start, "kind": "eval", "rank": 0, "step": step, "epoch": epoch,
                            "split": "holdout", "accuracy": acc, "loss": val_loss,
                            "architecture": net.derive(), "expected_latency_ms": float(latency.expected(net).detach())})
    if bar:
        bar.close()
    return _retrain(config, run, start, log, data, net, latency, table, parameter_count, step)


def _architecture_step(net, xa, ya, latency, target, config, arch_opt, weights_opt):
    """One update of α on a held-out batch: two sampled paths per block, the gradient through
    the gates, the latency term added or multiplied in; returns the loss."""
    net.set_mode("arch")
    ce_a = F.cross_entropy(net(xa), ya)
    form, term = latency_penalty(latency.expected(net), config.latency_weight, config.latency_form, target)
    arch_loss = ce_a + term if form == "add" else ce_a * term
    old = [a.detach().clone() for a in net.arch_parameters()]
    arch_opt.zero_grad()
    weights_opt.zero_grad()
    arch_loss.backward()
    arch_opt.step()
    for block, alpha in zip(net.blocks, old):
        block.rescale_pair(alpha)
    weights_opt.zero_grad()
    return arch_loss


def _retrain(config, run, start, log, data, net, latency, table, parameter_count, step) -> dict:
    """Derive the architecture, train it from scratch, time it: the search's summary."""
    shape = tuple(data.x_train.shape[1:])
    architecture = net.derive()
    predicted = latency.predict(architecture)
    log(f"labkit nas: derived {architecture}; predicted latency {predicted:.3f} ms; retraining from scratch")
    child = train_child(architecture, data, config.retrain_epochs, config.batch_size, config.lr, config.weight_l2,
                        config.seed,
                        on_epoch=lambda e, loss: run.append_metrics({
                            "t": time.time() - start, "kind": "event", "event": "retrain_epoch", "rank": 0,
                            "epoch": e, "loss": loss}))
    test_acc, test_loss = evaluate(child, data.x_test, data.y_test)
    measured = measure_network(child, shape, threads=config.threads)
    whole, parts = measure_with_parts(architecture, shape, data.num_classes, threads=config.threads)
    return {
        "status": "completed", "architecture": architecture, "candidates": [list(b.candidates) for b in net.blocks],
        "probs": [[float(p) for p in b.probs().detach()] for b in net.blocks],
        "latency_predicted_ms": predicted, "latency_measured_ms": measured,
        "latency_error": abs(predicted - measured) / measured,
        # the network and its table entries timed again in the same rounds, plus the table's fitted
        # overhead: the additive model's error alone, without the drift of the machine since the table
        "latency_measured_interleaved_ms": whole,
        "latency_parts_interleaved_ms": parts + latency.overhead_ms,
        "latency_model_error": abs(parts + latency.overhead_ms - whole) / whole,
        "test_accuracy": test_acc, "test_loss": test_loss, "parameters": parameter_count(child),
        "latency_weight": config.latency_weight, "latency_form": config.latency_form,
        "steps": step, "wall_time_s": time.time() - start, "latency_table": str(run.path / "latency_table.json"),
        "machine": table["machine"],
    }


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

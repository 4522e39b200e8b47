"""RunConfig: every toggle of a training run, in one frozen dataclass.

The command line (``labkit train --lr 0.1 ...``), the control-panel widgets and notebook
cells all build a ``RunConfig``; ``validate()`` rejects every bad value and every bad
combination with a :class:`ConfigError` that names the option, the value and what is
allowed. Choices (models, datasets, sync modes, compressors, launchers, backends,
parallelisms) come from the registries in :mod:`labkit.registry`, so anything registered
there is selectable everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import registry as reg

# Defaults a user can rely on (documented in README): 10 epochs when neither is given.
DEFAULT_EPOCHS = 10


class ConfigError(ValueError):
    """An invalid configuration. ``option`` is the command-line flag at fault."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


def _opt(help: str, registry: reg.Registry | None = None, choices: tuple = (), group: str = "run",
         metavar: str | None = None):
    return {"help": help, "registry": registry, "choices": choices, "group": group,
            "metavar": metavar}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. Build it, ``validate()`` it, run it."""

    # what to train
    model: str = field(default="mlp", metadata=_opt("network to train", reg.MODELS, group="model"))
    dataset: str = field(default="digits", metadata=_opt("dataset", reg.DATASETS, group="model"))
    data_dir: str | None = field(default=None, metadata=_opt(
        "folder with the dataset's files (mnist, cifar10)", group="model", metavar="DIR"))
    # how to run it
    workers: int = field(default=1, metadata=_opt("number of ranks (processes)", group="parallel", metavar="N"))
    launcher: str = field(default="local", metadata=_opt("how the ranks are started", reg.LAUNCHERS, group="parallel"))
    backend: str = field(default="gloo", metadata=_opt("communication backend", reg.BACKENDS, group="parallel"))
    device: str = field(default="cpu", metadata=_opt(
        "where each rank computes (auto: cuda when available)", choices=("cpu", "cuda", "auto"), group="parallel"))
    parallelism: str = field(default="data", metadata=_opt("how the work is split", reg.PARALLELISMS, group="parallel"))
    # settings of particular parallelisms (ignored by the others); a parallelism declares the
    # ones it takes when it is registered (``settings=``), and the panel shows it those
    data_parallel: str = field(default="flat", metadata=_opt(
        "data: how the gradients are averaged: one allreduce per parameter (naive), one flat buffer "
        "(flat, the sync mode's way) or buckets allreduced while backward runs (bucketed, as torch DDP)",
        choices=("naive", "flat", "bucketed"), group="parallel"))
    bucket_mb: float = field(default=25.0, metadata=_opt(
        "data --data-parallel bucketed: size of a gradient bucket in MiB", group="parallel", metavar="MIB"))
    pipeline_stages: int = field(default=0, metadata=_opt(
        "model, pipeline, hybrid: pipeline stages (0: model and pipeline use every worker; hybrid: "
        "2 data x workers/2 stages unless --tensor-parallel is given)", group="parallel", metavar="P"))
    microbatches: int = field(default=4, metadata=_opt(
        "pipeline, hybrid: micro-batches each batch is cut into", group="parallel", metavar="M"))
    schedule: str = field(default="1f1b", metadata=_opt(
        "pipeline, hybrid: the pipeline schedule", choices=("gpipe", "1f1b"), group="parallel"))
    tensor_parallel: int = field(default=0, metadata=_opt(
        "tensor, hybrid: ranks that split every layer (0: tensor uses every worker, hybrid none)",
        group="parallel", metavar="T"))
    sync: str = field(default="allreduce", metadata=_opt("how the ranks keep their weights in step", reg.SYNC_MODES, group="parallel"))
    # settings of particular sync modes (ignored by the others); a mode declares the ones it
    # takes when it is registered (``settings=``), and the panel shows it those
    allreduce_algorithm: str = field(default="library", metadata=_opt(
        "allreduce: the allreduce that sums the gradients, the library's or one written by hand "
        "(labkit.comm.collectives)", choices=("library", "ring", "tree", "recursive-doubling"), group="sync"))
    staleness: int = field(default=2, metadata=_opt(
        "ssp: how many clocks a worker may run ahead of the slowest", group="sync", metavar="S"))
    sync_every: int = field(default=8, metadata=_opt(
        "local-sgd: average the models every H steps", group="sync", metavar="H"))
    rho: float = field(default=2.0, metadata=_opt(
        "EASGD: strength of the elastic force between workers and center", group="sync"))
    easgd_variant: int = field(default=1, metadata=_opt(
        "easgd-sync: 1 tree reduction, 2 data on host / weights on device, 3 overlapped communication",
        choices=(1, 2, 3), group="sync", metavar="1|2|3"))
    lock: bool = field(default=False, metadata=_opt(
        "hogwild: take a lock around every update (the locked baseline)", group="sync"))
    clients: int = field(default=16, metadata=_opt("fedavg: number of simulated clients", group="sync", metavar="N"))
    client_fraction: float = field(default=0.5, metadata=_opt(
        "fedavg: fraction of clients taking part in each round", group="sync"))
    local_epochs: int = field(default=1, metadata=_opt(
        "fedavg: epochs each client trains on its own data per round", group="sync"))
    compression: str = field(default="none", metadata=_opt("gradient compression", reg.COMPRESSORS, group="compression"))
    compression_params: dict = field(default_factory=dict, metadata=_opt(
        "compressor parameter, repeatable (see the compressor's defaults)", group="compression", metavar="KEY=VALUE"))
    error_feedback: bool = field(default=True, metadata=_opt(
        "keep what compression dropped and add it to the next step", group="compression"))
    # optimization
    optimizer: str = field(default="torch-sgd", metadata=_opt(
        "optimizer of each worker (and of the master in modes with one); the table's optimizers "
        "from labkit.optim, or torch-sgd, the library's own", reg.OPTIMIZERS, group="optim"))
    lr: float = field(default=0.05, metadata=_opt("learning rate", group="optim"))
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum (0 to 1)", group="optim"))
    weight_decay: float = field(default=0.0, metadata=_opt("L2 weight decay", group="optim"))
    batch_size: int = field(default=32, metadata=_opt("samples per step on each rank", group="optim"))
    steps: int | None = field(default=None, metadata=_opt("optimizer steps per rank (instead of --epochs)", group="optim"))
    epochs: int | None = field(default=None, metadata=_opt(f"passes over the data (default {DEFAULT_EPOCHS})", group="optim"))
    seed: int = field(default=0, metadata=_opt("random seed (weights, data order)", group="optim"))
    lr_scaling: str = field(default="none", metadata=_opt(
        "large mini-batches (Goyal et al.): linear multiplies --lr by the number of workers (the "
        "global batch over the one-worker batch); allreduce sync with --parallelism data only",
        choices=("none", "linear"), group="optim"))
    warmup_epochs: float = field(default=0.0, metadata=_opt(
        "--lr-scaling linear: epochs over which the learning rate rises linearly from --lr to the "
        "scaled one", group="optim", metavar="E"))
    # numerics of one rank
    precision: str = field(default="fp32", metadata=_opt(
        "arithmetic of forward and loss: fp32, or bf16 under autocast (weights stay fp32)",
        choices=("fp32", "bf16"), group="optim"))
    conv_algorithm: str = field(default="torch", metadata=_opt(
        "how the model's convolutions are computed: torch's, or labkit.conv's direct, im2col, fft, "
        "winograd (3x3 kernels, stride 1)", choices=("torch", "direct", "im2col", "fft", "winograd"),
        group="model"))
    # bookkeeping
    eval_every: int = field(default=50, metadata=_opt("evaluate on the test set every N steps", metavar="N"))
    log_every: int = field(default=10, metadata=_opt("write training metrics every N steps", metavar="N"))
    run_dir: str | None = field(default=None, metadata=_opt(
        "run directory (default runs/<time>-<model>-<sync>-w<workers>)", metavar="DIR"))
    checkpoint_every: int = field(default=100, metadata=_opt("checkpoint every N steps (0: only at the end)", metavar="N"))
    resume: bool = field(default=False, metadata=_opt("continue the run in --run-dir from its last checkpoint"))
    timeout: float = field(default=120.0, metadata=_opt(
        "seconds a rank waits for another before the run fails", metavar="SECONDS"))

    # --- derived values ---------------------------------------------------------------
    def total_steps(self, train_samples: int) -> int:
        from .data import batches_per_epoch

        if self.steps is not None:
            return self.steps
        return (self.epochs or DEFAULT_EPOCHS) * batches_per_epoch(train_samples, self.workers, self.batch_size)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # --- JSON round trip ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: (dict(getattr(self, f.name)) if f.name == "compression_params" else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(option_name(unknown[0]), "unknown setting")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_dict(json.loads(text))

    # --- parsing from text (command line, widgets) ------------------------------------
    @classmethod
    def parse_value(cls, name: str, text: str | None):
        """Convert the text a user typed for field ``name`` to its type, or ConfigError."""
        f = _fields()[name]
        kind = _base_type(f.name)
        option = option_name(name)
        if _optional(name) and (text is None or str(text).strip().lower() in ("", "none")):
            return None
        if text is None:
            raise ConfigError(option, "a value is required")
        if kind is bool:
            if isinstance(text, bool):
                return text
            low = str(text).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(option, f"expected yes or no, got {text!r}")
        if kind is int:
            try:
                value = float(text)
            except (TypeError, ValueError):
                raise ConfigError(option, f"expected a whole number, got {text!r}") from None
            if not value.is_integer():
                raise ConfigError(option, f"expected a whole number, got {text!r}")
            return int(value)
        if kind is float:
            try:
                value = float(text)
            except (TypeError, ValueError):
                raise ConfigError(option, f"expected a number, got {text!r}") from None
            return value
        if kind is dict:
            return parse_params(text, option)
        return str(text)

    # --- validation ----------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Check every value and combination; raise ConfigError naming the first problem.

        Checks the file system (data dir, run dir, checkpoints) but writes nothing.
        """
        import math

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _base_type(f.name)
            option = option_name(f.name)
            if value is None:
                if not _optional(f.name):
                    raise ConfigError(option, "a value is required")
                continue
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(option, f"expected a whole number, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
                raise ConfigError(option, f"expected a finite number, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(option, f"expected true or false, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise ConfigError(option, f"expected text, got {value!r}")
            meta = f.metadata
            if meta.get("registry") is not None and value not in meta["registry"]:
                r = meta["registry"]
                raise ConfigError(option, f"unknown {r.kind} {value!r}; choose one of {', '.join(r.names())}")
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(option, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}")

        _positive(self, "workers", "lr", "batch_size", "eval_every", "log_every", "timeout",
                  "sync_every", "rho", "clients", "local_epochs")
        if self.staleness < 0:
            raise ConfigError("--staleness", f"must be >= 0, got {self.staleness}")
        if not 0 < self.client_fraction <= 1:
            raise ConfigError("--client-fraction", f"must be in (0, 1], got {self.client_fraction}")
        _positive(self, "steps", "epochs", allow_none=True)
        if not 0 <= self.momentum < 1:
            raise ConfigError("--momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise ConfigError("--checkpoint-every", f"must be >= 0, got {self.checkpoint_every}")
        if self.seed < 0:
            raise ConfigError("--seed", f"must be >= 0, got {self.seed}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("--steps", "give either --steps or --epochs, not both")

        self._validate_numerics()
        self._validate_compression()
        self._validate_placement()
        self._validate_data()
        self._validate_run_dir()
        for registry, choice in ((reg.SYNC_MODES, self.sync), (reg.PARALLELISMS, self.parallelism)):
            check = registry.entry(choice).meta.get("validate")
            problem = check(**self.values_for(check)) if check is not None else None
            if problem:
                raise ConfigError(*problem)
        return self

    def values_for(self, function) -> dict:
        """The settings that ``function`` takes, by the names of its parameters (plain values)."""
        import inspect

        return {name: getattr(self, name) for name in inspect.signature(function).parameters}

    def mode_settings(self) -> dict:
        """The settings the sync mode declared at registration, with their values."""
        return {name: getattr(self, name) for name in reg.SYNC_MODES.entry(self.sync).meta.get("settings", ())}

    def _validate_numerics(self) -> None:
        if self.warmup_epochs < 0:
            raise ConfigError("--warmup-epochs", f"must be >= 0, got {self.warmup_epochs}")
        if self.warmup_epochs > 0 and self.lr_scaling == "none":
            raise ConfigError("--warmup-epochs", "warms up to the scaled learning rate: needs --lr-scaling linear")
        if self.lr_scaling != "none":
            from .parallel import uses_sync_mode

            if self.sync != "allreduce" or not uses_sync_mode(self.parallelism, self.data_parallel):
                raise ConfigError("--lr-scaling", f"{self.lr_scaling} is applied only with --sync allreduce, "
                                                  "--parallelism data and --data-parallel flat")
        if self.conv_algorithm != "torch":
            problem = conv_algorithm_problem(self.model, self.dataset, self.conv_algorithm)
            if problem:
                raise ConfigError("--conv-algorithm", problem)

    def _validate_compression(self) -> None:
        if not isinstance(self.compression_params, dict):
            raise ConfigError("--compression-param", f"expected KEY=VALUE pairs, got {self.compression_params!r}")
        allowed = reg.COMPRESSORS.entry(self.compression).meta.get("params", {})
        for key, value in self.compression_params.items():
            if key not in allowed:
                names = ", ".join(allowed) if allowed else "none"
                raise ConfigError("--compression-param",
                                  f"{self.compression} has no parameter {key!r} (its parameters: {names})")
            default = allowed[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError("--compression-param", f"{key} expects true or false, got {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError("--compression-param", f"{key} expects a number, got {value!r}")
                if isinstance(default, int) and not float(value).is_integer():
                    raise ConfigError("--compression-param", f"{key} expects a whole number, got {value!r}")
        check = reg.COMPRESSORS.entry(self.compression).meta.get("validate")
        if check is not None:
            problem = check(dict(self.compression_params))
            if problem:
                raise ConfigError("--compression-param", problem)

    def _validate_placement(self) -> None:
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("--backend", "nccl needs GPUs; use --device cuda, or --backend gloo or mpi on CPU")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--device", "cuda: no CUDA device is visible; use --device cpu or auto")
            if self.backend == "nccl" and self.launcher != "slurm" and self.workers > torch.cuda.device_count():
                raise ConfigError("--workers", f"{self.workers} NCCL ranks need {self.workers} GPUs, "
                                               f"this machine has {torch.cuda.device_count()}")
        launcher = reg.LAUNCHERS.entry(self.launcher)
        backends = launcher.meta.get("backends")
        if backends and self.backend not in backends:
            raise ConfigError("--backend", f"{self.backend} cannot be used with --launcher {self.launcher} "
                                           f"(use {' or '.join(backends)})")
        available = launcher.meta.get("available")
        if available is not None:
            problem = available()
            if problem:
                raise ConfigError("--launcher", f"{self.launcher}: {problem}")
        backend_available = reg.BACKENDS.entry(self.backend).meta.get("available")
        if backend_available is not None:
            problem = backend_available()
            if problem:
                raise ConfigError("--backend", f"{self.backend}: {problem}")

    def _validate_data(self) -> None:
        from .data import DataError, check_data_dir, train_size

        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError("--data-dir", f"{self.data_dir} is not a directory")
        try:
            check_data_dir(self.dataset, self.data_dir)
            n = train_size(self.dataset, self.data_dir)
        except DataError as e:
            raise ConfigError("--data-dir", str(e)) from None
        per_rank = n // self.workers
        if self.batch_size > per_rank:
            raise ConfigError("--batch-size", f"{self.batch_size} is larger than each rank's share of "
                                              f"{self.dataset} ({n} training samples / {self.workers} "
                                              f"workers = {per_rank})")

    def _validate_run_dir(self) -> None:
        if self.run_dir is None:
            if self.resume:
                raise ConfigError("--resume", "needs --run-dir, the run to continue")
            return
        path = Path(self.run_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError("--run-dir", f"{self.run_dir} exists and is not a directory")
        if self.resume:
            from .runs import RunDir

            if not path.is_dir():
                raise ConfigError("--resume", f"{self.run_dir} does not exist: nothing to resume")
            if RunDir(path).latest_checkpoint() is None:
                raise ConfigError("--resume", f"{self.run_dir} has no checkpoint to resume from")
        elif path.is_dir() and any(path.iterdir()):
            raise ConfigError("--run-dir", f"{self.run_dir} already holds a run; choose a new "
                                           "directory or add --resume to continue it")
        parent = path.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise ConfigError("--run-dir", f"cannot create {self.run_dir}: {parent} is not writable")


# --- helpers -------------------------------------------------------------------------------
def conv_algorithm_problem(model: str, dataset: str, algorithm: str) -> str | None:
    """Why ``model`` cannot compute its convolutions with ``algorithm``, else None. The model is
    built on the CPU (the course's models are small; no data is loaded) and each convolution
    is checked."""
    from torch import nn

    from .conv import set_algorithm
    from .models import build_model
    from .parallel import _INPUT_SHAPES

    net = build_model(model, _INPUT_SHAPES.get(dataset, (1, 8, 8)), 10)
    convs = [(name, m) for name, m in net.named_modules() if type(m) is nn.Conv2d]
    if not convs:
        return f"{algorithm}: model {model} has no convolution"
    for name, conv in convs:
        try:
            set_algorithm(conv, algorithm)
        except ValueError as e:
            return f"{algorithm} cannot compute {model}'s layer {name}: {str(e).removeprefix('conv-algorithm: ')}"
    return None


def option_name(field_name: str) -> str:
    if field_name == "compression_params":
        return "--compression-param"
    return "--" + field_name.replace("_", "-")


def parse_params(text, option: str = "--compression-param") -> dict:
    """``"ratio=0.01,levels=4"`` or a list of ``key=value`` strings -> {"ratio": 0.01, ...}."""
    if isinstance(text, dict):
        return dict(text)
    items = text if isinstance(text, (list, tuple)) else [p for p in str(text).split(",") if p.strip()]
    out = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(option, f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _literal(raw.strip())
    return out


def _literal(raw: str):
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def _positive(cfg, *names, allow_none=False):
    for name in names:
        value = getattr(cfg, name)
        if value is None and allow_none:
            continue
        if value <= 0:
            raise ConfigError(option_name(name), f"must be > 0, got {value}")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunConfig)}


_HINTS = typing.get_type_hints(RunConfig)


def _is_union(tp) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


def _optional(name: str) -> bool:
    tp = _HINTS[name]
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _base_type(name: str):
    """int for ``int | None``, dict for ``dict``, ..."""
    tp = _HINTS[name]
    if _is_union(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def fields_info() -> list[dict]:
    """One record per RunConfig field (name, flag, type, default, help, choices): for CLIs and UIs."""
    out = []
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        choices = meta["registry"].names() if meta.get("registry") is not None else list(meta.get("choices", ()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append({"name": f.name, "option": option_name(f.name), "type": _base_type(f.name),
                    "optional": _optional(f.name), "default": default, "help": meta.get("help", ""),
                    "choices": choices, "group": meta.get("group", "run"), "metavar": meta.get("metavar")})
    return out

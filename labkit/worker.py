"""What one rank runs: ``python -m labkit.worker RUN_DIR``.

Every launcher (local, mpiexec, torchrun, SLURM) starts N copies of this with the
environment that ``labkit.comm.init()`` reads. A rank reads the RunConfig from the run
directory, builds its communicator, data, model and sync mode, trains, and writes its
metrics to the same run directory. Rank 0 writes ``summary.json`` at the end; a rank that
fails writes an ``error`` event naming itself and exits with status 1, and the launcher
turns that into a failed summary.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import threading
import time
import traceback

import torch

from . import comm as comm_pkg
from . import optim
from .algorithms.base import RankContext
from .compress import CompressedCommunicator, make_compressor
from .config import RunConfig
from .data import batches_per_epoch, load_dataset
from .models import build_model, describe
from .parallel import uses_sync_mode
from .registry import PARALLELISMS, SYNC_MODES
from .runs import RunDir, process_alive

LAUNCHER_GONE_GRACE_S = 20.0  # a rank whose launcher died exits by itself within this (finishing: 3x)


class Stopped(Exception):
    """The launcher asked this rank to stop (SIGTERM)."""


class Diverged(Exception):
    """The training loss (or the weights) stopped being finite numbers."""


def stop_on_divergence(ctx: RankContext) -> None:
    """Make this rank fail with ``diverged at step K`` as soon as a logged training loss is
    NaN or infinite, and refuse to checkpoint weights that are: the run ends ``failed``
    and its last checkpoint stays one that can be resumed from."""
    log_train, save_checkpoint = ctx.log_train, ctx.run.save_checkpoint

    def checked_log_train(step, epoch, loss, *args, **kwargs):
        log_train(step, epoch, loss, *args, **kwargs)
        if loss is None or not math.isfinite(loss):
            raise Diverged(f"diverged at step {step} (training loss {loss} on rank {ctx.rank})")

    def checked_save_checkpoint(step, state):
        for name, value in (state.get("model") or {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise Diverged(f"diverged at step {step} (weights {name} not finite on rank {ctx.rank})")
        return save_checkpoint(step, state)

    ctx.log_train = checked_log_train
    ctx.run.save_checkpoint = checked_save_checkpoint


def _on_sigterm(signum, frame):
    raise Stopped("stopped by request")


_finishing = False  # this rank has done its last step: a dead launcher does not interrupt it
_parent = [os.getppid()]  # this rank's parent when it started


def _launcher_of(meta: dict) -> dict | None:
    launched = meta.get("launched_by")
    if isinstance(launched, dict) and launched.get("host") == socket.gethostname():
        return launched
    return None


def _finalize_orphan(run: RunDir, launched: dict | None, rank: int) -> None:
    """The process that launched the run is gone: write the run's summary (``stopped``, or
    ``failed`` with a rank's own error) unless someone already has."""
    if launched is None:
        return
    if os.getppid() != _parent[0] and process_alive(launched):
        # reparented: the parent is dying, and /proc shows it as a zombie only a moment later
        deadline = time.monotonic() + 5
        while process_alive(launched) and time.monotonic() < deadline:
            time.sleep(0.05)
    if process_alive(launched):
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # None while another rank (or thread) holds the lock and writes
        try:
            if run.settle(found_by=f"rank {rank}", ranks_may_run=True) is not None:
                return
        except Exception:  # noqa: BLE001 - the next reader of the run directory finalizes it
            return
        time.sleep(0.1)


def watch_launcher(run: RunDir, meta: dict, rank: int) -> None:
    """End this rank, with the run finalized, when the process that launched it goes away
    (a killed kernel, a closed terminal): a rank never trains on for nobody.

    A rank started by that process directly asks the kernel for SIGTERM at its death (its
    launcher asked for SIGKILL, which would leave no chance to write anything); every rank
    on that host also checks the launcher twice a second."""
    launched = _launcher_of(meta)
    if launched is None:
        return
    if sys.platform == "linux" and os.getppid() == launched.get("pid"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def watch():
        while process_alive(launched):
            time.sleep(0.5)
        _finalize_orphan(run, launched, rank)
        if not _finishing and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(LAUNCHER_GONE_GRACE_S * (3 if _finishing else 1))
        os._exit(143)  # stuck in a collective with peers that went too

    threading.Thread(target=watch, name="labkit-launcher-watch", daemon=True).start()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scaled_lr(step: int, lr: float, factor: float, warmup_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (1, 2, ...) under the linear scaling rule
    (Goyal et al., 2017): the target is ``lr * factor``; during the first ``warmup_steps``
    steps the rate rises linearly from ``lr`` (step 1) towards the target, which it reaches at
    step ``warmup_steps + 1`` and keeps."""
    target = lr * factor
    if warmup_steps <= 0 or step > warmup_steps:
        return target
    return lr + (target - lr) * (step - 1) / warmup_steps


def attach_lr_scaling(optimizer, config: RunConfig, world: int, steps_per_epoch: int, start_step: int = 0):
    """Set ``optimizer``'s learning rate before every step by :func:`scaled_lr` (``--lr-scaling
    linear``: factor = the number of workers, the global batch ``world * batch_size`` over the
    one-worker batch ``batch_size``; ``--warmup-epochs`` converted to steps). Counts the steps
    from ``start_step`` (a resumed run continues its schedule)."""
    factor = world if config.lr_scaling == "linear" else 1
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    counter = [start_step]

    def before_step(opt, args, kwargs):
        counter[0] += 1
        lr = scaled_lr(counter[0], config.lr, factor, warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr

    optimizer.register_step_pre_hook(before_step)
    return optimizer


def build_context(config: RunConfig, comm, run: RunDir, start_time: float) -> RankContext:
    if "OMP_NUM_THREADS" not in os.environ:  # the launchers set it (launch.base.share_cores)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LABKIT_LOCAL_WORLD", comm.size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    device = resolve_device(config.device, comm_pkg.env_local_rank())
    data = load_dataset(config.dataset, config.data_dir)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    if config.conv_algorithm != "torch":
        from .conv import use_conv_algorithm

        use_conv_algorithm(model, config.conv_algorithm)
    model = model.to(device)
    resume_state = run.load_checkpoint() if config.resume and run.latest_checkpoint() else None

    def make_optimizer(params):
        settings = optim.settings_for(config.optimizer, lr=config.lr, momentum=config.momentum,
                                      weight_decay=config.weight_decay)
        optimizer = optim.make_optimizer(config.optimizer, params, **settings)
        if config.lr_scaling != "none":  # validate() allows it only where one optimizer steps per step
            attach_lr_scaling(optimizer, config, comm.size,
                              batches_per_epoch(len(data.y_train), comm.size, config.batch_size),
                              int((resume_state or {}).get("step", 0)))
        return optimizer

    compressor = make_compressor(config.compression, error_feedback=config.error_feedback,
                                 **config.compression_params)
    return RankContext(
        comm=comm, model=model, make_optimizer=make_optimizer, data=data, device=device, run=run,
        batch_size=config.batch_size, seed=config.seed, total_steps=config.total_steps(len(data.y_train)),
        eval_every=config.eval_every, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, start_time=start_time,
        compressed=CompressedCommunicator(comm, compressor), fixed_steps=config.steps is not None,
        resume_state=resume_state, precision=config.precision)


def summarize(ctx: RankContext, results: dict) -> dict:
    """The summary of a completed run, from the final evaluation and every rank's last metrics."""
    test_loss, test_acc = ctx.log_eval(ctx.total_steps, ctx.total_steps // ctx.steps_per_epoch,
                                       results["model"])
    last = {}
    for record in ctx.run.iter_metrics(kind="train"):
        last[record["rank"]] = record
    wall = ctx.now()
    samples = sum(r.get("samples", 0) for r in last.values())
    busy = sum(r.get("compute_s", 0) + r.get("comm_s", 0) + r.get("wait_s", 0) for r in last.values())
    comm_s = sum(r.get("comm_s", 0) for r in last.values())
    return {
        "status": "completed", "test_accuracy": test_acc, "test_loss": test_loss,
        "train_loss": results.get("train_loss"), "steps": ctx.total_steps, "wall_time_s": wall,
        "samples_per_s": samples / wall if wall > 0 else None,
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in last.values()),
        "comm_fraction": comm_s / busy if busy > 0 else 0.0,
        "world_size": ctx.world, "ranks_reporting": sorted(last),
        **{k: v for k, v in results.items() if k not in ("model", "train_loss")},
    }


_skip_finalize = False  # set when MPI_Finalize could wait forever for a rank that died


def _learn_deaths(comm, run: RunDir, since: int, follow_metrics: bool) -> None:
    """Tell the communicator of every rank that dies, as the guards report it.

    mpiexec -disable-auto-cleanup tells the surviving ranks that one died with SIGUSR1,
    after the dead rank's guard has written its ``rank_died`` event. MPI itself would have
    the survivors wait on the dead rank until the timeout; once the communicator knows
    (``mark_lost``), waiting on that rank fails at once and the mode goes on without it.
    SIGUSR1 reads the events at once; with ``follow_metrics`` (the mpi backend; gloo and
    NCCL see a closed connection by themselves) a thread also follows ``metrics.jsonl`` for
    them, so that a signal that comes early, late or not at all costs a fraction of a second.
    Only events from byte ``since`` of the metrics on count: a resumed run's file also
    holds the deaths of the runs before.
    """
    def read_deaths(start: int) -> int:
        """Mark the deaths reported from byte ``start`` on; the offset after the last line."""
        end = start
        for record, end in run.read_metrics_from(start):  # noqa: B007 - ``end`` is the result
            if record.get("event") == "rank_died" and isinstance(record.get("rank"), int):
                comm.mark_lost([record["rank"]])
        return end

    def on_sigusr1(signum, frame):
        try:
            read_deaths(since)
        except OSError:
            pass

    def follow():
        offset = since
        while True:
            try:
                offset = read_deaths(offset)
            except OSError:
                pass
            time.sleep(0.2)

    if hasattr(signal, "SIGUSR1"):  # its default action would end this rank too
        signal.signal(signal.SIGUSR1, on_sigusr1)
    if follow_metrics:
        threading.Thread(target=follow, name="labkit-rank-deaths", daemon=True).start()


def run_rank(run_dir: str) -> int:
    global _skip_finalize
    run = RunDir(run_dir)
    meta = run.read_config()
    config = RunConfig.from_dict(meta["config"])
    rank = comm_pkg.env_rank()
    if os.environ.get("LABKIT_RANK_LOGS") == "1":  # launchers with one output stream for all ranks
        log = open(run.log_path(rank), "a", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    signal.signal(signal.SIGTERM, _on_sigterm)
    watch_launcher(run, meta, rank)
    print(f"labkit worker: rank {rank} on {socket.gethostname()} pid {os.getpid()}", flush=True)
    comm = None
    try:
        # deaths reported from here on are this launch's: no rank gets through init without all
        since = run.metrics_path.stat().st_size if run.metrics_path.exists() else 0
        comm = comm_pkg.init(config.backend, config.timeout)
        return _train(run, meta, config, comm, since)
    except Stopped:
        return _stopped(run, meta, rank)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the rank exits
        return _failed(run, meta, rank, e)
    finally:
        if comm is not None:
            comm.close()
            _skip_finalize = _skip_finalize or bool(comm.lost)


def _train(run: RunDir, meta: dict, config: RunConfig, comm, since: int) -> int:
    """This rank's part of the run, on its communicator, to the summary (``since``: where
    the metrics file ended before the communicator was made)."""
    global _skip_finalize, _finishing
    survives = SYNC_MODES.entry(config.sync).meta.get("survives_worker_loss", False)
    if survives:
        _learn_deaths(comm, run, since, follow_metrics=config.backend == "mpi")
        # a peer may die at any time, also after this rank is done: MPI_Finalize would
        # wait for it forever, so this rank leaves without it (see main)
        _skip_finalize = config.backend == "mpi"
    ctx = build_context(config, comm, run, meta["start_time"])
    stop_on_divergence(ctx)
    ctx.event("started", world_size=comm.size, resumed_from=(ctx.resume_state or {}).get("step"))
    if comm.rank == 0:
        print(describe(ctx.model, ctx.data.input_shape), flush=True)
    if uses_sync_mode(config.parallelism, config.data_parallel):
        results = SYNC_MODES.get(config.sync)(**config.mode_settings()).run(ctx)
    else:  # a split model (or data parallelism done the naive or the bucketed way)
        parallelism = PARALLELISMS.get(config.parallelism)
        results = parallelism(**config.values_for(parallelism)).run(ctx)
    _finishing = True
    ctx.event("finished")
    if not survives:
        comm.barrier()  # a mode that survives lost workers ends in step by itself
    if comm.rank == 0:
        summary = summarize(ctx, results)
        run.write_summary(summary)
        print(f"labkit worker: done, test accuracy {summary['test_accuracy']:.4f}", flush=True)
    return 0


def _stopped(run: RunDir, meta: dict, rank: int) -> int:
    """The rank was asked to stop (SIGTERM): record it, finalize an orphaned run, exit 143."""
    # stopping already: a second SIGTERM (the launcher watch's) must not cut the finalizing short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"labkit worker: rank {rank} stopped", flush=True)
    try:
        run.append_metrics({"t": time.time() - meta["start_time"], "kind": "event", "event": "stopped",
                            "rank": rank, "pid": os.getpid()})
    except OSError:
        pass
    _finalize_orphan(run, _launcher_of(meta), rank)
    return 143


def _failed(run: RunDir, meta: dict, rank: int, e: BaseException) -> int:
    """Report the failure as an ``error`` event (the traceback to the rank's log); exit 1."""
    if isinstance(e, Diverged):
        message = str(e)
        print(f"labkit worker: rank {rank}: {message}", flush=True)
    else:
        traceback.print_exc()
        message = f"rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        run.append_metrics({"t": time.time() - meta["start_time"], "kind": "event", "event": "error",
                            "rank": rank, "error": message, "peer_error": isinstance(e, comm_pkg.PeerError),
                            "host": socket.gethostname(), "pid": os.getpid()})
    except OSError:
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m labkit.worker RUN_DIR", file=sys.stderr)
        return 2
    import labkit  # noqa: F401 - fills the registries

    code = run_rank(argv[0])
    sys.stdout.flush()
    sys.stderr.flush()
    if (code != 0 or _skip_finalize) and os.environ.get("LABKIT_BACKEND") == "mpi":
        os._exit(code)  # do not wait in MPI_Finalize for ranks that will never arrive
    return code


if __name__ == "__main__":
    sys.exit(main())

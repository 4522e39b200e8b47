"""The ``labkit`` command: ``train``, ``launch``, ``bench``, ``show``.

Every RunConfig field is an option of ``labkit train``; an invalid configuration ends
with one line ``labkit: error: --option: what is wrong`` and exit status 2, before any
process is started or any file written.

Building the parser imports no torch: the options come from ``RunConfig``'s fields and
the registries' names (remembered between processes by :mod:`labkit.choices`), and each
command imports what it runs only when it runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line: ``labkit: error: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"labkit: error: {message}\n")


def fail(message: str) -> int:
    print(f"labkit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- labkit train ---------------------------------------------------------------------
GROUP_TITLES = {"model": "what to train", "parallel": "how to run it", "compression": "gradient compression",
                "sync": "settings of particular sync modes",
                "optim": "optimization", "run": "the run directory and bookkeeping"}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    from .config import fields_info

    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for info in fields_info():
        group = groups[info["group"]]
        flag = info["option"]
        help_text = info["help"]
        if info["choices"]:
            help_text += f" ({', '.join(map(str, info['choices']))}; default {info['default']})"
        elif info["default"] not in (None, {}, False):
            help_text += f" (default {info['default']})"
        if info["type"] is bool:
            if info["default"]:
                group.add_argument(flag, dest=info["name"], action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(flag, dest=info["name"], action="store_const", const="true",
                                   default=argparse.SUPPRESS, help=help_text)
        elif info["type"] is dict:
            group.add_argument(flag, dest=info["name"], action="append", default=argparse.SUPPRESS,
                               metavar=info["metavar"] or "KEY=VALUE", help=help_text)
        else:
            group.add_argument(flag, dest=info["name"], default=argparse.SUPPRESS,
                               metavar=info["metavar"] or info["name"].upper(), help=help_text)


def config_from_args(given: dict):
    """RunConfig from the options given on the command line (text), validated."""
    import json
    from pathlib import Path

    from .config import ConfigError, RunConfig

    values = {name: RunConfig.parse_value(name, text) for name, text in given.items()}
    base = RunConfig()
    if values.get("resume") and values.get("run_dir"):
        saved = Path(values["run_dir"]) / "config.json"
        if saved.is_file():
            try:
                base = RunConfig.from_dict(json.loads(saved.read_text())["config"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError("--resume", f"{saved} is not a labkit run configuration ({e})") from None
    config = base.replace(**values)
    return config.validate()


def cmd_train(args: argparse.Namespace, given: dict) -> int:
    from .config import ConfigError

    try:
        config = config_from_args(given)
    except ConfigError as e:
        return fail(str(e))
    from .launch import launch

    try:
        run = launch(config)  # a locked run directory, a resume the checkpoint contradicts
    except ConfigError as e:
        return fail(str(e))
    print(f"labkit: {config.workers} worker(s), {config.launcher} launcher, {config.backend} backend, "
          f"sync {config.sync}, compression {config.compression}; run directory {run.run_dir}",
          file=sys.stderr)
    result = run.wait(progress=not args.quiet)
    summary = result.summary
    if result.status == "completed":
        from .bench.runs import fmt

        print(f"labkit: completed in {fmt(summary.get('wall_time_s'), '.1f')} s: test accuracy "
              f"{fmt(summary.get('test_accuracy'), '.4f')}, test loss {fmt(summary.get('test_loss'), '.4f')} "
              f"({run.run_dir}/summary.json)")
        return 0
    if result.status == "stopped":
        from .launch.run import resume_command

        print(f"labkit: stopped; resume with: {resume_command(run.run_dir)}", file=sys.stderr)
        return 130
    print(f"labkit: run failed: {summary.get('error')}", file=sys.stderr)
    if summary.get("resume_with"):
        print(f"labkit: resume from the last checkpoint with: {summary['resume_with']}", file=sys.stderr)
    return 1


# --- labkit launch ----------------------------------------------------------------------
def cmd_launch(args: argparse.Namespace) -> int:
    from .launch.command import run_command

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        return fail("launch: give the command to run after --, e.g. labkit launch -n 4 -- python train.py")
    if args.n < 1:
        return fail(f"-n: must be >= 1, got {args.n}")
    return run_command(command, args.n, args.launcher, args.backend, timeout=args.timeout)


# --- labkit bench -------------------------------------------------------------------------
HELP_FLAGS = ("-h", "--help")


def bench_list() -> str:
    """The benchmarks, one per line with what each measures (``labkit bench --help``)."""
    from .bench import BENCHMARKS

    width = max(map(len, BENCHMARKS))
    return "\n".join(f"  {name.ljust(width)}  {text}" for name, (_module, text) in BENCHMARKS.items())


def cmd_bench(args: argparse.Namespace, rest: list[str], parser: argparse.ArgumentParser) -> int:
    from .bench import BENCHMARKS, run_benchmark

    if args.name is None:
        if any(a in HELP_FLAGS for a in rest):
            parser.print_help()
            return 0
        parser.print_help(sys.stderr)
        return fail("bench: name the benchmark to run (listed above)")
    if args.name not in BENCHMARKS:
        return fail(f"bench: unknown benchmark {args.name!r}; choose one of {', '.join(BENCHMARKS)}")
    return run_benchmark(args.name, rest)


# --- labkit show ----------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    """One row per run (orphaned runs are finalized first); see :func:`labkit.bench.runs.show`
    for the exit statuses: 0, 1 when a file is damaged, 2 when a path is not a run directory."""
    from .bench.runs import show

    return show(args.run_dirs)


def _launch_timeout(text: str) -> float:
    from .launch.command import check_timeout

    try:
        return check_timeout(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> Parser:
    from . import __version__
    from .launch.command import DEFAULT_TIMEOUT_S

    parser = Parser(prog="labkit", description="labkit: distributed deep learning, for real, on your machine")
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)

    train = sub.add_parser("train", help="one training run (every option of RunConfig)",
                           description="Train a model; every choice below can also be set from a notebook. "
                                       "Each rank on a host gets a share of its cores (threads = cores / "
                                       "ranks, at least 1) unless OMP_NUM_THREADS is set.")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(train)

    launch = sub.add_parser(
        "launch", help="run a command as N ranks with labkit.comm ready inside",
        description="Run CMD as N ranks with the environment that labkit.comm.init() reads. Each rank "
                    "gets a share of this host's cores: OMP_NUM_THREADS = cores / N (at least 1), "
                    "unless OMP_NUM_THREADS is already set.")
    launch.add_argument("-n", type=int, required=True, help="number of ranks")
    launch.add_argument("--launcher", default="local", choices=["local", "mpi", "torchrun", "slurm"])
    launch.add_argument("--backend", default="gloo", choices=["gloo", "mpi", "nccl"])
    launch.add_argument("--timeout", type=_launch_timeout, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"end the ranks after this many seconds (default {DEFAULT_TIMEOUT_S:g})")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    bench = sub.add_parser("bench", help="benchmarks (tables for people, --json for machines)", add_help=False,
                           usage="labkit bench NAME [--json] [options of NAME]",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Run one benchmark: a table for people, JSON with --json.\n"
                                       "Ratios are against a baseline measured in the same run.\n"
                                       "labkit bench NAME --help lists NAME's own options.",
                           epilog="benchmarks:\n" + bench_list())
    bench.add_argument("name", nargs="?", metavar="NAME", help="the benchmark to run (listed below)")
    parser.bench_parser = bench  # `labkit bench` with no name prints its help

    for name, text in (("nas", "ProxylessNAS on this machine: search, retrain, measure latency"),
                       ("es", "evolution strategies: ranks exchange only scalars"),
                       ("search", "pbt | evolution | pso over labkit runs")):
        sub.add_parser(name, help=text, add_help=False)  # parsed by labkit.search.cli
    show = sub.add_parser("show", help="summaries of run directories, side by side")
    show.add_argument("run_dirs", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["nas"], ["es"], ["search"]):
        from .search.cli import run_command

        return run_command(argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        args, rest = parser.parse_known_args(argv)
        return cmd_bench(args, rest, parser.bench_parser)
    args = parser.parse_args(argv)
    if args.cmd == "train":
        given = {k: v for k, v in vars(args).items() if k not in ("cmd", "quiet")}
        return cmd_train(args, given)
    if args.cmd == "launch":
        return cmd_launch(args)
    if args.cmd == "show":
        return cmd_show(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

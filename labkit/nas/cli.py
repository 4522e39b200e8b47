"""``labkit nas``: the options of a ProxylessNAS search (one per NasConfig field)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..search.common import typed_value
from .search import NasConfig, NasError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(NasConfig)
    for f in dataclasses.fields(NasConfig):
        default = f.default
        help_text = f.metadata["help"] + ("" if default is None else f" (default {default})")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            metavar=f.name.upper(), help=help_text)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(_nas_types={f.name: hints[f.name] for f in dataclasses.fields(NasConfig)})


def _convert(name: str, text: str, kind):
    return typed_value("--" + name.replace("_", "-"), text, kind, NasError)


def config_from_args(args: argparse.Namespace) -> NasConfig:
    types = args._nas_types
    given = {name: _convert(name, getattr(args, name), types[name]) for name in types if hasattr(args, name)}
    return NasConfig(**given).validate()


def main(args: argparse.Namespace) -> int:
    from .search import run_search

    try:
        config = config_from_args(args)
    except NasError as e:
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_search(config, progress=not args.quiet,
                             log=lambda line: print(line, file=sys.stderr))
    except NasError as e:
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2
    print(f"labkit nas: architecture {' '.join(summary['architecture'])}; latency predicted "
          f"{summary['latency_predicted_ms']:.3f} ms, measured {summary['latency_measured_ms']:.3f} ms "
          f"({100 * summary['latency_error']:.0f} % apart; the network and its table entries timed together: "
          f"{summary['latency_measured_interleaved_ms']:.3f} vs {summary['latency_parts_interleaved_ms']:.3f} ms "
          f"with the overhead, "
          f"{100 * summary['latency_model_error']:.0f} % apart); test accuracy {summary['test_accuracy']:.4f}; "
          f"{summary['parameters']:,} parameters; {summary['wall_time_s']:.1f} s")
    return 0

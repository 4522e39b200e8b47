"""``labkit es`` and ``labkit search pbt|evolution|pso``: one option per setting of each searcher.

A bad value ends with one line ``labkit: error: --option: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .common import SearchError, typed_value


def _searchers():
    from .es import EsConfig, run_es
    from .evolution import EvolutionConfig, run_evolution
    from .pbt import PbtConfig, run_pbt
    from .pso import PsoConfig, run_pso

    return {"es": (EsConfig, run_es), "pbt": (PbtConfig, run_pbt), "evolution": (EvolutionConfig, run_evolution),
            "pso": (PsoConfig, run_pso)}


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        default = f.default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            metavar=f.name.upper(),
                            help=f.metadata["help"] + ("" if default is None else f" (default {default})"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_es_parser(sub) -> None:
    from .es import EsConfig

    p = sub.add_parser("es", help="evolution strategies on digits: ranks exchange only scalars")
    add_options(p, EsConfig)


def add_search_parser(sub) -> None:
    from .evolution import EvolutionConfig
    from .pbt import PbtConfig
    from .pso import PsoConfig

    p = sub.add_parser("search", help="population-based training, regularized evolution, particle swarm")
    kinds = p.add_subparsers(dest="searcher", metavar="pbt|evolution|pso", parser_class=type(p))
    kinds.required = True
    for name, cls, text in (("pbt", PbtConfig, "population-based training over labkit runs"),
                            ("evolution", EvolutionConfig, "regularized evolution over small architectures"),
                            ("pso", PsoConfig, "a particle swarm over hyperparameters")):
        add_options(kinds.add_parser(name, help=text), cls)


def convert(cls, name: str, text: str):
    return typed_value("--" + name.replace("_", "-"), text, typing.get_type_hints(cls)[name])


def main(args: argparse.Namespace) -> int:
    name = "es" if args.cmd == "es" else args.searcher
    cls, run = _searchers()[name]
    try:
        given = {f.name: convert(cls, f.name, getattr(args, f.name)) for f in dataclasses.fields(cls)
                 if hasattr(args, f.name)}
        config = cls(**given).validate()
    except SearchError as e:
        print(f"labkit: error: {e}", file=sys.stderr)
        return 2
    summary = run(config, progress=not args.quiet)
    if summary.get("status") != "completed":
        print(f"labkit: {name} failed: {summary.get('error')}", file=sys.stderr)
        return 1
    acc = summary.get("test_accuracy")
    line = f"labkit {name}: completed in {summary['wall_time_s']:.1f} s; test accuracy {acc:.4f}" if acc is not None \
        else f"labkit {name}: completed in {summary['wall_time_s']:.1f} s"
    if name == "es":
        line += (f"; each rank sent {summary['bytes_per_generation_per_rank']:,} bytes per generation "
                 f"(an allreduce of the {summary['parameters']:,} parameters: "
                 f"{summary['parameter_bytes_per_generation_per_rank']:,.0f})")
    if summary.get("best_run_dir"):
        line += f"; best member {summary['best_run_dir']}"
    print(line)
    return 0


def run_command(argv: list[str]) -> int:
    """``labkit nas|es|search ...`` (argv starts with the command's name)."""
    from ..cli import Parser
    from ..nas import cli as nas_cli

    parser = Parser(prog="labkit")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    nas = sub.add_parser("nas", help="ProxylessNAS on this machine: search, retrain, measure latency")
    nas_cli.add_arguments(nas)
    add_es_parser(sub)
    add_search_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "nas":
        return nas_cli.main(args)
    return main(args)

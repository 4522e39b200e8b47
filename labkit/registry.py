"""Registries: name -> implementation, so that a choice appears everywhere once registered.

Every choice a user can make (model, dataset, sync mode, compressor, launcher, backend,
parallelism) lives in one of the registries below. The CLI, ``RunConfig.validate()`` and
the widgets list the names they find here, so registering a new compressor or sync mode
is all it takes to make it selectable from the command line and from the control panel.

    from labkit.registry import COMPRESSORS

    @COMPRESSORS.register("fp16", help="half-precision floats, 2 bytes per value")
    class FP16Compressor: ...

Registries are filled when the packages that define the implementations are imported;
``import labkit`` imports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(frozen=True)
class Entry:
    """One registered choice: its name, the object behind it, and what it is for."""

    name: str
    obj: Any
    help: str = ""
    meta: dict = field(default_factory=dict)


class Registry:
    """A named collection of choices for one option (for example ``--sync``)."""

    def __init__(self, kind: str, option: str):
        self.kind = kind  # "sync mode", "compressor", ...
        self.option = option  # the command-line flag that selects it
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, obj: Any = None, *, help: str = "", **meta) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(target: Any) -> Any:
            if name in self._entries and self._entries[name].obj is not target:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = help or (target.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, target, doc, dict(meta))
            return target

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"{self.option} {name!r}: unknown {self.kind}; choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


MODELS = Registry("model", "--model")
DATASETS = Registry("dataset", "--dataset")
SYNC_MODES = Registry("sync mode", "--sync")
COMPRESSORS = Registry("compressor", "--compression")
LAUNCHERS = Registry("launcher", "--launcher")
BACKENDS = Registry("backend", "--backend")
PARALLELISMS = Registry("parallelism", "--parallelism")
OPTIMIZERS = Registry("optimizer", "--optimizer")

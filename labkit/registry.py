"""Registries: name -> implementation, so that a choice appears everywhere once registered.

Every choice a user can make (model, dataset, sync mode, compressor, launcher, backend,
parallelism) lives in one of the registries below. The CLI, ``RunConfig.validate()`` and
the widgets list the names they find here, so registering a new compressor or sync mode
is all it takes to make it selectable from the command line and from the control panel.

    from labkit.registry import COMPRESSORS

    @COMPRESSORS.register("fp16", help="half-precision floats, 2 bytes per value")
    class FP16Compressor: ...

Registries are filled when the packages that define the implementations are imported.
Reading a registry (its names, an entry, ``in``) imports all of them first (:func:`fill`),
so nothing ever lists half the choices; ``names()`` alone may answer from the names the
last full fill remembered (:mod:`labkit.choices`), which lets ``labkit train --help``
list every choice without importing torch.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

# the packages whose import registers choices (every registry below is filled by them)
REGISTERING = ("labkit.algorithms", "labkit.comm", "labkit.compress", "labkit.data", "labkit.models",
               "labkit.optim", "labkit.parallel", "labkit.launch")
_filled = False
_filling = False
_fill_lock = threading.RLock()


def fill() -> None:
    """Import every package that registers choices (once, whichever thread asks first; the
    others wait for it), and remember their names for the next process."""
    global _filled, _filling
    if _filled:
        return
    with _fill_lock:
        if _filled or _filling:  # done meanwhile, or asked again by the imports themselves
            return
        _filling = True
        try:
            for name in REGISTERING:
                importlib.import_module(name)
        finally:
            _filling = False
        _filled = True
    from . import choices

    choices.save({r.kind: list(r._entries) for r in ALL})


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
        fill()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"{self.option} {name!r}: unknown {self.kind}; choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        if not _filled:
            from . import choices

            remembered = choices.load()
            if remembered is not None and self.kind in remembered:
                known = remembered[self.kind]
                return known + [n for n in self._entries if n not in known]
        fill()
        return list(self._entries)

    def entries(self) -> list[Entry]:
        fill()
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        fill()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        fill()
        return iter(self._entries)

    def __len__(self) -> int:
        fill()
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
ALL = (MODELS, DATASETS, SYNC_MODES, COMPRESSORS, LAUNCHERS, BACKENDS, PARALLELISMS, OPTIMIZERS)

"""labkit: a real distributed-training stack for a course on parallel deep learning.

    import labkit
    result = labkit.train(labkit.RunConfig(workers=4, sync="allreduce"))
    run = labkit.launch(labkit.RunConfig(...))   # non-blocking: run.status, run.metrics(), run.stop()

Importing labkit does not import torch: the packages that register models, sync modes,
compressors and the rest are imported when a registry is first read
(``labkit.registry.fill``), or when one is named (``labkit.comm``, ``labkit.models``, ...).
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from . import launch as _launch_pkg  # noqa: E402
from .config import ConfigError, RunConfig  # noqa: E402
from .launch import Run, RunResult, train  # noqa: E402

launch = _launch_pkg.launch  # the function; the package stays labkit.launch in sys.modules

_SUBPACKAGES = ("algorithms", "comm", "compress", "data", "models", "optim", "parallel")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RunConfig", "ConfigError", "Run", "RunResult", "train", "launch", "__version__"]

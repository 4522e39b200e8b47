"""labkit: a real distributed-training stack for a course on parallel deep learning.

    import labkit
    result = labkit.train(labkit.RunConfig(workers=4, sync="allreduce"))
    run = labkit.launch(labkit.RunConfig(...))   # non-blocking: run.status, run.metrics(), run.stop()
"""

__version__ = "0.1.0"

# Filling the registries: every model, dataset, backend, sync mode, compressor, optimizer and
# launcher is registered when its module is imported, before anything lists choices.
from . import (  # noqa: E402,F401
    algorithms,  # noqa: E402,F401
    comm,  # noqa: E402,F401
    compress,  # noqa: E402,F401
    data,
    models,
    optim,
    parallel,
)
from . import launch as _launch_pkg  # noqa: E402
from .config import ConfigError, RunConfig  # noqa: E402
from .launch import Run, RunResult, train  # noqa: E402

launch = _launch_pkg.launch

__all__ = ["RunConfig", "ConfigError", "Run", "RunResult", "train", "launch", "__version__"]

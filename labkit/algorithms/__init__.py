"""The sync modes: how the ranks of a run keep their weights in step.

One file per family; importing this package registers every mode in
``labkit.registry.SYNC_MODES``.
"""

from . import allreduce, easgd, easgd_async, easgd_sync, fedavg, gossip, hogwild, local_sgd, ps, ssp  # noqa: F401
from .base import RankContext, SyncMode

__all__ = ["RankContext", "SyncMode"]

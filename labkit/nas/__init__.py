"""ProxylessNAS on this machine (Cai, Zhu, Han: "ProxylessNAS: Direct Neural Architecture Search on
Target Task and Hardware", ICLR 2019).

- :mod:`labkit.nas.supernet`: mixed operations over MBConv candidates and zero, α, binary gates;
- :mod:`labkit.nas.latency`: the latency table of this machine, E[latency] differentiable in α;
- :mod:`labkit.nas.search`: alternate weight and α steps, derive, retrain, time (``labkit nas``).
"""

from .latency import (
           LatencyModel,
           LatencyTableError,
           load_table,
           measure_network,
           measure_table,
           save_table,
)
from .search import NasConfig, NasError, run_search
from .supernet import CANDIDATES, ChildNet, MixedOp, SuperNet, activation_bytes

__all__ = ["CANDIDATES", "ChildNet", "MixedOp", "SuperNet", "activation_bytes", "LatencyModel",
           "LatencyTableError", "load_table", "measure_network", "measure_table", "save_table",
           "NasConfig", "NasError", "run_search"]

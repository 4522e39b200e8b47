"""Ways to split the work of training across ranks."""

from ..registry import PARALLELISMS

PARALLELISMS.register("data", "data", help="data parallelism: every rank holds the whole model and a shard of the data")

"""Search without gradients, and search over runs.

- :mod:`labkit.search.es`: evolution strategies (Salimans et al. 2017), ranks exchange scalars;
- :mod:`labkit.search.pbt`: population-based training (Jaderberg et al. 2017) over labkit runs;
- :mod:`labkit.search.evolution`: regularized evolution (Real et al. 2018) over small architectures;
- :mod:`labkit.search.pso`: a particle swarm (Lorenzo et al. 2017) over hyperparameters.

Each member is a run directory (config.json, metrics.jsonl, summary.json) and so is each search.
"""

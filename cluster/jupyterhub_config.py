# A starting point for a cluster JupyterHub serving the labkit course with batchspawner.
# Every setting below answers one known problem; see cluster/README.md.
c = get_config()  # noqa: F821 - provided by JupyterHub

c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
# Compute nodes must reach the hub API (batchspawner #63): an address they can route to.
c.JupyterHub.hub_connect_ip = "HUB_ADDRESS_REACHABLE_FROM_COMPUTE_NODES"
# Queue waits can exceed the spawn timeout (batchspawner #88).
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 120
# Environments do not propagate by themselves (batchspawner #246, #281).
c.BatchSpawnerBase.req_prologue = "source /shared/labkit/.venv/bin/activate"
c.BatchSpawnerBase.req_partition = "labkit"
c.BatchSpawnerBase.req_runtime = "04:00:00"
c.BatchSpawnerBase.req_nprocs = "4"
c.BatchSpawnerBase.req_memory = "8G"
c.Spawner.default_url = "/lab/tree/notebooks/00_start_here.ipynb"

# JupyterHub for the labkit course on a SLURM cluster: each student's server is a SLURM job
# (batchspawner), started from a CPU or a GPU profile. cluster/local-hub.sh runs it on the
# one-node local SLURM; on a real cluster, set the LABKIT_HUB_* variables below (or copy the
# file and edit it). Every setting that answers a known problem names it; see docs/cluster.md.
#
#   LABKIT_HUB_PORT          the hub's public port (8000)
#   LABKIT_HUB_IP            the address the public proxy listens on (127.0.0.1)
#   LABKIT_HUB_API_PORT      the hub's API port, which the servers call back (8081)
#   LABKIT_HUB_CONNECT_IP    an address of the hub that compute nodes can route to (127.0.0.1)
#   LABKIT_HUB_STATE         where the database, cookie secret and proxy pid go (cwd)
#   LABKIT_HUB_USERS         the students allowed in, space-separated (every PAM user if unset)
#   LABKIT_HUB_AUTH          pam (the cluster's accounts) or shared (one password for all:
#                            LABKIT_HUB_PASSWORD; for a local test hub only)
#   LABKIT_HUB_VENV          the course's environment on the compute nodes (this Python's)
#   LABKIT_HUB_PARTITION     the partition the servers' jobs go to (SLURM's default)
#   LABKIT_HUB_START_TIMEOUT seconds the hub waits for a server, queue included (600)
#   LABKIT_HUB_SERVER_IP     the address the servers listen on (0.0.0.0; 127.0.0.1 on one node)
#   LABKIT_HUB_EXTRA_CONFIG  a file of further settings, loaded last (site overrides, tests)
import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821 - provided by JupyterHub

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))  # labkit_spawner.py
env = os.environ.get
state = Path(env("LABKIT_HUB_STATE", os.getcwd()))
venv = Path(env("LABKIT_HUB_VENV", sys.prefix))

# --- the hub and its proxy -------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://{env('LABKIT_HUB_IP', '127.0.0.1')}:{env('LABKIT_HUB_PORT', '8000')}"
c.JupyterHub.hub_ip = env("LABKIT_HUB_API_IP", "127.0.0.1")
c.JupyterHub.hub_port = int(env("LABKIT_HUB_API_PORT", "8081"))
# Compute nodes must reach the hub's API (batchspawner #63, #233, #279): the address they use.
# On the one-node local cluster the servers run on this host and reach it on loopback.
c.JupyterHub.hub_connect_ip = env("LABKIT_HUB_CONNECT_IP", "127.0.0.1")
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('LABKIT_HUB_PROXY_API_PORT', '8001')}"
c.JupyterHub.cleanup_servers = True  # stopping the hub cancels the servers' jobs
c.JupyterHub.cleanup_proxy = True

# --- who may log in ---------------------------------------------------------------------------
users = set(env("LABKIT_HUB_USERS", "").split())
if env("LABKIT_HUB_AUTH", "pam") == "shared":
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = env("LABKIT_HUB_PASSWORD") or sys.exit(
        "jupyterhub_config: LABKIT_HUB_AUTH=shared needs LABKIT_HUB_PASSWORD")
    c.Authenticator.allowed_users = users or sys.exit(
        "jupyterhub_config: LABKIT_HUB_AUTH=shared needs LABKIT_HUB_USERS")
else:
    c.JupyterHub.authenticator_class = "pam"
    if users:
        c.Authenticator.allowed_users = users
    else:
        c.Authenticator.allow_all = True  # every account PAM accepts

# --- the students' servers: SLURM jobs -------------------------------------------------------
c.JupyterHub.spawner_class = "labkit_spawner.LabkitSlurmSpawner"
# The hub runs as root and submits as the student (batchspawner's default, sudo -E -u, needs
# sudo and a sudoers rule; runuser comes with util-linux and keeps the environment the same way).
c.LabkitSlurmSpawner.exec_prefix = "runuser -u {username} --"
c.LabkitSlurmSpawner.bind_ip = env("LABKIT_HUB_SERVER_IP", "0.0.0.0")
if env("LABKIT_HUB_SERVER_IP") == "127.0.0.1":
    c.LabkitSlurmSpawner.state_exechost_exp = "127.0.0.1"  # one node: this host
c.LabkitSlurmSpawner.req_partition = env("LABKIT_HUB_PARTITION", "")
# Environments do not propagate by themselves (batchspawner #246, #281): put the course's
# environment first on the job's PATH, and pass the variables the course reads.
c.LabkitSlurmSpawner.req_prologue = (f"export VIRTUAL_ENV={venv} PATH={venv}/bin:$PATH; "
                                     "unset SLURM_CPU_BIND SLURM_CPU_BIND_LIST SLURM_CPU_BIND_TYPE")
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL", "SLURM_CONF", "LABKIT_CACHE_DIR", "LABKIT_SLURM_TIME",
                      "LABKIT_SBATCH_EXTRA", "LABKIT_RUNS_DIR", "LABKIT_LAUNCHER", "LABKIT_WARM_RANKS"]
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
# Queue waits can be longer than the spawn timeout (batchspawner #88): the hub waits this long;
# the spawner gives up on the queue a little earlier, cancels the job and says why.
c.Spawner.start_timeout = int(env("LABKIT_HUB_START_TIMEOUT", "600"))
c.Spawner.http_timeout = 120
c.LabkitSlurmSpawner.startup_poll_interval = 1.0

extra = env("LABKIT_HUB_EXTRA_CONFIG")
if extra:
    load_subconfig(extra)  # noqa: F821 - provided by JupyterHub

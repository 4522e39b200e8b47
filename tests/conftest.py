import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LABKIT = [PYTHON, "-m", "labkit.cli"]

# panels built by tests and by the notebooks they run start no pool of warm ranks
# (tests that want one ask for a size themselves)
os.environ.setdefault("LABKIT_WARM_RANKS", "0")


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run ``labkit ARGS`` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([*LABKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def labkit_processes(marker: str) -> list[int]:
    """PIDs of live processes whose command line or environment mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if state == "Z":
            continue
        if marker.encode() in cmd or marker.encode() in env:
            found.append(int(entry.name))
    return found


@pytest.fixture
def no_leftovers(tmp_path):
    """Fails the test if any process that mentions its tmp_path outlives it (and kills them)."""
    yield tmp_path
    import time

    deadline = time.time() + 10
    left = labkit_processes(str(tmp_path))
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = labkit_processes(str(tmp_path))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {left}"


# --- the local SLURM cluster (tests marked `slurm`) ------------------------------------------
SLURM_SCRIPT = ROOT / "cluster" / "local-slurm.sh"


def slurm_state() -> Path:
    """Where cluster/local-slurm.sh keeps this cluster's state ($LABKIT_SLURM_STATE moves it)."""
    return Path(os.environ.get("LABKIT_SLURM_STATE", ROOT / "cluster" / "state"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster (cluster/local-slurm.sh), started once for the whole
    session and stopped after it; skips when SLURM cannot be had (not root, no apt-get).

    SLURM_CONF is set to this cluster's configuration for the session, so that sbatch and
    the tests' subprocesses talk to it even if /etc/slurm/slurm.conf names another one."""
    import shutil

    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("SLURM is not installed and cannot be (needs root and apt-get)")
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM cluster needs root")
    up = subprocess.run(["bash", str(SLURM_SCRIPT), "up"], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.skip(f"local SLURM did not start: {up.stderr.strip()[-300:]}")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm_state() / "slurm.conf")
    yield slurm_state()
    subprocess.run(["bash", str(SLURM_SCRIPT), "down"], capture_output=True, timeout=120)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


# --- running tests in parallel (make test: pytest -n 2 --dist loadgroup) ----------------------
# The tests that start or use the machine's one SLURM cluster, or create local user accounts,
# share state outside their tmp_path: they all run in one worker, one after another.
MACHINE_WIDE = ("test_hub.py", "test_exchange.py", "test_slurm_queue.py")
# Modules whose tests share what another module builds (``spawned()`` of test_parallel_compress).
SHARES_WITH = {"test_parallel_overlap.py": "test_parallel_compress"}


def _module_group(item) -> str | None:
    """The tests of a module that share a module-scoped fixture (a class graded once, ranks
    started once) run in one worker, so that the fixture is built once, not once per worker."""
    if item.path.name in SHARES_WITH:
        return SHARES_WITH[item.path.name]
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        defs = info.name2fixturedefs.get(name) if info else None
        if defs and defs[-1].scope == "module":
            return item.path.stem
    return None


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook (see below)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.get_closest_marker("slurm") or "slurm_cluster" in getattr(item, "fixturenames", ())
                or "slurm" in item.nodeid.split("::")[-1] or item.path.name in MACHINE_WIDE):
            item.add_marker(pytest.mark.xdist_group("machine"))
        elif not item.get_closest_marker("xdist_group") and _module_group(item):
            item.add_marker(pytest.mark.xdist_group(_module_group(item)))
    # --dist loadgroup finds a test's group in a "@group" suffix of its node id, which
    # pytest-xdist 3.8 writes into item._nodeid: pytest >= 9.2 keeps the id in item._id and
    # no longer reads that, so no test is grouped (pytest-xdist #1386). Write it here.
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):
            continue
        if hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix

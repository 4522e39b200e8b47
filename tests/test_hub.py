"""The course's JupyterHub on the local SLURM, end to end (cluster/local-hub.sh).

The hub starts; a student (a real local account, made for the test and removed after) logs
in with the password form; a spawn whose job fails ends at once with the job's own error
(batchspawner #253); a spawn whose job waits in the queue past the spawner's queue timeout
is cancelled and says so (#88); the student's server is then spawned through sbatch and
answers; code run in a kernel on it starts a 2-worker labkit run from the control panel
with the slurm launcher, which completes as a second SLURM job; stopping the server and
the hub leaves no job, no process of the student and no hub or proxy behind.

The hub's stop waits until SLURM has ended the server's job, whose batch script ends on its
way out every process still carrying the job's id; a process may still be exiting for a
moment after that (SIGKILLed, not yet gone), so the checks wait for the student's processes
with a deadline and, on failure, name each one with its command line. Everything the test
started is stopped also when it fails: the fixture's ``local-hub.sh down --remove-users``
cancels the account's jobs and ends its processes before removing it, and whatever is still
left after that is killed before the test reports it.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .conftest import PYTHON, ROOT, labkit_processes

# in the "machine" xdist group with the other SLURM tests (tests/conftest.py)
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HUB_SCRIPT = ROOT / "cluster" / "local-hub.sh"
USER = "labkit-hubtest"
# a profile whose job fails before the server starts, one that waits in the queue for an hour
EXTRA_CONFIG = """
from labkit_spawner import DEFAULT_PROFILES
c.LabkitSlurmSpawner.profiles = {
    **DEFAULT_PROFILES,
    "broken": {"display": "broken", "prologue": "echo 'labkit-test: no course environment here' >&2; exit 3"},
    "later": {"display": "later", "options": "--begin=now+3600"},
}
c.LabkitSlurmSpawner.queue_timeout = 6
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_jobs(who: str = USER) -> list[str]:
    """The jobs in the queue of ``who`` (a name, or a uid once the account is gone)."""
    out = subprocess.run(["squeue", "-h", "-u", who, "-o", "%i %j %T"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()


def uid_of(user: str) -> int | None:
    out = subprocess.run(["id", "-u", user], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 else None


def processes_of(uid: int) -> dict[int, str]:
    """The live processes whose real uid is ``uid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            found[int(entry.name)] = cmd or f"[{fields.get('Name', '?').strip()}]"
    return found


def wait_until_gone(uid: int, deadline_s: float) -> dict[int, str]:
    """Wait up to ``deadline_s`` for every process of ``uid`` to end (one still exiting from
    a SIGKILL needs a moment); those still alive then."""
    deadline = time.monotonic() + deadline_s
    left = processes_of(uid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_of(uid)
    return left


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError, TypeError):
            pass


def remove_stale_account() -> None:
    """The test account left by an earlier run that was killed before its cleanup: its jobs,
    its processes, the account (it is this test's own, never a real user's)."""
    uid = uid_of(USER)
    if uid is None:
        return
    if shutil.which("scancel"):
        subprocess.run(["scancel", "-u", USER], capture_output=True, timeout=30)
    kill_all(processes_of(uid))
    wait_until_gone(uid, 20)
    subprocess.run(["userdel", "-r", USER], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def hub(slurm_cluster, tmp_path_factory):
    """The hub on free ports, its state in a temporary folder; stopped (and the test
    account removed) after the module, with a check that nothing of it is left."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("websocket")
    if shutil.which("jupyterhub", path=str(Path(PYTHON).parent)) is None:
        pytest.skip("jupyterhub is not installed in the environment (pip install jupyterhub batchspawner)")
    pytest.importorskip("batchspawner")
    if shutil.which("configurable-http-proxy") is None:
        pytest.skip("configurable-http-proxy is missing (npm install -g configurable-http-proxy)")
    remove_stale_account()
    state = tmp_path_factory.mktemp("hub")
    (state / "extra_config.py").write_text(EXTRA_CONFIG)
    port = free_port()
    env = {**os.environ, "LABKIT_HUB_STATE": str(state / "hub"), "LABKIT_HUB_USERS": USER,
           "LABKIT_HUB_PORT": str(port), "LABKIT_HUB_API_PORT": str(free_port()),
           "LABKIT_HUB_PROXY_API_PORT": str(free_port()), "LABKIT_HUB_PASSWORD": uuid.uuid4().hex,
           "LABKIT_HUB_EXTRA_CONFIG": str(state / "extra_config.py"), "LABKIT_HUB_VENV": str(Path(PYTHON).parents[1]),
           # the student's server keeps no warm ranks (the panel's runs go to SLURM)
           "LABKIT_WARM_RANKS": "0"}
    hub_pid = proxy_pid = uid = None
    try:
        up = subprocess.run(["bash", str(HUB_SCRIPT), "up"], capture_output=True, text=True, timeout=180, env=env)
        hub_pid = _pid_in(state / "hub" / "hub.pid")
        proxy_pid = _pid_in(state / "hub" / "jupyterhub-proxy.pid")
        uid = uid_of(USER)
        assert up.returncode == 0, up.stderr + up.stdout
        yield {"url": f"http://127.0.0.1:{port}", "password": env["LABKIT_HUB_PASSWORD"], "requests": requests,
               "uid": uid}
    finally:
        down = subprocess.run(["bash", str(HUB_SCRIPT), "down", "--remove-users"], capture_output=True,
                              text=True, timeout=180, env=env)
        # what is still left is killed first, then reported
        left_hub = {name: pid for name, pid in (("the hub", hub_pid), ("the proxy", proxy_pid))
                    if pid and _alive(pid)}
        left_user = wait_until_gone(uid, 10) if uid is not None else {}
        left_state = labkit_processes(str(state))
        kill_all([*left_hub.values(), *left_user, *left_state])
        jobs = user_jobs(str(uid)) if uid is not None else []
        if jobs:
            subprocess.run(["scancel", *[job.split()[0] for job in jobs]], capture_output=True, timeout=30)
    assert down.returncode == 0, down.stderr
    assert not left_hub, f"still running after down: {left_hub}"
    assert not jobs, f"jobs left in the queue: {jobs}"
    assert not left_user, f"processes of {USER} left after down: {left_user}"
    assert not left_state, f"processes of the hub are left: {left_state}"
    assert uid_of(USER) is None, "the test account is left"


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class Student:
    """A browser-like session: the login form, then the hub's REST API with its cookies."""

    def __init__(self, hub):
        self.base, self.rq = hub["url"], hub["requests"]
        self.session = self.rq.Session()
        self.session.get(f"{self.base}/hub/login", timeout=30)
        reply = self.session.post(f"{self.base}/hub/login", allow_redirects=False, timeout=60, data={
            "username": USER, "password": hub["password"], "_xsrf": self.session.cookies.get("_xsrf")})
        self.login_status = reply.status_code
        self.headers = {"X-XSRFToken": self.session.cookies.get("_xsrf"), "Referer": f"{self.base}/hub/"}

    def api(self, method: str, path: str, **kw):
        return self.session.request(method, f"{self.base}/hub/api{path}", headers=self.headers, timeout=60, **kw)

    def spawn(self, profile: str, timeout: float = 150) -> tuple[bool, list[str]]:
        """Ask for a server with ``profile``; follow the spawn page's progress events until it
        is ready or has failed: (ready, the messages shown)."""
        reply = self.api("POST", f"/users/{USER}/server", json={"profile": profile})
        assert reply.status_code in (201, 202), reply.text
        messages, deadline = [], time.monotonic() + timeout
        with self.session.get(f"{self.base}/hub/api/users/{USER}/server/progress", headers=self.headers,
                              stream=True, timeout=timeout) as events:
            for line in events.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    messages.append(event.get("message", ""))
                    if event.get("ready") or event.get("failed"):
                        return bool(event.get("ready")), messages
                assert time.monotonic() < deadline, f"the spawn did not end: {messages}"
        return False, messages


def run_in_kernel(base: str, token: str, code: str, timeout: float = 240) -> str:
    """Run ``code`` in a new kernel of the student's server; its printed output."""
    import requests
    import websocket

    auth = {"Authorization": f"token {token}"}
    kernel = requests.post(f"{base}/user/{USER}/api/kernels", headers=auth, json={"name": "python3"}, timeout=60)
    assert kernel.status_code == 201, kernel.text
    kid = kernel.json()["id"]
    ws = websocket.create_connection(f"{base.replace('http', 'ws')}/user/{USER}/api/kernels/{kid}/channels",
                                     header=[f"Authorization: token {token}"], timeout=timeout)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": USER,
                                   "session": uuid.uuid4().hex, "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "channel": "shell",
                        "content": {"code": code, "silent": False, "store_history": False,
                                    "user_expressions": {}, "allow_stdin": False}}))
    out, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            raw = ws.recv()
            if isinstance(raw, bytes):  # a message with binary buffers (the widgets' comms)
                continue
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                out.append("\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)
        raise AssertionError(f"the kernel did not finish within {timeout} s: {''.join(out)}")
    finally:
        ws.close()
        requests.delete(f"{base}/user/{USER}/api/kernels/{kid}", headers=auth, timeout=60)


# what the student's notebook runs: the panel starts a 2-worker run through SLURM
STUDENT_CODE = """
import time
t0 = time.time()
import json, os, labkit
from labkit.widgets import ControlPanel
panel = ControlPanel(labkit.RunConfig(workers=2, launcher="slurm", steps=20, log_every=5, eval_every=20),
                     runs_dir="hub-runs")
t1 = time.time()
panel.start()
result = panel.run.wait(timeout=200)
panel.tick()
print(json.dumps({"status": result.status, "error": result.error, "world_size": result.summary.get("world_size"),
                  "job": panel.run.job.job_id, "server_job": os.environ.get("SLURM_JOB_ID"),
                  "panel": panel.status.value, "run_dir": str(result.run_dir.resolve()),
                  "import_s": t1 - t0, "run_s": time.time() - t1, "train_s": result.summary.get("wall_time_s"),
                  "straggler": straggler}))
"""
# and, as a student may (`nohup ... &` in a terminal), leaves a process behind that has left
# the server's process tree (new session, its parent gone) and ignores SIGTERM
STRAGGLER_CODE = """
import subprocess
straggler = int(subprocess.run("setsid bash -c \\"trap '' TERM; exec sleep 1000\\" </dev/null >/dev/null 2>&1 & echo $!",
                               shell=True, capture_output=True, text=True).stdout)
"""


@pytest.mark.timeout(300)
def test_student_spawns_through_sbatch_and_trains_on_slurm(hub):
    t0 = time.monotonic()

    def phase(name):
        print(f"{time.monotonic() - t0:6.1f} s  {name}")

    student = Student(hub)
    assert student.login_status == 302  # the password form let the student in

    # a job that fails before its server starts: the spawn ends at once, saying why (#253)
    started = time.monotonic()
    ready, messages = student.spawn("broken", timeout=60)
    assert not ready and time.monotonic() - started < 45
    assert re.search(r"SLURM job \d+ ended \(FAILED, exit code 3:0", messages[-1]), messages
    assert "labkit-test: no course environment here" in messages[-1]

    phase("failed job reported")
    # a job that waits in the queue longer than the spawner waits: cancelled, and said (#88)
    ready, messages = student.spawn("later", timeout=60)
    assert not ready
    assert any(re.search(r"SLURM job \d+ is waiting in the queue \(position 1 of 1\), reason: BeginTime", m)
               for m in messages), messages
    assert "was cancelled" in messages[-1] and "longer than the hub waits" in messages[-1]
    assert not user_jobs(), user_jobs()

    phase("queued job cancelled")
    # the student's server: a SLURM job, answering through the hub's proxy
    ready, messages = student.spawn("cpu")
    assert ready, messages
    server_job = [line for line in user_jobs() if "spawner-jupyterhub" in line]
    assert len(server_job) == 1 and server_job[0].endswith("RUNNING"), user_jobs()
    token = student.api("POST", f"/users/{USER}/tokens", json={"note": "test", "expires_in": 900}).json()["token"]
    status = hub["requests"].get(f"{hub['url']}/user/{USER}/api/status", headers={"Authorization": f"token {token}"},
                                 timeout=60)
    assert status.status_code == 200, status.text

    phase("server answers")
    # a kernel on it runs a 2-worker labkit job through SLURM, from the panel
    out = run_in_kernel(hub["url"], token, STRAGGLER_CODE + STUDENT_CODE)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "completed", out
    phase(f"2-worker run done (imports {report['import_s']:.1f} s, sbatch to end {report['run_s']:.1f} s, "
          f"the ranks' own wall time {report['train_s']:.1f} s)")
    assert report["world_size"] == 2
    assert report["job"] != report["server_job"] and report["server_job"] == server_job[0].split()[0]
    assert report["panel"].startswith("completed in"), report["panel"]
    run_dir = Path(report["run_dir"])
    assert run_dir.stat().st_uid == int(subprocess.check_output(["id", "-u", USER]))  # written as the student
    assert (run_dir / "job.sbatch").exists() and (run_dir / "logs" / "rank-1.log").exists()
    straggler = processes_of(hub["uid"]).get(report["straggler"], "")
    assert straggler == "sleep 1000", f"the straggler {report['straggler']}: {straggler!r}"
    assert _parent_of(report["straggler"]) not in processes_of(hub["uid"])  # out of the server's tree

    # the student stops the server: the hub cancels its job and waits until SLURM has ended it
    assert student.api("DELETE", f"/users/{USER}/server").status_code in (202, 204)
    deadline = time.monotonic() + 60
    model = student.api("GET", f"/users/{USER}").json()
    while (model.get("server") or model.get("pending")) and time.monotonic() < deadline:
        time.sleep(0.5)
        model = student.api("GET", f"/users/{USER}").json()
    assert not model.get("server") and not model.get("pending"), model
    deadline = time.monotonic() + 30
    while user_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not user_jobs(), user_jobs()
    left = wait_until_gone(hub["uid"], 20)
    assert not left, f"processes of {USER} left after its server stopped: {left}"
    # the job's batch script ended the straggler, which SLURM's linuxproc tracking no longer saw
    log = (Path(f"~{USER}").expanduser() / f"jupyterhub_slurmspawner_{report['server_job']}.log").read_text()
    assert re.search(rf"ending this job's processes left \(TERM\): .*\b{report['straggler']}\b", log), log[-2000:]
    phase("server stopped, no process of the student left")

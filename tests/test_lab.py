"""`make lab`: JupyterLab starts on the student's workspace and serves the start-here notebook.

It serves the workspace only (copies of the walk-throughs and released assignments): nothing
above it, so neither `assignments/source/` nor `assignments/hidden_tests/`, and a notebook
saved from the browser lands in the workspace, not in a tracked file."""

import json
import os
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest

from labkit import course

from .conftest import ROOT
from .servers import server

JUPYTER = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "jupyter"
START_HERE = "notebooks/00_start_here.ipynb"


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.geturl(), response.read()


def put(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


def git_status(path: str) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", path], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


def test_make_lab_serves_the_workspace():
    makefile = (ROOT / "Makefile").read_text()
    lab = makefile[makefile.index("\nlab:"):].split("\n\n")[0]
    assert "--ServerApp.root_dir=$(abspath $(WORKSPACE))" in lab and "labkit.course workspace" in makefile
    assert f"--LabApp.default_url=/lab/tree/{START_HERE}" in lab


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lab_serves_the_course(no_leftovers):
    tmp_path = no_leftovers
    before = git_status(START_HERE)
    workspace = tmp_path / "workspace"
    course.setup_workspace(ROOT, workspace)
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    args = [JUPYTER, "lab", "--no-browser", f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={workspace}", f"--LabApp.default_url=/lab/tree/{START_HERE}"]
    if os.geteuid() == 0:  # containers and CI often run as root, which jupyter refuses by default
        args.append("--allow-root")
    with server(args, workspace, env, tmp_path / "lab.log", start_timeout=90) as port:
        base = f"http://127.0.0.1:{port}"
        status, _, page = get(f"{base}/lab?token={token}")
        assert status == 200 and b"jupyter-config-data" in page

        status, final_url, _ = get(f"{base}/?token={token}")
        assert status == 200 and final_url.split("?")[0] == f"{base}/lab/tree/{START_HERE}"

        status, _, body = get(f"{base}/api/contents/{START_HERE}?token={token}")
        notebook = json.loads(body)
        assert status == 200 and notebook["type"] == "notebook"
        assert notebook["content"]["cells"][0]["source"].startswith("# Distributed and parallel")
        assert notebook["content"]["metadata"]["kernelspec"]["name"] == "labkit"

        with pytest.raises(urllib.error.HTTPError) as denied:
            get(f"{base}/api/contents/{START_HERE}")
        assert denied.value.code == 403

        # the instructor's material is not served: not by name, not by climbing out of the root
        for path in ("assignments/source", "assignments/hidden_tests", "../assignments/source",
                     "..%2Fassignments%2Fsource", "..%2F..%2Fassignments%2Fhidden_tests"):
            with pytest.raises(urllib.error.HTTPError) as hidden:
                get(f"{base}/api/contents/{path}?token={token}")
            assert hidden.value.code in (400, 403, 404), path
        status, _, body = get(f"{base}/api/contents?token={token}")
        assert {item["name"] for item in json.loads(body)["content"]} <= {"notebooks", "assignments", "runs"}

        # saving from the browser (autosave) writes into the workspace, not into the repository
        notebook["content"]["cells"][0]["source"] += "\n\nmy notes"
        assert put(f"{base}/api/contents/{START_HERE}?token={token}",
                   {"type": "notebook", "format": "json", "content": notebook["content"]}) == 200
    assert "my notes" in (workspace / START_HERE).read_text()
    assert "my notes" not in (ROOT / START_HERE).read_text()
    assert git_status(START_HERE) == before

"""`make lab`: JupyterLab starts on the course and serves the start-here notebook."""

import json
import os
import secrets
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT
from .servers import server

JUPYTER = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "jupyter"
START_HERE = "notebooks/00_start_here.ipynb"


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.geturl(), response.read()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lab_serves_the_course(no_leftovers):
    tmp_path = no_leftovers
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    args = [JUPYTER, "lab", "--no-browser", f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={ROOT}", f"--LabApp.default_url=/lab/tree/{START_HERE}"]
    if os.geteuid() == 0:  # containers and CI often run as root, which jupyter refuses by default
        args.append("--allow-root")
    with server(args, ROOT, env, tmp_path / "lab.log", start_timeout=90) as port:
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

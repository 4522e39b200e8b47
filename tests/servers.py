"""Starting and stopping a Jupyter server (JupyterLab, Voila) from a test."""

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

from labkit.launch.base import free_port


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{proc.args[0]} did not listen on port {port} within {timeout} s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM (the server shuts its kernels down), then SIGKILL whatever is left."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def server(args: list, cwd, env: dict, log_path, start_timeout: float = 60):
    """Run ``args + --port=PORT`` in its own process group; yield PORT once it listens."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*map(str, args), f"--port={port}"], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_for_port(port, proc, start_timeout)
            yield port
        finally:
            stop_process_group(proc)

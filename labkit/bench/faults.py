"""``labkit bench faults``: every fault a student or a machine can cause, injected into a real
tiny run, and what came of it.

Each fault runs a real 2-rank training (digits, the MLP) in a directory of its own and is
then injected from outside, as it would happen: a rank or the launching process killed, a
terminal's Ctrl-C pressed twice, a checkpoint altered, the disk filled, the run directory
moved away, a rank stopped (SIGSTOP) and never continued, a bad data file, a second run on
a directory in use. The table says, for each, how the run ended (exit status and the one
line naming the cause), how long after the fault the run had its status, what was kept,
and whether anything was lost. "Nothing lost" is checked, not assumed: the run directory
has a summary with a status and its reason (or, for a refused command, is untouched);
every checkpoint left in place passes its checksum and loads; every line of
``metrics.jsonl`` is JSON; no temporary file is left; no process of the run is left.
Steps after the last checkpoint are not a loss: the printed resume command redoes them.

    labkit bench faults [--only NAME,NAME] [--json] [--keep DIR]

The exit status is 0 when every row says "nothing lost", 1 otherwise, 2 for a bad option.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .runs import print_table, significant

PYTHON = sys.executable
LABKIT = [PYTHON, "-m", "labkit.cli"]
SMALL = ["--workers", "2", "--checkpoint-every", "10", "--log-every", "5", "--eval-every", "10"]
LONG = [*SMALL, "--steps", "100000"]  # ended by the fault, long before its last step
WAIT_S = 120.0  # the longest any step of a fault may take on a loaded 2-core machine


class Fault:
    """One injected fault: ``run(root)`` returns its row."""

    def __init__(self, name: str, what: str, fn):
        self.name, self.what, self.fn = name, what, fn


FAULTS: dict[str, Fault] = {}


def fault(name: str, what: str):
    def register(fn):
        FAULTS[name] = Fault(name, what, fn)
        return fn
    return register


# --- helpers ----------------------------------------------------------------------------------
def _popen(args, run_dir=None, **kwargs) -> subprocess.Popen:
    """``labkit ARGS`` in the background, its SIGINT as a terminal's would be (not ignored)."""
    return subprocess.Popen([*LABKIT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


def _cli(*args, timeout=WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*LABKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the run ended before {what}: {proc.stderr.read().strip()[-300:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _events(run_dir: Path, name: str) -> list[dict]:
    from ..runs import RunDir

    return [e for e in RunDir(run_dir).metrics("event") if e.get("event") == name]


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    pids = [e["pid"] for e in _events(run_dir, "started") if e.get("rank") == rank]
    return pids[-1] if pids else None


def _has_checkpoint(run_dir: Path) -> bool:
    from ..runs import RunDir

    return bool(RunDir(run_dir).checkpoints())


def _finish(proc: subprocess.Popen, timeout: float = WAIT_S) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return -9, "hung: killed by the benchmark after %.0f s" % timeout
    return proc.returncode, err + (out or "")  # a completed run says so on stdout


def _cause(stderr: str) -> str:
    """The one line that names how the run ended (``labkit: run failed: ...``, ``labkit: error: ...``)."""
    lines = [line for line in stderr.splitlines() if line.startswith("labkit:") and " worker(s), " not in line]
    for prefix in ("labkit: run failed:", "labkit: error:", "labkit: stopped", "labkit: completed", "labkit: resume:"):
        for line in lines:
            if line.startswith(prefix):
                return line
    return lines[-1] if lines else ""


def _live(marker: str) -> list[int]:
    """Processes (other than this one) whose command line or environment names ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker.encode() in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def audit(run_dir: Path, status: str | None, words: str | None = None, settle_s: float = 15.0) -> tuple[str, list[str]]:
    """(what was kept, what was lost) of a run that should have ended ``status`` with ``words``
    in its reason; every check of "nothing lost" in the module's docstring."""
    from ..runs import RunDir

    run = RunDir(run_dir)
    lost = []
    deadline = time.monotonic() + settle_s
    while _live(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _live(str(run_dir))
    if left:
        lost.append(f"processes left: {left}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    summary = run.read_summary()
    if status is not None:
        if summary is None:
            lost.append("no summary.json: the run's end is not recorded")
        elif summary.get("status") != status:
            lost.append(f"status {summary.get('status')}, expected {status}")
        elif words and words not in (summary.get("error") or ""):
            lost.append(f"the reason does not name the cause ({summary.get('error')!r})")
    temps = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp")] if run_dir.exists() else []
    if temps:
        lost.append(f"temporary files left: {', '.join(temps)}")
    good = []
    for ckpt in run.checkpoints():
        state, why = run.verify_checkpoint(ckpt)
        if state is None:
            lost.append(f"{ckpt.name} {why}")
        else:
            good.append(int(state["step"]))
    bad_lines = [p for p in run.problems() if "line(s) are not JSON" in p]
    lost += bad_lines
    lines = len(run.metrics())
    kept = []
    if good:
        kept.append("checkpoints " + ", ".join(map(str, good)))
    if summary is not None:
        kept.append(f"summary (steps {summary.get('steps')})")
    if lines:
        kept.append(f"{lines} metric lines")
    rejected = run.checkpoint_dir / "rejected"
    if rejected.is_dir():
        kept.append(f"bad file set aside ({', '.join(sorted(p.name for p in rejected.glob('*.pt')))})")
    return "; ".join(kept) or "-", lost


def row(name: str, code, cause: str, detected_s, kept: str, lost: list[str]) -> dict:
    return {"fault": name, "what": FAULTS[name].what, "exit": code, "outcome": cause,
            "detected_s": None if detected_s is None else round(detected_s, 2), "kept": kept,
            "lost": lost, "nothing_lost": not lost}


def _interrupted(run_dir: Path, fault, *options) -> tuple[int, str, float]:
    """Start ``labkit train`` (``options``, the long run by default), call ``fault(proc)``
    once it has a first checkpoint, and wait for it to end: (exit status, stderr, seconds
    from the fault to the end)."""
    proc = _popen(["train", "--quiet", *(options or LONG), "--run-dir", run_dir])
    try:
        _wait_for(lambda: _has_checkpoint(run_dir), "a first checkpoint", proc)
        t = time.monotonic()
        fault(proc)
        code, err = _finish(proc)
        return code, err, time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()


def _killed_rank(root: Path, name: str, rank: int) -> dict:
    run_dir = root / name

    def kill(proc):
        os.kill(_wait_for(lambda: _rank_pid(run_dir, rank), f"rank {rank} to start", proc), signal.SIGKILL)
    code, err, detected = _interrupted(run_dir, kill)
    kept, lost = audit(run_dir, "failed", f"rank {rank} died")
    return row(name, code, _cause(err), detected, kept, lost)


# --- the faults -------------------------------------------------------------------------------
@fault("kill-worker", "SIGKILL to rank 1 mid-run")
def kill_worker(root: Path) -> dict:
    return _killed_rank(root, "kill-worker", 1)


@fault("kill-master", "SIGKILL to rank 0 mid-run")
def kill_master(root: Path) -> dict:
    return _killed_rank(root, "kill-master", 0)


KERNEL = """
import sys, time, labkit
labkit.launch(labkit.RunConfig(workers=2, steps=100000, checkpoint_every=10, log_every=5, eval_every=10,
                               run_dir=sys.argv[1]))
print("launched", flush=True)
time.sleep(3600)
"""


@fault("kill-launcher", "SIGKILL to the Python process that called labkit.launch (a killed kernel, a closed tab)")
def kill_launcher(root: Path) -> dict:
    run_dir = root / "kill-launcher"
    kernel = subprocess.Popen([PYTHON, "-c", KERNEL, str(run_dir)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _has_checkpoint(run_dir), "a first checkpoint", kernel)
        kernel.kill()
        kernel.wait()
        t = time.monotonic()
        from ..runs import RunDir

        _wait_for(lambda: RunDir(run_dir).summary_path.exists() or not _live(str(run_dir)), "the run to end")
        detected = time.monotonic() - t
    finally:
        if kernel.poll() is None:
            kernel.kill()
    kept, lost = audit(run_dir, "stopped", "the process that launched the run")
    from ..runs import RunDir

    summary = RunDir(run_dir).read_summary() or {}
    return row("kill-launcher", "-", f"stopped: {summary.get('error')}", detected, kept, lost)


def _signalled(root: Path, name: str, signals: list[int], status: str, words: str) -> dict:
    run_dir = root / name

    def send(proc):
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.3)
            proc.send_signal(sig)
    code, err, detected = _interrupted(run_dir, send)
    kept, lost = audit(run_dir, status, words)
    if "Traceback" in err:
        lost.append("a traceback was printed")
    return row(name, code, _cause(err), detected, kept, lost)


@fault("sigterm-launcher", "SIGTERM to labkit train (a closed terminal, a job scheduler)")
def sigterm(root: Path) -> dict:
    return _signalled(root, "sigterm-launcher", [signal.SIGTERM], "stopped", "received SIGTERM")


@fault("ctrl-c-twice", "Ctrl-C pressed twice on labkit train")
def ctrl_c_twice(root: Path) -> dict:
    return _signalled(root, "ctrl-c-twice", [signal.SIGINT, signal.SIGINT], "stopped", "Ctrl-C")


@fault("corrupt-checkpoint", "two bytes flipped in the newest checkpoint, then --resume")
def corrupt_checkpoint(root: Path) -> dict:
    run_dir = root / "corrupt-checkpoint"
    first = _cli("train", "--quiet", *SMALL, "--steps", "20", "--run-dir", run_dir)
    if first.returncode != 0:
        return row("corrupt-checkpoint", first.returncode, _cause(first.stderr), None, "-", ["the first run failed"])
    from ..runs import RunDir

    newest = RunDir(run_dir).latest_checkpoint()
    data = bytearray(newest.read_bytes())
    data[200] ^= 1
    data[201] ^= 1
    newest.write_bytes(bytes(data))
    t = time.monotonic()
    out = _cli("train", "--quiet", "--run-dir", run_dir, "--resume")
    detected = time.monotonic() - t
    kept, lost = audit(run_dir, "completed")
    notes = [line for line in out.stderr.splitlines() if line.startswith("labkit: resume:")]
    if not notes or "does not match its checksum" not in notes[0]:
        lost.append("the resume did not say which checkpoint it skipped and why")
    return row("corrupt-checkpoint", out.returncode, notes[0] if notes else _cause(out.stderr), detected, kept, lost)


@fault("disk-full", "the run directory's disk fills up mid-run (a 256 KB tmpfs)")
def disk_full(root: Path) -> dict:
    mount = root / "disk-full-mnt"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    limit = None
    if mounted.returncode != 0:  # not allowed to mount here: a file size limit fills "the disk" instead
        import resource

        limit = 256 * 1024

        def preexec():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    run_dir = mount / "run"
    try:
        proc = subprocess.Popen([*LABKIT, "train", "--quiet", *LONG, "--run-dir", str(run_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=preexec if limit else None)
        t = time.monotonic()
        code, err = _finish(proc)
        detected = time.monotonic() - t
        kept, lost = audit(run_dir, None)
        from ..runs import RunDir

        summary = RunDir(run_dir).read_summary()
        cause = _cause(err)
        if code != 1 or not cause.startswith("labkit: run failed:") or "Traceback" in err:
            lost.append(f"did not end in one line (exit {code})")
        elif summary is not None and summary.get("status") != "failed":
            lost.append(f"status {summary.get('status')}")
        kept += "" if summary is not None else "; (no room for summary.json: the line said why)"
    finally:
        if limit is None:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    what = "" if limit is None else " (ulimit -f 256 KB standing in for a full disk)"
    return row("disk-full", code, cause + what, detected, kept, lost)


@fault("vanish-run-dir", "the run directory moved away (deleted) mid-run")
def vanish(root: Path) -> dict:
    run_dir = root / "vanish"
    code, err, detected = _interrupted(run_dir, lambda proc: os.rename(run_dir, root / "vanish-moved"))
    shutil.rmtree(root / "vanish-moved", ignore_errors=True)
    lost = []
    cause = _cause(err)
    if code != 1 or "vanished" not in cause or "Traceback" in err:
        lost.append(f"did not end in one line naming the vanished directory (exit {code})")
    if _live(str(run_dir)):
        lost.append("processes left")
    return row("vanish-run-dir", code, cause, detected, "the user removed it: nothing to keep", lost)


@fault("silent-rank", "rank 1 stopped (SIGSTOP) and never continued; --timeout 5")
def silent_rank(root: Path) -> dict:
    run_dir = root / "silent-rank"
    code, err, detected = _interrupted(run_dir, lambda proc: os.kill(_rank_pid(run_dir, 1), signal.SIGSTOP),
                                       *LONG, "--timeout", "5")
    kept, lost = audit(run_dir, "failed", "rank 1 stopped answering")
    if "--timeout 5" not in _cause(err):
        lost.append("the line does not name the timeout that caught it")
    return row("silent-rank", code, _cause(err), detected, kept, lost)


@fault("straggler", "rank 1 stopped (SIGSTOP) for 3 s, then continued; --timeout 30")
def straggler(root: Path) -> dict:
    run_dir = root / "straggler"

    def pause(proc):
        pid = _rank_pid(run_dir, 1)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3)
        os.kill(pid, signal.SIGCONT)
    code, err, _ = _interrupted(run_dir, pause, *SMALL, "--steps", "60", "--timeout", "30")
    kept, lost = audit(run_dir, "completed")
    return row("straggler", code, _cause(err), None, kept, lost)


@fault("resume-race", "labkit train --resume on a run that is still going")
def resume_race(root: Path) -> dict:
    run_dir = root / "resume-race"
    proc = _popen(["train", "--quiet", *LONG, "--run-dir", run_dir])
    try:
        _wait_for(lambda: _has_checkpoint(run_dir), "a first checkpoint", proc)
        before = (run_dir / "metrics.jsonl").read_bytes()
        t = time.monotonic()
        out = _cli("train", "--quiet", "--run-dir", run_dir, "--resume")
        detected = time.monotonic() - t
        lost = []
        if out.returncode != 2 or f"launched by pid {proc.pid}" not in out.stderr:
            lost.append("the second run was not refused naming the first")
        if not (run_dir / "metrics.jsonl").read_bytes().startswith(before):
            lost.append("metrics.jsonl was rewritten")
        proc.send_signal(signal.SIGINT)
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept, more = audit(run_dir, "stopped")
    return row("resume-race", out.returncode, _cause(out.stderr), detected, kept, lost + more)


@fault("bad-data-file", "an MNIST file that is not an IDX file")
def bad_data(root: Path) -> dict:
    from ..data import MNIST_FILES

    data = root / "bad-data"
    data.mkdir()
    for stem in MNIST_FILES.values():
        (data / stem).write_bytes(b"\x00\x00\x08\x03" + b"not an image" * 3)
    run_dir = root / "bad-data-run"
    t = time.monotonic()
    out = _cli("train", "--quiet", "--dataset", "mnist", "--data-dir", data, "--run-dir", run_dir, "--steps", "5")
    detected = time.monotonic() - t
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    lost = []
    if out.returncode != 2 or len(lines) != 1 or str(data) not in lines[0]:
        lost.append("not one line naming the file, exit 2")
    if run_dir.exists():
        lost.append("a run directory was written")
    return row("bad-data-file", out.returncode, lines[0] if lines else "", detected, "nothing to keep: no run started",
               lost)


@fault("run-dir-under-file", "--run-dir inside a regular file")
def run_dir_under_file(root: Path) -> dict:
    regular = root / "a-file"
    regular.write_text("not a directory\n")
    t = time.monotonic()
    out = _cli("train", "--quiet", "--steps", "5", "--run-dir", regular / "run")
    detected = time.monotonic() - t
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    lost = []
    if out.returncode != 2 or len(lines) != 1 or not lines[0].startswith("labkit: error: --run-dir"):
        lost.append("not one line naming --run-dir, exit 2")
    if regular.read_text() != "not a directory\n":
        lost.append("the file was changed")
    return row("run-dir-under-file", out.returncode, lines[0] if lines else "", detected, "the file untouched", lost)


# --- the command ----------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    from ..cli import Parser

    parser = Parser(prog="labkit bench faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--json", action="store_true", help="rows as JSON")
    parser.add_argument("--keep", metavar="DIR", help="keep the run directories under DIR (default: removed)")
    args = parser.parse_args(argv)
    names = list(FAULTS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in FAULTS]
        if unknown or not names:
            parser.error(f"--only: unknown fault {', '.join(unknown) or repr(args.only)}; "
                         f"choose from {', '.join(FAULTS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="labkit-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    env_before = os.environ.get("LABKIT_RUNS_DIR")
    rows = []
    try:
        for name in args.names:
            started = time.monotonic()
            try:
                result = FAULTS[name].fn(root)
            except Exception as e:  # noqa: BLE001 - a fault the stack did not survive is a row, not a crash
                result = row(name, None, f"the benchmark could not complete: {type(e).__name__}: {e}", None, "-",
                             [f"{type(e).__name__}: {e}"])
            result["wall_s"] = round(time.monotonic() - started, 1)
            rows.append(result)
            if not args.json:
                print(f"  {name}: {'nothing lost' if result['nothing_lost'] else 'LOST'} "
                      f"({result['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if env_before is not None:
            os.environ["LABKIT_RUNS_DIR"] = env_before
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    if args.json:
        print(json.dumps({"rows": rows, "loadavg": load}, indent=2))
    else:
        table = [[r["fault"], str(r["exit"]), r["outcome"][:110], significant(r["detected_s"], 3), r["kept"],
                  "nothing lost" if r["nothing_lost"] else "LOST: " + "; ".join(r["lost"])] for r in rows]
        print(f"faults injected into real 2-rank runs (digits, MLP); load average {load}")
        print_table(["fault", "exit", "how it ended (the one line)", "detected_s", "kept", "lost"], table)
    return 0 if all(r["nothing_lost"] for r in rows) else 1

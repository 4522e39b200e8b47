"""nbgrader's exchange between real users (labkit/exchange.py).

As root, the test makes three local accounts (an instructor and two students, homes 0700), sets up
the exchange of a fresh course with ``python -m labkit.exchange setup`` and runs the whole cycle with
nbgrader's own commands, each as its user (``runuser``): the instructor generates and releases
ps0_warmup; each student fetches it, works (one solves it, one hands it in untouched) and submits;
the instructor collects, autogrades, generates and releases feedback; each student fetches their
feedback. Along the way: student B can neither list the submissions nor read A's, even knowing where
they are; the instructor can. Without root (no accounts to make) the cycle is skipped.
"""

import grp
import importlib.util
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from labkit import exchange

from .test_grading import COURSE, solutions, submission

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSIGNMENT = "ps0_warmup"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
COURSE_ID = "labkit"
TEST_LIMITS = """
c.ExecutePreprocessor.timeout = 20
c.Execute.timeout = 20
"""
STEP_TIMEOUT = 120


def test_formgrader_is_enabled_in_jupyterlab():
    """Hand grading needs nbgrader's server extension (formgrader) enabled, as `jupyter server
    extension list` reads it, and its JupyterLab extension enabled (`jupyter labextension list`)."""
    from jupyter_core.paths import jupyter_config_path
    from jupyter_server.extension.config import ExtensionConfigManager

    enabled = ExtensionConfigManager(read_config_path=jupyter_config_path()).get_jpserver_extensions()
    assert enabled.get("nbgrader.server_extensions.formgrader") is True, enabled
    assert importlib.util.find_spec("nbgrader.server_extensions.formgrader") is not None
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    lab = subprocess.run([str(BIN / "jupyter"), "labextension", "list"], capture_output=True, text=True,
                         env=env, timeout=120)
    lab_lines = [line for line in (lab.stdout + lab.stderr).splitlines() if "@jupyter/nbgrader" in line]
    assert lab_lines and all("enabled" in line and "OK" in line for line in lab_lines), lab.stdout + lab.stderr


def test_setup_refuses_bad_input(tmp_path):
    with pytest.raises(exchange.ExchangeSetupError, match="course id"):
        exchange.check(str(tmp_path), "a/b")
    assert exchange.check(str(tmp_path / "none"), "labkit") == [
        f"{tmp_path / 'none'}: no such folder (run: python -m labkit.exchange setup)"]
    if os.geteuid() == 0:
        with pytest.raises(exchange.ExchangeSetupError, match="no user 'no-such-user-x9'"):
            exchange.setup(str(tmp_path), "labkit", "no-such-user-x9", config_dir=None)


# --- the whole cycle, as real users ----------------------------------------------------------------

class Accounts:
    """Local accounts made for the test and removed after it, with the processes they ran."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.users = []
        self.groups = []

    def add(self, role):
        name = f"{self.prefix}{role}"
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True,
                       capture_output=True, timeout=30)
        self.users.append(name)
        home = Path(pwd.getpwnam(name).pw_dir)
        os.chmod(home, 0o700)
        return name

    def remove(self):
        for name in self.users:
            subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=30)
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=30)


def home(user):
    return Path(pwd.getpwnam(user).pw_dir)


def as_user(user, *command, cwd, config_dir, environment, check=True):
    """Run ``command`` as ``user`` (runuser, a clean environment with the course's environment
    first on PATH) in its own session; kill the session if it runs past STEP_TIMEOUT."""
    bin_folder, variables = environment
    env = [f"HOME={home(user)}", f"USER={user}", f"LOGNAME={user}", f"PATH={bin_folder}:/usr/bin:/bin",
           f"JUPYTER_CONFIG_PATH={config_dir}", "LANG=C.UTF-8", *variables]
    process = subprocess.Popen(["runuser", "-u", user, "--", "env", "-i", *env, *command], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{user}: {' '.join(command)} ran past {STEP_TIMEOUT} s:\n{output}")
    if check:
        assert process.returncode == 0, f"{user}: {' '.join(command)} failed:\n{output}"
    return process.returncode, output


def _traversable(path):
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in Path(path).parents)


def _link_or_copy(source, target):
    try:
        os.link(source, target)  # same file system: nothing is copied
    except OSError:
        shutil.copy2(source, target)


def course_environment(base):
    """(bin folder, extra variables) through which the test's accounts run the course's environment.

    A course installs its environment where every user can run it (docs/instructor.md). A venv made
    from a Python under a home folder (/root is 0700, and its mode is not this test's to change) is
    out of the accounts' reach: then that same Python (its interpreter, its library and its standard
    library, hard-linked where possible) is put in ``base``, with a venv that adds the course's
    site-packages and the ``labkit`` kernel pointing at it."""
    real = Path(os.path.realpath(sys.executable))
    homes = (Path("/root"), Path("/home"))
    if _traversable(real) and _traversable(sys.executable) and not any(h in real.parents for h in homes):
        return BIN, []
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = base / "python"
    (python / "bin").mkdir(parents=True)
    _link_or_copy(real, python / "bin" / version)
    library = Path(sysconfig.get_config_var("LIBDIR") or "")
    (python / "lib").mkdir()
    for shared in library.glob(f"lib{version}.so*"):
        _link_or_copy(shared, python / "lib" / shared.name)
    shutil.copytree(sysconfig.get_paths()["stdlib"], python / "lib" / version, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter", "turtledemo"))
    variables = [f"LD_LIBRARY_PATH={python / 'lib'}"]
    env = base / "env"
    subprocess.run([str(python / "bin" / version), "-m", "venv", "--without-pip", str(env)], check=True,
                   capture_output=True, timeout=120, env={**os.environ, "LD_LIBRARY_PATH": str(python / "lib")})
    site_packages = Path(sysconfig.get_paths()["purelib"])
    (env / "lib" / version / "site-packages" / "labkit-course.pth").write_text(
        f"import site; site.addsitedir({str(site_packages)!r})\n")
    for name, entry in {"nbgrader": "nbgrader.apps.nbgraderapp", "alembic": "alembic.config"}.items():
        script = env / "bin" / name
        script.write_text(f"#!{env / 'bin' / 'python'}\nimport sys\nfrom {entry} import main\nsys.exit(main())\n")
        script.chmod(0o755)
    kernel = base / "share" / "jupyter" / "kernels" / "labkit"
    kernel.mkdir(parents=True)
    spec = json.loads((Path(sys.prefix) / "share" / "jupyter" / "kernels" / "labkit" / "kernel.json").read_text())
    spec["argv"][0] = str(env / "bin" / "python")
    (kernel / "kernel.json").write_text(json.dumps(spec))
    # this kernel first, then the course environment's data (nbconvert's templates, the other kernels)
    variables.append(f"JUPYTER_PATH={base / 'share' / 'jupyter'}:{Path(sys.prefix) / 'share' / 'jupyter'}")
    return env / "bin", variables


def processes_of(users):
    uids = {pwd.getpwnam(u).pw_uid for u in users}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid in uids and (entry / "stat").read_text().split()[2] != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="makes local accounts: run as root")
@pytest.mark.skipif(shutil.which("useradd") is None or shutil.which("runuser") is None,
                    reason="needs useradd and runuser")
def test_release_submit_collect_grade_feedback_between_real_users():
    accounts = Accounts(f"lkx{os.getpid() % 100000}")
    base = Path(tempfile.mkdtemp(prefix="labkit-exchange-"))
    os.chmod(base, 0o755)
    try:
        cycle(accounts, base, course_environment(base))
    finally:
        for pid in processes_of(accounts.users) if accounts.users else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        accounts.remove()
        shutil.rmtree(base, ignore_errors=True)


def cycle(accounts, base, environment):
    """Release, fetch, submit, collect, autograde, feedback, fetch feedback, as three users."""
    instructor, alice, bob = accounts.add("i"), accounts.add("a"), accounts.add("b")
    group = f"{accounts.prefix}g"
    accounts.groups.append(group)
    root, config_dir = base / "exchange", base / "config"
    result = subprocess.run(
        [sys.executable, "-m", "labkit.exchange", "setup", "--root", str(root), "--course", COURSE_ID,
         "--instructor", instructor, "--group", group, "--config-dir", str(config_dir)],
        capture_output=True, text=True, timeout=STEP_TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert exchange.check(str(root), COURSE_ID, group) == []
    inbound = root / COURSE_ID / "inbound"

    def instructor_does(*command, check=True):
        return as_user(instructor, *command, cwd=course, config_dir=config_dir, environment=environment, check=check)

    def student_does(user, *command, check=True):
        return as_user(user, *command, cwd=home(user), config_dir=config_dir, environment=environment,
                       check=check)

    # The instructor's course directory: the course's source and hidden tests of ps0_warmup.
    course = home(instructor) / "course"
    (course / "source").mkdir(parents=True)
    shutil.copytree(COURSE / "source" / ASSIGNMENT, course / "source" / ASSIGNMENT,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (course / "hidden_tests").mkdir()
    shutil.copy(COURSE / "hidden_tests" / f"{ASSIGNMENT}.py", course / "hidden_tests")
    shutil.copy(COURSE / "nbgrader_config.py", course)
    with open(course / "nbgrader_config.py", "a") as config:
        config.write(TEST_LIMITS)
    subprocess.run(["chown", "-R", f"{instructor}:", str(course)], check=True, timeout=30)

    instructor_does("nbgrader", "generate_assignment", ASSIGNMENT)
    instructor_does("nbgrader", "release_assignment", ASSIGNMENT)
    assert (root / COURSE_ID / "outbound" / ASSIGNMENT / NOTEBOOK).is_file()

    # Each student fetches, works and submits.
    release = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)
    work = {alice: submission(release, solutions()), bob: submission(release)}
    for user, notebook in work.items():
        student_does(user, "nbgrader", "fetch_assignment", ASSIGNMENT)
        fetched = home(user) / ASSIGNMENT / NOTEBOOK
        assert fetched.is_file() and fetched.stat().st_uid == pwd.getpwnam(user).pw_uid
        nbformat.write(notebook, fetched)
        student_does(user, "nbgrader", "submit", ASSIGNMENT)

    # Nobody but the graders reads a submission: bob cannot list them, nor read alice's even
    # knowing its name; alice's home (her working copy and nbgrader's cache) is closed to him.
    code, output = student_does(bob, "ls", str(inbound), check=False)
    assert code != 0 and "Permission denied" in output, output
    (alices,) = [p for p in inbound.iterdir() if p.name.startswith(f"{alice}+{ASSIGNMENT}+")]
    for target in (alices / NOTEBOOK, alices / "submission_secret.txt", alices,
                   home(alice) / ASSIGNMENT / NOTEBOOK):
        code, output = student_does(bob, "cat" if target.is_file() else "ls", str(target), check=False)
        assert code != 0 and "Permission denied" in output, f"bob reads {target}: {output}"
    code, output = student_does(bob, "mv", str(alices), str(inbound / "moved"), check=False)
    assert code != 0 and alices.is_dir(), f"bob moved alice's submission: {output}"
    graders = grp.getgrnam(group).gr_gid
    for path in [alices, *alices.rglob("*")]:
        mode = exchange.SUBMISSION_DIR_MODE if path.is_dir() else exchange.SUBMISSION_FILE_MODE
        assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (mode, graders), path
    code, output = student_does(alice, "cat", str(alices / NOTEBOOK), check=False)
    assert code == 0, output

    # The instructor collects, grades with nbgrader's own commands and returns feedback.
    instructor_does("nbgrader", "collect", ASSIGNMENT)
    for user in work:
        assert (course / "submitted" / user / ASSIGNMENT / NOTEBOOK).is_file(), user
    instructor_does("nbgrader", "autograde", ASSIGNMENT)
    instructor_does("nbgrader", "generate_feedback", ASSIGNMENT)
    instructor_does("nbgrader", "release_feedback", ASSIGNMENT)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gradebook:
        scores = {user: (gradebook.find_submission(ASSIGNMENT, user).score,
                         gradebook.find_submission(ASSIGNMENT, user).max_score) for user in work}
    assert scores == {alice: (7, 9), bob: (0, 9)}, scores  # 2 of the 9 points are graded by hand

    for user in work:
        student_does(user, "nbgrader", "fetch_feedback", ASSIGNMENT)
        pages = list((home(user) / ASSIGNMENT / "feedback").glob(f"*/{ASSIGNMENT}.html"))
        assert len(pages) == 1, f"{user}: {pages}"
        page = pages[0].read_text()
        assert "Score: 7.0 / 9.0" in page if user == alice else "Score: 0.0 / 9.0" in page, page[:2000]
    code, output = student_does(bob, "ls", str(root / COURSE_ID / "feedback"), check=False)
    assert code != 0 and "Permission denied" in output, output
    assert processes_of(accounts.users) == [], "processes left by the users"

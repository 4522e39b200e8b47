"""nbgrader's exchange between real users: the shared directory, its permissions, its configuration.

nbgrader hands assignments out and back through one directory that every user of the machine (or
of the cluster's shared file system) can reach, laid out per course::

    <root>/                     1777  anyone may add a course; nobody removes another's
    <root>/<course>/            0755  the instructor's
        outbound/               0755  released assignments: everyone reads
        inbound/                3733  submissions: everyone may add one, nobody may list them,
                                      remove another's, or (see PrivateSubmit) read another's
        feedback/               0711  feedback pages, each under a name only its student can compute

``inbound/`` is setgid to the course's graders group (the instructor and teaching assistants), so
every submission belongs to that group. nbgrader itself hides a submission only behind a random
name and leaves its files readable by all (nbgrader #659, #1225): a student who learns the name
(a shared screen, a log line) can read them. :class:`PrivateSubmit`, the ``submit`` of this
course's exchange, closes that: right after nbgrader copies a submission in, its files become
readable by their owner and the graders group only.

    python -m labkit.exchange setup --root /srv/nbgrader/exchange --course labkit --instructor alice
    python -m labkit.exchange check --root /srv/nbgrader/exchange --course labkit

``setup`` runs as root: it creates the graders group (``<course>-graders`` unless ``--group`` says
otherwise), puts the instructor in it, makes the directories above and writes the configuration
every user's nbgrader reads (``<config-dir>/nbgrader_config.py``, by default in /etc/jupyter):
the exchange's root, the course id and PrivateSubmit. ``check`` says, one line each, what is not
as above; it needs no privilege. Students' home folders should be private (mode 0700): nbgrader
keeps a copy of each submission, with the secret that names its feedback, in the student's
``~/.local/share/jupyter/nbgrader_cache``. See docs/instructor.md.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

DEFAULT_ROOT = "/srv/nbgrader/exchange"
DEFAULT_CONFIG_DIR = "/etc/jupyter"
ROOT_MODE = 0o1777
# folder -> (mode, owned by the graders group)
COURSE_LAYOUT = {
    ".": (0o755, False),
    "outbound": (0o755, False),
    "inbound": (0o3733, True),
    "feedback": (0o711, False),
}
SUBMISSION_DIR_MODE = 0o770
SUBMISSION_FILE_MODE = 0o640
CONFIG_NAME = "nbgrader_config.py"
CONFIG_TEMPLATE = '''\
"""The nbgrader exchange of course {course!r} (written by python -m labkit.exchange setup)."""

c = get_config()  # noqa: F821
c.Exchange.root = {root!r}
c.CourseDirectory.course_id = {course!r}
# Submissions readable by their student and the graders group only (labkit/exchange.py).
c.ExchangeFactory.submit = "labkit.exchange.PrivateSubmit"
'''


class ExchangeSetupError(Exception):
    """Something that stops the setup; the message is one line."""


def _private_submit():
    from nbgrader.exchange.default.submit import ExchangeSubmit
    from nbgrader.utils import ignore_patterns

    class PrivateSubmit(ExchangeSubmit):
        """nbgrader's submit, with every file of the submission in the graders group and readable
        by its student and that group only (folders 0770, files 0640; nbgrader leaves them readable
        by all and the folder writable by all)."""

        def do_copy(self, src, dest):
            if Path(dest).parent != Path(self.inbound_path):
                return super().do_copy(src, dest)  # the student's own cache
            # nbgrader's copy is shutil.copytree, which gives the new folder the mode of the
            # student's (copystat): inbound's setgid bit is lost, and the files nbgrader writes
            # afterwards (timestamp.txt, submission_secret.txt) would be in the student's group,
            # out of the graders' reach. Folders are made here instead, inheriting it.
            max_size = self.coursedir.max_dir_size
            if self.get_size(src) > 1000 * max_size:
                raise RuntimeError(f"the assignment's folder is larger than {max_size} kB; remove large files")
            ignore = ignore_patterns(exclude=self.coursedir.ignore, include=self.coursedir.include,
                                     max_file_size=self.coursedir.max_file_size, log=self.log)
            copy_keeping_group(Path(src), Path(dest), ignore)

        def copy_files(self):
            super().copy_files()
            private(Path(self.inbound_path) / self.assignment_filename)

    PrivateSubmit.__module__ = __name__
    PrivateSubmit.__qualname__ = "PrivateSubmit"
    return PrivateSubmit


def copy_keeping_group(src: Path, dest: Path, ignore) -> None:
    """Copy the folder ``src`` to ``dest`` (new) without copying modes, so that what is made takes the
    group of a setgid parent; ``ignore`` is shutil.copytree's. Symbolic links are not followed nor copied."""
    dest.mkdir()
    names = os.listdir(src)
    skipped = set(ignore(str(src), names))
    for name in names:
        source = src / name
        if name in skipped or source.is_symlink():
            continue
        if source.is_dir():
            copy_keeping_group(source, dest / name, ignore)
        elif source.is_file():
            shutil.copyfile(source, dest / name)


def __getattr__(name):
    """``PrivateSubmit`` is made on first use, so that ``setup`` and ``check`` do not import nbgrader."""
    if name == "PrivateSubmit":
        globals()[name] = _private_submit()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def private(folder: Path) -> None:
    """Folders 0770 and files 0640 under ``folder``, itself included (symbolic links are left alone)."""
    for path, _folders, files in os.walk(folder):
        os.chmod(path, SUBMISSION_DIR_MODE)
        for name in files:
            file = Path(path) / name
            if not file.is_symlink():
                os.chmod(file, SUBMISSION_FILE_MODE)


def default_group(course: str) -> str:
    return f"{course}-graders"


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ExchangeSetupError(f"no user {name!r} on this machine (create the instructor's account first)") from None


def _group(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ExchangeSetupError(f"{' '.join(command)} failed: {message[-1] if message else result.returncode}")


def check_course_id(course: str) -> None:
    if not course or "/" in course or "+" in course or course.startswith("."):
        raise ExchangeSetupError(f"course id {course!r} must be a plain name (no '/', no '+')")


def setup(root: str, course: str, instructor: str, group: str | None = None,
          config_dir: str | None = DEFAULT_CONFIG_DIR) -> list[str]:
    """Make the exchange of ``course`` under ``root`` (as root); return what was done, a line each."""
    check_course_id(course)
    if os.geteuid() != 0:
        raise ExchangeSetupError("setup creates a group and folders owned by the instructor: run it as root")
    owner = _user(instructor)
    group = group or default_group(course)
    done = []
    if _group(group) is None:
        _run("groupadd", group)
        done.append(f"created group {group}")
    if instructor not in _group(group).gr_mem and owner.pw_gid != _group(group).gr_gid:
        _run("usermod", "-a", "-G", group, instructor)
        done.append(f"added {instructor} to group {group}")
    gid = _group(group).gr_gid
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    os.chmod(root_path, ROOT_MODE)
    done.append(f"{root_path} mode {ROOT_MODE:o}")
    for name, (mode, graders) in COURSE_LAYOUT.items():
        folder = (root_path / course / name) if name != "." else root_path / course
        folder.mkdir(exist_ok=True)
        os.chown(folder, owner.pw_uid, gid if graders else owner.pw_gid)
        os.chmod(folder, mode)
        done.append(f"{folder} owner {instructor}{f', group {group}' if graders else ''}, mode {mode:o}")
    if config_dir:
        config = Path(config_dir) / CONFIG_NAME
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG_TEMPLATE.format(root=str(root_path.resolve()), course=course))
        os.chmod(config, 0o644)
        done.append(f"wrote {config}")
    return done


def check(root: str, course: str, group: str | None = None) -> list[str]:
    """What is not as setup makes it, one line each; empty when all is well."""
    check_course_id(course)
    group = group or default_group(course)
    problems = []
    root_path = Path(root)
    if not root_path.is_dir():
        return [f"{root_path}: no such folder (run: python -m labkit.exchange setup)"]
    if stat.S_IMODE(root_path.stat().st_mode) != ROOT_MODE:
        problems.append(f"{root_path}: mode {stat.S_IMODE(root_path.stat().st_mode):o}, should be {ROOT_MODE:o}")
    graders = _group(group)
    if graders is None:
        problems.append(f"no group {group!r}")
    course_path = root_path / course
    owner = course_path.stat().st_uid if course_path.is_dir() else None
    for name, (mode, by_graders) in COURSE_LAYOUT.items():
        folder = course_path if name == "." else course_path / name
        if not folder.is_dir():
            problems.append(f"{folder}: no such folder")
            continue
        info = folder.stat()
        if stat.S_IMODE(info.st_mode) != mode:
            problems.append(f"{folder}: mode {stat.S_IMODE(info.st_mode):o}, should be {mode:o}")
        if info.st_uid != owner:
            problems.append(f"{folder}: not owned by the course's owner")
        if by_graders and graders is not None and info.st_gid != graders.gr_gid:
            problems.append(f"{folder}: group is not {group}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.exchange",
                                     description="Set up or check nbgrader's exchange directory of a course.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("setup", "check"):
        sub = commands.add_parser(name)
        sub.add_argument("--root", default=DEFAULT_ROOT, help="the exchange directory (default: %(default)s)")
        sub.add_argument("--course", default="labkit", help="the course id (default: %(default)s)")
        sub.add_argument("--group", help="the graders group (default: <course>-graders)")
        if name == "setup":
            sub.add_argument("--instructor", required=True, help="the user who owns the course and grades it")
            sub.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR,
                             help="where to write nbgrader_config.py for every user (default: %(default)s; "
                                  "'' writes none)")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            for line in setup(args.root, args.course, args.instructor, args.group, args.config_dir or None):
                print(line)
            return 0
        problems = check(args.root, args.course, args.group)
    except ExchangeSetupError as error:
        print(f"labkit.exchange: error: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{Path(args.root) / args.course}: the exchange is set up")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

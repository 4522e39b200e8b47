"""The student's workspace (`make lab`): apart from the instructor's material, and kept clean.

The workspace holds copies of the walk-throughs and of the released assignments only; running
and saving notebooks there leaves `git status` as it was, a student's edits survive the next
`make lab`, `--fresh` brings back the original of one notebook, and nothing of
`assignments/source/` or `assignments/hidden_tests/` (no solution, no hidden test) is in it.
The instructor's release works without an activated environment.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labkit import course

from .conftest import ROOT
from .test_notebooks import kernel_name


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the repository (its last commit): what a new user has, and a tree no one
    else edits while the test runs."""
    path = tmp_path_factory.mktemp("clone") / "labkit"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True, timeout=120)
    return path


def git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout


def course_cli(repo: Path, *args, env=None, timeout=300):
    """``python -m labkit.course --root REPO ARGS`` run from REPO, as the Makefile runs it."""
    return subprocess.run([sys.executable, "-m", "labkit.course", "--root", str(repo), *map(str, args)],
                          cwd=repo, capture_output=True, text=True, timeout=timeout, env=env)


def solution_blocks(repo: Path) -> list[str]:
    """The text of every solution and hidden-test region of the instructor's notebooks."""
    blocks = []
    for path in (repo / "assignments" / "source").glob("*/*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            for m in re.finditer(r"### BEGIN (?:SOLUTION|HIDDEN TESTS)\n(.*?)### END", cell.source, re.S):
                if m.group(1).strip():
                    blocks.append(m.group(1).strip())
    return blocks


def test_default_workspace_is_ignored_by_git(clone):
    for path in ("workspace/notebooks/00_start_here.ipynb", "workspace/assignments/ps0_warmup/ps0_warmup.ipynb",
                 "workspace/notebooks/runs/x/metrics.jsonl"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=clone).returncode == 0, path


def test_release_works_without_an_activated_environment(clone):
    # a shell that never activated .venv: its bin folder is not on PATH (nbgrader's `alembic` is there)
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": path or "/usr/bin:/bin"}
    out = course_cli(clone, "release", "ps0_warmup", env=env)
    assert out.returncode == 0, out.stderr
    released = clone / "assignments" / "release" / "ps0_warmup" / "ps0_warmup.ipynb"
    assert released.exists()
    text = released.read_text()
    assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text and "run_hidden_tests" not in text


def test_release_of_an_unknown_assignment_is_one_line(clone):
    out = course_cli(clone, "release", "ps99_nothing")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no assignment 'ps99_nothing'" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_workspace_runs_and_saves_without_touching_the_repository(clone, no_leftovers, monkeypatch):
    assert git_status(clone) == ""
    workspace = clone / "workspace"   # where `make lab` puts it

    # make lab's set-up: release what is not released yet, copy what the workspace lacks
    out = course_cli(clone, "workspace")
    assert out.returncode == 0, out.stderr
    names = {p.relative_to(workspace).as_posix() for p in workspace.rglob("*") if p.is_file()}
    for nb in clone.glob("notebooks/*.ipynb"):
        assert f"notebooks/{nb.name}" in names
    for assignment in course.assignments(clone):
        assert f"assignments/{assignment}/{assignment}.ipynb" in names

    # nothing of the instructor's is in it: no source, no hidden tests, no link out, no solution text
    assert not [n for n in names if "source/" in n or "hidden_tests" in n]
    assert not [p for p in workspace.rglob("*") if p.is_symlink()]
    blocks = solution_blocks(clone)
    assert blocks, "the instructor's notebooks have solution regions to look for"
    for path in workspace.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text, path
            leaked = [b[:60] for b in blocks if b in text]
            assert not leaked, f"{path} holds solution text: {leaked}"
    hidden = {p.stem for p in (clone / "assignments" / "hidden_tests").glob("*.py")}
    assert not [p for p in workspace.rglob("*.py") if p.stem in hidden]

    # a student runs a notebook in the workspace and saves it with its outputs (what JupyterLab's autosave does)
    student_nb = workspace / "assignments" / "ps0_warmup" / "ps0_warmup.ipynb"
    monkeypatch.setenv("LABKIT_RUNS_DIR", str(workspace / "runs"))
    nb = nbformat.read(student_nb, as_version=4)
    NotebookClient(nb, kernel_name=kernel_name(), timeout=120, allow_errors=True,
                   resources={"metadata": {"path": str(student_nb.parent)}}).execute()
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("my notes"))
    nbformat.write(nb, student_nb)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")

    # the next `make lab` keeps the student's version; --fresh brings the original back and keeps theirs
    out = course_cli(clone, "workspace", "--no-release")
    assert out.returncode == 0, out.stderr
    assert nbformat.read(student_nb, as_version=4).cells[0].source == "my notes"
    out = course_cli(clone, "workspace", "--fresh", "ps0_warmup.ipynb")
    assert out.returncode == 0, out.stderr
    fresh = nbformat.read(student_nb, as_version=4)
    assert fresh.cells[0].source != "my notes"
    assert all(c.get("outputs", []) == [] for c in fresh.cells if c.cell_type == "code")
    (kept,) = student_nb.parent.glob("ps0_warmup-mine-*.ipynb")
    assert nbformat.read(kept, as_version=4).cells[0].source == "my notes"
    bad = course_cli(clone, "workspace", "--fresh", "nowhere.ipynb")
    assert bad.returncode == 2 and "no notebook named 'nowhere.ipynb'" in bad.stderr

    assert (workspace / "runs").is_dir() and (clone / "assignments" / "release").is_dir()
    assert git_status(clone) == "", "using the workspace changed the repository"

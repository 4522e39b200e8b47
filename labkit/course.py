"""The course's spine: the topic map, the student's workspace, the instructor's release.

The topic map (``notebooks/topics.toml``) lists every topic of the five source documents (the
99 rows of TOPICS.md) with the walk-through notebook(s) whose cells carry the tag
``topic-<id>`` and, for ``lab`` topics, the graded question(s) in ``assignments/source/`` that
carry the same tag. :func:`check` holds the map against the files and gives each row a status:

- ``covered``: every mapped notebook has a cell with the tag, every mapped question is a graded
  cell with the tag, and a ``lab`` row has at least one such question;
- ``to come (issue N)``: what is not there yet is work of open issue N (``todo``);
- ``missing``: something mapped is not there and no open issue is said to bring it.

The student's workspace (``workspace/``, git-ignored) holds copies of the walk-throughs and of
the *released* assignments only: JupyterLab (``make lab``) is served from it, so a student never
sees ``assignments/source/`` or ``assignments/hidden_tests/`` and never writes into tracked files.

    python -m labkit.course                      # covered / to come / missing, and what is missing
    python -m labkit.course --write              # render the table of notebooks/README.md
    python -m labkit.course workspace            # make the workspace, or add what is new to it
    python -m labkit.course workspace --fresh 003_cnn_training_and_easgd.ipynb
    python -m labkit.course release              # nbgrader generate_assignment for every assignment
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MAP_FILE = Path("notebooks") / "topics.toml"
README_FILE = Path("notebooks") / "README.md"
TABLE_BEGIN = "<!-- topic table: begin (python -m labkit.course --write) -->"
TABLE_END = "<!-- topic table: end -->"
KINDS = ("lab", "context")
ID_PATTERN = re.compile(r"^\d{3}\.\d{2}$")
TODO_PATTERN = re.compile(r"^issue \d+$")
WORKSPACE = Path("workspace")


class CourseError(Exception):
    """A problem with the map or the files; the message is one line."""


def tag(topic_id: str) -> str:
    return f"topic-{topic_id}"


# --- the map -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topic:
    id: str
    title: str
    kind: str
    doc: str
    notebooks: tuple[str, ...]
    questions: tuple[str, ...]
    todo: str | None = None
    todo_items: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return tag(self.id)

    def is_todo(self, item: str) -> bool:
        return self.todo is not None and item in self.todo_items


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CourseError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise CourseError(f"{path}: not valid TOML: {e}") from None


def load_map(path: str | os.PathLike | None = None) -> list[Topic]:
    """The topics of ``path`` (default notebooks/topics.toml), checked for form."""
    path = Path(path) if path else ROOT / MAP_FILE
    rows = _read_toml(path).get("topic")
    if not isinstance(rows, list) or not rows:
        raise CourseError(f"{path}: no [[topic]] rows")
    topics, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{path}: topic {row.get('id', f'#{n}')}"
        unknown = set(row) - {"id", "title", "kind", "doc", "notebooks", "questions", "todo", "todo_items"}
        if unknown:
            raise CourseError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        topic_id = row.get("id")
        if not isinstance(topic_id, str) or not ID_PATTERN.match(topic_id):
            raise CourseError(f"{where}: id must look like '000.01', not {topic_id!r}")
        if topic_id in seen:
            raise CourseError(f"{where}: id appears twice")
        seen.add(topic_id)
        if row.get("kind") not in KINDS:
            raise CourseError(f"{where}: kind must be lab or context, not {row.get('kind')!r}")
        if not isinstance(row.get("title"), str) or not row["title"].strip():
            raise CourseError(f"{where}: no title")
        if row.get("doc", topic_id[:3]) != topic_id[:3]:
            raise CourseError(f"{where}: doc {row['doc']!r} does not match the id")
        lists = {}
        for key in ("notebooks", "questions", "todo_items"):
            value = row.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise CourseError(f"{where}: {key} must be a list of names")
            lists[key] = tuple(value)
        for name in lists["notebooks"]:
            if "/" in name or not name.endswith(".ipynb"):
                raise CourseError(f"{where}: notebook {name!r} must be a file name in notebooks/ ending in .ipynb")
        for question in lists["questions"]:
            if not re.match(r"^[A-Za-z0-9_\-]+(:[A-Za-z0-9_\-]+)?$", question):
                raise CourseError(f"{where}: question {question!r} must be 'assignment' or 'assignment:grade_id'")
        if not lists["notebooks"]:
            raise CourseError(f"{where}: no notebook: every topic gets a walk-through cell")
        todo = row.get("todo")
        if todo is not None and (not isinstance(todo, str) or not TODO_PATTERN.match(todo)):
            raise CourseError(f"{where}: todo must read 'issue N', not {todo!r}")
        items = lists["notebooks"] + lists["questions"]
        todo_items = lists["todo_items"] or (items if todo else ())
        if todo_items and todo is None:
            raise CourseError(f"{where}: todo_items without todo")
        stray = [i for i in todo_items if i not in items]
        if stray:
            raise CourseError(f"{where}: todo_items {stray} are not among its notebooks or questions")
        if row["kind"] == "lab" and not lists["questions"]:
            raise CourseError(f"{where}: a lab topic needs a graded question (or one marked todo)")
        topics.append(Topic(topic_id, row["title"].strip(), row["kind"], topic_id[:3], lists["notebooks"],
                            lists["questions"], todo, todo_items))
    return topics


def load_documents(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The titles of the source documents, by number ("000" -> title)."""
    path = Path(path) if path else ROOT / MAP_FILE
    return {k: v["title"] for k, v in _read_toml(path).get("documents", {}).items()}


def read_topic_list(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """The rows of a TOPICS.md-style list: id -> (title, kind)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^\|\s*(\d{3}\.\d{2})\s*\|(.*)\|\s*(lab|context)\s*\|\s*$", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3))
    return rows


# --- the files -----------------------------------------------------------------------------------
def _cells(path: Path) -> list[dict]:
    """The cells of a notebook, read as plain JSON (nothing in it runs)."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CourseError(f"{path}: not a readable notebook ({e.__class__.__name__})") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list):
        raise CourseError(f"{path}: not a notebook (no cells)")
    return [c for c in cells if isinstance(c, dict)]


def cell_tags(cell: dict) -> set[str]:
    tags = (cell.get("metadata") or {}).get("tags") or []
    return {t for t in tags if isinstance(t, str)}


@dataclass
class Files:
    """What the notebooks and assignments of a course tree hold, read once."""

    root: Path
    notebook_tags: dict[str, set[str]] = field(default_factory=dict)
    # assignment -> grade_id -> tags of that graded cell
    graded_cells: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: str | os.PathLike | None = None) -> Files:
        root = Path(root) if root else ROOT
        files = cls(root)
        for path in sorted((root / "notebooks").glob("*.ipynb")):
            files.notebook_tags[path.name] = set().union(*(cell_tags(c) for c in _cells(path)))
        source = root / "assignments" / "source"
        for folder in sorted(p for p in source.glob("*") if p.is_dir()):
            graded = files.graded_cells.setdefault(folder.name, {})
            for path in sorted(folder.glob("*.ipynb")):
                for cell in _cells(path):
                    meta = (cell.get("metadata") or {}).get("nbgrader") or {}
                    if meta.get("grade") is True and meta.get("grade_id"):
                        graded[meta["grade_id"]] = cell_tags(cell)
        return files


@dataclass
class RowStatus:
    topic: Topic
    missing: list[str] = field(default_factory=list)   # not there, and no open issue brings it
    to_come: list[str] = field(default_factory=list)   # not there yet, work of topic.todo
    questions_found: list[str] = field(default_factory=list)  # "assignment:grade_id" tagged with the id

    @property
    def status(self) -> str:
        if self.missing:
            return "missing"
        if self.to_come:
            return f"to come ({self.topic.todo})"
        return "covered"


def check_topic(topic: Topic, files: Files) -> RowStatus:
    row = RowStatus(topic)

    def problem(item: str, what: str) -> None:
        (row.to_come if topic.is_todo(item) else row.missing).append(what)

    for name in topic.notebooks:
        if name not in files.notebook_tags:
            problem(name, f"notebook {name} does not exist")
        elif topic.tag not in files.notebook_tags[name]:
            problem(name, f"{name} has no cell tagged {topic.tag}")
    for question in topic.questions:
        assignment, _, grade_id = question.partition(":")
        graded = files.graded_cells.get(assignment)
        if graded is None:
            problem(question, f"assignment {assignment} does not exist")
        elif grade_id:
            if grade_id not in graded:
                problem(question, f"{assignment} has no graded cell {grade_id}")
            elif topic.tag not in graded[grade_id]:
                problem(question, f"{assignment}:{grade_id} is not tagged {topic.tag}")
            else:
                row.questions_found.append(question)
        else:
            found = [f"{assignment}:{g}" for g, tags in graded.items() if topic.tag in tags]
            if found:
                row.questions_found.extend(found)
            else:
                problem(question, f"{assignment} has no graded cell tagged {topic.tag}")
    return row


def check(topics: list[Topic] | None = None, root: str | os.PathLike | None = None) -> list[RowStatus]:
    topics = load_map() if topics is None else topics
    files = Files.scan(root)
    return [check_topic(t, files) for t in topics]


def counts(rows: list[RowStatus]) -> dict[str, int]:
    """covered, missing, and one "to come (issue N)" count per open issue."""
    out = {"covered": 0, "missing": 0}
    for row in rows:
        out[row.status] = out.get(row.status, 0) + 1
    return out


def report(rows: list[RowStatus]) -> str:
    """The counts on one line, then one line per row that is missing something."""
    c = counts(rows)
    later = sorted(k for k in c if k.startswith("to come"))
    by_issue = ", ".join(f"{c[k]} {k[len('to come ('):-1]}" for k in later)
    lines = [f"{len(rows)} topics: {c['covered']} covered, {sum(c[k] for k in later)} to come"
             + (f" ({by_issue})" if by_issue else "") + f", {c['missing']} missing"]
    for row in rows:
        if row.missing:
            lines.append(f"  missing {row.topic.id} {row.topic.title[:50]}: " + "; ".join(row.missing))
    stale = [row.topic.id for row in rows if row.status == "covered" and row.topic.todo]
    if stale:
        lines.append(f"  covered although marked todo (the mark can go): {', '.join(stale)}")
    return "\n".join(lines)


# --- notebooks/README.md -------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[RowStatus], documents: dict[str, str] | None = None) -> str:
    documents = documents or {}
    c = counts(rows)
    later = {k: v for k, v in c.items() if k.startswith("to come")}
    summary = (f"{len(rows)} topics: **{c['covered']} covered**, {sum(later.values())} to come"
               + (" (" + ", ".join(f"{v} in {k[9:-1]}" for k, v in sorted(later.items())) + ")" if later else "")
               + f", {c['missing']} missing.")
    out = [TABLE_BEGIN, "", summary, ""]
    doc = None
    for row in rows:
        t = row.topic
        if t.doc != doc:
            doc = t.doc
            out += ["", f"### {doc}: {documents.get(doc, '')}".rstrip(": "), "",
                    "| id | topic | kind | walk-through (cell tag) | graded question | status |",
                    "|---|---|---|---|---|---|"]
        notebooks = ", ".join(f"[{n}]({n})" for n in t.notebooks)
        questions = []
        found_assignments = {q.split(":")[0] for q in row.questions_found}
        questions += row.questions_found
        questions += [q for q in t.questions if q.split(":")[0] not in found_assignments]
        status = row.status
        if row.missing:
            status = "missing: " + "; ".join(row.missing)
            if row.to_come:
                status += f" (and to come in {t.todo}: " + "; ".join(row.to_come) + ")"
        out.append(f"| {t.id} | {_cell(t.title)} | {t.kind} | {notebooks} (`{t.tag}`) | "
                   f"{_cell(', '.join(questions)) or '-'} | {_cell(status)} |")
    out += ["", TABLE_END]
    return "\n".join(out)


def readme_with_table(readme_text: str, table: str) -> str:
    begin, end = readme_text.find(TABLE_BEGIN), readme_text.find(TABLE_END)
    if begin < 0 or end < begin:
        raise CourseError(f"{README_FILE}: the markers of the topic table are missing")
    return readme_text[:begin] + table + readme_text[end + len(TABLE_END):]


def current_table(root: str | os.PathLike | None = None) -> str:
    root = Path(root) if root else ROOT
    topics = load_map(root / MAP_FILE)
    return render_table(check(topics, root), load_documents(root / MAP_FILE))


# --- the student's workspace ---------------------------------------------------------------------
def walkthroughs(root: Path) -> list[Path]:
    return sorted((root / "notebooks").glob("*.ipynb"))


def released(root: Path) -> list[Path]:
    """Every file of every released assignment (assignments/release/<a>/...)."""
    release = root / "assignments" / "release"
    return sorted(p for p in release.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts)


def workspace_files(root: Path) -> dict[Path, Path]:
    """What the workspace holds: path in the workspace -> the original it is copied from."""
    files = {Path("notebooks") / p.name: p for p in walkthroughs(root)}
    for p in sorted((root / "notebooks" / "dashboards").glob("*.ipynb")):
        files[Path("notebooks") / "dashboards" / p.name] = p
    release = root / "assignments" / "release"
    for p in released(root):
        files[Path("assignments") / p.relative_to(release)] = p
    return files


def setup_workspace(root: str | os.PathLike | None = None, dest: str | os.PathLike | None = None) -> list[Path]:
    """Copy into ``dest`` every walk-through and released file it does not hold yet.

    A file already in the workspace is never touched (it may hold a student's work). Returns
    the files copied."""
    root = Path(root) if root else ROOT
    dest = Path(dest) if dest else root / WORKSPACE
    copied = []
    for rel, original in workspace_files(root).items():
        target = dest / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, target)  # a copy, never a link to the instructor's tree
        copied.append(rel)
    (dest / "runs").mkdir(parents=True, exist_ok=True)
    return copied


def fresh_copy(name: str, root: str | os.PathLike | None = None, dest: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """Replace the workspace's copy of ``name`` by the original; the student's version is kept
    beside it as ``<name>-mine-<time>.ipynb``. Returns (the fresh copy, the kept version)."""
    root = Path(root) if root else ROOT
    dest = Path(dest) if dest else root / WORKSPACE
    files = workspace_files(root)
    matches = [rel for rel in files if rel.name == Path(name).name or rel.as_posix() == name]
    if not matches:
        names = ", ".join(sorted(rel.name for rel in files if rel.suffix == ".ipynb"))
        raise CourseError(f"no notebook named {name!r} in the course; one of: {names}")
    if len(matches) > 1:
        raise CourseError(f"{name!r} is ambiguous: {', '.join(m.as_posix() for m in matches)}")
    rel = matches[0]
    target, kept = dest / rel, None
    if target.exists():
        kept = target.with_name(f"{target.stem}-mine-{time.strftime('%Y%m%d-%H%M%S')}{target.suffix}")
        target.rename(kept)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files[rel], target)
    return target, kept


# --- the instructor's release --------------------------------------------------------------------
def assignments(root: Path) -> list[str]:
    source = root / "assignments" / "source"
    return sorted(p.name for p in source.glob("*") if p.is_dir() and any(p.glob("*.ipynb")))


def release(names: list[str] | None = None, root: str | os.PathLike | None = None,
            only_stale: bool = False) -> list[str]:
    """``nbgrader generate_assignment NAME --force`` in assignments/, for each assignment.

    nbgrader creates the gradebook with the ``alembic`` command of its own environment, so the
    folder of this interpreter goes first on PATH: the release works without an activated
    environment. With ``only_stale``, an assignment whose release is newer than its source is
    skipped. Returns the assignments released."""
    root = Path(root) if root else ROOT
    course = root / "assignments"
    known = assignments(root)
    names = names or known
    for name in names:
        if name not in known:
            raise CourseError(f"no assignment {name!r} in assignments/source/; one of: {', '.join(known)}")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    done = []
    for name in names:
        if only_stale and _release_is_current(course, name):
            continue
        result = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", name, "--force"],
                                cwd=course, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CourseError(f"nbgrader generate_assignment {name} failed: {last}")
        done.append(name)
    return done


def _release_is_current(course: Path, name: str) -> bool:
    released_files = [p for p in (course / "release" / name).rglob("*") if p.is_file()]
    source_files = [p for p in (course / "source" / name).rglob("*") if p.is_file()]
    if not released_files:
        return False
    return min(p.stat().st_mtime for p in released_files) >= max(p.stat().st_mtime for p in source_files)


# --- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.course", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="render the topic table into notebooks/README.md")
    parser.add_argument("--root", default=str(ROOT), help="the course tree (default: this repository)")
    sub = parser.add_subparsers(dest="command")
    ws = sub.add_parser("workspace", help="make the student's workspace, or add what is new to it")
    ws.add_argument("--dest", help="the workspace folder (default: workspace/ in the course tree)")
    ws.add_argument("--fresh", metavar="NOTEBOOK", help="replace the workspace's copy of NOTEBOOK by the original "
                    "(the student's version is kept beside it)")
    ws.add_argument("--no-release", action="store_true", help="do not release assignments whose release is missing or old")
    rel = sub.add_parser("release", help="nbgrader generate_assignment for every assignment (or those named)")
    rel.add_argument("names", nargs="*", help="assignments (default: all of assignments/source/)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        if args.command == "workspace":
            dest = Path(args.dest) if args.dest else root / WORKSPACE
            if args.fresh:
                target, kept = fresh_copy(args.fresh, root, dest)
                print(f"fresh copy: {target}" + (f" (yours is kept as {kept.name})" if kept else ""))
                return 0
            if not args.no_release:
                for name in release(root=root, only_stale=True):
                    print(f"released {name}")
            copied = setup_workspace(root, dest)
            print(f"workspace {dest}: {len(copied)} new file(s)" + (": " + ", ".join(p.as_posix() for p in copied) if copied else ""))
            return 0
        if args.command == "release":
            for name in release(args.names or None, root=root):
                print(f"released {name}: assignments/release/{name}/")
            return 0
        topics = load_map(root / MAP_FILE)
        rows = check(topics, root)
        if args.write:
            readme = root / README_FILE
            readme.write_text(readme_with_table(readme.read_text(), render_table(rows, load_documents(root / MAP_FILE))))
            print(f"wrote the topic table of {readme}")
        print(report(rows))
        return 0
    except CourseError as e:
        print(f"labkit.course: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The topic map (notebooks/topics.toml): complete, true to the files, and shown in the README.

The coverage test names, in its output, how many topics are covered, still to come (in which
open issue) and missing, and fails while anything is missing that no open issue is said to bring.
"""

import json
import subprocess
import sys

import pytest

from labkit import course

from .conftest import ROOT

TOPICS_MD = ROOT.parent / "shared" / "seeds" / "TOPICS.md"


def test_map_has_every_topic_of_the_list_with_its_kind():
    topics = course.load_map()
    assert len(topics) == 99
    assert len({t.id for t in topics}) == 99
    if not TOPICS_MD.exists():
        pytest.skip(f"{TOPICS_MD} is not beside this checkout")
    listed = course.read_topic_list(TOPICS_MD)
    assert len(listed) == 99
    assert [t.id for t in topics] == list(listed), "the map's ids (in order) differ from TOPICS.md"
    wrong_kind = [t.id for t in topics if t.kind != listed[t.id][1]]
    assert not wrong_kind, f"kind differs from TOPICS.md: {wrong_kind}"
    wrong_title = [t.id for t in topics if t.title != listed[t.id][0]]
    assert not wrong_title, f"title differs from TOPICS.md: {wrong_title}"


def test_every_lab_topic_has_a_question_and_every_topic_a_notebook():
    for t in course.load_map():
        assert t.notebooks, t.id
        if t.kind == "lab":
            assert t.questions, t.id


def test_readme_table_is_in_sync():
    readme = (ROOT / course.README_FILE).read_text()
    expected = course.readme_with_table(readme, course.current_table())
    assert readme == expected, "notebooks/README.md is out of date: run `python -m labkit.course --write`"


def test_every_topic_is_covered_or_to_come(capsys):
    rows = course.check()
    text = course.report(rows)
    with capsys.disabled():
        print("\n" + text)
    missing = [f"{r.topic.id}: {'; '.join(r.missing)}" for r in rows if r.missing]
    assert not missing, f"{len(missing)} topic(s) missing:\n" + "\n".join(missing)


def test_command_prints_the_counts():
    out = subprocess.run([sys.executable, "-m", "labkit.course"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("99 topics: ") and " covered, " in first and " missing" in first


# --- the checker itself, on a small made-up course tree ------------------------------------------
def notebook(*cells):
    return {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def cell(tags=(), nbgrader=None):
    metadata = {"tags": list(tags)}
    if nbgrader:
        metadata["nbgrader"] = nbgrader
    return {"cell_type": "code", "source": "", "metadata": metadata, "outputs": [], "execution_count": None}


def graded(grade_id, tags=()):
    return cell(tags, {"grade": True, "grade_id": grade_id, "points": 1, "solution": False, "locked": True})


MAP = '''
[[topic]]
id = "900.01"
title = "covered"
kind = "lab"
notebooks = ["a.ipynb"]
questions = ["psx"]

[[topic]]
id = "900.02"
title = "tag missing in the notebook"
kind = "context"
notebooks = ["a.ipynb"]
questions = []

[[topic]]
id = "900.03"
title = "notebook missing"
kind = "context"
notebooks = ["nowhere.ipynb"]
questions = []

[[topic]]
id = "900.04"
title = "lab row whose assignment has no graded cell with the tag"
kind = "lab"
notebooks = ["a.ipynb"]
questions = ["psx"]

[[topic]]
id = "900.05"
title = "named question that is not graded"
kind = "lab"
notebooks = ["a.ipynb"]
questions = ["psx:answer"]

[[topic]]
id = "900.06"
title = "to come"
kind = "lab"
notebooks = ["later.ipynb"]
questions = ["psy"]
todo = "issue 42"

[[topic]]
id = "900.07"
title = "partly to come: the present part must be there"
kind = "lab"
notebooks = ["nowhere.ipynb"]
questions = ["psy"]
todo = "issue 42"
todo_items = ["psy"]
'''


@pytest.fixture
def fake_course(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "topics.toml").write_text(MAP)
    tags = ["topic-900.01", "topic-900.04", "topic-900.05"]
    (tmp_path / "notebooks" / "a.ipynb").write_text(json.dumps(notebook(cell(tags))))
    psx = tmp_path / "assignments" / "source" / "psx"
    psx.mkdir(parents=True)
    answer = cell(["topic-900.05"], {"grade": False, "grade_id": "answer", "solution": True})
    (psx / "psx.ipynb").write_text(json.dumps(notebook(graded("test_one", ["topic-900.01"]), graded("test_two"), answer)))
    return tmp_path


def test_checker_finds_what_is_missing(fake_course):
    rows = {r.topic.id: r for r in course.check(course.load_map(fake_course / "notebooks" / "topics.toml"), fake_course)}
    assert rows["900.01"].status == "covered" and rows["900.01"].questions_found == ["psx:test_one"]
    assert rows["900.02"].missing == ["a.ipynb has no cell tagged topic-900.02"]
    assert rows["900.03"].missing == ["notebook nowhere.ipynb does not exist"]
    assert rows["900.04"].missing == ["psx has no graded cell tagged topic-900.04"]
    assert rows["900.05"].missing == ["psx has no graded cell answer"]
    assert rows["900.06"].status == "to come (issue 42)" and not rows["900.06"].missing
    assert rows["900.07"].status == "missing"
    assert rows["900.07"].missing == ["notebook nowhere.ipynb does not exist"]
    assert rows["900.07"].to_come == ["assignment psy does not exist"]
    text = course.report(list(rows.values()))
    assert text.splitlines()[0] == "7 topics: 1 covered, 1 to come (1 issue 42), 5 missing"


def test_tagging_a_cell_covers_the_row(fake_course):
    nb_path = fake_course / "notebooks" / "a.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"][0]["metadata"]["tags"].append("topic-900.02")
    nb_path.write_text(json.dumps(nb))
    rows = {r.topic.id: r for r in course.check(course.load_map(fake_course / "notebooks" / "topics.toml"), fake_course)}
    assert rows["900.02"].status == "covered"


@pytest.mark.parametrize("change, message", [
    ('kind = "lab"\nnotebooks = ["a.ipynb"]\nquestions = []', "a lab topic needs a graded question"),
    ('kind = "exam"\nnotebooks = ["a.ipynb"]\nquestions = []', "kind must be lab or context"),
    ('kind = "context"\nnotebooks = []\nquestions = []', "no notebook"),
    ('kind = "context"\nnotebooks = ["../x.ipynb"]\nquestions = []', "must be a file name in notebooks/"),
    ('kind = "context"\nnotebooks = ["a.ipynb"]\nquestions = []\ntodo = "soon"', "todo must read 'issue N'"),
    ('kind = "context"\nnotebooks = ["a.ipynb"]\nquestions = []\ntodo = "issue 1"\ntodo_items = ["b.ipynb"]',
     "are not among its notebooks or questions"),
    ('kind = "context"\nnotebooks = ["a.ipynb"]\nquestions = []\nnotes = "x"', "unknown key(s) notes"),
])
def test_bad_map_rows_give_one_clear_line(tmp_path, change, message):
    path = tmp_path / "topics.toml"
    path.write_text(f'[[topic]]\nid = "900.01"\ntitle = "t"\n{change}\n')
    with pytest.raises(course.CourseError) as error:
        course.load_map(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_duplicate_id_and_unreadable_notebook(tmp_path):
    path = tmp_path / "topics.toml"
    row = '[[topic]]\nid = "900.01"\ntitle = "t"\nkind = "context"\nnotebooks = ["a.ipynb"]\n'
    path.write_text(row + "\n" + row)
    with pytest.raises(course.CourseError, match="id appears twice"):
        course.load_map(path)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "a.ipynb").write_text("{not json")
    with pytest.raises(course.CourseError, match="not a readable notebook"):
        course.Files.scan(tmp_path)

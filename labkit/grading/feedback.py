"""Feedback pages that need no network and show nothing of the grading machine.

nbgrader's feedback page loads MathJax from a CDN, so offline (a laptop on a train, a cluster
without outbound access) its formulas stay raw LaTeX; and the tracebacks in it name files of
the machine that graded it (``/home/instructor/course/.venv/.../hidden.py``). Two pieces fix both,
set in ``assignments/nbgrader_config.py``:

- :class:`OfflineFeedback`, a preprocessor of ``nbgrader generate_feedback``: the math of every
  markdown cell (``$...$``, ``$$...$$``) becomes MathML, which browsers draw themselves, and every
  absolute path in an output becomes its last part (``hidden.py``);
- the ``labkit_feedback`` template (``templates/``): nbgrader's feedback page without its MathJax
  script.
"""

import re
from pathlib import Path

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

TEMPLATES = Path(__file__).parent / "templates"

# code spans and fenced blocks are left alone; math is $$...$$ (display) or $...$ (inline)
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$(?!\s)([^$\n]+?)(?<![\s\\])\$", re.S)
_ANSI = re.compile(r"(\x1b\[[0-9;]*[A-Za-z])")
# an absolute path: two or more /parts, not part of a URL, a word or a relative path
_PATH = re.compile(r"(?<![\w.:/~\\-])(?:/[\w.@+~%=-]+)+/([\w.@+~%=-]*)")


def latex_to_mathml(latex, display=False):
    """MathML for one formula; the LaTeX itself (escaped) if it cannot be converted."""
    from latex2mathml.converter import convert

    try:
        mathml = convert(latex.strip(), display="block" if display else "inline")
    except Exception:
        return _escape(latex)
    return mathml.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', "")


def markdown_math_to_mathml(text):
    """The markdown ``text`` with every formula outside code replaced by MathML."""
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code
        parts[i] = _MATH.sub(lambda m: latex_to_mathml(m.group(1), display=True) if m.group(1) is not None
                             else latex_to_mathml(m.group(2)), parts[i])
    return "".join(parts)


def strip_paths(text):
    """``text`` with every absolute path replaced by its last part (ANSI colour codes kept)."""
    parts = _ANSI.split(text)
    return "".join(part if i % 2 else _PATH.sub(lambda m: m.group(1) or "/", part)
                   for i, part in enumerate(parts))


def _escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clean(value):
    if isinstance(value, str):
        return strip_paths(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class OfflineFeedback(Preprocessor):
    """Math as MathML in markdown cells; no absolute path in any output."""

    # nbgrader registers its converters' preprocessors without enabling them
    enabled = Bool(True).tag(config=True)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            cell.source = markdown_math_to_mathml(cell.source)
        for output in cell.get("outputs", []):
            for key in ("text", "evalue", "traceback"):
                if key in output:
                    output[key] = _clean(output[key])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") or mime == "application/json":
                    output["data"][mime] = _clean(value)
        return cell, resources

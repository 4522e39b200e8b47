"""``python -m labkit.search nas|es|search ...``: the same as ``labkit nas|es|search ...``."""

import sys

from .cli import run_command

sys.exit(run_command(sys.argv[1:]))

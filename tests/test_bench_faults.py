"""labkit bench faults: faults injected into real runs, one row each, checked not assumed."""

import json
import re

import pytest

from .conftest import run_cli


@pytest.mark.timeout(200)
def test_bench_faults_tabulates_what_was_kept_and_lost(tmp_path, no_leftovers):
    keep = tmp_path / "runs"
    out = run_cli("bench", "faults", "--only", "ctrl-c-twice,run-dir-under-file", "--json", "--keep", keep,
                  timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert len(report["loadavg"].split()) == 3
    twice, under_file = report["rows"]
    assert twice["fault"] == "ctrl-c-twice" and twice["exit"] == 130 and twice["nothing_lost"], twice
    assert twice["outcome"] == (f"labkit: stopped; resume with: labkit train --run-dir {keep / 'ctrl-c-twice'} "
                                "--resume")
    assert 0 < twice["detected_s"] < 60
    # the run goes on for the moment the stop takes (older checkpoints rotate out meanwhile):
    # what must be kept is a checkpoint from the first one on, and a summary at or after it
    kept = re.fullmatch(r"checkpoints ([\d, ]+); summary \(steps (\d+)\); \d+ metric lines", twice["kept"])
    assert kept, twice["kept"]
    steps = [int(step) for step in kept[1].split(", ")]
    assert steps == sorted(steps) and steps[0] >= 10 and int(kept[2]) >= steps[-1], twice["kept"]
    summary = json.loads((keep / "ctrl-c-twice" / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("stopped", "stopped by request (Ctrl-C)")
    assert not list(keep.rglob("*.tmp"))
    assert under_file["exit"] == 2 and under_file["nothing_lost"] and under_file["lost"] == []
    assert under_file["outcome"] == (f"labkit: error: --run-dir: cannot lock {keep / 'a-file' / 'run'}: "
                                     "Not a directory")


def test_bench_faults_refuses_an_unknown_fault_in_one_line(capsys):
    from labkit.bench import faults

    with pytest.raises(SystemExit) as exit_:
        faults.main(["--only", "kill-worker,meteor"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("labkit: error: --only: unknown fault meteor; choose from kill-worker, kill-master, ")

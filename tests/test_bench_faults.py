"""labkit bench faults: faults injected into real runs, one row each, checked not assumed."""

import json

import pytest

from .conftest import run_cli


@pytest.mark.timeout(200)
def test_bench_faults_tabulates_what_was_kept_and_lost(tmp_path, no_leftovers):
    keep = tmp_path / "runs"
    out = run_cli("bench", "faults", "--only", "kill-worker,run-dir-under-file", "--json", "--keep", keep,
                  timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert len(report["loadavg"].split()) == 3
    worker, under_file = report["rows"]
    assert worker["fault"] == "kill-worker" and worker["exit"] == 1 and worker["nothing_lost"], worker
    assert worker["outcome"] == (f"labkit: run failed: rank 1 died (killed by SIGKILL); "
                                 f"see {keep / 'kill-worker' / 'logs' / 'rank-1.log'}")
    assert 0 < worker["detected_s"] < 60 and worker["kept"].startswith("checkpoints 10")
    summary = json.loads((keep / "kill-worker" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resume_with"]
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

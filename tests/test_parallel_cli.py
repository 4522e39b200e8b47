"""``labkit train --parallelism ...``: a split model trained by the real stack ends with the
single-process run's test loss, writes its grid, bubble and timeline; a grid that cannot work
ends with exit 2 and one line naming the option."""

import json

import pytest

from .conftest import run_cli

COMMON = ["--steps", "30", "--eval-every", "100", "--log-every", "10", "--seed", "0"]


def train(tmp_path, name, *options):
    run_dir = tmp_path / name
    result = run_cli("train", *COMMON, "--run-dir", run_dir, *options, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    return run_dir, summary


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), "one", "--workers", "1")[1]


@pytest.mark.timeout(400)
def test_pipeline_run_equals_one_process_and_writes_its_timeline(tmp_path, single, no_leftovers):
    from labkit.parallel.gantt import timeline_from_run

    run_dir, summary = train(tmp_path, "pipe", "--workers", "2", "--parallelism", "pipeline",
                             "--microbatches", "4", "--schedule", "gpipe")
    assert summary["grid"] == {"data": 1, "pipeline": 2, "tensor": 1}
    assert summary["test_loss"] == pytest.approx(single["test_loss"], abs=1e-4)
    assert summary["bubble_fraction_model"] == pytest.approx(1 / 5)
    assert 0 < summary["bubble_fraction"] < 1 and summary["stashed_peak"] == 4
    timeline = timeline_from_run(run_dir)
    assert timeline["step"] == 30 and len(timeline["ranks"]) == 2
    for events in timeline["ranks"]:
        kinds = [e["kind"] for e in events]
        assert kinds.count("forward") == 4 and kinds.count("backward") == 4


@pytest.mark.timeout(400)
def test_tensor_run_equals_one_process(tmp_path, single, no_leftovers):
    _, summary = train(tmp_path, "tensor", "--workers", "2", "--parallelism", "tensor")
    assert summary["grid"] == {"data": 1, "pipeline": 1, "tensor": 2}
    assert summary["test_loss"] == pytest.approx(single["test_loss"], abs=1e-4)


@pytest.mark.parametrize("options,line", [
    (["--workers", "4", "--parallelism", "pipeline"],
     "labkit: error: --pipeline-stages: 4 stages but the model has only 3 layers"),
    (["--workers", "6", "--parallelism", "hybrid", "--pipeline-stages", "4"],
     "labkit: error: --pipeline-stages: 6 workers do not divide into 4 stages x 1 tensor ranks"),
    (["--workers", "3", "--parallelism", "pipeline", "--sync", "easgd-sync"],
     "labkit: error: --sync: easgd-sync cannot combine with --parallelism pipeline"),
    (["--workers", "2", "--parallelism", "pipeline", "--microbatches", "5"],
     "labkit: error: --microbatches: 5 does not divide --batch-size 32"),
])
def test_a_bad_grid_is_one_line_and_exit_2(tmp_path, options, line):
    result = run_cli("train", "--steps", "5", "--run-dir", tmp_path / "bad", *options, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert not (tmp_path / "bad").exists()


def test_the_panel_shows_only_the_chosen_parallelisms_settings():
    from labkit import RunConfig
    from labkit.widgets.form import ConfigForm

    form = ConfigForm(RunConfig(workers=2))
    shown = {"data": ["data parallel", "bucket mb"], "model": ["pipeline stages"],
             "pipeline": ["pipeline stages", "microbatches", "schedule"], "tensor": ["tensor parallel"],
             "hybrid": ["pipeline stages", "microbatches", "schedule", "tensor parallel"]}
    for parallelism, labels in shown.items():
        form.widgets["parallelism"].value = parallelism
        assert [c.description for c in form.parallel_box.children] == labels, parallelism
    form.widgets["parallelism"].value = "pipeline"
    form.parallel_settings["schedule"].value = "gpipe"
    form.parallel_settings["microbatches"].value = "8"
    config = form.config()
    assert (config.parallelism, config.schedule, config.microbatches) == ("pipeline", "gpipe", 8)
    form.widgets["workers"].value = 4  # 4 stages, 3 layers
    assert str(form.problem()) == "--pipeline-stages: 4 stages but the model has only 3 layers"

"""RunConfig: JSON round trip, choices from the registries, and every bad input rejected cleanly."""

import json
import subprocess

import pytest

import labkit
from labkit.config import ConfigError, RunConfig, fields_info
from labkit.registry import COMPRESSORS, SYNC_MODES

from .conftest import run_cli


def test_json_round_trip():
    cfg = RunConfig(model="lenet", workers=3, lr=0.1, steps=7, compression="none", run_dir="x", resume=False)
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["lr"] == 0.1


def test_defaults_validate():
    assert RunConfig().validate() == RunConfig()


def test_choices_come_from_registries():
    info = {f["name"]: f for f in fields_info()}
    assert info["sync"]["choices"] == SYNC_MODES.names()
    assert info["compression"]["choices"] == COMPRESSORS.names()
    assert set(info["model"]["choices"]) >= {"mlp", "lenet", "resnet"}


def test_new_registration_is_selectable():
    SYNC_MODES.register("test-only-mode", object, help="registered by a test")
    try:
        RunConfig(sync="test-only-mode").validate()
        out = run_cli("train", "--help")
        assert "allreduce" in out.stdout
    finally:
        SYNC_MODES._entries.pop("test-only-mode")
    with pytest.raises(ConfigError, match="--sync"):
        RunConfig(sync="test-only-mode").validate()


@pytest.mark.parametrize("name,text,expected", [
    ("lr", "0.5", 0.5), ("workers", "4", 4), ("workers", "4.0", 4), ("steps", "none", None),
    ("error_feedback", "no", False), ("compression_params", ["ratio=0.01", "warm=true"], {"ratio": 0.01, "warm": True}),
])
def test_parse_value(name, text, expected):
    assert RunConfig.parse_value(name, text) == expected


def _bad_inputs(tmp):
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    empty = tmp / "empty"
    empty.mkdir()
    used = tmp / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    return [
        (["--model", "resnet50"], "--model"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--workers", "0"], "--workers"),
        (["--workers", "2.5"], "--workers"),
        (["--workers", "-3"], "--workers"),
        (["--batch-size", "100000"], "--batch-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--workers", "8", "--batch-size", "200"], "--batch-size"),
        (["--dataset", "mnist", "--data-dir", str(tmp / "missing")], "--data-dir"),
        (["--dataset", "mnist"], "--data-dir"),
        (["--dataset", "cifar10", "--data-dir", str(empty)], "--data-dir"),
        (["--run-dir", str(a_file)], "--run-dir"),
        (["--run-dir", str(used)], "--run-dir"),
        (["--resume", "--run-dir", str(empty)], "--resume"),
        (["--resume"], "--resume"),
        (["--sync", "telepathy"], "--sync"),
        (["--compression", "zip"], "--compression"),
        (["--compression-param", "ratio=0.1"], "--compression-param"),
        (["--compression-param", "ratio"], "--compression-param"),
        (["--momentum", "1.5"], "--momentum"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--steps", "10", "--epochs", "2"], "--steps"),
        (["--steps", "1.5"], "--steps"),
        (["--epochs", "0"], "--epochs"),
        (["--eval-every", "0"], "--eval-every"),
        (["--timeout", "-1"], "--timeout"),
        (["--seed", "-1"], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--backend", "nccl"], "--backend"),
        (["--launcher", "carrier-pigeon"], "--launcher"),
        (["--no-such-option", "1"], "--no-such-option"),
    ]


def test_bad_inputs_table(tmp_path, capsys, monkeypatch):
    """Each bad input: exit 2, one line `labkit: error:` naming the option, nothing started or written."""
    from labkit import cli

    def no_process(*a, **k):
        raise AssertionError("a process was started for an invalid configuration")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.chdir(tmp_path)
    cases = _bad_inputs(tmp_path)
    assert len(cases) >= 20
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, option in cases:
        with pytest.raises(SystemExit) as exit_info:
            code = cli.main(["train", *argv])
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (argv, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("labkit: error: "), (argv, err)
        assert option in lines[0], (argv, lines[0])
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "an invalid configuration wrote files"


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    for argv, option in [(["--lr", "abc"], "--lr"), (["--workers", "2.5"], "--workers"),
                         (["--model", "nope"], "--model")]:
        out = run_cli("train", *argv, cwd=tmp_path, timeout=120)
        assert out.returncode == 2
        assert out.stderr.strip().startswith("labkit: error: ") and option in out.stderr
        assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_api_raises_config_error():
    with pytest.raises(ConfigError) as e:
        labkit.launch(RunConfig(lr=-1))
    assert e.value.option == "--lr"

"""Packaging: the conda environment agrees with pyproject.toml; the commands exist."""

import re

import tomllib
import yaml

from .conftest import ROOT, run_cli

CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].strip().lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r): r for r in project["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(spec): spec for spec in env["dependencies"] if isinstance(spec, str)}
    for name, requirement in runtime.items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"{name} is in pyproject.toml but not in environment.yml"
        pin = requirement[len(name):].strip()
        assert conda[conda_name].endswith(pin), f"{name}: pyproject says {pin!r}, environment.yml {conda[conda_name]!r}"
    extra = set(conda) - {CONDA_NAMES.get(n, n) for n in runtime} - {"python", "pip"}
    assert not extra, f"environment.yml has packages pyproject.toml lacks: {extra}"
    assert conda["python"] == "python" + project["requires-python"]
    pip_part = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert "-e ." in pip_part, "the conda environment installs labkit itself"


def test_console_script_and_help():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["labkit"] == "labkit.cli:main"
    out = run_cli("train", "--help", timeout=120)
    assert out.returncode == 0
    for option in ("--sync", "--compression", "--parallelism", "--workers", "--launcher", "--backend",
                   "--model", "--dataset", "--lr", "--batch-size", "--steps", "--epochs", "--seed",
                   "--run-dir", "--resume", "--checkpoint-every", "--eval-every"):
        assert option in out.stdout, option


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("lab:", "test:", "setup:", "dashboard:", "grade:"):
        assert target in makefile
    assert "torch==$TORCH_VERSION" in (ROOT / "scripts" / "setup_env.sh").read_text()

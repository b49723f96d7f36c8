"""The README's quick start is two commands that set the project up themselves, and CI runs the second one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def quick_start_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


# What make itself passes down when the suite runs under `make test VENV=.venv-ci` (as CI does): variables given on
# make's command line reach the environment, where the Makefile's `VENV ?=` would take them.
MAKE_ENVIRONMENT = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VENV", "PYTHON", "PIP_ARGS"}


def dry_run(folder, target: str) -> str:
    env = {name: value for name, value in os.environ.items() if name not in MAKE_ENVIRONMENT}
    done = subprocess.run(["make", "-n", target], cwd=folder, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_quick_start_is_make_pipeline_and_make_test_and_ci_runs_make_test():
    assert quick_start_commands() == ["make pipeline", "make test"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert any(re.fullmatch(r"make test( VENV=\S+)?", line) for line in ci), ci


def test_each_command_sets_the_project_up_when_needed_and_only_then(tmp_path):
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path)
    for target, command in (("pipeline", "dvc repro"), ("test", "-m pytest")):
        fresh = dry_run(tmp_path, target)  # no environment yet: made first, with the pins, then the command
        assert "-m venv .venv" in fresh and "pip install --quiet -c constraints.txt -e \".[test]\"" in fresh
        assert fresh.index("pip install --quiet -c") < fresh.index(command)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".medseg-installed").touch()
    ready = dry_run(tmp_path, "test")
    assert "pip install" not in ready  # set up already: straight to the tests, the environment's tools on PATH
    assert f'PATH="{tmp_path / ".venv" / "bin"}:' in ready and ".venv/bin/python -m pytest" in ready
    later = time.time() + 5
    os.utime(tmp_path / "constraints.txt", (later, later))  # the pins changed: set up again
    assert "pip install --quiet -c constraints.txt" in dry_run(tmp_path, "test")

"""Every dvc.yaml stage maps to a stage module and a flow task; its params and deps are real."""

import importlib
import re

import pytest
import yaml

from medseg.params import load_params
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def resolve(text: str) -> str:
    """DVC's ${a.b} interpolation from params.yaml."""
    def lookup(match):
        value = PARAMS
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_has_module_and_flow_task(stage):
    from pipelines.medseg_flow import STAGE_TASKS

    module = importlib.import_module(f"medseg.{stage}")
    assert callable(module.run)
    assert stage in STAGE_TASKS, f"dvc stage {stage} has no Prefect task"
    source = STAGE_TASKS[stage].fn.__code__.co_names
    assert "run" in source, f"task for {stage} does not call a stage run()"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_include_its_code_and_exist(stage):
    deps = [resolve(d) for d in STAGES[stage]["deps"]]
    module_path = f"src/medseg/{stage}"
    assert any(d == module_path + ".py" or d == module_path for d in deps), f"{stage} deps miss its module"
    for dep in deps:
        if dep.startswith("src/"):
            assert (REPO / dep).exists(), f"{stage} dep {dep} does not exist"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_exist(stage):
    for key in STAGES[stage].get("params", []):
        value = PARAMS
        for part in key.split("."):
            assert part in value, f"{stage} lists params key {key} missing from params.yaml"
            value = value[part]


def test_stage_cli_commands_exist():
    from medseg.cli import build_parser

    parser = build_parser()
    for name, stage in STAGES.items():
        argv = resolve(stage["cmd"]).split()
        assert argv[0] == "medseg"
        parser.parse_args(argv[1:])  # raises SystemExit on an unknown command or option


def test_every_path_in_dvc_comes_from_params():
    text = (REPO / "dvc.yaml").read_text()
    assert "data/" not in text, "paths belong in params.yaml, interpolated into dvc.yaml"
    load_params(REPO / "params.yaml")

"""Every dvc.yaml stage maps to a stage module and a flow task; its params and deps are real."""

import importlib
import inspect
import re
import shlex

import pytest
import yaml

from medseg.cli import STAGE_MODULES
from medseg.common.params import load_params
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


def _normalise(value):
    """Paths and strings naming the same place compare equal; params compare by value."""
    from pathlib import Path

    if isinstance(value, Path) or (isinstance(value, str) and "/" in value):
        return str(Path(value).resolve())
    return value


def _stage_calls(stage: str, signature, monkeypatch, call) -> list:
    """The ``medseg.<stage>.run`` calls ``call()`` makes, with the stage function replaced by a recorder."""
    module = importlib.import_module(STAGE_MODULES[stage])
    calls = []

    def recorder(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # a default passed or left out is the same call
        arguments = dict(bound.arguments)
        arguments.pop("case_map", None)  # how per-case work runs (threads, or the flow's task runner)
        arguments.pop("recorded", None)  # DVC's record of the stage's inputs, which only a dvc run has
        calls.append({name: _normalise(value) for name, value in arguments.items()})
        return {}

    monkeypatch.setattr(module, "run", recorder)
    call()
    return calls


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_and_the_flow_call_the_same_stage_function_with_the_same_arguments(stage, monkeypatch):
    """``dvc repro`` runs the stage's command (the CLI); the Prefect flow runs its task. Both must reach
    ``medseg.<stage>.run`` once, with equal arguments, from the same params.yaml."""
    from medseg.cli import main
    from medseg_pipelines.medseg_flow import STAGE_TASKS

    monkeypatch.chdir(REPO)  # the commands read params.yaml from the project folder, as under dvc
    assert stage in STAGE_TASKS, f"dvc stage {stage} has no Prefect task"
    runner = STAGE_TASKS[stage]  # a task, or a function that submits a task per case
    params = load_params(REPO / "params.yaml")
    signature = inspect.signature(importlib.import_module(STAGE_MODULES[stage]).run)
    argv = shlex.split(resolve(STAGES[stage]["cmd"]))  # as DVC's shell splits it
    by_cli = _stage_calls(stage, signature, monkeypatch, lambda: main(argv[1:]))
    by_flow = _stage_calls(stage, signature, monkeypatch, lambda: getattr(runner, "fn", runner)(params))
    assert len(by_cli) == 1, f"medseg {stage} did not call medseg.{stage}.run once"
    assert by_flow == by_cli, f"the flow calls medseg.{stage}.run differently from dvc.yaml's command"


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


@pytest.mark.parametrize("preset", sorted((REPO / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate_and_share_the_project_paths(preset):
    params = load_params(preset)
    project = load_params(REPO / "params.yaml")
    assert params.paths == project.paths and params.mlflow == project.mlflow  # each path written once, in step
    assert params.model.name == "dynunet" and params.model.deep_supervision and params.train.fold == "all"


@pytest.mark.parametrize(("preset", "spacing", "shape", "dims"), [
    ("acdc-gpu.yaml", (1.5, 1.5, 10.0), (220, 240, 10), 2),
    ("pancreas-gpu.yaml", (0.8, 0.8, 2.5), (512, 512, 90), 3),
])
def test_gpu_presets_plan_a_network_that_runs(preset, spacing, shape, dims):
    import torch

    from medseg.networks.architectures import build_network
    from medseg.planning.plan import make_plan

    params = load_params(REPO / "presets" / preset)
    cases = [{"case_id": f"c{i}", "modality": "MR", "spacing": list(spacing), "shape": list(shape),
              "foreground_fraction": 0.05} for i in range(20)]
    plan = make_plan({"cases": cases, "modalities": {"MR": {"cases": 20, "foreground_intensity": {}}}}, params)
    assert plan.spatial_dims == dims and plan.batch_size >= 2
    assert plan.estimated_step_mb <= params.plan.memory_budget_mb
    with torch.device("meta"):  # shapes only: a full-size GPU network on the planned patch, without the compute
        net = build_network(plan.network, 1, 3).eval()
        out = net(torch.zeros(1, 1, *plan.patch_size[:dims]))
    assert out.shape == (1, 3, *plan.patch_size[:dims])

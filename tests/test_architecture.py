"""The package's layers (``[tool.importlinter]`` in pyproject.toml), checked by the real import-linter: they hold, and
adding an import that runs the wrong way breaks them. The old top-level module names still import."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO

CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
LINT = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")


def lint(root, *extra: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on the project copy at ``root`` (its pyproject.toml, its src/ and pipelines/)."""
    assert LINT is not None, "import-linter is a test dependency: pip install -c constraints.txt -e '.[test]'"
    pipelines = root / "tmp_pipelines"
    if not pipelines.exists():  # medseg_pipelines is the installed name of pipelines/
        (pipelines / "medseg_pipelines").parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root / "pipelines", pipelines / "medseg_pipelines")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(pipelines)])}
    return subprocess.run([LINT, "--no-cache", *extra], cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "pyproject.toml", root)
    for folder in ("src", "pipelines"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return root


def test_the_layers_hold(project):
    result = lint(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and f"{len(CONFIG['contracts'])} kept" in result.stdout


@pytest.mark.parametrize("module, forbidden, contract", [
    ("inference/predict.py", "from medseg.training import train", "trained-not-training"),
    ("evaluation/evaluate.py", "from medseg.training.loaders import make_val_loader", "trained-not-training"),
    ("ingest/nifti.py", "from medseg.planning.plan import read_plan", "lifecycle"),
    ("common/params.py", "from medseg.networks.architectures import build_network", "lifecycle"),
    ("demo/demo_data.py", "from medseg.ingest import run", "lifecycle"),  # ingest and demo are independent
])
def test_an_import_against_the_layers_fails_the_check(project, module, forbidden, contract):
    path = project / "src" / "medseg" / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n\ndef _wrong_way():\n    {forbidden}\n")  # a function-level import counts too
        result = lint(project, "--contract", contract)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert "1 broken" in result.stdout
    importer = "medseg." + module.removesuffix(".py").replace("/", ".")
    assert importer in result.stdout


def test_every_package_folder_is_in_a_layer():
    """A new folder must be placed in the layers: an unlisted one would be unchecked."""
    layered = {name.strip() for layer in CONFIG["contracts"][0]["layers"] for name in layer.split("|")}
    folders = {f"medseg.{p.name}" for p in (REPO / "src" / "medseg").iterdir() if (p / "__init__.py").is_file()}
    assert folders <= layered, f"not in any layer: {sorted(folders - layered)}"
    modules = {f"medseg.{p.stem}" for p in (REPO / "src" / "medseg").glob("*.py") if p.stem != "__init__"}
    assert modules <= layered, f"top-level modules outside the layers: {sorted(modules - layered)}"


def test_the_old_top_level_names_import_as_their_new_modules():
    import medseg

    for old, new in medseg.MOVED.items():
        assert not (REPO / "src" / "medseg" / f"{old}.py").exists(), f"medseg/{old}.py is back beside its alias"
        assert importlib.import_module(f"medseg.{old}") is importlib.import_module(f"medseg.{new}")
    from medseg import predict, train  # the form users wrote

    assert predict.__name__ == "medseg.inference.predict" and train.__name__ == "medseg.training.train"
    # models registered before the move name their loader medseg.mlflow_model
    assert hasattr(importlib.import_module("medseg.mlflow_model"), "_load_pyfunc")


def test_the_old_modules_now_folders_still_give_their_functions():
    from medseg.inference import build_inferer, sliding_window
    from medseg.networks import architectures, build_network

    assert build_network is architectures.build_network and build_inferer is sliding_window.build_inferer
    with pytest.raises(ImportError):
        from medseg.networks import no_such_name  # noqa: F401


def test_the_readme_architecture_shows_every_folder_and_only_real_modules():
    text = (REPO / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    folders = {p.name for p in (REPO / "src" / "medseg").iterdir() if (p / "__init__.py").is_file()}
    assert {f for f in folders if f"{f}/" not in section} == set()
    import re

    named = set(re.findall(r"\b([a-z_]+\.py)\b", section)) - {"test_architecture.py"}
    real = {p.name for p in (REPO / "src" / "medseg").rglob("*.py")} | {p.name for p in (REPO / "pipelines").glob("*.py")}
    assert named - real == set(), "README's architecture names modules that do not exist"
    modules = {p.name for p in (REPO / "src" / "medseg").rglob("*.py")
               if p.name != "__init__.py" and p.parent.name != "ingest"}
    assert modules - named == set(), "modules missing from README's architecture section"


def test_every_package_folder_is_installed():
    """pyproject's package list names every folder, so a wheel (not only an editable install) holds them all."""
    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src" / "medseg").rglob("__init__.py")}
    assert folders | {"medseg_pipelines"} == packages

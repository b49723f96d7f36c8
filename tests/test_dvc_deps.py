"""dvc.yaml's code deps are each stage module's real import closure within ``medseg`` (``medseg.common.code_deps``): an edit
to any module a stage runs makes ``dvc repro`` rerun that stage, and no other edit does."""

from __future__ import annotations

import pytest
import yaml

from medseg.cli import STAGE_MODULES
from medseg.common.code_deps import PACKAGE_ROOT, module_closure
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
SRC = "src/"


def code_deps(stage: str) -> set[str]:
    """The stage's ``src/`` deps as package files (``medseg/x.py``); a folder stands for every ``.py`` file in it."""
    files = set()
    for dep in STAGES[stage]["deps"]:
        if not dep.startswith(SRC):
            continue
        path = REPO / dep
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {p.relative_to(PACKAGE_ROOT).as_posix() for p in found if "__pycache__" not in p.parts}
    return files


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_are_its_modules_import_closure(stage):
    closure = set(module_closure(STAGE_MODULES[stage]))
    deps = code_deps(stage)
    missing, extra = sorted(closure - deps), sorted(deps - closure)
    assert not missing, f"dvc.yaml stage {stage} does not depend on {missing}, which its code imports"
    assert not extra, f"dvc.yaml stage {stage} depends on {extra}, which its code never imports"


def test_the_train_resume_digest_hashes_the_train_stages_code_deps_but_post_processing():
    from medseg.training import resume

    training, stage = set(resume.training_code()), code_deps("train")
    post = {f for m in resume.POSTPROCESS_MODULES for f in module_closure(m)}
    # the stage runs post-processing (on the final validation); it does not shape the weights
    assert {"medseg/inference/postprocess.py", "medseg/evaluation/postprocessing.py"} <= stage - training
    assert training <= stage and stage - training <= post
    assert "medseg/training/train.py" in training and "medseg/networks/architectures.py" in training


def test_the_closure_follows_function_level_relative_and_package_imports(tmp_path, monkeypatch):
    from medseg.common import code_deps as codedeps

    package = tmp_path / "medseg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\ndef f():\n    from medseg.sub import c\n    from medseg import b\n")
    (package / "b.py").write_text("from . import d  # relative\n")
    (package / "d.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .c import X\n")
    (package / "sub" / "c.py").write_text("X = 1\nfrom ..e import Y\n")
    (package / "e.py").write_text("Y = 2\n")
    (package / "unused.py").write_text("")
    monkeypatch.setattr(codedeps, "PACKAGE_ROOT", tmp_path)
    codedeps._imports.cache_clear()
    try:
        assert codedeps.module_closure("medseg.a") == ["medseg/a.py", "medseg/b.py", "medseg/d.py", "medseg/e.py",
                                                       "medseg/sub/__init__.py", "medseg/sub/c.py"]
        assert codedeps.module_closure("medseg.a", stop={"medseg.b"}) == [
            "medseg/a.py", "medseg/e.py", "medseg/sub/__init__.py", "medseg/sub/c.py"]
    finally:
        codedeps._imports.cache_clear()

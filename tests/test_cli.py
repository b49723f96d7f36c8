import subprocess
import sys

import pytest

from medseg.cli import build_parser, main

COMMANDS = ["demo-data", "ingest", "plan", "preprocess", "train", "evaluate", "register", "promote", "predict",
            "export-bundle", "predict-flow", "pipeline", "serve"]


def subcommands() -> dict:
    import argparse

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_lists_every_command_once_with_its_summary(capsys):
    assert list(subcommands()) == COMMANDS  # a command added or dropped is a deliberate change here too
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == COMMANDS


def test_every_dvc_stage_is_a_command_of_the_same_name():
    import yaml

    from tests.conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {name.replace("_", "-") for name in stages} <= set(subcommands())
    for name, stage in stages.items():
        assert stage["cmd"].split()[:2] == ["medseg", name.replace("_", "-")], name


@pytest.mark.parametrize("argv", [["--help"], ["ingest", "--help"]])
def test_light_commands_do_not_import_torch_or_monai(argv):
    code = (
        "import sys; from medseg.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'monai', 'mlflow', 'prefect') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_ingest_of_a_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "acdc" in err and "dicom" in err


def test_stage_with_bad_params_names_the_key(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("paths: {}\ndata: {source: x}\n")
    assert main(["preprocess", "--params", str(bad)]) == 2
    assert "missing params key 'paths.demo'" in capsys.readouterr().err


def test_train_resume_and_params_options_parse():
    args = build_parser().parse_args(["train", "--resume", "--params", "other.yaml"])
    assert args.resume is True and args.params == "other.yaml"
    assert build_parser().parse_args(["train"]).resume is False


@pytest.mark.parametrize("raised", [
    OSError(28, "No space left on device"),  # no file name: the stage's output folder is named
    OSError(28, "No space left on device", "data/plans/plans.json"),
    RuntimeError("an MLflow error"),  # raised from SQLite's, below
], ids=["enospc", "enospc_with_path", "sqlite_full"])
def test_a_full_disk_is_one_line_naming_the_stage_and_where(raised, tmp_path, capsys, monkeypatch):
    import sqlite3

    from medseg.planning import plan
    from tests.conftest import REPO

    def fails(params):
        if isinstance(raised, RuntimeError):
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as cause:
                raise raised from cause
        raise raised

    monkeypatch.setattr(plan, "run", fails)
    assert main(["plan", "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medseg plan: error: ")
    assert ("data/plans" in err[0]) != isinstance(raised, RuntimeError)
    assert ("MLflow store" in err[0]) == isinstance(raised, RuntimeError)


def test_other_errors_keep_their_traceback(monkeypatch):
    from medseg.planning import plan
    from tests.conftest import REPO

    monkeypatch.setattr(plan, "run", lambda params: (_ for _ in ()).throw(KeyError("a bug")))
    with pytest.raises(KeyError):
        main(["plan", "--params", str(REPO / "params.yaml")])

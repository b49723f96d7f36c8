import subprocess
import sys

import pytest

from medseg.cli import build_parser, main

COMMANDS = ["demo-data", "ingest", "preprocess", "train", "evaluate", "register", "predict", "pipeline", "serve"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


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


def test_parser_builds():
    assert build_parser().parse_args(["train", "--resume"]).resume is True

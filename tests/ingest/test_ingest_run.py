"""Stage-level behaviour: errors and exit codes, stale outputs, no identifiers in outputs or logs, no torch."""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys

import pytest
from conftest import axial_positions, make_acdc_patient, read_json, write_series

from medseg.cli import main
from medseg.common.errors import IngestError
from medseg.ingest import ingest_folder
from medseg.common.manifest import read_manifest


def test_missing_source(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest_folder(tmp_path / "nope", tmp_path / "out")


def test_nothing_detected_lists_layouts(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    with pytest.raises(IngestError) as err:
        ingest_folder(tmp_path / "src", tmp_path / "out")
    message = str(err.value)
    assert str(tmp_path / "src") in message and all(name in message for name in ("acdc", "msd", "dicom", "nifti"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_nothing_usable_raises_and_cli_exits_2(tmp_path, capsys):
    write_series(tmp_path / "src" / "one", axial_positions(1))  # DICOM found, but a single slice
    with pytest.raises(IngestError, match="nothing usable.*single slice"):
        ingest_folder(tmp_path / "src", tmp_path / "out")
    assert main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2


def test_cli_success(tmp_path):
    make_acdc_patient(tmp_path / "src", "patient007")
    assert main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--layout", "acdc"]) == 0
    assert len(read_manifest(tmp_path / "out").cases) == 2


def test_cli_reads_the_stage_settings_from_params_and_its_options_override_them(tmp_path, monkeypatch):
    """``medseg ingest`` (as dvc.yaml runs it) takes data.* and paths.ingested from params; SOURCE, --out and
    --layout given on the command line win; outside a project (no params file) SOURCE and --out are enough."""
    import yaml

    from tests.conftest import REPO

    make_acdc_patient(tmp_path / "src", "patient007")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source=str(tmp_path / "src"), layout="nifti")  # nifti: would read no ACDC patient folder
    raw["paths"]["ingested"] = str(tmp_path / "from_params")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(["ingest", "--params", str(params)]) == 2  # data.layout from params is used, and is wrong here
    assert main(["ingest", "--params", str(params), "--layout", "acdc"]) == 0
    assert len(read_manifest(tmp_path / "from_params").cases) == 2
    assert main(["ingest", "--params", str(params), "--layout", "acdc", "--out", str(tmp_path / "given")]) == 0
    assert len(read_manifest(tmp_path / "given").cases) == 2
    monkeypatch.chdir(tmp_path / "src")  # no params.yaml here
    assert main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "adhoc")]) == 0
    assert len(read_manifest(tmp_path / "adhoc").cases) == 2
    assert main(["ingest"]) == 2  # neither a project nor a source: one line, exit 2


def test_stale_outputs_removed(tmp_path):
    src = tmp_path / "src"
    write_series(src / "a", axial_positions(3), series_uid="1.5.1", patient_id="A")
    write_series(src / "b", axial_positions(3), series_uid="1.5.2", patient_id="B")
    ingest_folder(src, tmp_path / "out")
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2
    for f in (src / "b").iterdir():
        f.unlink()
    summary = ingest_folder(src, tmp_path / "out")
    assert summary["accepted"] == 1
    (case,) = read_manifest(tmp_path / "out").cases
    assert [p.name for p in (tmp_path / "out" / "images").iterdir()] == [f"{case.case_id}.nii.gz"]
    assert read_json(tmp_path / "out" / "ingest_report.json")["accepted"][0]["case_id"] == case.case_id


def test_case_ids_stable_across_runs(tmp_path):
    write_series(tmp_path / "src" / "a", axial_positions(3))
    ingest_folder(tmp_path / "src", tmp_path / "o1")
    ingest_folder(tmp_path / "src", tmp_path / "o2")
    assert read_manifest(tmp_path / "o1").cases == read_manifest(tmp_path / "o2").cases


PHI = {"PatientName": "Quorrafield^Zebulon", "PatientID": "MRN-8675309-QZ", "PatientBirthDate": "19410523",
       "AccessionNumber": "ACC-55501234", "InstitutionName": "Saint Wobblesworth Infirmary",
       "ReferringPhysicianName": "Drhollow^Ignatz"}


def test_no_identifiers_in_outputs_or_logs(tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a key file, if one were made, would land here
    src = tmp_path / "src"
    extra = {k: v for k, v in PHI.items() if k != "PatientID"}
    write_series(src / "series1", axial_positions(4), patient_id=PHI["PatientID"], extra=extra)
    write_series(src / "series2", axial_positions(1), patient_id=PHI["PatientID"], extra=extra, series_uid="1.7.7")
    with caplog.at_level(logging.DEBUG):
        assert main(["-v", "ingest", str(src), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    blobs = [caplog.text.encode(), captured.out.encode(), captured.err.encode()]
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        data = path.read_bytes()
        blobs.append(gzip.decompress(data) if path.name.endswith(".gz") else data)
    needles = [v.encode() for v in PHI.values()] + [part.encode() for v in PHI.values() for part in v.split("^")]
    for blob in blobs:
        for needle in needles:
            assert needle not in blob
    assert not (tmp_path / ".medseg").exists()


def test_import_does_not_pull_torch():
    code = "import medseg.ingest, sys; assert 'torch' not in sys.modules and 'monai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_series_split_over_folders_reported(tmp_path):
    src = tmp_path / "src"
    pos = axial_positions(3)
    write_series(src / "copy1", pos, series_uid="1.4.4", prefix="a")
    write_series(src / "copy2", [(x, y, z + 100) for x, y, z in pos], series_uid="1.4.4", prefix="b")
    with pytest.raises(IngestError, match=r"non-uniform slice spacing.*6 files in 2 folders: <input>, <input>"):
        ingest_folder(src, tmp_path / "out")

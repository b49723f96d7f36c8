"""No name taken from the source (folder or file names, paths in library messages) reaches ingest's outputs or log;
the ``input-...`` keys resolve through the private id map only; the pseudonym key is the project's, wherever the
command is started from."""

from __future__ import annotations

import logging

from conftest import all_written, axial_positions, read_json, write_series

import medseg.ingest as ingest
from medseg.cli import main
from medseg.common.pseudonym import SECRET_ENV, SECRET_FILE

FOLDER = "DOE_JOHN_MRN12345"
FILE = "SMITH_JANE_19370214"


def test_folder_and_file_names_never_reach_the_report_cache_or_log(tmp_path, caplog, capsys):
    src, out, ids = tmp_path / "export" / FOLDER, tmp_path / "out", tmp_path / "private" / "ids.json"
    write_series(src / "series_a", axial_positions(4), patient_id="P1")
    write_series(src / FILE, axial_positions(1), patient_id="P2", series_uid="1.2.3.9")  # rejected: one slice
    (src / "labels").mkdir()
    (src / "labels" / f"{FILE}.nii.gz").write_bytes(b"\x1f\x8b truncated")  # a library error quoting the path
    with caplog.at_level(logging.DEBUG):
        assert main(["-v", "ingest", str(src), "--out", str(out), "--write-id-map", str(ids)]) == 0
    captured = capsys.readouterr()
    blobs = all_written(out) + [("log", caplog.text.encode()), ("stdout", captured.out.encode()),
                                 ("stderr", captured.err.encode())]
    for name, blob in blobs:
        for needle in (FOLDER, FILE, "MRN12345", "19370214", "series_a", str(tmp_path / "export")):
            assert needle.encode() not in blob, f"{needle} in {name}"
    report = read_json(out / "ingest_report.json")
    assert report["rejected"] and all(set(r) == {"input", "reason"} for r in report["rejected"])
    mapping = read_json(ids)  # the private map resolves every key the report uses
    for entry in report["accepted"] + report["rejected"]:
        assert (src / mapping[entry["input"]]["source"]).exists()


def test_pseudonyms_are_the_projects_wherever_ingest_is_started(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV)
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "params.yaml").write_text("{}\n")
    (tmp_path / "elsewhere").mkdir()
    src = tmp_path / "data"
    write_series(src / "a", axial_positions(3), patient_id="PAT-77")
    seen = []
    for k, cwd in enumerate([project, project / "sub", tmp_path / "elsewhere"]):
        monkeypatch.chdir(cwd)
        ingest.ingest_folder(src, project / "data" / f"ingested{k}")
        seen.append(read_json(project / "data" / f"ingested{k}" / "manifest.json")["cases"][0]["case_id"])
    assert len(set(seen)) == 1
    assert (project / SECRET_FILE).is_file() and not (tmp_path / "elsewhere" / SECRET_FILE).exists()
    assert not (project / "sub" / SECRET_FILE).exists()


def test_source_path_is_not_an_mlflow_parameter(tmp_path):
    from medseg.common.tracking import flatten_params
    from tests.conftest import tiny_params

    params = tiny_params(tmp_path, data={"source": str(tmp_path / FOLDER)})
    logged = flatten_params(params)
    assert FOLDER not in str(logged) and logged["data.source"].startswith("source-")
    assert logged["data.source"] == flatten_params(params)["data.source"]  # stable: runs still group by data

"""A re-run does no work for unchanged cases, an interrupted run leaves nothing half-written, and no identifier of
the source DICOM reaches the output folder or the log (only the optional re-identification map, when asked for)."""

from __future__ import annotations

import gzip
import logging
import os
import stat

import nibabel
import pytest
from conftest import all_written, axial_positions, read_json, write_series

import medseg.ingest as ingest
import medseg.common.fast_gzip as pgzip
from medseg.cli import main
from medseg.ingest.cache import CACHE_NAME
from medseg.common.manifest import MANIFEST_NAME

PHI = {
    "PatientName": "Zyxwoth^Quimbleby",
    "PatientID": "PID0042917",
    "PatientBirthDate": "19370214",
    "AccessionNumber": "ACC7781234",
    "InstitutionName": "St Elsewhereville Hospital",
    "ReferringPhysicianName": "Drakovic^Ramoraye",
}
# Each value, and each part of the person names, as they could appear once formatted.
NEEDLES = sorted({*PHI.values(), "Zyxwoth", "Quimbleby", "Drakovic", "Ramoraye", "Elsewhereville", "1937-02-14"})


def _tree(root, n=3, extra=None):
    """``n`` small CT series, one per patient, one per folder."""
    for k in range(n):
        write_series(root / f"series{k}", axial_positions(4 + k), series_uid=f"1.2.826.0.1.3680043.8.498.1{k}",
                     study_uid=f"1.2.826.0.1.3680043.8.498.2{k}", patient_id=f"PAT-{k}", extra=extra)
    return root


def _count_loads(monkeypatch) -> list[str]:
    """Record the source of every case whose pixels are read (each Item.load call)."""
    calls: list[str] = []
    real = ingest.READERS["dicom"]

    def scan(*args, **kwargs):
        found = real(*args, **kwargs)
        for item in found.items:
            item.load = (lambda load=item.load, src=item.source: (calls.append(src), load())[1])
        return found

    monkeypatch.setitem(ingest.READERS, "dicom", scan)
    return calls


def _snapshot(out):
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(out.rglob("*.nii.gz"))}


def test_second_run_does_no_work(tmp_path, monkeypatch):
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    first = ingest.ingest_folder(src, out)
    assert first["accepted"] == 3 and first["skipped"] == 0
    before = _snapshot(out)
    calls = _count_loads(monkeypatch)
    second = ingest.ingest_folder(src, out)
    assert calls == []
    assert second["skipped"] == 3 and second["accepted"] == 3
    assert _snapshot(out) == before  # same bytes, same mtimes: nothing rewritten


def test_changed_source_file_redoes_only_that_case(tmp_path, monkeypatch):
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    ingest.ingest_folder(src, out)
    before = _snapshot(out)
    one = sorted((src / "series1").iterdir())[0]
    st = one.stat()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = _count_loads(monkeypatch)
    assert ingest.ingest_folder(src, out)["skipped"] == 2
    assert calls == ["series1"]
    after = _snapshot(out)
    assert len([k for k in before if before[k][0] != after[k][0]]) == 1  # one image rewritten, the others untouched
    assert {k: v[1] for k, v in before.items()} == {k: v[1] for k, v in after.items()}


def test_deleted_output_redoes_that_case(tmp_path, monkeypatch):
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    ingest.ingest_folder(src, out)
    victim = sorted((out / "images").iterdir())[0]
    victim.unlink()
    calls = _count_loads(monkeypatch)
    assert ingest.ingest_folder(src, out)["skipped"] == 2
    assert len(calls) == 1 and victim.is_file()


def test_code_change_redoes_everything(tmp_path, monkeypatch):
    src, out = _tree(tmp_path / "src", n=2), tmp_path / "out"
    ingest.ingest_folder(src, out)
    monkeypatch.setattr(ingest, "code_version", lambda settings="": "another version of the code")
    calls = _count_loads(monkeypatch)
    assert ingest.ingest_folder(src, out)["skipped"] == 0
    assert len(calls) == 2


@pytest.mark.parametrize("workers", [1, 3])
def test_interrupted_run_leaves_nothing_half_written(tmp_path, monkeypatch, workers):
    src, out = _tree(tmp_path / "src", n=4), tmp_path / "out"
    real_save, saved = pgzip.write_gzip, []

    def save_then_die(filename, data, *args, **kwargs):
        saved.append(filename)
        if len(saved) == 2:  # the second case dies mid-write, as under Ctrl-C
            with open(filename, "wb") as fh:
                fh.write(data[:100])
            raise KeyboardInterrupt
        return real_save(filename, data, *args, **kwargs)

    monkeypatch.setattr(pgzip, "write_gzip", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest.ingest_folder(src, out, workers=workers)
    leftovers = [p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers in ([], [CACHE_NAME])  # no temporary file; only the record of the cases that finished
    assert not (out / MANIFEST_NAME).exists()
    for image in (out / "images").glob("*.nii.gz"):
        assert nibabel.load(image).get_fdata().shape[2] >= 4  # every output there is whole
    monkeypatch.setattr(pgzip, "write_gzip", real_save)
    calls = _count_loads(monkeypatch)
    result = ingest.ingest_folder(src, out, workers=workers)
    assert result["accepted"] == 4 and len(calls) == 4 - result["skipped"]
    assert result["skipped"] >= 1 if workers == 1 else True


def test_interrupted_rerun_keeps_the_old_manifest(tmp_path, monkeypatch):
    src, out = _tree(tmp_path / "src", n=2), tmp_path / "out"
    ingest.ingest_folder(src, out)
    manifest = (out / MANIFEST_NAME).read_bytes()
    for path in (out / "images").iterdir():
        path.unlink()
    monkeypatch.setattr(pgzip, "write_gzip", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ingest.ingest_folder(src, out, workers=1)
    assert (out / MANIFEST_NAME).read_bytes() == manifest
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != CACHE_NAME]


def test_no_phi_in_outputs_or_log_and_private_id_map(tmp_path, caplog, capsys):
    src, out, id_map = tmp_path / "src", tmp_path / "out", tmp_path / "private" / "ids.json"
    tags = {k: v for k, v in PHI.items() if k != "PatientID"}
    write_series(src / "a", axial_positions(4), patient_id=PHI["PatientID"], extra=tags)
    write_series(src / "b", axial_positions(5), series_uid="1.2.826.0.1.3680043.8.498.9", patient_id="PAT-2",
                 extra=tags)
    with caplog.at_level(logging.DEBUG):
        assert main(["-v", "ingest", str(src), "--out", str(out), "--write-id-map", str(id_map)]) == 0
        assert main(["-v", "ingest", str(src), "--out", str(out)]) == 0  # the cached re-run logs too
    captured = capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert {MANIFEST_NAME, "ingest_report.json", CACHE_NAME} <= names
    blobs = [*all_written(out), ("log", caplog.text.encode()), ("stdout", captured.out.encode()),
             ("stderr", captured.err.encode())]
    blobs += [(f"record {r.name}", repr((r.msg, r.args)).encode()) for r in caplog.records]
    for needle in NEEDLES:
        for name, blob in blobs:
            assert needle.encode() not in blob, f"{needle!r} found in {name}"
    for image in out.rglob("*.nii.gz"):
        header = nibabel.load(image).header
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            assert header[field].tobytes().strip(b"\x00") == b"", f"{image.name} {field}"

    assert stat.S_IMODE(id_map.stat().st_mode) == 0o600
    mapping = read_json(id_map)
    cases = {k: v for k, v in mapping.items() if not k.startswith("input-")}
    assert set(cases) == {c["case_id"] for c in read_json(out / MANIFEST_NAME)["cases"]}
    assert sorted(v["patient_id"] for v in cases.values()) == ["PAT-2", PHI["PatientID"]]
    assert sorted(v["source"] for v in cases.values()) == ["a", "b"]
    assert all(set(v) == {"patient_id", "study_uid", "series_uid", "source", "input"} for v in cases.values())
    inputs = {k: v["source"] for k, v in mapping.items() if k.startswith("input-")}  # the report's keys resolve
    report = read_json(out / "ingest_report.json")
    assert sorted(inputs[e["input"]] for e in report["accepted"]) == ["a", "b"]
    text = id_map.read_text()
    assert [n for n in NEEDLES if n in text] == [PHI["PatientID"]]  # names, dates, accession: not even in the map


def test_id_map_inside_the_output_folder_is_refused(tmp_path):
    from medseg.common.errors import IngestError

    src, out = _tree(tmp_path / "src", n=1), tmp_path / "out"
    with pytest.raises(IngestError, match="outside"):
        ingest.ingest_folder(src, out, id_map=out / "ids.json")
    assert not (out / "ids.json").exists()


def test_no_id_map_unless_asked(tmp_path):
    src, out = _tree(tmp_path / "src", n=1), tmp_path / "out"
    ingest.ingest_folder(src, out)
    assert not list(tmp_path.rglob("*id*map*")) and not list(tmp_path.rglob("ids.json"))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("backend", ["zlib", "default"])
def test_parallel_gzip_is_one_standard_gzip_member(tmp_path, monkeypatch, threads, backend):
    import zlib

    import numpy as np

    if backend == "zlib":
        monkeypatch.setattr(pgzip, "_deflate_lib", zlib)
    monkeypatch.setattr(pgzip, "CHUNK", 1000)  # many chunks, and a last one shorter than the others
    rng = np.random.default_rng(0)
    for size in (0, 1, 999, 1000, 5001):
        data = rng.integers(0, 50, size, dtype=np.uint8).tobytes()
        path = pgzip.write_gzip(tmp_path / f"{size}.gz", data, threads=threads)
        raw = path.read_bytes()
        assert gzip.decompress(raw) == data
        assert zlib.decompressobj(31).decompress(raw) == data  # one member: zlib alone reads it to the end
    image = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    from medseg.common.atomic_write import save_nifti

    saved = nibabel.load(save_nifti(tmp_path / "x.nii.gz", image, np.eye(4)))
    assert np.array_equal(np.asarray(saved.dataobj), image) and saved.get_data_dtype() == np.int16

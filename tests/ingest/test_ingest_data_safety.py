"""Ingest never deletes or writes inside the user's data, removes only what it wrote itself, and a killed run
(SIGKILL, no clean-up) loses at most the cases in flight: the re-run skips every case it finished."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import axial_positions, write_series

import medseg.ingest as ingest
from medseg.common.atomic_write import TMP_MARKER
from medseg.cli import main
from medseg.common.errors import IngestError
from medseg.ingest.cache import CACHE_NAME, load_cache


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _nifti_source(root, n=2):
    import nibabel as nib
    import numpy as np

    (root / "images").mkdir(parents=True)
    for k in range(n):
        data = np.random.default_rng(k).normal(size=(12, 10, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / "images" / f"scan{k}.nii.gz")
    (root / "my_notes.txt").write_text("mine")
    return root


@pytest.mark.parametrize("where", ["same", "inside", "images", "parent"])
def test_output_overlapping_the_source_is_refused_and_nothing_is_touched(tmp_path, capsys, where):
    src = _nifti_source(tmp_path / "data" / "src")
    out = {"same": src, "inside": src / "out", "images": src / "images", "parent": tmp_path / "data"}[where]
    before = _hashes(tmp_path / "data")
    with pytest.raises(IngestError, match="source folder"):
        ingest.ingest_folder(src, out)
    assert main(["ingest", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _hashes(tmp_path / "data") == before  # no file removed, changed or added


def test_only_files_ingest_wrote_are_ever_removed(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src / "a", axial_positions(3), series_uid="1.5.1", patient_id="A")
    write_series(src / "b", axial_positions(3), series_uid="1.5.2", patient_id="B")
    (out / "images").mkdir(parents=True)
    theirs = {out / "images" / "my_scan.nii.gz": b"not ours", out / "images" / "my_notes.txt": b"notes",
              out / "labels" / "other_tool.nii.gz": b"theirs", out / "images" / ".hidden.nii.gz": b"hidden"}
    for path, data in theirs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    ingest.ingest_folder(src, out)
    for f in (src / "b").iterdir():  # case b disappears from the source: its outputs are stale
        f.unlink()
    summary = ingest.ingest_folder(src, out)
    assert summary["accepted"] == 1
    assert all(path.read_bytes() == data for path, data in theirs.items())
    ours = sorted(p.name for p in (out / "images").glob("sub-*.nii.gz"))
    assert len(ours) == 1 and set(load_cache(out)) == {ours[0].removesuffix(".nii.gz")}


def test_a_hand_edited_record_cannot_delete_outside_our_folders(tmp_path):
    import json

    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src / "a", axial_positions(3), series_uid="1.5.1", patient_id="A")
    ingest.ingest_folder(src, out)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    cache = json.loads((out / CACHE_NAME).read_text())
    cache["cases"]["sub-bogus"] = {"key": "x", "results": [], "outputs": {"images/../../victim.txt": [7, 0],
                                                                           "../victim.txt": [7, 0]}}
    (out / CACHE_NAME).write_text(json.dumps(cache))
    ingest.ingest_folder(src, out)
    assert victim.read_text() == "keep me"


def test_temporaries_of_a_killed_run_are_cleaned_at_start_up(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src / "a", axial_positions(3), series_uid="1.5.1", patient_id="A")
    (out / "images").mkdir(parents=True)
    left = [out / "images" / f".sub-x.nii.gz{TMP_MARKER}ab12cd34.nii.gz", out / f".manifest.json{TMP_MARKER}zz.json"]
    for path in left:
        path.write_bytes(b"")  # a 0-byte temporary, as SIGKILL leaves mid-write
    ingest.ingest_folder(src, out)
    assert not any(path.exists() for path in left)


CHILD = textwrap.dedent("""
    import sys, time
    import medseg.ingest as ingest
    real = ingest._ingest_one
    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)
    ingest._ingest_one = slow
    ingest.SAVE_EVERY_S = 0.0
    ingest.ingest_folder(sys.argv[1], sys.argv[2], workers=1)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_progress_survives_a_kill(tmp_path, sig):
    src, out = tmp_path / "src", tmp_path / "out"
    for k in range(8):
        write_series(src / f"s{k}", axial_positions(3), series_uid=f"1.5.{k}", patient_id=f"P{k}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(load_cache(out)) < 3:
        time.sleep(0.05)
    child.send_signal(sig)
    child.wait(timeout=30)
    done = len(load_cache(out))
    assert 3 <= done < 8, "the child finished too early or too late to test a kill"
    summary = ingest.ingest_folder(src, out)
    assert summary["accepted"] == 8 and summary["skipped"] == done
    assert not [p for p in out.rglob("*") if TMP_MARKER in p.name]


def test_a_full_disk_is_one_line_and_the_finished_cases_are_kept(tmp_path, monkeypatch, capsys):
    import errno

    import medseg.common.fast_gzip as pgzip

    src, out = tmp_path / "src", tmp_path / "out"
    for k in range(3):
        write_series(src / f"s{k}", axial_positions(3), series_uid=f"1.5.{k}", patient_id=f"P{k}")
    real, calls = pgzip.write_gzip, []

    def fills_up(filename, data, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(filename, data, *args, **kwargs)

    monkeypatch.setattr(pgzip, "write_gzip", fills_up)
    assert main(["ingest", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err and str(out) in err
    assert "Traceback" not in err
    assert len(load_cache(out)) == 1 and not [p for p in out.rglob("*") if TMP_MARKER in p.name]
    monkeypatch.setattr(pgzip, "write_gzip", real)
    assert ingest.ingest_folder(src, out)["skipped"] == 1


def test_ctrl_c_is_one_line_and_keeps_the_finished_cases(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for k in range(8):
        write_series(src / f"s{k}", axial_positions(3), series_uid=f"1.5.{k}", patient_id=f"P{k}")
    # The CLI ingests on every core: two seconds per case keep the run going well past the moment we interrupt it,
    # even on a loaded machine (at one second a fresh clone's run, beside a training, finished first).
    code = CHILD.replace("time.sleep(0.4)", "time.sleep(2.0)").replace("ingest.ingest_folder(sys.argv[1], sys.argv[2], workers=1)",
                         "from medseg.cli import main\nsys.exit(main(['ingest', sys.argv[1], '--out', sys.argv[2]]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; a child inherits an *ignored* SIGINT
    # (something in the full test session ignores it), and Python then never raises KeyboardInterrupt.
    child = subprocess.Popen([sys.executable, "-c", code, str(src), str(out)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    # Two cases *recorded*: an image on disk is not yet in the record (the run notes it a moment later), and a
    # Ctrl-C in that moment rightly loses it, which made this test flaky when it waited on the image files.
    while time.monotonic() < deadline and len(load_cache(out)) < 2:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=60)[1]
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert len(json.loads((out / ".ingest_cache.json").read_text())["cases"]) >= 2  # the finished ones recorded


def test_a_dangling_label_link_is_a_rejection_and_a_link_loop_is_skipped(tmp_path, caplog):
    from conftest import make_acdc_patient, read_report

    src = tmp_path / "acdc"
    folder = make_acdc_patient(src, "patient001")
    label = sorted(folder.glob("*_gt.nii.gz"))[0]
    label.unlink()
    label.symlink_to(tmp_path / "nowhere.nii.gz")
    (folder / "loopA").symlink_to(folder / "loopB")
    (folder / "loopB").symlink_to(folder / "loopA")
    summary = ingest.ingest_folder(src, tmp_path / "out")
    assert summary["accepted"] == 1 and summary["rejected"] == 1 and summary["labelled"] == 1
    (rejected,) = read_report(tmp_path / "out", src)["rejected"]
    assert "link that loops or points nowhere" in rejected["reason"]
    assert caplog.text.count("a symbolic link that loops") == 2  # loopA and loopB, once each

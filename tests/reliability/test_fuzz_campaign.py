"""The fuzz campaign (``reliability/fuzz.py``) at CI's small count, and the inputs it once broke medseg with.

The campaign mutates the demo's real-format inputs (here) or ``../shared/data`` (by hand, 10,000 inputs: the
README's reliability section) and runs ingest and predict on each in worker processes: 0 crashes, 0 hangs, 0 memory
blow-ups, 0 touched sources, 0 temporaries left is the rule, and every input ends accepted or refused in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from reliability import fuzz

# (seed, index) of campaign inputs that broke medseg once, on the demo's inputs; each failed before its fix:
REGRESSIONS = {
    (0, 1): "nibabel's two-line message ('...\\n - could the file be damaged?') reached the report: not one line",
    (0, 29): "a dataset.json path longer than the file system allows: OSError out of the MSD reader",
    (0, 36): "a PNG header claiming 60000x60000 pixels: Pillow's DecompressionBombError out of predict",
    (0, 52): "predict given a symlink loop: RuntimeError while resolving the input",
    (0, 109): "an ACDC image whose pixdim is NaN: nibabel's HeaderDataError while writing the case",
    (0, 132): "a dataset.json label that is a symlink loop: RuntimeError out of the MSD reader",
    (2, 59): "a DICOM element length claiming gigabytes in a small file: a MemoryError reading the header",
    (2, 68): "dataset.json labels of the wrong form: ValueError out of the MSD reader",
    (2, 437): "a NIfTI qform nibabel cannot decompose: ValueError out of predict's reader",
    (2, 520): "a transfer syntax UID that is no transfer syntax: ValueError out of predict",
    (2, 819): "a NIfTI header claiming 60000-voxel dimensions: a MemoryError reading it",
}


def test_a_small_campaign_finds_no_crash_hang_blowup_or_touched_source():
    summary = fuzz.campaign(seed=1, count=40, workers=2, timeout=120)
    assert summary["tried"] == 40
    assert summary["failures"] == [], summary["failures"]
    assert summary["crashes"] == summary["hangs"] == summary["memory"] == summary["touched"] == 0
    assert summary["accepted"] + summary["rejected_only"] == 40  # every input ended one way or the other
    assert summary["rejected_by_reason"] and summary["accepted"] > 0  # the mutations do reach the readers


@pytest.mark.parametrize("seed", sorted({s for s, _ in REGRESSIONS}))
def test_the_inputs_that_once_broke_medseg_are_now_refused_in_one_line(seed):
    indices = [i for s, i in sorted(REGRESSIONS) if s == seed]
    summary = fuzz.campaign(seed=seed, count=0, indices=indices, workers=2, timeout=120)
    assert summary["tried"] == len(indices)
    assert summary["failures"] == [], [(REGRESSIONS[(seed, f["index"])], f["failures"]) for f in summary["failures"]]


# Found by the by-hand campaign on ../shared/data (seed 0, 10,000 inputs): inputs built from the real files there
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHARED_REGRESSIONS = {
    442: "a NIfTI whose datatype says RGB24: numpy's 'minimum' has no loop for its structured voxels",
    452: "a DICOM file whose header bytes were flipped: a MemoryError for a length field of gigabytes (pixel pass)",
    2196: "a PNG frame whose chunk length was flipped: Pillow read gigabytes for it (MemoryError)",
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
def test_the_shared_data_inputs_that_once_broke_medseg_are_now_refused_in_one_line():
    summary = fuzz.campaign(seed=0, count=0, data=SHARED, indices=sorted(SHARED_REGRESSIONS), workers=2, timeout=120)
    assert summary["tried"] == len(SHARED_REGRESSIONS)
    assert summary["failures"] == [], [(SHARED_REGRESSIONS[f["index"]], f["failures"]) for f in summary["failures"]]


def test_the_campaign_reports_what_it_is_there_to_find(tmp_path, monkeypatch):
    """The rules themselves can fail: a crash, a touched source and a multi-line refusal are each reported."""
    source = tmp_path / "source" / "images"
    source.mkdir(parents=True)
    (source / "case.nii.gz").write_bytes(b"not a nifti")
    case = {"kind": "nifti", "source": str(tmp_path / "source"), "predict_on": None}

    def touch_and_crash(*args, **kwargs):
        (source / "case.nii.gz").write_bytes(b"changed")
        raise KeyError("a reader bug")

    monkeypatch.setattr("medseg.ingest.ingest_folder", touch_and_crash)
    result = fuzz.check_case(case, tmp_path / "work", {})
    assert any(f.startswith("crash: ingest") for f in result["failures"])
    assert "touched: the source changed" in result["failures"]
    assert logging.root.manager.disable == logging.NOTSET  # the caller's logging is left as it was (caplog tests)
    monkeypatch.undo()

    def two_line_refusal(source_dir, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "ingest_report.json").write_text(json.dumps({"rejected": [{"reason": "first\nsecond"}]}))
        return {"accepted": 0, "report": str(out_dir / "ingest_report.json")}

    monkeypatch.setattr("medseg.ingest.ingest_folder", two_line_refusal)
    assert any("more than one line" in f for f in fuzz.check_case(case, tmp_path / "work2", {})["failures"])

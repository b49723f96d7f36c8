"""What predict finds to segment: DICOM series read by ingest's own series walk (same checks, same slice-spacing
tolerance), so a series ingest accepts predict accepts, and the other way round."""

from __future__ import annotations

import numpy as np

from medseg.inference.inputs import Input, Unreadable, find_inputs
from medseg.ingest.dicom import scan_dicom
from tests.ingest.conftest import axial_positions, write_series


def uneven_series(folder, **kw):
    """Four slices 2 mm apart, the last gap 2.5 % longer."""
    pos = axial_positions(4, step=2.0)
    pos[3] = (pos[3][0], pos[3][1], pos[3][2] + 0.05)
    return write_series(folder, pos, **kw)


def test_the_slice_spacing_tolerance_reaches_predicts_dicom_reading(tmp_path):
    uneven_series(tmp_path / "series")
    (strict,) = find_inputs(tmp_path / "series", spacing_rel_tol=0.01)
    assert isinstance(strict, Unreadable) and "spacing" in strict.reason.lower()
    (lenient,) = find_inputs(tmp_path / "series", spacing_rel_tol=0.05)
    assert isinstance(lenient, Input) and lenient.image.shape[2] == 4 and len(lenient.dicom_files) == 4


def test_predict_accepts_exactly_the_series_ingest_accepts(tmp_path):
    source = tmp_path / "studies"
    uid = "1.2.826.0.1.3680043.8.498.10"
    write_series(source / "even", axial_positions(5, step=2.5), series_uid=uid + "1")
    uneven_series(source / "uneven", series_uid=uid + "2")
    gap = axial_positions(6, step=2.0)
    write_series(source / "missing_slice", gap[:3] + gap[4:], series_uid=uid + "3")
    write_series(source / "mixed_sizes", axial_positions(3), series_uid=uid + "4")
    write_series(source / "mixed_sizes", axial_positions(1, z0=30.0), rows=5, series_uid=uid + "4", prefix="y")
    for tolerance, accepted in ((0.01, {"even"}), (0.05, {"even", "uneven"})):
        ingested = {item.source for item in scan_dicom(source, spacing_rel_tol=tolerance).items}
        found = list(find_inputs(source, spacing_rel_tol=tolerance))
        predicted = {i.name for i in found if isinstance(i, Input)}
        assert predicted == ingested == accepted
        assert {i.name for i in found} == {"even", "uneven", "missing_slice", "mixed_sizes"}  # each one accounted for

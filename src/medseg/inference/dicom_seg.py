"""Predictions as DICOM-SEG objects (``medseg predict --dicom-seg``), made with ``highdicom``.

The SEG references the source series' instances and shares their frame of reference: frame ``k`` is source slice
``k`` (sorted along the slice normal, as :mod:`medseg.ingest.dicom_geometry` sorts them), with the source's own
orientation, position and pixel spacing, so any viewer overlays it on the series without resampling. It carries the
source's patient and study modules, as it must to go back to the PACS next to its series; nothing here logs them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_dicom_seg", "SEG_SERIES_NUMBER"]

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9901  # far from the scanner's own series numbers, so the SEG sorts after its source


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medseg")
    except PackageNotFoundError:
        return "0"


def write_dicom_seg(labels: np.ndarray, source_files: Sequence[Path], label_names: Mapping[str, str], model: str,
                    path: Path) -> Path:
    """Write ``labels`` as a BINARY DICOM-SEG with one segment per foreground class.

    Args:
        labels: uint8 ``(X, Y, Z)`` = (column, row, sorted slice) label map on the source series' grid.
        source_files: the series' single-frame files in sorted slice order (``len == Z``).
        label_names: ``{"0": "background", "1": name, ...}`` (the inference config's ``labels``); classes must be
            numbered ``1..N``, the DICOM segment numbers.
        model: what the predictions came from (a model folder or ``models:/`` URI), for the algorithm identification.
        path: output file, conventionally ``<case>.seg.dcm``; written atomically.

    Returns:
        ``path``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medseg.common.atomic_write import atomic_path
    from medseg.common.errors import StageInputError
    from medseg.ingest.dicom_headers import quiet_pydicom

    nx, ny, nz = labels.shape
    if len(source_files) != nz or len(set(source_files)) != nz:
        raise StageInputError(f"DICOM-SEG needs one single-frame source file per slice: {len(set(source_files))} "
                              f"files for {nz} slices (enhanced multi-frame series are not supported)")
    classes = sorted(int(k) for k in label_names if int(k) > 0)
    if classes != list(range(1, len(classes) + 1)):
        raise StageInputError(f"DICOM-SEG segments must be numbered 1..N; the model's labels are {classes}")
    present = {int(v) for v in np.unique(labels)} - {0}
    if not present <= set(classes):
        raise StageInputError(f"label values {sorted(present - set(classes))} have no name in the model's labels")
    with quiet_pydicom():  # pydicom's warnings can quote element values, some of them identifiers
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
        algorithm = hd.AlgorithmIdentificationSequence(
            name="medseg", version=_version(), family=codes.cid7162.ArtificialIntelligence,
            parameters={"model": str(model)[:64]})
        segments = [hd.seg.SegmentDescription(
            segment_number=c, segment_label=str(label_names[str(c)])[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
            for c in classes]
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=np.ascontiguousarray(labels.transpose(2, 1, 0)),  # (slices, rows, columns), source order
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medseg", manufacturer_model_name=Path(str(model)).name[:64] or "medseg",
            software_versions=_version(), device_serial_number="0",
            series_description="medseg segmentation", content_label="MEDSEG",
            content_description=f"medseg segmentation ({len(classes)} classes)")
        with atomic_path(path) as tmp:
            seg.save_as(tmp)
    log.info("DICOM-SEG with %d segments (%d non-empty) written to %s", len(classes), len(present), path.name)
    return path

"""The ``dicom`` layout: a tree of DICOM files (any names, any depth) read series by series.

Labels, optional: ``SOURCE/labels/<SERIES_FOLDER>.nii.gz``, where ``SERIES_FOLDER`` is the name of the folder that
directly holds the series' files, on exactly the grid this module builds (see :mod:`.dicom_geometry`); label names
from ``SOURCE/labels.json`` (``{"0": "background", "1": "pancreas"}``), else ``class_N`` from the values seen.
Intensities are ``stored * RescaleSlope + RescaleIntercept`` (CT in HU): int16 when integral (int32 when out of the
int16 range), else float32. Modality is the DICOM ``Modality`` tag: CT and MR series are read, other modalities
rejected; a series without the tag is guessed from its intensities. Enhanced multi-frame CT/MR files are split into
their frames (:mod:`.dicom_multiframe`) and then treated like single-frame slices; a series whose positions repeat per
phase (cine MR, dynamic series) becomes one case per phase (:func:`.dicom_geometry.split_phases`), its ``source``
followed by ``(phase N of M, TAG VALUE)``; repeated copies of one instance (same SOPInstanceUID) count once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from medseg.ingest.common import CaseRejected, Item, Loaded, Scan, iter_files, modality_name, named, \
    read_label_json, rel
from medseg.ingest.dicom_geometry import SPACING_REL_TOL, Geometry, series_geometry, split_phases
from medseg.ingest.dicom_label_match import is_label_object, match_label_objects, object_loader
from medseg.ingest.dicom_headers import Header, group_series, non_image_reason, read_header, unique_instances
from medseg.ingest.dicom_multiframe import frame_headers, is_enhanced
from medseg.ingest.dicom_pixels import decoder_problem, read_series
from medseg.ingest.nifti import load_nifti
from medseg.common.pseudonym import pseudonym

__all__ = ["scan_dicom", "read_headers", "image_series", "Series", "read_series", "decoder_problem"]

log = logging.getLogger(__name__)


def _series_folder(headers: list[Header]) -> Path:
    return Path(os.path.commonpath([str(h.path.parent) for h in headers]))


def _which_files(headers: list[Header], source: Path) -> str:
    """" [N files in K folders: a, b]" or " [N files: x, y, z, ...]" to say which files a rejected series is."""
    paths = {h.path for h in headers}  # the frames of a multi-frame file are one file
    if len(paths) == 1:
        return ""
    folders = sorted({rel(p.parent, source) for p in paths})
    if len(folders) > 1:
        return f" [{len(paths)} files in {len(folders)} folders: {', '.join(folders[:4])}]"
    names = sorted(p.name for p in paths)
    return f" [{len(names)} files: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}]"


def _loader(geometry: Geometry, label_path: Path | None):
    def load() -> Loaded:
        image = read_series(geometry)
        if label_path is None:
            return Loaded(image, geometry.affine)
        label, label_affine = load_nifti(label_path, "label")
        return Loaded(image, geometry.affine, label, label_affine)

    return load


@dataclasses.dataclass
class Series:
    """One image series, or one phase of a cine/dynamic series, found under a source folder: its sorted slices'
    ``geometry`` when it passed every check, else the ``problem`` (one line) that rejects it."""

    key: str  # the grouping key (study and series UIDs, ...)
    folder: Path  # the folder that directly holds its files
    where: str  # that folder, or the file of a one-file series, relative to the source
    members: list[Header]
    phase: str | None = None  # "phase N of M, TAG VALUE" when the series repeats its positions per phase
    phase_number: int | None = None  # N
    geometry: Geometry | None = None
    problem: str | None = None


def read_headers(files: Iterable[Path], reject: Callable[[Path, str], None] | None = None) -> list[Header]:
    """The DICOM headers of ``files`` (an enhanced multi-frame file as one header per frame); a file that is not
    DICOM or is corrupt goes to ``reject(path, reason)``."""
    headers: list[Header] = []
    for path in files:
        try:
            header = read_header(path)
            headers.extend(frame_headers(header) if is_enhanced(header) else [header])
        except CaseRejected as err:
            if reject is not None:
                reject(path, str(err))
    return headers


def image_series(groups: dict[str, list[Header]], source: Path,
                 spacing_rel_tol: float = SPACING_REL_TOL) -> Iterator[Series]:
    """The series of ``groups`` (:func:`group_series` of the image headers), as ingest and predict both read them:
    repeated instances counted once, CT and MR only, split into phases, slices sorted and their geometry checked
    (spacing within ``spacing_rel_tol``)."""
    for key, group in groups.items():
        group, copies = unique_instances(group)
        if copies:
            log.info("%d repeated copies of the same instance (SOPInstanceUID) left out of one series", copies)
        folder = _series_folder(group)
        one_file = len({h.path for h in group}) == 1  # a single slice, or all the frames of one multi-frame file
        where = rel(group[0].path if one_file else folder, source)
        reason = next((r for r in map(non_image_reason, group) if r), None)
        if not reason and group[0].modality not in ("CT", "MR", ""):
            reason = f"modality {group[0].modality} is not supported (CT or MR only)"
        phases = [(None, group)] if reason else split_phases(group)
        for number, (phase, members) in enumerate(phases, 1):
            series = Series(key, folder, where, members, phase, None if phase is None else number)
            try:
                if reason:
                    raise CaseRejected(reason)
                series.geometry = series_geometry(members, spacing_rel_tol)
            except CaseRejected as err:
                series.problem = str(err)
            yield series


def scan_dicom(source: Path, skip: tuple[Path, ...] = (), spacing_rel_tol: float = SPACING_REL_TOL) -> Scan:
    """Find the DICOM series under ``source``: one header-only pass, then grouping, sorting and geometry checks.

    Files in ``SOURCE/labels/`` and ``SOURCE/labels.json`` are not scanned. Files that are not DICOM or are corrupt are
    rejected one by one; series that fail a check are rejected as a whole (``source`` = the series' folder, or the
    file for a one-file series).
    """
    labels_dir = source / "labels"
    labels = read_label_json(source / "labels.json") if (source / "labels.json").is_file() else None
    scan = Scan(labels=labels)
    files = list(iter_files(source, (*skip, labels_dir, source / "labels.json")))
    headers = read_headers(tqdm(files, desc="DICOM headers", unit="file", disable=None, leave=False),
                           lambda path, reason: scan.reject(rel(path, source), reason))
    # DICOM-SEG and RTSTRUCT objects are labels of the series they reference, not series of their own.
    label_headers = [h for h in headers if is_label_object(h)]
    groups = group_series([h for h in headers if not is_label_object(h)])
    match = match_label_objects(label_headers, groups, source, labels)
    scan.rejected.extend(match.rejected)
    if match.by_series:
        scan.labels = match.labels
    for series in image_series(groups, source, spacing_rel_tol):
        # each phase of a cine/dynamic series is its own case; its source names the phase
        src = series.where if series.phase is None else f"{series.where} ({series.phase})"
        if series.problem is not None:
            scan.reject(src, f"{series.problem}{_which_files(series.members, source)}")
            continue
        scan.items.append(_item(series, source, src, match, labels_dir))
    return scan


def _item(series: Series, source: Path, src: str, match, labels_dir: Path) -> Item:
    """The ingest item of a good series: pseudonymous ids, its label (a NIfTI beside it, or a SEG/RTSTRUCT)."""
    first, key, phase = series.members[0], series.key, series.phase
    subject = pseudonym(first.patient_id or first.study_uid or f"series:{rel(series.folder, source)}")
    case_key = key if phase is None else f"{key}|{phase}"
    case_id = f"{subject}_{pseudonym(case_key, prefix='ser', length=6)}"
    if key in match.by_series:
        load = object_loader(series.geometry, match.by_series[key], match.labels, read_series)
    else:
        load = _loader(series.geometry, named(labels_dir / f"{series.folder.name}.nii.gz"))
    ids = {"patient_id": first.patient_id, "study_uid": first.study_uid, "series_uid": first.series_uid}
    return Item(source=src, subject=subject, case_id=case_id, load=load, identifiers=ids,
                modality=modality_name(first.modality) if first.modality else None,
                phase=None if phase is None else phase.split(",")[0])

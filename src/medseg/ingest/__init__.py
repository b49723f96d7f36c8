"""Ingest stage: read ACDC, MSD, DICOM or NIfTI data into ``images/``, ``labels/``, ``manifest.json`` and
``ingest_report.json``.

Every case is checked (3D, finite, label on the image's grid, label values in the label map); a case that fails is
listed in the report with its reason and the rest are still ingested. Geometry is kept as in the source (no
reorientation); ``case_id`` and ``subject`` are keyed pseudonyms, and no patient identifier reaches the outputs or the
log (the optional ``id_map`` file, written outside the output folder, is the only link back). Cases are ingested in
parallel threads (under the Prefect flow: one task each, see :mod:`medseg.common.case_map`); a re-run skips the cases whose sources and outputs are unchanged (see :mod:`.cache`). This package
imports neither torch nor MONAI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from medseg.common.atomic_write import remove_temporaries, save_nifti, write_json
from medseg.common.case_map import CaseMap, threads
from medseg.common.errors import IngestError
from medseg.ingest.acdc import scan_acdc
from medseg.ingest.cache import SourceIndex, code_version, is_fresh, load_cache, output_stats, save_cache
from medseg.ingest.checks import check_label, checked_image, guess_modality, spacing_of
from medseg.ingest.common import CaseRejected, Item, Scan, folders_overlap, new_walk
from medseg.ingest.dicom import scan_dicom
from medseg.ingest.dicom_geometry import SPACING_REL_TOL
from medseg.ingest.dicom_headers import quiet_pydicom
from medseg.ingest.images import scan_images
from medseg.ingest.layouts import LAYOUT_HELP, LAYOUTS, detect_layout, layout_help
from medseg.ingest.msd import scan_msd
from medseg.ingest.nifti import scan_nifti
from medseg.ingest.privacy import Scrubber, input_key
from medseg.common.manifest import REPORT_NAME, Case, write_manifest
from medseg.common.pseudonym import project_key, write_id_map

if TYPE_CHECKING:
    from medseg.common.params import Params

__all__ = ["run", "ingest_folder", "detect_layout", "LAYOUTS", "READERS"]

log = logging.getLogger(__name__)

READERS = {"acdc": scan_acdc, "msd": scan_msd, "dicom": scan_dicom, "nifti": scan_nifti, "images": scan_images}


def _image_dtype(image: np.ndarray) -> np.dtype:
    """Keep the source dtype, except float64 -> float32, bool -> uint8 and 64-bit integers -> int32 when in range."""
    if image.dtype == np.float64 or np.issubdtype(image.dtype, np.floating) and image.dtype.itemsize > 4:
        return np.dtype(np.float32)
    if image.dtype == bool:
        return np.dtype(np.uint8)
    if np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize > 4:
        info = np.iinfo(np.int32)
        fits = image.size == 0 or (image.min() >= info.min and image.max() <= info.max)
        return np.dtype(np.int32 if fits else np.float32)
    return image.dtype


def _ingest_one(item: Item, out_dir: Path, allowed: set[int] | None, scrub: Scrubber) -> tuple[Case, set[int]]:
    """Load, check and write one case; returns its manifest entry and the label values it holds."""
    try:
        loaded = item.load()
    except CaseRejected:
        raise
    except Exception as err:  # a reader bug or an odd file must not stop the other cases
        log.debug("unexpected error reading %s:\n%s", input_key(item.source), scrub(traceback.format_exc()))
        raise CaseRejected(f"unexpected error while reading: {type(err).__name__}: {str(err)[:200]}") from None
    image = checked_image(loaded.image, loaded.channels, loaded.affine)
    shape = tuple(int(s) for s in image.shape[:3])
    label, values = None, set()
    if loaded.label is not None:
        label = check_label(np.asarray(loaded.label), loaded.label_affine, shape, loaded.affine, allowed)
        values = {int(v) for v in np.unique(label)}
    image_rel = f"images/{item.case_id}.nii.gz"
    label_rel = None if label is None else f"labels/{item.case_id}.nii.gz"
    try:
        save_nifti(out_dir / image_rel, image, loaded.affine, dtype=_image_dtype(image))
        if label is not None:
            save_nifti(out_dir / label_rel, label, loaded.affine, dtype=np.uint8)
    except OSError as err:  # disk full, read-only, quota: no case can be written, so stop (the finished are kept)
        raise IngestError(f"cannot write to the output folder {out_dir}: {err.strerror or err} (case "
                          f"{item.case_id}); the cases finished so far are kept and a re-run goes on from there") \
            from None
    case = Case(case_id=item.case_id, subject=item.subject, image=image_rel, label=label_rel,
                modality=item.modality or loaded.modality or guess_modality(image), spacing=spacing_of(loaded.affine),
                shape=shape, phase=item.phase, group=item.group, channels=loaded.channels or 1)
    return case, values


DUPLICATE = "duplicate case: same patient and series/phase as an accepted case"


def _ingest_group(group: list[Item], out_dir: Path, allowed: set[int] | None, scrub: Scrubber) -> list[dict[str, Any]]:
    """Ingest the items that share one case_id, in order: the first accepted one wins, later ones are duplicates.

    Grouping keeps two concurrent calls from ever writing the same output file.
    """
    results: list[dict[str, Any]] = []
    done = False
    with quiet_pydicom():  # also in a worker process of a cluster, where no caller holds it
        for item in group:
            if done:
                results.append(scrub.public(item.source, DUPLICATE))
                continue
            try:
                case, values = _ingest_one(item, out_dir, allowed, scrub)
            except CaseRejected as err:
                results.append(scrub.public(item.source, str(err)))
                continue
            done = True
            results.append({"input": input_key(item.source), "case": case.to_json(), "values": sorted(values)})
    return results


def _outputs(results: list[dict[str, Any]]) -> list[str]:
    return [p for r in results if "case" in r for p in (r["case"]["image"], r["case"]["label"]) if p]


def _identifiers(item: Item) -> dict[str, str]:
    """Source identifiers of a case for the re-identification map (layouts other than DICOM have only the path)."""
    return {**item.identifiers, "source": item.source, "input": input_key(item.source)}


def _run_cases(groups: dict[str, list[Item]], keys: dict[str, str], out_dir: Path, allowed: set[int] | None,
               scrub: Scrubber, case_map: CaseMap, desc: str
               ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], int]:
    """Ingest the cases whose cache entry is stale, one ``case_map`` call each (:mod:`medseg.common.case_map`).

    Returns:
        The cache entries of this run's cases (by case_id), every entry recorded so far (the previous run's too:
        the record of what ingest itself wrote, which :func:`_remove_stale` may delete), and how many cases were
        skipped as unchanged.

    The record is saved as cases finish (at most every :data:`SAVE_EVERY_S` seconds), so a killed run loses at most
    that much work: the re-run skips every case recorded. Each output is replaced by rename, so nothing half-written
    is left. An :class:`IngestError` (the output cannot be written) stops the run with what finished recorded.
    """
    # The skip pays off for `medseg ingest` run by hand and for the Prefect flow; `dvc repro` deletes the stage's
    # outputs before running it, so under DVC every case is stale here and DVC's own cache does the skipping.
    record = load_cache(out_dir)
    cache = {cid: record[cid] for cid in groups if is_fresh(record.get(cid), keys[cid], out_dir)}
    todo = [cid for cid in groups if cid not in cache]
    skipped = len(cache)
    log.info("%d case(s) unchanged since the last run, %d to ingest", len(cache), len(todo))
    # Identifiers stay here: the calls may travel to other processes (a Dask cluster); only the id map needs them.
    calls = [([replace(item, identifiers={}) for item in groups[cid]], out_dir, allowed, scrub) for cid in todo]
    saved = time.monotonic()
    try:
        # pydicom's quiet_pydicom() swaps process-wide state (logger level, warning filters); holding it around
        # the map keeps that state quiet however the calls' own enter/exit interleave in threads.
        with quiet_pydicom(), tqdm(total=len(todo), desc=desc, unit="case", disable=None) as bar:
            for index, results in case_map(_ingest_group, calls):
                cid = todo[index]
                cache[cid] = record[cid] = {"key": keys[cid], "results": results,
                                            "outputs": output_stats(out_dir, _outputs(results))}
                bar.update()
                if time.monotonic() - saved > SAVE_EVERY_S:
                    save_cache(out_dir, record)
                    saved = time.monotonic()
    finally:
        if todo:
            save_cache(out_dir, record)
    return cache, record, skipped


SAVE_EVERY_S = 1.0


def _remove_stale(out_dir: Path, keep: set[str], record: dict[str, dict[str, Any]]) -> None:
    """Delete the outputs a previous run wrote (as its record says) that the new manifest does not list.

    Only files ingest itself wrote are ever removed: a file in ``images/`` or ``labels/`` that is not in the record
    (the user's own, or one written by another tool) stays.
    """
    written = {r for entry in record.values() for r in entry.get("outputs", {})}
    for relpath in sorted(written - keep):
        sub, _, name = relpath.partition("/")
        if sub not in ("images", "labels") or not name or "/" in name or name.startswith("."):
            continue  # a record we did not write (edited by hand): never follow it out of our folders
        path = out_dir / sub / name
        if path.is_file() and not path.is_symlink():
            log.info("removing stale %s", relpath)
            path.unlink()


def _check_folders(source: Path, out_dir: Path) -> None:
    """Refuse an output folder that is the source, lies inside it or contains it: ingest never writes into, or
    deletes from, the user's data."""
    if folders_overlap(out_dir, source):
        where = "is" if out_dir == source else "lies inside" if out_dir.is_relative_to(source) else "contains"
        raise IngestError(f"output folder {out_dir} {where} the source folder {source}: choose an output folder "
                          f"outside the data being ingested")


def run(params: Params, *, id_map: Path | None = None, workers: int | None = None,
        case_map: CaseMap | None = None) -> dict[str, Any]:
    """The ingest stage: ``data.source`` into ``paths.ingested``, read as ``data.layout`` with
    ``data.slice_spacing_tolerance`` and ``data.group_pattern`` (:func:`ingest_folder` has the details).

    ``id_map``, ``workers`` and ``case_map`` are how this run is made, not what it makes: the user's private
    re-identification file, and how the cases run (threads here; one Prefect task each under the flow).
    """
    data = params.data
    return ingest_folder(Path(data.source), Path(params.paths.ingested), layout=data.layout, id_map=id_map,
                         workers=workers, spacing_tolerance=data.slice_spacing_tolerance, case_map=case_map,
                         group_pattern=data.group_pattern)


def ingest_folder(source: Path, out_dir: Path, layout: str = "auto", id_map: Path | None = None,
                  workers: int | None = None, spacing_tolerance: float = SPACING_REL_TOL,
                  case_map: CaseMap | None = None, group_pattern: str | None = None) -> dict[str, Any]:
    """Ingest ``source`` into ``out_dir``: the library call under :func:`run`, and ``medseg ingest SOURCE --out DIR``
    outside a project (no params file).

    Args:
        source: folder to read.
        out_dir: output folder; receives ``images/``, ``labels/``, ``manifest.json``, ``ingest_report.json`` and
            the re-run cache ``.ingest_cache.json``.
        layout: "auto" (detect acdc, msd, dicom, nifti in that order) or one of :data:`LAYOUTS`.
        id_map: if given, a JSON file (mode 0600, outside ``out_dir``) mapping each case_id to its source
            identifiers (patient_id, study_uid, series_uid for DICOM) and source path, for re-identification.
        workers: cases ingested at once in threads (default: the number of CPUs), unless ``case_map`` is given.
        spacing_tolerance: relative deviation of a DICOM series' slice steps from their median beyond which the
            series is refused as non-uniform (``data.slice_spacing_tolerance`` in params.yaml).
        case_map: how the cases run (:mod:`medseg.common.case_map`); the Prefect flow's runs one task per case.
        group_pattern: 2D images: the regular expression whose first group, matched at the start of a file stem,
            names the frame's video sequence or patient (``data.group_pattern``); None: each frame its own group
            unless ``SOURCE/groups.csv`` says otherwise (:mod:`.images`).

    Returns:
        Summary: ``layout``, ``out``, counts ``accepted``, ``rejected``, ``labelled``, ``skipped`` (unchanged since
        the last run), and the ``manifest`` and ``report`` paths.

    Raises:
        IngestError: ``source`` does not exist, no layout matches, no case passed the checks, or ``id_map`` lies
            inside ``out_dir``.
    """
    source = Path(source).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not source.exists():
        raise IngestError(f"source {source} does not exist (data.source in params.yaml, or the SOURCE argument); "
                          f"it should be a folder in one of these layouts: {layout_help()}")
    if not source.is_dir():
        raise IngestError(f"source {source} is not a folder")
    _check_folders(source, out_dir)
    if id_map is not None:
        id_map = Path(id_map).expanduser().resolve()
        if id_map.is_relative_to(out_dir):  # the data folder is shared and versioned: no identifiers there
            raise IngestError(f"--write-id-map {id_map} must lie outside the output folder {out_dir}")
    with project_key(out_dir):  # the project's key, wherever the command is started from
        options = {"dicom": {"spacing_rel_tol": spacing_tolerance}, "images": {"group_pattern": group_pattern}}
        return _ingest(source, out_dir, layout, id_map, case_map or threads(workers or os.cpu_count() or 1), options)


def _ingest(source: Path, out_dir: Path, layout: str, id_map: Path | None, case_map: CaseMap,
            options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    skip = (out_dir,)
    layout, scan = _scan(source, skip, layout, options)
    groups: dict[str, list[Item]] = {}
    for item in scan.items:
        groups.setdefault(item.case_id, []).append(item)
    index = SourceIndex(source, skip, [i.source for i in scan.items], code_version(f"layout={layout}"))
    scrub = Scrubber(source, index.paths)
    rejected = [scrub.public(r["source"], r["reason"]) for r in scan.rejected]
    for r in rejected:
        log.warning("rejected %s: %s", r["input"], r["reason"])
    keys = {cid: hashlib.sha256("\x1f".join(index.key(i.source) for i in g).encode()).hexdigest()
            for cid, g in groups.items()}
    for folder in (out_dir, out_dir / "images", out_dir / "labels"):  # left by a killed run
        remove_temporaries(folder)
    allowed = set(scan.labels) if scan.labels else None
    cache, record, skipped = _run_cases(groups, keys, out_dir, allowed, scrub, case_map, f"ingest {layout}")
    results = {(cid, r["input"]): r for cid, entry in cache.items() for r in entry["results"]}
    cases, accepted, values_seen, ids = _collect(scan, results, rejected)
    if not cases:
        first = "; ".join(f"{r['input']}: {r['reason']}" for r in rejected[:3])
        raise IngestError(f"nothing usable in {source} (layout {layout}: {LAYOUT_HELP[layout]}); "
                          f"{len(rejected)} rejected" + (f", e.g. {first}" if first else ""))
    labels = dict(scan.labels) if scan.labels else {0: "background", **{v: f"class_{v}" for v in values_seen if v}}
    keep = {c.image for c in cases.values()} | {c.label for c in cases.values() if c.label}
    _remove_stale(out_dir, keep, record)
    save_cache(out_dir, cache)  # the record now: this run's cases only
    manifest = write_manifest(out_dir, layout, labels, list(cases.values()), dataset=_dataset_name(scan, cases))
    report = write_json(out_dir / REPORT_NAME, {"source_layout": layout, "accepted": accepted, "rejected": rejected})
    _write_ids(id_map, ids, len(cases), len(rejected))
    labelled = sum(c.label is not None for c in cases.values())
    subjects = len({c.subject for c in cases.values()})
    log.info("ingest: %d cases of %d %s accepted (%d with labels), %d rejected, %d unchanged -> %s", len(cases),
             subjects, "groups" if layout == "images" else "subjects", labelled, len(rejected), skipped, out_dir)
    return {"layout": layout, "out": str(out_dir), "accepted": len(cases), "subjects": subjects,
            "rejected": len(rejected), "labelled": labelled, "skipped": skipped, "manifest": str(manifest),
            "report": str(report)}


def _scan(source: Path, skip: tuple[Path, ...], layout: str, options: dict[str, dict[str, Any]]) -> tuple[str, Scan]:
    """The layout (detected for ``auto``) and its reader's scan of ``source``."""
    new_walk()
    if layout == "auto":
        layout = detect_layout(source, skip)
    elif layout not in READERS:
        raise IngestError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    log.info("ingesting data.source as layout %s", layout)  # no path: folder names can identify patients
    try:
        return layout, READERS[layout](source, skip, **options.get(layout, {}))
    except CaseRejected as err:  # a layout-wide problem (a bad groups.csv or group pattern): nothing to ingest
        raise IngestError(f"layout {layout}: {err}") from None


def _collect(scan: Scan, results: dict, rejected: list[dict]) -> tuple[dict[str, Case], list, set, dict]:
    """The cases, in the scan's order whatever order the threads finished in: ``(cases, accepted, label values
    seen, identifiers by key)``; each input a case refused is added to ``rejected``."""
    cases: dict[str, Case] = {}
    accepted, values_seen = [], set()
    ids = {input_key(r["source"]): {"source": r["source"]} for r in scan.rejected}
    for item in scan.items:
        key = input_key(item.source)
        ids[key] = {"source": item.source}
        r = results[(item.case_id, key)]
        if "reason" in r:
            rejected.append({"input": key, "reason": r["reason"]})
            log.warning("rejected %s: %s", key, r["reason"])
            continue
        case = Case.from_json(r["case"])
        cases[case.case_id] = case
        values_seen |= set(r["values"])
        accepted.append({"input": key, "case_id": case.case_id})
        ids[case.case_id] = _identifiers(item)
    return cases, accepted, values_seen, ids


def _write_ids(id_map: Path | None, ids: dict, cases: int, rejected: int) -> None:
    """The re-identification map, only where the user asked for one (outside the data folder)."""
    if id_map is not None:
        write_id_map(id_map, ids)
        log.info("re-identification map written (%d cases, %d inputs); keep it private", cases, len(ids) - cases)
    elif rejected:
        log.info("%d input(s) rejected, named by input-... keys in %s; --write-id-map FILE maps the keys to files",
                 rejected, REPORT_NAME)


def _dataset_name(scan, cases: dict) -> str:
    """What the data is, for the registered model's name (``medseg.common.manifest``): the layout's own name for it, else
    ``frames`` (2D images) or the modality (``ct``, ``mr``, ``mr-ct``); never a file or folder name of the source."""
    from medseg.common.manifest import FRAME_MODALITIES, dataset_slug

    named = dataset_slug(scan.name) if scan.name else None
    if named:
        return named
    modalities = sorted({c.modality for c in cases.values()})
    return "frames" if set(modalities) <= set(FRAME_MODALITIES) else dataset_slug("-".join(modalities)) or "data"

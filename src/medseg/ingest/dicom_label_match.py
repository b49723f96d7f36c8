"""Which DICOM-SEG or RTSTRUCT labels which image series, and one label map for the whole data set.

Rules (reported, never silent):
- an object labels the series whose SeriesInstanceUID it references (for series with empty UIDs: whose
  SOPInstanceUIDs include the ones it references);
- several objects for one series: SEG wins over RTSTRUCT (voxel-exact rather than contours), then the first by path;
  the others are listed in the report as not used;
- an object whose series is not under SOURCE is listed in the report;
- label values are remapped by structure *name* onto one data-set-wide map, so "liver" has the same value in every
  case; with ``SOURCE/labels.json`` the names must be in it (case-insensitive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.ingest.common import CaseRejected, rel
from medseg.ingest.dicom_headers import Header
from medseg.ingest.dicom_labels import LabelObject, find_label_objects

__all__ = ["LabelMatch", "match_label_objects", "remap_by_name", "is_label_object", "object_loader"]

LABEL_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.5.1.4.1.1.481.3")


def is_label_object(h: Header) -> bool:
    return h.sop_class in LABEL_SOP_CLASSES


@dataclass
class LabelMatch:
    """The chosen label object per series key, the data-set label map, and report lines."""

    by_series: dict[str, LabelObject] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)


def _references(obj: LabelObject, key: str, group: list[Header]) -> bool:
    if obj.series_uid:
        return obj.series_uid == key or obj.series_uid == group[0].series_uid
    uids = {h.sop_uid for h in group if h.sop_uid}
    return bool(obj.instance_uids) and set(obj.instance_uids) <= uids


def match_label_objects(headers: list[Header], groups: dict[str, list[Header]], source: Path,
                        known: dict[int, str] | None) -> LabelMatch:
    """Match the label objects among ``headers`` to the image series ``groups`` (series key -> headers)."""
    match = LabelMatch(labels=dict(known) if known else {0: "background"})
    objects = sorted(find_label_objects([h for h in headers if is_label_object(h)]),
                     key=lambda o: (o.kind != "SEG", str(o.path)))
    used: set[Path] = set()
    for path in sorted({h.path for h in headers if is_label_object(h)} - {o.path for o in objects}):
        match.rejected.append({"source": rel(path, source),
                              "reason": "SEG/RTSTRUCT object whose references could not be read"})
    for key, group in groups.items():
        matching = [o for o in objects if _references(o, key, group)]
        present = {h.sop_uid for h in group if h.sop_uid}
        for o in [o for o in matching if present and not set(o.instance_uids) <= present]:
            # The right series, but slices it was drawn on are not here: it cannot be placed, so it labels nothing.
            missing = len(set(o.instance_uids) - present)
            match.rejected.append({"source": rel(o.path, source),
                                  "reason": f"{o.kind} references {missing} image instance(s) that are not in its "
                                            "series under SOURCE (slices missing?)"})
            used.add(o.path)
            matching.remove(o)
        if not matching:
            continue
        chosen, *others = matching
        match.by_series[key] = chosen
        used.update(o.path for o in matching)
        for o in others:
            match.rejected.append({"source": rel(o.path, source),
                                  "reason": f"not used: {rel(chosen.path, source)} ({chosen.kind}) already labels "
                                            "the same series"})
    for o in objects:
        if o.path not in used:
            match.rejected.append({"source": rel(o.path, source),
                                  "reason": f"{o.kind} references series {o.series_uid or '(none)'}, "
                                            "which is not among the image series found under SOURCE"})
    if not known:
        for o in match.by_series.values():
            for name in o.names.values():
                if name.lower() not in {n.lower() for n in match.labels.values()}:
                    match.labels[max(match.labels) + 1] = name
    return match


def remap_by_name(label: np.ndarray, names: dict[int, str], labels: dict[int, str]) -> np.ndarray:
    """Values of one object (``names``: value -> structure name) onto the data-set map ``labels`` by name.

    Raises:
        CaseRejected: a structure name is not in the data-set map (e.g. missing from ``labels.json``).
    """
    value_of = {n.lower(): v for v, n in labels.items()}
    lut = np.zeros(256, np.uint8)
    for value, name in names.items():
        if name.lower() not in value_of:
            raise CaseRejected(f"label structure {name!r} is not in the label map {sorted(labels.values())}")
        lut[value] = value_of[name.lower()]
    return lut[label]


def object_loader(geometry, obj: LabelObject, labels: dict[int, str], read_image):
    """A ``load()`` for an Item: the series' volume (``read_image(geometry)``) and its label object on that grid."""
    from medseg.ingest.common import Loaded
    from medseg.ingest.dicom_labels import rasterise_rtstruct, rasterise_seg

    def load() -> Loaded:
        image = read_image(geometry)
        rasterise = rasterise_seg if obj.kind == "SEG" else rasterise_rtstruct
        label, names = rasterise(obj.path, geometry)
        return Loaded(image, geometry.affine, remap_by_name(label, names, labels), geometry.affine)

    return load

"""The dataset contract between ingest and the later stages: ``manifest.json`` and its cases.

``manifest.json`` = ``{"layout": str, "dataset": str, "labels": {"0": "background", "1": name, ...},
"cases": [Case, ...]}``. ``dataset`` names what the data is, from the data itself (a Decathlon task's ``name``,
``acdc``; else the modality, ``ct``, or ``frames``): the registered model is ``medseg-<dataset>`` unless
``register.model_name`` says otherwise (:func:`registered_model_name`).
Image and label paths are relative to the manifest's folder. ``case_id`` and ``subject`` are pseudonyms;
``subject`` groups the cases of one patient (both ACDC frames) so that splits never leak a patient.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.common.atomic_write import read_json, write_json
from medseg.common.errors import StageInputError

__all__ = ["Case", "Manifest", "read_manifest", "write_manifest", "locked_subjects", "MANIFEST_NAME", "REPORT_NAME",
           "CACHE_NAME", "CARDIAC_LABELS", "FRAME_MODALITIES", "dataset_slug", "registered_model_name"]

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "ingest_report.json"
CACHE_NAME = ".ingest_cache.json"  # ingest's re-run cache in the same folder (file times: not part of the data)
CARDIAC_LABELS = {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
# Modalities of 2D frames (photographs: endoscopy and the like; medseg.ingest.images): no physical scale, and RGB is
# normalised per channel.
FRAME_MODALITIES = ("RGB", "GRAY")


@dataclass(frozen=True)
class Case:
    case_id: str
    subject: str
    image: str
    label: str | None
    modality: str  # "MR" or "CT"; 2D images: "RGB" or "GRAY"
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    phase: str | None = None  # ACDC: "ED" or "ES"
    group: str | None = None  # ACDC: pathology group (DCM, HCM, MINF, NOR, RV)
    channels: int = 1  # image channels (a trailing axis of the image file when > 1: RGB frames)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Case:
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k: v for k, v in raw.items() if k in names}
        clean["spacing"] = tuple(float(s) for s in clean["spacing"])
        clean["shape"] = tuple(int(s) for s in clean["shape"])
        return cls(**clean)


@dataclass(frozen=True)
class Manifest:
    root: Path
    layout: str
    labels: dict[int, str]
    cases: tuple[Case, ...]
    dataset: str | None = None  # what the data is (module docstring); None in manifests written before it

    def image_path(self, case: Case) -> Path:
        return self.root / case.image

    def label_path(self, case: Case) -> Path | None:
        return None if case.label is None else self.root / case.label

    @property
    def num_classes(self) -> int:
        """Output channels, background included."""
        return max(self.labels) + 1


def write_manifest(root: str | Path, layout: str, labels: dict[int, str], cases: list[Case],
                   name: str = MANIFEST_NAME, dataset: str | None = None) -> Path:
    payload = {
        "layout": layout,
        **({"dataset": dataset} if dataset else {}),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "cases": [c.to_json() for c in sorted(cases, key=lambda c: c.case_id)],
    }
    return write_json(Path(root) / name, payload)


def read_manifest(root: str | Path, name: str = MANIFEST_NAME, made_by: str = "medseg ingest") -> Manifest:
    root = Path(root)
    path = root / name
    if not path.is_file():
        raise StageInputError(f"no {name} in {root}: run '{made_by}' first")
    raw = read_json(path)
    return Manifest(
        root=root,
        layout=raw["layout"],
        labels={int(k): v for k, v in raw["labels"].items()},
        cases=tuple(Case.from_json(c) for c in raw["cases"]),
        dataset=raw.get("dataset"),
    )


def dataset_slug(name: str) -> str | None:
    """A data set's name as part of a registered model name: lower case, ``[a-z0-9-]``, at most 40 characters
    (``"Task04 Hippocampus"`` -> ``task04-hippocampus``); None when nothing is left."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")[:40].strip("-")
    return slug or None


def registered_model_name(params) -> str:
    """The Model Registry name of this pipeline's models: ``register.model_name`` when set, else
    ``medseg-<dataset>`` from the ingested manifest (module docstring).

    Raises:
        StageInputError: neither is there (no ingested data yet and no name set).
    """
    if params.register.model_name:
        return params.register.model_name
    try:
        manifest = read_manifest(params.paths.ingested)
    except StageInputError as err:
        raise StageInputError(f"register.model_name is null and the name comes from the data: {err}, or set "
                              f"register.model_name") from None
    return f"medseg-{manifest.dataset or manifest.layout}"


def locked_subjects(cases: list[Case], named: tuple[str, ...] | None, fraction: float, seed: int) -> list[str]:
    """The subjects of the locked test set (``preprocess.test_cases`` / ``test_fraction``), sorted.

    Named entries are subjects or case ids (a case id brings its whole subject: a patient is never split). Else
    ``fraction`` of the labelled subjects (at least one when above 0), drawn with ``seed`` round-robin over the
    groups, so that each group (e.g. ACDC's pathologies) is represented. Plan and preprocess both call this: the
    test subjects are never planned on, cross-validated or trained on.

    Raises:
        StageInputError: a named entry matches no case.
    """
    import numpy as np

    labelled = [c for c in cases if c.label is not None]
    if named:
        subject_of = {c.case_id: c.subject for c in labelled} | {c.subject: c.subject for c in labelled}
        missing = [n for n in named if n not in subject_of]
        if missing:
            raise StageInputError(f"preprocess.test_cases {missing[:5]} are not labelled subjects or case ids of "
                                  f"the ingested data")
        return sorted({subject_of[n] for n in named})
    subjects = sorted({c.subject for c in labelled})
    if fraction <= 0 or not subjects:
        return []
    group_of = {c.subject: c.group or "" for c in labelled}
    rng = np.random.default_rng(seed)
    by_group = {g: [s for s in subjects if group_of[s] == g] for g in sorted(set(group_of.values()))}
    queues = [list(rng.permutation(members)) for members in by_group.values()]
    wanted = max(1, round(fraction * len(subjects)))
    chosen: list[str] = []
    while len(chosen) < wanted:
        for queue in queues:
            if queue and len(chosen) < wanted:
                chosen.append(str(queue.pop()))
    return sorted(chosen)

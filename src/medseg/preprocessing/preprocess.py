"""Preprocess stage: RAS orientation, resampling, normalisation and foreground crop; patient-level k-fold splits.

Reads ``<paths.ingested>/manifest.json`` and the plan (``<paths.plans>/plans.json``: target spacing,
normalisation); writes ``<paths.preprocessed>/{images,labels}/<case>.nii.gz``, ``dataset.json`` (a manifest of the
preprocessed cases) and ``splits.json``. The whole output folder is swapped in
atomically at the end.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from medseg.common.atomic_write import atomic_dir, read_json, write_json
from medseg.common.case_map import CaseMap, in_order
from medseg.common.errors import StageInputError
from medseg.common.manifest import Case, Manifest, read_manifest, locked_subjects, write_manifest
from medseg.common.params import Params
from medseg.planning.plan import Plan, read_plan

__all__ = ["run", "make_splits", "read_splits", "read_test_set", "case_set_hash", "read_dataset", "DATASET_NAME",
           "SPLITS_NAME"]

log = logging.getLogger(__name__)

DATASET_NAME = "dataset.json"
SPLITS_NAME = "splits.json"


def make_splits(cases: list[Case], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """k folds over *subjects* (all cases of a patient on one side), groups spread round-robin across folds."""
    by_subject: dict[str, list[str]] = defaultdict(list)
    group_of: dict[str, str] = {}
    for c in cases:
        by_subject[c.subject].append(c.case_id)
        group_of[c.subject] = c.group or ""
    subjects = sorted(by_subject)
    random.Random(seed).shuffle(subjects)
    subjects.sort(key=lambda s: group_of[s])  # stable: shuffled within each group, groups dealt in turn
    if len(subjects) < folds:
        raise StageInputError(f"{len(subjects)} labelled patients cannot make {folds} folds (preprocess.folds)")
    fold_of = {s: i % folds for i, s in enumerate(subjects)}
    splits = []
    for k in range(folds):
        val = sorted(cid for s in subjects if fold_of[s] == k for cid in by_subject[s])
        train = sorted(cid for s in subjects if fold_of[s] != k for cid in by_subject[s])
        splits.append({"train": train, "val": val})
    return splits


def case_set_hash(case_ids: list[str]) -> str:
    """SHA-256 of the sorted test case ids: the same test set, the same hash (recorded in splits.json and on every
    model version compared on it)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(case_ids)).encode()).hexdigest()


def read_test_set(preprocessed: str | Path) -> tuple[list[str], str]:
    """The locked test set's case ids (ingest's pseudonyms) and hash; empty when there is none."""
    raw = read_json(Path(preprocessed) / SPLITS_NAME)
    test = list(raw.get("test", []))
    return test, raw.get("test_hash", case_set_hash(test))


def read_splits(preprocessed: str | Path, fold: int) -> dict[str, list[str]]:
    splits = read_json(Path(preprocessed) / SPLITS_NAME)["splits"]
    if not 0 <= fold < len(splits):
        raise StageInputError(f"fold {fold} not in splits.json (it has {len(splits)} folds)")
    return splits[fold]


def _preprocess_case(manifest: Manifest, case: Case, plan: Plan, out: Path) -> Case:
    """One case into ``out`` (images/, labels/); its entry in dataset.json. A module-level function: the Prefect
    flow may run it in another process (:mod:`medseg.common.case_map`)."""
    import numpy as np

    from medseg.common.atomic_write import save_nifti
    from medseg.preprocessing.transforms import IMAGE, LABEL, preprocess_transforms

    if case.modality not in plan.normalization:
        raise StageInputError(f"case {case.case_id}: modality {case.modality} is not in plans.json "
                              f"(planned: {sorted(plan.normalization)}); re-run 'medseg plan'")
    chain = preprocess_transforms(plan.normalization[case.modality], plan.target_spacing)
    data = chain({IMAGE: str(manifest.image_path(case)), LABEL: str(manifest.label_path(case))})
    image, label = data[IMAGE], data[LABEL]
    affine = image.affine.numpy()
    image_rel, label_rel = f"images/{case.case_id}.nii.gz", f"labels/{case.case_id}.nii.gz"
    pixels = image.numpy()  # channel first; on disk a single channel is dropped, several go last (NIfTI's 4th axis)
    save_nifti(out / image_rel, pixels[0] if len(pixels) == 1 else np.moveaxis(pixels, 0, -1), affine, dtype="float32")
    save_nifti(out / label_rel, label[0].numpy(), affine, dtype="uint8")
    shape = tuple(int(s) for s in image.shape[1:])
    spacing = tuple(float(s) for s in plan.target_spacing)
    return Case(case.case_id, case.subject, image_rel, label_rel, case.modality, spacing, shape, case.phase, case.group,
                case.channels)


def run(params: Params, case_map: CaseMap = in_order) -> dict:
    """Preprocess every labelled case of the ingested manifest, one ``case_map`` call each (the Prefect flow's runs
    a task per case); returns a small summary."""
    from tqdm import tqdm

    manifest = read_manifest(params.paths.ingested)
    labelled = [c for c in manifest.cases if c.label is not None]
    if not labelled:
        raise StageInputError(f"{params.paths.ingested}/manifest.json has no labelled cases to train on")
    skipped = len(manifest.cases) - len(labelled)
    if skipped:
        log.warning("skipping %d cases without labels", skipped)
    pre = params.preprocess
    locked = set(locked_subjects(manifest.cases, pre.test_cases, pre.test_fraction, pre.seed))
    test = sorted(c.case_id for c in labelled if c.subject in locked)
    labelled = [c for c in labelled if c.subject not in locked]  # the test set is locked away: not preprocessed
    if test:
        log.info("locked test set: %d cases of %d subjects, never trained or cross-validated on", len(test),
                 len(locked))
    splits = make_splits(labelled, params.preprocess.folds, params.preprocess.seed)
    plan = read_plan(params.paths.plans)
    with atomic_dir(params.paths.preprocessed) as out:
        cases: list[Case] = [None] * len(labelled)  # type: ignore[list-item]
        calls = [(manifest, c, plan, out) for c in labelled]
        with tqdm(total=len(calls), desc="preprocess", unit="case", disable=None) as bar:
            for index, case in case_map(_preprocess_case, calls):
                cases[index] = case
                bar.update()
        write_manifest(out, "preprocessed", manifest.labels, cases, name=DATASET_NAME, dataset=manifest.dataset)
        write_json(out / SPLITS_NAME, {"folds": params.preprocess.folds, "seed": params.preprocess.seed,
                                       "unit": "subject", "splits": splits, "test": test,
                                       "test_hash": case_set_hash(test)})
    log.info("preprocessed %d cases into %s", len(cases), params.paths.preprocessed)
    return {"cases": len(cases), "skipped_unlabelled": skipped, "folds": params.preprocess.folds,
            "out": params.paths.preprocessed}


def read_dataset(preprocessed: str | Path) -> Manifest:
    """The preprocessed cases (same schema as the ingest manifest)."""
    return read_manifest(preprocessed, DATASET_NAME, made_by="medseg preprocess")

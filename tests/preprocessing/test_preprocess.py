import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.planning import plan

from medseg.preprocessing import preprocess
from medseg.common.errors import StageInputError
from medseg.common.manifest import Case


def test_outputs_are_ras_at_target_spacing_and_normalised(tiny_ingested, params_for):
    params = params_for(paths={"ingested": str(tiny_ingested)}, plan={"target_spacing": [1.0, 2.0, 8.0]})
    plan.run(params)
    summary = preprocess.run(params)
    assert summary["cases"] == 6
    dataset = preprocess.read_dataset(params.paths.preprocessed)
    for case in dataset.cases:
        image = nib.load(str(dataset.image_path(case)))
        label = nib.load(str(dataset.label_path(case)))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        np.testing.assert_allclose(image.header.get_zooms(), (1.0, 2.0, 8.0), atol=1e-4)
        np.testing.assert_allclose(image.affine, label.affine)
        assert image.shape == label.shape == case.shape
        data = np.asarray(image.dataobj)
        assert abs(data.mean()) < 0.2 and 0.8 < data.std() < 1.2
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}


def test_flipped_input_is_reoriented_not_mirrored(tmp_path, tiny_ingested, params_for):
    """An LAS copy of a case gives the same preprocessed label as the RAS original."""
    from medseg.common.manifest import read_manifest, write_manifest

    manifest = read_manifest(tiny_ingested)
    case = manifest.cases[0]
    for kind in ("images", "labels"):
        img = nib.load(str(tiny_ingested / kind / f"{case.case_id}.nii.gz"))
        flipped = np.asarray(img.dataobj)[::-1]
        affine = img.affine @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(flipped, affine), str(tiny_ingested / kind / "flipped.nii.gz"))
    copy = Case("sub-9999_ED", "sub-9999", "images/flipped.nii.gz", "labels/flipped.nii.gz", "MR",
                case.spacing, case.shape)
    write_manifest(tiny_ingested, manifest.layout, manifest.labels, [*manifest.cases, copy])
    params = params_for(paths={"ingested": str(tiny_ingested)})
    plan.run(params)
    preprocess.run(params)
    out = Path(params.paths.preprocessed) / "labels"
    original = np.asarray(nib.load(str(out / f"{case.case_id}.nii.gz")).dataobj)
    reoriented = np.asarray(nib.load(str(out / "sub-9999_ED.nii.gz")).dataobj)
    np.testing.assert_array_equal(original, reoriented)


def test_splits_keep_each_patient_on_one_side(tiny_ingested, params_for):
    params = params_for(paths={"ingested": str(tiny_ingested)})
    plan.run(params)
    preprocess.run(params)
    splits = json.loads((Path(params.paths.preprocessed) / "splits.json").read_text())
    assert splits["folds"] == 3 and len(splits["splits"]) == 3
    all_val = []
    for split in splits["splits"]:
        train_subjects = {c.rsplit("_", 1)[0] for c in split["train"]}
        val_subjects = {c.rsplit("_", 1)[0] for c in split["val"]}
        assert not train_subjects & val_subjects
        all_val += split["val"]
    assert sorted(all_val) == sorted({c for s in splits["splits"] for c in s["train"] + s["val"]})


def test_too_few_patients_for_the_folds(tiny_ingested, params_for):
    params = params_for(paths={"ingested": str(tiny_ingested)}, preprocess={"folds": 4})
    plan.run(params)
    with pytest.raises(StageInputError, match="3 labelled patients cannot make 4 folds"):
        preprocess.run(params)
    assert not Path(params.paths.preprocessed).exists()


def test_interrupted_preprocess_leaves_no_output(tiny_ingested, params_for, monkeypatch):
    params = params_for(paths={"ingested": str(tiny_ingested)})
    plan.run(params)
    calls = {"n": 0}
    real = preprocess._preprocess_case

    def dies_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(preprocess, "_preprocess_case", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        preprocess.run(params)
    out = Path(params.paths.preprocessed)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_preprocess_needs_a_plan(tiny_ingested, params_for):
    params = params_for(paths={"ingested": str(tiny_ingested)})
    with pytest.raises(StageInputError, match="plans.json not found: run 'medseg plan'"):
        preprocess.run(params)

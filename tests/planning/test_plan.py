"""The planner: spacing, 2D/3D, patch and batch within the memory budget, DynUNet topology, CT normalisation."""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.planning import plan

from medseg.preprocessing import preprocess
from medseg.common.errors import StageInputError
from medseg.planning.plan import dynunet_topology, estimate_step_mb, make_plan, read_plan


def fingerprint_of(spacings, shapes, modality="MR", stats=None):
    cases = [{"case_id": f"c{i}", "modality": modality, "spacing": list(sp), "shape": list(sh),
              "foreground_fraction": 0.1} for i, (sp, sh) in enumerate(zip(spacings, shapes))]
    return {"cases": cases, "modalities": {modality: {"cases": len(cases), "foreground_intensity": stats or {}}},
            "labels": {"0": "background", "1": "a"}}


def planning_params(params_for, **plan_overrides):
    return params_for(plan={"target_spacing": None, "spatial_dims": None, "patch_size": None, "batch_size": None,
                            "ct_clip": None, **plan_overrides})


def test_anisotropic_data_gets_a_2d_plan_at_median_spacing(params_for):
    prints = fingerprint_of([(1.2, 1.2, 10.0), (1.6, 1.6, 8.0), (1.4, 1.4, 9.0)],
                            [(200, 180, 10), (160, 150, 12), (180, 170, 11)])
    p = make_plan(prints, planning_params(params_for, memory_budget_mb=1e6))
    assert p.spatial_dims == 2 and p.target_spacing == (1.4, 1.4, 9.0)
    assert p.patch_size[2] == 1
    # the whole median slice fits a huge budget; rounded up to the network's divisor (strides 2, 2 -> 4)
    assert all(s % 4 == 0 for s in p.patch_size[:2])
    assert p.patch_size[0] >= p.median_shape[0] and p.patch_size[1] >= p.median_shape[1]


def test_isotropic_data_gets_a_3d_plan(params_for):
    prints = fingerprint_of([(1.0, 1.0, 1.5)] * 3, [(128, 128, 96)] * 3)
    p = make_plan(prints, planning_params(params_for))
    assert p.spatial_dims == 3 and p.patch_size[2] > 1


@pytest.mark.parametrize("budget", [20.0, 60.0, 400.0])
def test_patch_and_batch_fit_the_memory_budget(params_for, budget):
    prints = fingerprint_of([(1.0, 1.0, 1.0)] * 4, [(160, 160, 160)] * 4)
    params = planning_params(params_for, memory_budget_mb=budget)
    p = make_plan(prints, params)
    model = params.section("model")
    assert p.batch_size >= 2
    assert estimate_step_mb(model, 3, p.target_spacing, p.patch_size, p.batch_size) <= budget
    assert p.estimated_step_mb <= budget


def test_a_bigger_budget_never_plans_less(params_for):
    prints = fingerprint_of([(1.0, 1.0, 1.0)] * 4, [(160, 160, 160)] * 4)
    small = make_plan(prints, planning_params(params_for, memory_budget_mb=20.0))
    large = make_plan(prints, planning_params(params_for, memory_budget_mb=400.0))
    assert math.prod(large.patch_size) * large.batch_size > math.prod(small.patch_size) * small.batch_size


def test_params_override_every_planned_value(params_for):
    prints = fingerprint_of([(1.0, 1.0, 1.0)] * 3, [(64, 64, 64)] * 3, "CT",
                            {"mean": 40.0, "std": 30.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0})
    params = params_for(plan={"target_spacing": [2.0, 2.0, 2.0], "spatial_dims": 2, "patch_size": [32, 32, 1],
                              "batch_size": 7, "ct_clip": [-50.0, 150.0]})
    p = make_plan(prints, params)
    assert (p.spatial_dims, p.target_spacing, p.patch_size, p.batch_size) == (2, (2.0, 2.0, 2.0), (32, 32, 1), 7)
    assert p.normalization["CT"]["clip"] == [-50.0, 150.0]
    assert set(p.overridden) == {"target_spacing", "spatial_dims", "patch_size", "batch_size", "ct_clip"}


def test_patch_the_network_cannot_halve_is_refused(params_for):
    prints = fingerprint_of([(1.0, 1.0, 5.0)] * 3, [(64, 64, 10)] * 3)
    with pytest.raises(StageInputError, match=r"not divisible by \[4, 4\]"):
        make_plan(prints, params_for(plan={"patch_size": [30, 32, 1], "spatial_dims": None}))


def test_2d_patch_on_a_3d_plan_says_what_to_set(params_for):
    prints = fingerprint_of([(1.0, 1.0, 1.5)] * 3, [(64, 64, 40)] * 3)
    with pytest.raises(StageInputError, match="set plan.spatial_dims: 2"):
        make_plan(prints, params_for(plan={"patch_size": [48, 48, 1], "spatial_dims": None}))


def test_dynunet_topology_waits_for_the_thick_axis():
    strides, kernels = dynunet_topology((0.8, 0.8, 4.0), (160, 160, 20), levels=5)
    assert strides[0] == [1, 1, 1]
    assert strides[1] == [2, 2, 1] and kernels[0] == [3, 3, 1]  # 4 mm slices: not downsampled, no 3-wide kernel
    assert strides[2] == [2, 2, 1] and strides[3] == [2, 2, 2]  # in-plane caught up (3.2 mm): now all axes
    assert kernels[-1] == [3, 3, 3]
    assert all(s[2] == 1 for s in strides[:3])


def test_dynunet_never_shrinks_a_feature_map_below_four():
    strides, _ = dynunet_topology((1.0, 1.0), (32, 16), levels=5)
    sizes = [32, 16]
    for stride in strides:
        sizes = [s // t for s, t in zip(sizes, stride)]
    assert min(sizes) >= 4


def test_plan_stage_writes_fingerprint_and_plan(tiny_ingested, params_for):
    params = params_for(paths={"ingested": str(tiny_ingested)},
                        plan={"spatial_dims": None, "patch_size": None, "batch_size": None})
    summary = plan.run(params)
    out = Path(params.paths.plans)
    prints = json.loads((out / "fingerprint.json").read_text())
    assert len(prints["cases"]) == 6 and prints["cases"][0]["spacing"] == [1.5, 1.5, 8.0]
    stats = prints["modalities"]["MR"]["foreground_intensity"]
    assert 150 < stats["mean"] < 450  # blobs at 200-500 on a 100 background: foreground only
    planned = read_plan(out)
    assert planned.spatial_dims == 2 and summary["patch_size"] == list(planned.patch_size)
    assert planned.normalization == {"MR": {"scheme": "zscore"}}
    saved = json.loads((out / "plans.json").read_text())
    assert saved["network"]["spatial_dims"] == 2 and saved["network"]["name"] == "unet"
    assert planned.network == saved["network"]  # what train builds is what the plan wrote, not recomputed
    assert "channels" not in saved and "strides" not in saved  # written once, inside the network spec
    plan.check_network_current(planned, params.section("model"))  # unchanged params: current
    for change in ({"norm": "batch"}, {"channels": [8, 16, 32, 64], "strides": [2, 2, 2]}, {"name": "dynunet"}):
        edited = params_for(paths={"ingested": str(tiny_ingested)}, model=change)
        with pytest.raises(StageInputError, match="run 'medseg plan'"):
            plan.check_network_current(planned, edited.section("model"))


def test_ras_geometry_follows_the_affine_not_the_voxel_order(tmp_path):
    from medseg.planning.fingerprint import ras_geometry

    # voxel axes (z, x, y) on disk, e.g. a sagittal-stored stack: spacing must come out in RAS order
    affine = np.array([[0, 1.5, 0, 0], [0, 0, -1.5, 0], [8.0, 0, 0, 0], [0, 0, 0, 1]])
    spacing, shape = ras_geometry(affine, (10, 200, 180))
    assert spacing == [1.5, 1.5, 8.0] and shape == [200, 180, 10]


def test_ct_is_clipped_and_normalised_with_dataset_statistics(tmp_path, params_for):
    from medseg.common.atomic_write import save_nifti
    from medseg.common.manifest import Case, write_manifest

    root = tmp_path / "ingested"
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        image = rng.normal(-900, 10, (40, 40, 12)).astype(np.float32)  # air
        label = np.zeros(image.shape, np.uint8)
        label[10:30, 10:30, 2:10] = 1
        image[label == 1] = rng.normal(60, 15, int(label.sum()))
        image[20, 20, 5] = 3000.0  # a metal voxel inside the organ: clipped by the planned window
        save_nifti(root / "images" / f"c{i}.nii.gz", image, np.diag([1.0, 1.0, 2.5, 1.0]))
        save_nifti(root / "labels" / f"c{i}.nii.gz", label, np.diag([1.0, 1.0, 2.5, 1.0]), dtype=np.uint8)
        cases.append(Case(f"c{i}", f"s{i}", f"images/c{i}.nii.gz", f"labels/c{i}.nii.gz", "CT", (1.0, 1.0, 2.5),
                          image.shape))
    write_manifest(root, "nifti", {0: "background", 1: "organ"}, cases)
    params = params_for(paths={"ingested": str(root)}, preprocess={"folds": 2},
                        plan={"patch_size": [16, 16, 8], "spatial_dims": 3, "batch_size": 2})
    plan.run(params)
    norm = read_plan(params.paths.plans).normalization["CT"]
    assert norm["scheme"] == "ct" and 0 < norm["clip"][0] < 60 < norm["clip"][1] < 200
    preprocess.run(params)
    data = preprocess.read_dataset(params.paths.preprocessed)
    image = np.asarray(nib.load(str(data.image_path(data.cases[0]))).dataobj)
    label = np.asarray(nib.load(str(data.label_path(data.cases[0]))).dataobj)
    organ = image[label == 1]
    assert abs(organ.mean()) < 0.3 and organ.max() <= (norm["clip"][1] - norm["mean"]) / norm["std"] + 1e-3


def _rgb_frames_params(params_for, **model):
    return params_for(plan={"target_spacing": None, "spatial_dims": None, "patch_size": None, "batch_size": None,
                            "ct_clip": None, "memory_budget_mb": 300},
                      model={"channels": None, "strides": None, **model})


def _frames_fingerprint(modality="RGB"):
    spacings = [(100 / w, 100 / w, 999.0) for w in (384, 622, 1350)]
    return fingerprint_of(spacings, [(384, 288, 1), (622, 528, 1), (1350, 1080, 1)], modality=modality)


def test_rgb_frames_plan_the_pretrained_encoder_when_its_weights_are_installed(params_for, monkeypatch, tmp_path):
    weights = tmp_path / "lite0.pth"
    weights.write_bytes(b"weights")
    p = make_plan(_frames_fingerprint(), _rgb_frames_params(params_for, encoder_weights=str(weights)))
    assert p.network["encoder"] == "efficientnet-lite0" and p.network["channels"] == [16, 32, 64, 128, 256, 320]
    assert len(p.network["encoder_sha256"]) == 64
    assert p.normalization["RGB"] == {"scheme": "imagenet", "mean": [0.485, 0.456, 0.406],
                                      "std": [0.229, 0.224, 0.225], "max_value": 255.0}
    assert p.batch_size >= plan.BATCH_NORM_MIN_BATCH and all(s % 32 == 0 for s in p.patch_size[:2])
    scratch = make_plan(_frames_fingerprint(), _rgb_frames_params(params_for, encoder="none"))
    assert scratch.network["encoder"] is None and scratch.normalization["RGB"]["scheme"] == "zscore"
    assert p.patch_size == scratch.patch_size and p.target_spacing == scratch.target_spacing  # same frame size
    gray = make_plan(_frames_fingerprint("GRAY"), _rgb_frames_params(params_for, encoder_weights=str(weights)))
    assert gray.network["encoder"] is None  # ImageNet encoders take RGB


def test_missing_weights_train_from_scratch_with_one_line_or_stop_when_named(params_for, tmp_path, caplog):
    absent = str(tmp_path / "absent.pth")
    with caplog.at_level("WARNING", logger="medseg.planning.plan"):
        p = make_plan(_frames_fingerprint(), _rgb_frames_params(params_for, encoder_weights=absent))
    assert p.network["encoder"] is None
    notes = [r.getMessage() for r in caplog.records if "from scratch" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "pretrained" in notes[0]
    with pytest.raises(StageInputError, match="weights not found"):
        make_plan(_frames_fingerprint(), _rgb_frames_params(params_for, encoder="efficientnet-lite0",
                                                            encoder_weights=absent))
    with pytest.raises(StageInputError, match="takes 2D RGB frames"):
        make_plan(fingerprint_of([(1.0, 1.0, 1.0)] * 3, [(64, 64, 64)] * 3),
                  _rgb_frames_params(params_for, encoder="efficientnet-lite0"))


def test_the_imagenet_scheme_maps_8_bit_rgb_to_imagenet_statistics():
    import torch

    from medseg.preprocessing.transforms import IMAGE, LABEL, preprocess_transforms

    pixels = torch.stack([torch.full((8, 6, 1), 255.0), torch.full((8, 6, 1), 0.0), torch.full((8, 6, 1), 116.0)])
    from monai.data import MetaTensor

    image = MetaTensor(pixels, affine=torch.eye(4))
    label = MetaTensor(torch.ones(1, 8, 6, 1), affine=torch.eye(4))
    chain = preprocess_transforms({"scheme": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                   "max_value": 255.0}, (1.0, 1.0, 1.0), load=False)
    out = chain({IMAGE: image, LABEL: label})[IMAGE]
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (116 / 255 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        assert float(out[channel].mean()) == pytest.approx(value, abs=1e-4)

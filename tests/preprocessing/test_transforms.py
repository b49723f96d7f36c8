import numpy as np
import pytest
import torch
from monai.transforms import Randomizable

from medseg.common.atomic_write import save_nifti
from medseg.common.params import load_params
from medseg.preprocessing.transforms import ForegroundSelect, train_transforms
from tests.conftest import REPO, write_tiny_volume


def augmentation():
    return load_params(REPO / "params.yaml").train.augmentation


@pytest.mark.parametrize(("dims", "patch"), [(2, (32, 32, 1)), (3, (32, 32, 4))])
def test_train_patches_have_patch_shape(tmp_path, dims, patch):
    image, label = write_tiny_volume(1, shape=(40, 36, 5))
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    item = {"image": str(save_nifti(tmp_path / "i.nii.gz", image, affine)),
            "label": str(save_nifti(tmp_path / "l.nii.gz", label, affine, dtype=np.uint8))}
    cached, random = train_transforms(dims, patch, samples_per_volume=3, num_classes=4, augmentation=augmentation())
    samples = random(cached(item))
    assert len(samples) == 3
    expected = patch[:2] if dims == 2 else patch
    for s in samples:
        assert tuple(s["image"].shape) == (1, *expected) and tuple(s["label"].shape) == (1, *expected)
        assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.int64
        assert set(s) == {"image", "label"}  # the cached class positions do not reach the batch


def test_the_cached_part_is_deterministic_and_the_random_part_holds_every_random_transform():
    """A cache holds ``cached``'s output once: no random transform may sit in it, and loading and padding must."""
    from monai.transforms import ClassesToIndicesd, LoadImaged, RandCropByLabelClassesd, SpatialPadd

    cached, random = train_transforms(2, (32, 32, 1), 2, 4, augmentation())
    assert not any(isinstance(t, Randomizable) for t in cached.transforms)
    assert {LoadImaged, SpatialPadd, ClassesToIndicesd} <= {type(t) for t in cached.transforms}
    assert isinstance(random.transforms[0], RandCropByLabelClassesd)
    _, random = train_transforms(2, (32, 32, 1), 2, 4, augmentation(), foreground_fraction=0.33)
    assert type(random.transforms[0]).__name__ == "OneOf"


@pytest.mark.parametrize("fraction", [0.0, 0.33, 1.0])
def test_foreground_fraction_of_patches_is_centred_on_a_labelled_class(tmp_path, fraction):
    """A volume whose only labelled voxel sits in one corner slice: a patch contains it only when centred on it."""
    import dataclasses

    image = np.random.default_rng(0).normal(size=(64, 64, 20)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[5, 5, 3] = 2
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    item = {"image": str(save_nifti(tmp_path / "i.nii.gz", image, affine)),
            "label": str(save_nifti(tmp_path / "l.nii.gz", label, affine, dtype=np.uint8))}
    off = dataclasses.replace(augmentation(), **{f: 0.0 for f in ("rotate_prob", "scale_prob", "flip_prob",
                                                                  "noise_prob", "blur_prob", "brightness_prob",
                                                                  "contrast_prob", "lowres_prob",
                                                                  "inverted_gamma_prob", "gamma_prob")})
    cached, random = train_transforms(2, (16, 16, 1), 1, 4, off, foreground_fraction=fraction)
    random.set_random_state(seed=0)
    data = cached(item)
    hits = np.mean([bool((random(data)[0]["label"] == 2).any()) for _ in range(300)])
    # anywhere: the labelled slice is 1 of 20 and the patch a sixteenth of it
    assert abs(hits - fraction) < 0.08


def test_zero_probabilities_leave_augmentation_out():
    import dataclasses

    off = dataclasses.replace(augmentation(), rotate_prob=0.0, scale_prob=0.0, flip_prob=0.0, noise_prob=0.0,
                              gamma_prob=0.0, contrast_prob=0.0, blur_prob=0.0, brightness_prob=0.0, lowres_prob=0.0,
                              inverted_gamma_prob=0.0, colour_prob=0.0)
    _, random = train_transforms(3, (16, 16, 4), 1, 4, off)
    assert [type(t).__name__ for t in random.transforms] == ["RandCropByLabelClassesd", "DeleteItemsd", "EnsureTyped"]
    _, random = train_transforms(3, (16, 16, 4), 1, 4, augmentation())
    names = [type(t).__name__ for t in random.transforms]
    assert names.count("RandFlipd") == 3
    assert {"RandRotated", "RandZoomd", "RandGaussianNoised", "RandAdjustContrastd", "RandGaussianSmoothd",
            "RandScaleIntensityd", "RandScaleIntensityFixedMeand", "RandSimulateLowResolutiond",
            "RandColourShiftd"} <= set(names)
    assert names.count("RandAdjustContrastd") == 2  # gamma on the inverted and on the plain image


@pytest.mark.parametrize("dims, patch, expected", [(2, (224, 192, 1), 180.0), (2, (256, 96, 1), 15.0),
                                                   (3, (64, 64, 32), 30.0)])
def test_rotation_range_follows_nnunet_unless_set(dims, patch, expected):
    import dataclasses

    from medseg.preprocessing.augmentation import rotation_range_deg

    assert rotation_range_deg(dims, patch, augmentation()) == expected
    assert rotation_range_deg(dims, patch, dataclasses.replace(augmentation(), rotate_range_deg=10.0)) == 10.0


def test_foreground_select_excludes_air():
    x = np.zeros((10, 10, 2), np.float32)
    x[2:8, 2:8] = 100
    assert ForegroundSelect()(x).sum() == 72


def test_zscore_matches_monai_and_does_not_depend_on_the_thread_count():
    from monai import transforms as mt

    from medseg.preprocessing.transforms import ZScored

    image = torch.as_tensor(np.random.default_rng(3).gamma(2.0, 40.0, (1, 197, 196, 12)).astype(np.float32))
    expected = mt.NormalizeIntensityd("image")({"image": image.clone()})["image"]
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outputs.append(ZScored("image")({"image": image.clone()})["image"])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], torch.as_tensor(expected), rtol=0, atol=1e-5)
    assert torch.equal(ZScored("image")({"image": torch.full((1, 4, 4, 4), 7.0)})["image"], torch.zeros(1, 4, 4, 4))


def test_clip_is_monais_identity_rescale_with_clipping_and_keeps_the_meta_data():
    from monai import transforms as mt
    from monai.data import MetaTensor

    from medseg.preprocessing.transforms import ClipIntensityd

    values = np.random.default_rng(4).normal(40.0, 300.0, (1, 30, 20, 6)).astype(np.float32)
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(values), affine=affine)
    clipped = ClipIntensityd("image", -150.0, 250.0)({"image": image})["image"]
    expected = mt.ScaleIntensityRanged("image", a_min=-150.0, a_max=250.0, b_min=-150.0, b_max=250.0,
                                       clip=True)({"image": image})["image"]
    assert torch.equal(clipped.as_tensor(), torch.from_numpy(np.clip(values, -150.0, 250.0)))
    torch.testing.assert_close(clipped.as_tensor(), expected.as_tensor(), rtol=0, atol=1e-4)
    assert isinstance(clipped, MetaTensor) and torch.equal(clipped.affine, affine)
    assert torch.equal(image.as_tensor(), torch.from_numpy(values))  # the input is left as it was
    np.testing.assert_array_equal(ClipIntensityd("image", 0, 1)({"image": values})["image"], np.clip(values, 0, 1))


def test_colour_shift_moves_each_rgb_channel_by_its_own_offset_and_leaves_gray_alone():
    from medseg.preprocessing.augmentation import RandColourShiftd

    shift = RandColourShiftd("image", prob=1.0)
    shift.set_random_state(0)
    rgb = torch.zeros(3, 8, 8)
    out = shift({"image": rgb})["image"]
    offsets = out.reshape(3, -1)
    assert torch.all(offsets == offsets[:, :1]) and len(set(offsets[:, 0].tolist())) == 3
    assert float(offsets.abs().max()) <= 0.2
    gray = torch.zeros(1, 8, 8)
    assert torch.equal(shift({"image": gray})["image"], gray)
    never = RandColourShiftd("image", prob=0.0)
    assert torch.equal(never({"image": rgb})["image"], rgb)


def test_frames_leave_out_the_scanner_transforms_that_volumes_keep():
    import dataclasses

    every = dataclasses.replace(augmentation(), skip_for_frames=("noise", "lowres", "gamma"))
    scan = [type(t).__name__ for t in train_transforms(2, (16, 16, 1), 1, 2, every)[1].transforms]
    frame = [type(t).__name__ for t in train_transforms(2, (16, 16, 1), 1, 2, every, frames=True)[1].transforms]
    assert {"RandGaussianNoised", "RandSimulateLowResolutiond"} <= set(scan)
    assert not {"RandGaussianNoised", "RandSimulateLowResolutiond"} & set(frame)
    assert scan.count("RandAdjustContrastd") == 2 and frame.count("RandAdjustContrastd") == 1  # inverted gamma kept
    assert set(scan) - set(frame) == {"RandGaussianNoised", "RandSimulateLowResolutiond"}
    unskipped = dataclasses.replace(every, skip_for_frames=None)
    assert [type(t).__name__ for t in train_transforms(2, (16, 16, 1), 1, 2, unskipped, frames=True)[1].transforms] \
        == scan


def test_skip_for_frames_names_only_known_transforms(tmp_path):
    import yaml

    from medseg.common.params import ParamsError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["augmentation"]["skip_for_frames"] = ["noise", "sharpen"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="skip_for_frames"):
        load_params(tmp_path / "params.yaml")


def _spacing_pair(affine, keys=("image",), modes=("bilinear",)):
    from monai import transforms as mt

    from medseg.preprocessing.transforms import AxisAlignedSpacingd

    args = dict(keys=list(keys), pixdim=(0.8, 0.9, 2.5), mode=list(modes), dtype=np.float32)
    return AxisAlignedSpacingd(**args), mt.Spacingd(**args)


def _as_meta(array, affine):
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine))


@pytest.mark.parametrize("oblique", [False, True])
def test_axis_aligned_spacing_is_monais_spacing_with_the_same_record_and_inverse(oblique):
    """Pixels to float32 rounding, and the affine, shape and traced operation exactly: MONAI inverts it as its own.
    An oblique image too: spacing keeps its directions, so its voxel map keeps the axes."""
    from monai.transforms import Invertd

    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    affine[:3, 3] = [4.0, -2.0, 9.0]
    if oblique:
        affine[:3, :3] = np.array([[1, 0, 0], [0, 0.96, -0.28], [0, 0.28, 0.96]]) @ affine[:3, :3]
    ct = np.asfortranarray(np.random.default_rng(0).integers(-1000, 1500, (40, 36, 12)).astype(np.int16))
    fast, monai = _spacing_pair(affine)
    ours, reference = fast({"image": _as_meta(ct, affine)}), monai({"image": _as_meta(ct, affine)})
    assert ours["image"].dtype == torch.float32 and ours["image"].shape == reference["image"].shape
    np.testing.assert_allclose(np.asarray(ours["image"]), np.asarray(reference["image"]), atol=2500 * 1e-5)  # float32 positions in grid_sample
    assert not np.array_equal(np.asarray(ours["image"]), np.asarray(reference["image"]))  # really ours, not MONAI's
    np.testing.assert_array_equal(ours["image"].affine, reference["image"].affine)
    (op,), (ref_op,) = ours["image"].applied_operations, reference["image"].applied_operations
    assert {k: v for k, v in op.items() if k not in ("id", "extra_info")} == \
        {k: v for k, v in ref_op.items() if k not in ("id", "extra_info")}
    assert str(op["extra_info"]) == str(ref_op["extra_info"])
    back = Invertd("image", transform=fast, orig_keys="image", nearest_interp=False)(ours)["image"]
    assert back.shape == (1, *ct.shape)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)


@pytest.mark.parametrize("case", ["with_label", "unchanged"])
def test_axis_aligned_spacing_leaves_everything_else_to_monai(case):
    """A nearest-neighbour key (with the image) and an image already at the spacing are MONAI's, bit for bit."""
    affine = np.diag([0.8, 0.9, 2.5, 1.0]) if case == "unchanged" else np.diag([0.7, 0.7, 2.0, 1.0])
    image = np.random.default_rng(1).normal(size=(30, 26, 10)).astype(np.float32)
    keys, modes = (("image", "label"), ("bilinear", "nearest")) if case == "with_label" else (("image",), ("bilinear",))
    data = {"image": _as_meta(image, affine)}
    if case == "with_label":
        data["label"] = _as_meta((image > 0).astype(np.float32), affine)
    fast, monai = _spacing_pair(affine, keys, modes)
    ours, reference = fast(dict(data)), monai(dict(data))
    for key in keys:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]))


def _spatial_and_gamma(random):
    """The rotation, zoom and the two gamma transforms (inverted first, as built) of a random training chain."""
    from monai import transforms as mt

    rotate, = [t for t in random.transforms if isinstance(t, mt.RandRotated)]
    zoom, = [t for t in random.transforms if isinstance(t, mt.RandZoomd)]
    gammas = [t for t in random.transforms if isinstance(t, mt.RandAdjustContrastd)]
    return rotate, zoom, gammas


def test_default_augmentation_is_nnunets_inverted_gamma_zoom_and_full_circle_rotation():
    """params.yaml's defaults reach the built MONAI transforms as nnU-Net v2's: rotation over the full circle for a
    near-square 2D patch (30 degrees about each axis in 3D), zoom 0.7-1.4, gamma 0.7-1.5 once on the inverted image
    (p 0.1) and once on the plain one (p 0.3), both keeping the patch's mean and spread."""
    import math

    rotate, zoom, gammas = _spatial_and_gamma(train_transforms(2, (48, 40, 1), 1, 4, augmentation())[1])
    assert rotate.prob == 0.2
    assert rotate.rand_rotate.range_x == pytest.approx((-math.pi, math.pi))
    assert zoom.prob == 0.2
    assert zoom.rand_zoom.min_zoom == pytest.approx((0.7,)) and zoom.rand_zoom.max_zoom == pytest.approx((1.4,))
    inverted, plain = gammas
    assert (inverted.prob, plain.prob) == (0.1, 0.3)
    # the flag the computing transform reads (MONAI's AdjustContrast inside the random one)
    assert inverted.adjuster.adjust_contrast.invert_image and not plain.adjuster.adjust_contrast.invert_image
    for gamma in gammas:
        assert gamma.adjuster.gamma == pytest.approx((0.7, 1.5)) and gamma.adjuster.retain_stats

    rotate, _, _ = _spatial_and_gamma(train_transforms(3, (32, 32, 16), 1, 4, augmentation())[1])
    for axis in ("range_x", "range_y", "range_z"):
        assert getattr(rotate.rand_rotate, axis) == pytest.approx((-math.pi / 6, math.pi / 6))


def test_changed_augmentation_params_change_the_built_transforms(tmp_path):
    """An edit of params.yaml's train.augmentation (zoom 0.8-1.2, rotation 90 degrees, other probabilities) is what
    the training chain's MONAI transforms then do: nothing is hard-coded past the params."""
    import math

    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["augmentation"].update(scale_range=[0.8, 1.2], scale_prob=0.35, rotate_range_deg=90,
                                        rotate_prob=0.45, inverted_gamma_prob=0.55, gamma_prob=0.65)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    edited = load_params(tmp_path / "params.yaml").train.augmentation
    rotate, zoom, (inverted, plain) = _spatial_and_gamma(train_transforms(2, (48, 40, 1), 1, 4, edited)[1])
    assert zoom.rand_zoom.min_zoom == pytest.approx((0.8,)) and zoom.rand_zoom.max_zoom == pytest.approx((1.2,))
    assert zoom.prob == 0.35
    assert rotate.rand_rotate.range_x == pytest.approx((-math.pi / 2, math.pi / 2)) and rotate.prob == 0.45
    assert inverted.adjuster.adjust_contrast.invert_image and (inverted.prob, plain.prob) == (0.55, 0.65)

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.preprocessing.resample import axis_map, nearest_index, resample_axes

AFFINE = np.array([[0.7, 0, 0, 5.0], [0, 0.7, 0, -3.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def _monai(volume: np.ndarray, pixdim, mode: str) -> tuple[np.ndarray, dict]:
    """MONAI's Spacing of ``volume`` (its float32 result) and the resampling it planned (lazily)."""
    image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(AFFINE))
    spacing = mt.Spacingd(["image"], pixdim=pixdim, mode=[mode], dtype=np.float32)
    op = spacing({"image": image}, lazy=True)["image"].pending_operations[-1]
    return spacing({"image": image})["image"][0].numpy(), op


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("pixdim", [(0.8, 0.8, 2.5), (0.5, 0.9, 1.3), (1.9, 0.35, 4.0)])
def test_linear_resampling_is_monais_to_float32_rounding_in_the_inputs_own_type_and_order(order, pixdim):
    volume = np.asarray(np.random.default_rng(1).integers(-1024, 3000, (41, 30, 22)), dtype=np.int16, order=order)
    reference, op = _monai(volume, pixdim, "bilinear")
    ours = resample_axes(volume, *axis_map(op["lazy_affine"]), op["lazy_shape"], "bilinear", threads=2)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    assert ours.flags.f_contiguous == (order == "F") and ours.flags.c_contiguous == (order == "C")
    # grid_sample computes positions in float32 (off by up to about 1e-5 voxel here), and neighbouring voxels of this
    # noise differ by up to 4000
    np.testing.assert_allclose(ours, reference, rtol=0, atol=4000 * 1e-5)
    assert np.abs(ours - reference).max() > 0 or pixdim == (0.7, 0.7, 2.0)  # really compared with MONAI's


def test_nearest_neighbour_is_monais_where_no_voxel_falls_halfway():
    """(0.5, 0.9, 1.3) mm from 0.7/0.7/2 mm puts no output voxel exactly between two inputs, where grid_sample's
    float32 positions decide a tie by noise."""
    volume = np.random.default_rng(2).integers(0, 5, (41, 30, 22)).astype(np.uint8)
    reference, op = _monai(volume, (0.5, 0.9, 1.3), "nearest")
    ours = resample_axes(volume, *axis_map(op["lazy_affine"]), op["lazy_shape"], "nearest", dtype=np.uint8)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference.astype(np.uint8))


def test_threads_split_planes_without_changing_a_value():
    volume = np.asfortranarray(np.random.default_rng(3).normal(size=(33, 29, 17)).astype(np.float32))
    args = ([1.13, 0.81, 1.7], [0.2, -0.4, 0.0], (29, 36, 10))
    one = resample_axes(volume, *args, threads=1)
    np.testing.assert_array_equal(resample_axes(volume, *args, threads=3), one)
    np.testing.assert_array_equal(resample_axes(volume, *args, threads=64), one)


def test_positions_outside_the_volume_take_its_edge_value():
    volume = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    out = resample_axes(volume, [1.0, 1.0, 1.0], [-2.0, 0.0, 0.0], (8, 2, 2))
    np.testing.assert_array_equal(out[:, 0, 0], [0, 0, 0, 1, 2, 3, 3, 3])
    np.testing.assert_array_equal(nearest_index(0.5, 0.0, 5, 3), [0, 0, 1, 2, 2])  # 0.5 and 1.5: ties to even


@pytest.mark.parametrize("voxel_map", [
    np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),  # axes swapped
    np.array([[1.0, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),  # sheared (oblique)
    np.diag([-1.0, 1, 1, 1]),  # flipped
])
def test_a_map_that_does_not_keep_the_axes_is_not_separable(voxel_map):
    assert axis_map(voxel_map) is None
    assert axis_map(np.diag([1.2, 0.8, 2.0, 1.0])) is not None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="3D"):
        resample_axes(np.zeros((3, 3)), [1, 1], [0, 0], (3, 3))
    with pytest.raises(ValueError, match="mode"):
        resample_axes(np.zeros((3, 3, 3)), [1] * 3, [0] * 3, (3, 3, 3), mode="bicubic")


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_the_output_takes_the_memory_order_asked_for_with_the_same_values(mode):
    volume = np.random.default_rng(4).integers(0, 9, (23, 19, 11)).astype(np.uint8)  # C order
    args = ([0.7, 1.2, 0.5], [0.1, 0.0, -0.2], (31, 16, 21), mode)
    kept = resample_axes(volume, *args)
    assert kept.flags.c_contiguous
    for order, flag in (("F", "f_contiguous"), ("C", "c_contiguous")):
        other = resample_axes(volume, *args, threads=2, order=order)
        assert getattr(other.flags, flag)
        # the axes are interpolated in another order: the same values to float32 rounding (nearest: exactly)
        np.testing.assert_allclose(other, kept, rtol=2e-6, atol=0 if mode == "nearest" else 1e-6)
    with pytest.raises(ValueError, match="order"):
        resample_axes(volume, *args, order="A")

import numpy as np
import pytest
from monai.transforms import Randomizable

from medseg.atomic import save_nifti
from medseg.transforms import ForegroundSelect, train_transforms
from tests.conftest import write_tiny_volume


@pytest.mark.parametrize(("dims", "patch"), [(2, (32, 32, 1)), (3, (32, 32, 4))])
def test_train_patches_have_patch_shape(tmp_path, dims, patch):
    image, label = write_tiny_volume(1, shape=(40, 36, 5))
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    item = {"image": str(save_nifti(tmp_path / "i.nii.gz", image, affine)),
            "label": str(save_nifti(tmp_path / "l.nii.gz", label, affine, dtype=np.uint8))}
    chain = train_transforms(dims, patch, samples_per_volume=3, num_classes=4)
    samples = chain(item)
    assert len(samples) == 3
    expected = patch[:2] if dims == 2 else patch
    for s in samples:
        assert tuple(s["image"].shape) == (1, *expected) and tuple(s["label"].shape) == (1, *expected)


def test_loading_and_padding_sit_in_the_cached_prefix():
    """CacheDataset caches up to the first random transform: loading and padding must come before it."""
    from monai.transforms import LoadImaged, SpatialPadd

    chain = train_transforms(2, (32, 32, 1), 2, 4).transforms
    first_random = next(i for i, t in enumerate(chain) if isinstance(t, Randomizable))
    prefix = [type(t) for t in chain[:first_random]]
    assert LoadImaged in prefix and SpatialPadd in prefix


def test_foreground_select_excludes_air():
    x = np.zeros((10, 10, 2), np.float32)
    x[2:8, 2:8] = 100
    assert ForegroundSelect()(x).sum() == 72

import os

import numpy as np
import pytest

from medseg.common.atomic_write import atomic_dir, atomic_path, save_nifti, write_json


def test_outputs_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_json(tmp_path / "x.json", {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_interrupted_write_leaves_old_file(tmp_path):
    target = write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text().strip().startswith("{") and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_whole(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


def test_save_nifti_gzip_roundtrip(tmp_path):
    import nibabel as nib

    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = save_nifti(tmp_path / "v.nii.gz", data, np.diag([1.0, 2.0, 3.0, 1.0]))
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    assert img.header["descrip"].tobytes().strip(b"\x00") == b""


def test_stage_folders_get_the_same_permissions_as_other_outputs(tmp_path):
    """mkdtemp makes 0700 folders; a stage folder is as readable as the files in it (0777 less the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    with atomic_dir(tmp_path / "stage") as tmp:
        write_json(tmp / "x.json", {})
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "stage" / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask

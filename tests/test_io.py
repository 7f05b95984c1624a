import numpy as np
import pytest
import SimpleITK as sitk

from crossmod_lib import io
from crossmod_lib.errors import CrossmodError


def _image(shape=(6, 20, 24), spacing=(0.5, 0.5, 4.0), origin=(-5.0, 3.0, 10.0)):
    image = sitk.GetImageFromArray(np.zeros(shape, np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_label_map_round_trip_on_source_grid(tmp_path, suffix):
    reference = _image()
    masks = {}
    for k, name in enumerate(io.PAROTIDS):
        array = np.zeros((6, 20, 24), np.uint8)
        array[2:4, 5:10, 3 + 10 * k:8 + 10 * k] = 1
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(reference)
        masks[name] = mask
    path = io.write_label_map(masks, reference, tmp_path / f"labels{suffix}")
    back = io.read_image(path)
    assert not io.grid_differences(back, reference)
    labels = sitk.GetArrayFromImage(back)
    assert set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(labels == 1, sitk.GetArrayFromImage(masks["Parotid_L"]) > 0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_label_map_refuses_other_grid():
    reference = _image()
    other = _image(spacing=(1.0, 1.0, 4.0))
    mask = sitk.Cast(other, sitk.sitkUInt8)
    with pytest.raises(CrossmodError, match="Parotid_L: mask grid differs"):
        io.label_map({"Parotid_L": mask}, reference)


def test_read_case_refuses_mask_on_other_grid(tmp_path):
    io.write_image(_image(), tmp_path / "img.nrrd")
    io.write_image(sitk.Cast(_image(shape=(6, 20, 20)), sitk.sitkUInt8),
                   tmp_path / "structures" / "Parotid_L.nrrd")
    with pytest.raises(CrossmodError, match="Parotid_L.nrrd: mask grid differs from its image img.nrrd: size"):
        io.read_case(tmp_path)


def test_staged_folder_replaces_only_when_complete(tmp_path):
    from crossmod_lib.io import staged_folder

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("generation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written left
    assert (target / "old.txt").read_text() == "old"
    with staged_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CrossmodError, match="file: exists and is not a folder"), \
            staged_folder(tmp_path / "file"):
        pass

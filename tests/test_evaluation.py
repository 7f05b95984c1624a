import numpy as np
import pytest
import SimpleITK as sitk

from crossmod_lib import evaluation
from crossmod_lib.errors import CrossmodError


def _write_case(folder, left, right, observer2_shift=1):
    image = sitk.GetImageFromArray(np.zeros(left.shape, np.int16))
    image.SetSpacing((0.5, 0.5, 4.0))
    sitk.WriteImage(image, str(folder / "img.nrrd"))
    for sub, shift in (("structures", 0), ("structures_observer2", observer2_shift)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name, mask in (("Parotid_L", left), ("Parotid_R", right)):
            m = sitk.GetImageFromArray(np.roll(mask, shift, axis=2).astype(np.uint8))
            m.CopyInformation(image)
            sitk.WriteImage(m, str(folder / sub / f"{name}.nrrd"))


def test_interobserver_and_table(tmp_path):
    for k, shift in enumerate((1, 2)):
        folder = tmp_path / f"mr_{k}"
        folder.mkdir()
        left = np.zeros((6, 40, 40), bool)
        left[2:5, 10:20, 25:35] = True
        right = np.zeros_like(left)
        right[2:5, 10:20, 5:15] = True
        _write_case(folder, left, right, observer2_shift=shift)
    table = evaluation.interobserver(tmp_path)
    assert list(table["patient"]) == ["mr_0", "mr_0", "mr_1", "mr_1"]
    assert set(table["structure"]) == {"Parotid_L", "Parotid_R"}
    # a shift of k voxels of 0.5 mm along x: HD = 0.5 k mm
    np.testing.assert_allclose(table["hd"], [0.5, 0.5, 1.0, 1.0])
    summary = evaluation.mean_sd_table(table)
    assert summary.loc["Parotid_L", "HD (mm)"] == "0.75 ± 0.35"
    assert summary.loc["Parotid_L", "n"] == 2


def test_interobserver_needs_second_observer(tmp_path):
    folder = tmp_path / "mr_0"
    folder.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4), np.int16)), str(folder / "img.nrrd"))
    with pytest.raises(CrossmodError, match="mr_0: no second observer"):
        evaluation.interobserver(tmp_path)


def test_mean_sd_table_counts_undefined():
    import pandas as pd

    table = pd.DataFrame({"structure": ["A", "A", "A"], "dsc": [0.8, 0.6, 0.0],
                          "hd": [2.0, 4.0, np.inf], "hd95": [1, 2, np.inf], "msd": [1.0, 1.0, np.inf]})
    out = evaluation.mean_sd_table(table)
    assert out.loc["A", "HD (mm)"] == "3.00 ± 1.41 (1 undefined)"
    assert out.loc["A", "DSC"] == "0.47 ± 0.42"

"""The slice files every stage passes on: atomic writes, checked reads, one-line errors."""

import numpy as np
import pytest

from crossmod_lib.errors import CrossmodError
from crossmod_lib.slices import read_slices, write_slices


def arrays(n=3):
    return {"image": np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4),
            "patient": np.array([f"p{i}" for i in range(n)])}


def test_round_trip_and_no_temporary_left(tmp_path):
    path = write_slices(arrays(), tmp_path / "s.npz")
    back = read_slices(path, required=("image", "patient"))
    np.testing.assert_array_equal(back["image"], arrays()["image"])
    assert back["patient"].tolist() == ["p0", "p1", "p2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


@pytest.mark.parametrize("problem, message", [
    ("missing", "CT slices not found"),
    ("corrupt", "cannot read CT slices"),
    ("no_patient", "lack the array(s) patient"),
    ("rows", "'patient' has 2 rows, 'image' 3"),
    ("flat", "must be [N, H, W]"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, problem, message):
    path = tmp_path / "ct.npz"
    data = arrays()
    if problem == "corrupt":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif problem == "no_patient":
        write_slices({"image": data["image"]}, path)
    elif problem == "rows":
        write_slices({**data, "patient": data["patient"][:2]}, path)
    elif problem == "flat":
        write_slices({**data, "image": data["image"].reshape(3, 16)}, path)
    with pytest.raises(CrossmodError) as info:
        read_slices(path, "CT slices", ("image", "patient"))
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_failed_write_leaves_nothing(tmp_path):
    class Unsavable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_slices({"image": Unsavable()}, tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []

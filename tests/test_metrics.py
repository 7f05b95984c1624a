"""Tests for crossmod_lib.metrics (paper section 2.G) and the metrics benchmark."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from crossmod_lib import metrics as M
from crossmod_lib.bench import bench_metrics, format_table
from crossmod_lib.errors import CrossmodError

SPACING = (2.5, 0.98, 0.7)  # numpy axis order (z, y, x), deliberately anisotropic
SHAPE = (12, 14, 10)


# ------------------------------------------------------------------------------------------
# Brute-force oracle, independent of the implementation (no erosion, no distance transform)
# ------------------------------------------------------------------------------------------


def oracle_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one 6-neighbour outside the mask (outside the array counts)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    inner = (slice(1, -1),) * 3
    all_neighbours_in = np.ones(mask.shape, bool)
    for axis in range(3):
        for step in (-1, 1):
            shifted = tuple(
                slice(1 + step, m.shape[a] - 1 + step) if a == axis else slice(1, -1) for a in range(3)
            )
            all_neighbours_in &= m[shifted]
    return m[inner] & ~all_neighbours_in


def oracle(ref: np.ndarray, pred: np.ndarray, spacing) -> dict:
    ref, pred = ref.astype(bool), pred.astype(bool)
    pts_r = np.argwhere(oracle_surface(ref)) * np.asarray(spacing)
    pts_p = np.argwhere(oracle_surface(pred)) * np.asarray(spacing)
    pair = cdist(pts_r, pts_p)
    d_rp, d_pr = pair.min(axis=1), pair.min(axis=0)
    return {
        "dsc": 2 * np.count_nonzero(ref & pred) / (ref.sum() + pred.sum()),
        "hd": max(d_rp.max(), d_pr.max()),
        "hd95": np.percentile(np.concatenate([d_rp, d_pr]), 95),
        "msd": (d_rp.mean() + d_pr.mean()) / 2,
        "hd95_max": max(np.percentile(d_rp, 95), np.percentile(d_pr, 95)),
        "assd": np.concatenate([d_rp, d_pr]).mean(),
        "d_rp": d_rp,
        "d_pr": d_pr,
    }


def random_blob(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    """Smoothed-noise blob; some fill the grid up to its border, some are tiny or ragged."""
    sigma = rng.uniform(0.6, 2.0)
    field = ndimage.gaussian_filter(rng.random(shape), sigma, mode="constant", cval=0.5)
    level = np.quantile(field, rng.uniform(0.4, 0.97))
    mask = field > level
    if not mask.any():
        mask[tuple(rng.integers(0, s) for s in shape)] = True
    return mask


def random_pairs(n=20, seed=1234):
    rng = np.random.default_rng(seed)
    pairs = [(random_blob(rng), random_blob(rng)) for _ in range(n)]
    # A few hand-picked awkward ones: full grid, single voxels, a one-voxel-thick sheet on the border.
    full = np.ones(SHAPE, bool)
    single = np.zeros(SHAPE, bool)
    single[0, 0, 0] = True
    sheet = np.zeros(SHAPE, bool)
    sheet[:, -1, :] = True
    pairs += [(full, random_blob(rng)), (single, random_blob(rng)), (sheet, full), (single, sheet)]
    return pairs


# ------------------------------------------------------------------------------------------
# Oracle agreement
# ------------------------------------------------------------------------------------------


def test_pairs_touch_the_border():
    touching = [a for pair in random_pairs() for a in pair if a[0].any() or a[-1].any() or a[:, 0].any()]
    assert len(touching) >= 5


@pytest.mark.parametrize("index", range(24))
def test_compare_masks_matches_brute_force(index):
    ref, pred = random_pairs()[index]
    expected = oracle(ref, pred, SPACING)
    got = M.compare_masks(ref.astype(np.uint8), pred, SPACING)
    for key in (*M.METRICS, *M.EXTRA_METRICS):
        assert got[key] == pytest.approx(expected[key], abs=1e-9, rel=0), key
        assert isinstance(got[key], float)
    assert got["reference_voxels"] == ref.sum() and got["prediction_voxels"] == pred.sum()
    assert M.dice(ref, pred) == pytest.approx(expected["dsc"], abs=1e-9)
    d_rp, d_pr = M.surface_distances(ref, pred, SPACING)
    np.testing.assert_allclose(d_rp, expected["d_rp"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(d_pr, expected["d_pr"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(M.surface(ref), oracle_surface(ref))


def test_crop_does_not_change_results_inside_a_large_grid():
    rng = np.random.default_rng(7)
    ref, pred = random_blob(rng), random_blob(rng)
    big_ref = np.zeros((40, 50, 45), np.uint8)
    big_pred = np.zeros_like(big_ref)
    big_ref[20:32, 30:44, 5:15] = ref
    big_pred[20:32, 30:44, 5:15] = pred
    small = M.compare_masks(ref, pred, SPACING)
    big = M.compare_masks(big_ref, big_pred, SPACING)
    for key in M.METRICS:
        assert big[key] == pytest.approx(small[key], abs=1e-12)
    # ...and at the border of the small grid, the surface is the same as in the padded one
    np.testing.assert_array_equal(M.surface(big_ref)[20:32, 30:44, 5:15], oracle_surface(ref))


def test_non_binary_values_are_foreground():
    rng = np.random.default_rng(3)
    ref = random_blob(rng)
    labelled = ref.astype(np.int16) * 7
    labelled[ref & (rng.random(SHAPE) < 0.5)] = -3
    floats = ref.astype(np.float32) * 0.25
    assert M.compare_masks(labelled, floats, SPACING) == M.compare_masks(ref, ref, SPACING)


# ------------------------------------------------------------------------------------------
# Analytic cases and properties
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", range(3))
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_shifted_cubes(axis, k):
    ref = np.zeros((16, 16, 16), bool)
    ref[2:7, 2:7, 2:7] = True
    pred = np.roll(ref, k, axis=axis)
    got = M.compare_masks(ref, pred, SPACING)
    assert got["hd"] == pytest.approx(k * SPACING[axis], abs=1e-12)
    overlap = max(0, 5 - k) / 5
    assert got["dsc"] == pytest.approx(overlap, abs=1e-12)


def test_symmetry():
    for ref, pred in random_pairs(8, seed=99):
        ab = M.compare_masks(ref, pred, SPACING)
        ba = M.compare_masks(pred, ref, SPACING)
        for key in M.METRICS:
            assert ab[key] == pytest.approx(ba[key], abs=1e-12)
        d_ab = M.surface_distances(ref, pred, SPACING)
        d_ba = M.surface_distances(pred, ref, SPACING)
        np.testing.assert_array_equal(d_ab[0], d_ba[1])
        np.testing.assert_array_equal(d_ab[1], d_ba[0])


def test_identical_masks():
    for mask, _ in random_pairs(5, seed=5):
        got = M.compare_masks(mask, mask.copy(), SPACING)
        assert got["dsc"] == 1.0
        assert got["hd"] == got["hd95"] == got["msd"] == 0.0


# ------------------------------------------------------------------------------------------
# Empty masks and bad input
# ------------------------------------------------------------------------------------------


def test_both_empty():
    empty = np.zeros(SHAPE, np.uint8)
    got = M.compare_masks(empty, empty, SPACING)
    assert got == {"dsc": 1.0, "hd": 0.0, "hd95": 0.0, "msd": 0.0, "hd95_max": 0.0, "assd": 0.0,
                   "reference_voxels": 0, "prediction_voxels": 0}
    assert M.empty_case(got) == "both"
    assert M.dice(empty, empty) == 1.0
    assert not M.surface(empty).any()
    d_rp, d_pr = M.surface_distances(empty, empty, SPACING)
    assert d_rp.size == 0 and d_pr.size == 0


def test_one_empty():
    mask = np.zeros(SHAPE, bool)
    mask[3:6, 4:8, 2:5] = True
    empty = np.zeros(SHAPE, bool)
    a = M.compare_masks(mask, empty, SPACING)
    b = M.compare_masks(empty, mask, SPACING)
    for got in (a, b):
        assert got["dsc"] == 0.0
        assert math.isinf(got["hd"]) and math.isinf(got["hd95"]) and math.isinf(got["msd"])
    assert M.empty_case(a) == "prediction" and M.empty_case(b) == "reference"
    assert M.empty_case(M.compare_masks(mask, mask, SPACING)) == "none"
    d_rp, d_pr = M.surface_distances(mask, empty, SPACING)
    assert d_rp.size == oracle_surface(mask).sum() and np.isinf(d_rp).all() and d_pr.size == 0


def test_shape_mismatch():
    with pytest.raises(CrossmodError, match=r"shape \(12, 14, 10\).*\(12, 14, 9\)"):
        M.compare_masks(np.ones(SHAPE), np.ones((12, 14, 9)), SPACING)
    with pytest.raises(CrossmodError, match="shape"):
        M.dice(np.ones(SHAPE), np.ones((12, 14)))


def test_bad_spacing():
    with pytest.raises(CrossmodError, match="spacing"):
        M.compare_masks(np.ones(SHAPE), np.ones(SHAPE), (1.0, 1.0))
    with pytest.raises(CrossmodError, match="spacing"):
        M.compare_masks(np.ones(SHAPE), np.ones(SHAPE), (1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------
# Images and files
# ------------------------------------------------------------------------------------------


def label_images(seed=11):
    """Two (12, 14, 10)-array label images with labels 1 and 2, spacing (x, y, z) = (0.7, 0.98, 2.5)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(2):
        arr = np.zeros((12, 14, 20), np.uint8)
        arr[:, :, :10][random_blob(rng)] = 1
        arr[:, :, 10:][random_blob(rng)] = 2
        arrays.append(arr)
    images = []
    for arr in arrays:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(reversed(SPACING)))
        img.SetOrigin((-12.5, 30.0, 4.0))
        images.append(img)
    return arrays, images


def test_compare_images_per_structure():
    (ref, pred), (ref_img, pred_img) = label_images()
    df = M.compare_images(ref_img, pred_img, {1: "Parotid_L", 2: "Parotid_R"})
    assert list(df.columns[:6]) == ["structure", "label", "dsc", "hd", "hd95", "msd"]
    assert list(df["structure"]) == ["Parotid_L", "Parotid_R"]
    for _, row in df.iterrows():
        expected = oracle(ref == row["label"], pred == row["label"], SPACING)  # spacing reversed to z, y, x
        for key in M.METRICS:
            assert row[key] == pytest.approx(expected[key], abs=1e-9)
    auto = M.compare_images(ref_img, pred_img)
    assert list(auto["structure"]) == ["label_1", "label_2"]
    pd.testing.assert_frame_equal(auto.drop(columns="structure"), df.drop(columns="structure"))


def test_compare_images_missing_label():
    _, (ref_img, pred_img) = label_images()
    df = M.compare_images(ref_img, pred_img, {3: "Brainstem"})
    row = df.iloc[0]
    assert row["dsc"] == 1.0 and row["hd"] == 0.0 and M.empty_case(row) == "both"


@pytest.mark.parametrize(
    "change, what",
    [
        (lambda img: img.SetSpacing((0.7, 0.98, 3.0)), "spacing"),
        (lambda img: img.SetOrigin((-12.5, 30.0, 5.0)), "origin"),
        (lambda img: img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), "direction"),
    ],
)
def test_grid_mismatch(change, what):
    _, (ref_img, pred_img) = label_images()
    change(pred_img)
    with pytest.raises(CrossmodError) as info:
        M.compare_images(ref_img, pred_img, names=("manual.nrrd", "auto.nrrd"))
    message = str(info.value)
    assert "manual.nrrd" in message and "auto.nrrd" in message and what in message and "\n" not in message


def test_grid_size_mismatch_and_tolerance():
    _, (ref_img, _) = label_images()
    other = sitk.Image(20, 14, 11, sitk.sitkUInt8)
    other.SetSpacing(ref_img.GetSpacing())
    other.SetOrigin(ref_img.GetOrigin())
    with pytest.raises(CrossmodError, match=r"size \(20, 14, 12\) vs \(20, 14, 11\)"):
        M.compare_images(ref_img, other)
    nudged = sitk.Image(ref_img)
    nudged.SetOrigin(tuple(o + 5e-5 for o in ref_img.GetOrigin()))
    nudged.SetSpacing(tuple(s + 5e-5 for s in ref_img.GetSpacing()))
    assert len(M.compare_images(ref_img, nudged)) == 2


def test_compare_files_round_trip(tmp_path):
    _, (ref_img, pred_img) = label_images()
    ref_path, pred_path = tmp_path / "manual.nrrd", tmp_path / "auto.nii.gz"
    sitk.WriteImage(ref_img, str(ref_path))
    sitk.WriteImage(pred_img, str(pred_path))
    labels = {1: "Parotid_L", 2: "Parotid_R"}
    from_files = M.compare_files(ref_path, pred_path, labels)
    in_memory = M.compare_images(ref_img, pred_img, labels)
    pd.testing.assert_frame_equal(from_files, in_memory, atol=1e-6, rtol=0)


def _assert_names_file(path, call):
    with pytest.raises(CrossmodError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_compare_files_bad_files(tmp_path):
    _, (ref_img, pred_img) = label_images()
    good = tmp_path / "manual.nrrd"
    sitk.WriteImage(ref_img, str(good))

    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    _assert_names_file(garbage, lambda: M.compare_files(good, garbage))

    missing = tmp_path / "missing.nii.gz"
    _assert_names_file(missing, lambda: M.compare_files(missing, good))

    for name in ("cut.nrrd", "cut.nii.gz", "cut.nii", "cut.mha"):
        full = tmp_path / ("full_" + name)
        sitk.WriteImage(pred_img, str(full))
        data = full.read_bytes()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) * 2 // 3])
        _assert_names_file(cut, lambda cut=cut: M.compare_files(good, cut))


# ------------------------------------------------------------------------------------------
# Summary and benchmark
# ------------------------------------------------------------------------------------------


def test_summarise():
    df = pd.DataFrame(
        {
            "patient": ["p1", "p1", "p2", "p2", "p3", "p3"],
            "structure": ["Parotid_L", "Parotid_R"] * 3,
            "dsc": [0.8, 0.7, 0.9, 0.0, 0.7, 0.75],
            "hd": [5.0, 6.0, 7.0, math.inf, 9.0, 8.0],
            "hd95": [4.0, 5.0, 6.0, math.inf, 8.0, 7.0],
            "msd": [1.0, 1.5, 2.0, math.inf, 3.0, 2.5],
        }
    )
    out = M.summarise(df).set_index("structure")
    assert out.loc["Parotid_L", "n"] == 3
    assert out.loc["Parotid_L", "dsc_mean"] == pytest.approx(0.8)
    assert out.loc["Parotid_L", "dsc_sd"] == pytest.approx(0.1)
    assert out.loc["Parotid_R", "hd_mean"] == pytest.approx(7.0)
    assert out.loc["Parotid_R", "hd_sd"] == pytest.approx(math.sqrt(2))
    assert out.loc["Parotid_R", "hd_n_inf"] == 1 and out.loc["Parotid_L", "hd_n_inf"] == 0
    assert out.loc["Parotid_R", "dsc_n_inf"] == 0
    overall = M.summarise(df, by=())
    assert len(overall) == 1 and overall.loc[0, "n"] == 6 and overall.loc[0, "msd_n_inf"] == 1
    with pytest.raises(CrossmodError, match="organ"):
        M.summarise(df, by=("organ",))


def test_bench_metrics_runs():
    result = bench_metrics(repeats=1)
    for key in ("name", "grid", "spacing_mm", "median_ms", "min_ms", "target_ms", "meets_target", "dsc", "hd"):
        assert key in result
    assert result["name"] == "metrics" and result["grid"] == (512, 512, 150)
    assert 0.7 < result["dsc"] < 1.0 and 20 < result["reference_cc"] < 30
    table = format_table(result)
    assert "median_ms" in table and len({len(line) for line in table.splitlines()}) == 1


# --------------------------------------------------------------------------------------------
# Against MedPy itself, on real interobserver pairs (DeepMind TCIA: oncologist vs radiographer)

DEEPMIND_PAIRS = (("0522c0017", "Parotid-Lt"), ("0522c0161", "Parotid-Rt"))


def _deepmind_pair(scan: str, organ: str):
    from crossmod_lib.datasets import data_root

    try:
        root = data_root() / "deepmind-tcia-hn" / "nrrds"
    except CrossmodError as exc:
        pytest.skip(f"no data root: {exc}")
    found = sorted(root.glob(f"*/oncologist/{scan}/segmentations/{organ}.nrrd"))
    if not found:
        pytest.skip(f"DeepMind pair {scan} {organ} not under {root}")
    return found[0], Path(str(found[0]).replace("oncologist", "radiographer"))


@pytest.mark.parametrize("scan, organ", DEEPMIND_PAIRS)
def test_metrics_agree_with_medpy_on_real_pairs(scan, organ):
    medpy = pytest.importorskip("medpy.metric.binary", reason="medpy is not installed (pip install medpy)")
    oncologist, radiographer = _deepmind_pair(scan, organ)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(oncologist))) > 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(radiographer))) > 0
    spacing = sitk.ReadImage(str(oncologist)).GetSpacing()[::-1]
    ours = M.compare_masks(a, b, spacing)
    # MedPy on the union's box padded by one empty voxel: the same surfaces and distances as on
    # the full 512 x 512 grid (border voxels count as surface in both), in a second instead of a minute
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects((a | b).astype(np.uint8))[0])
    a, b = np.pad(a[box], 1), np.pad(b[box], 1)
    assert ours["dsc"] == pytest.approx(medpy.dc(b, a), abs=1e-12)
    assert ours["hd"] == pytest.approx(medpy.hd(b, a, spacing), abs=1e-9)
    assert ours["hd95"] == pytest.approx(medpy.hd95(b, a, spacing), abs=1e-9)
    assert ours["assd"] == pytest.approx(medpy.assd(b, a, spacing), abs=1e-9)
    # MSD weighs the two directions equally: the mean of MedPy's two directed asd
    assert ours["msd"] == pytest.approx((medpy.asd(a, b, spacing) + medpy.asd(b, a, spacing)) / 2, abs=1e-9)
    assert ours["hd95_max"] > ours["hd95"] and ours["msd"] != pytest.approx(ours["assd"], abs=1e-3)

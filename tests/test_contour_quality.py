"""Paper Fig. 9 / section 4.B: automatic checks of the CT contours (crossmod_lib.contour_quality)."""

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from crossmod_lib import contour_quality as cq
from crossmod_lib import plots
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import Case
from crossmod_lib.runs import RunFolder


def parabola(n=18, peak=800.0):
    """An ellipsoid's area profile: a parabola over n slices, small at the tips."""
    z = np.linspace(-1, 1, n + 2)[1:-1]
    return peak * (1 - z ** 2)


def test_healthy_profile_is_not_flagged():
    a = parabola()
    table = cq.flag_profile(np.concatenate([[0, 0], a, [0]]))
    assert list(table["slice"]) == list(range(2, 2 + a.size))  # the extent only
    assert not table["flagged"].any()
    np.testing.assert_allclose(table["expected"], a, rtol=1e-6)  # a quadratic is fitted exactly
    assert cq.flag_profile(np.zeros(5)).empty


def test_gap_and_part_contoured_run_are_flagged():
    a = parabola()
    a[4] = 0.0           # a slice without contour
    a[9:14] *= 0.5       # five slices contoured in half
    table = cq.flag_profile(a).set_index("slice")
    assert table.loc[4, "rule"] == "missing+short"
    assert set(table.index[table["flagged"]]) == {4, 9, 10, 11, 12, 13}
    assert table.loc[11, "ratio"] == pytest.approx(0.5, abs=0.08)  # the upper fit rides over the run


def test_short_needs_a_real_deficit():
    a = parabola()
    a[0] *= 0.5  # a tip slice halved: a large ratio, but a few mm² (below short_deficit of the max)
    assert not cq.flag_profile(a)["flagged"].any()
    assert cq.flag_profile(a, short_deficit=0.01)["flagged"].iloc[0]


def test_expected_areas_short_profiles_and_bad_input():
    assert np.isnan(cq.expected_areas([1.0, 2.0, 1.0])).all()
    with pytest.raises(CrossmodError, match="finite non-negative"):
        cq.flag_profile([1.0, -2.0, 3.0])
    with pytest.raises(CrossmodError, match="3D"):
        cq.area_profile(np.zeros((4, 4)))
    with pytest.raises(CrossmodError, match="unknown setting"):
        cq.settings_from(None, dent=0.5)
    with pytest.raises(CrossmodError, match="short_ratio"):
        cq.settings_from({"contour_quality": {"short_ratio": 1.5}})


def _case(pid, areas_by_gland, spacing=(1.0, 1.0, 2.5)):
    """A Case whose glands have the given per-slice areas (pixels), as square-ish blocks."""
    n = len(next(iter(areas_by_gland.values())))
    image = sitk.GetImageFromArray(np.zeros((n, 60, 60), np.int16))
    image.SetSpacing(spacing)
    structures = {}
    for name, areas in areas_by_gland.items():
        mask = np.zeros((n, 60, 60), np.uint8)
        for k, area in enumerate(areas):
            mask[k].flat[:int(area)] = 1
        m = sitk.GetImageFromArray(mask)
        m.CopyInformation(image)
        structures[name] = m
    return Case(pid, image, structures)


def test_assess_cohort_and_volume_outliers():
    base = np.round(parabola(12, 400)).astype(int)
    cases = []
    for k in range(5):
        left = np.round(base * (1 + 0.12 * k)).astype(int)
        if k == 0:
            left[5:8] //= 2
        right = np.round(base * (1.06 + 0.12 * k) * (3 if k == 4 else 1))  # one gland 3x the others
        cases.append(_case(f"ct_{k}", {"Parotid_L": left, "Parotid_R": right}))
    report = cq.assess_cohort(cases)
    glands = report.glands.set_index(["patient", "structure"])
    assert glands.loc[("ct_0", "Parotid_L"), "flagged_slices"] == "5;6;7"
    assert glands.loc[("ct_0", "Parotid_L"), "rules"] == "short"
    assert glands.loc[("ct_1", "Parotid_L"), "n_flagged"] == 0
    assert glands.loc[("ct_1", "Parotid_L"), "volume_cc"] == pytest.approx(
        np.round(base * 1.12).sum() * 2.5 / 1000)
    assert glands.loc[("ct_4", "Parotid_R"), "volume_outlier"]
    assert glands.loc[("ct_4", "Parotid_R"), "flagged"]
    assert glands["volume_outlier"].sum() == 1
    small = cq.assess_cohort(cases[:3])  # 6 glands < min_cohort 8: volume not assessed
    assert small.glands["volume_z"].isna().all() and not small.glands["volume_outlier"].any()


def test_robust_z():
    z = cq.robust_z([1.0, 2.0, 3.0, 4.0, 100.0])
    assert z[2] == 0 and z[4] == pytest.approx(0.6745 * 97 / 1.0)
    assert np.isnan(cq.robust_z([2.0, 2.0, 2.0, 5.0])).all()  # MAD 0


def test_detection_accuracy_counts():
    profiles = pd.DataFrame({
        "patient": ["a"] * 6, "structure": ["Parotid_L"] * 6, "slice": [1, 2, 3, 4, 5, 6],
        "flagged": [False, True, True, False, False, True]})
    glands = pd.DataFrame({"patient": ["a", "a", "b"], "structure": ["Parotid_L", "Parotid_R", "Parotid_L"],
                           "flagged": [True, False, False]})
    report = cq.QualityReport(glands=glands, profiles=profiles, settings=cq.DEFAULTS)
    defects = pd.DataFrame({"defect": [0, 0, 0, 1], "patient": ["a"] * 3 + ["b"],
                            "structure": ["Parotid_L"] * 4, "kind": ["partial"] * 3 + ["missing"],
                            "part": ["lateral"] * 3 + [""], "slice": [2, 3, 4, 9]})
    acc = cq.detection_accuracy(report, defects).set_index(["level", "kind"])
    assert acc.loc[("slice", "partial"), "sensitivity"] == pytest.approx(2 / 3)
    assert acc.loc[("slice", "missing"), "sensitivity"] == 0
    assert acc.loc[("slice", "all"), "precision"] == pytest.approx(2 / 3)
    assert acc.loc[("slice", "all"), "false_alarms"] == 1
    assert acc.loc[("defect", "all"), "found"] == 1 and acc.loc[("defect", "all"), "n"] == 2
    assert acc.loc[("gland", "all"), "sensitivity"] == 0.5
    assert acc.loc[("gland", "all"), "precision"] == 1.0
    assert acc.loc[("gland", "all"), "specificity"] == 1.0


def test_affected_slices(tmp_path):
    profiles = pd.DataFrame({"patient": ["a", "a", "a", "b"], "structure": ["Parotid_L", "Parotid_R", "Parotid_L", "Parotid_L"],
                             "slice": [3, 3, 4, 7], "flagged": [True, True, True, False]})
    glands = pd.DataFrame({"patient": ["a", "b"], "structure": ["Parotid_L", "Parotid_L"]})
    report = cq.QualityReport(glands=glands, profiles=profiles, settings=cq.DEFAULTS)
    np.savez(tmp_path / "prep.npz", patient=np.array(["a"] * 4 + ["b"] * 2),
             slice_index=np.array([2, 3, 4, 5, 7, 8], np.int32))
    np.savez(tmp_path / "clean.npz", patient=np.array(["a", "b"]), slice_index=np.array([4, 7]))
    table = cq.affected_slices(report, tmp_path / "prep.npz", tmp_path / "clean.npz").set_index("patient")
    assert table.loc["a", "flagged_slices"] == 2  # slice 3 (both glands) and 4
    assert table.loc["a", "prepared_affected"] == 2 and table.loc["a", "prepared_slices"] == 4
    assert table.loc["a", "training_affected"] == 1 and table.loc["b", "training_affected"] == 0
    assert table.loc["all", "prepared_slices"] == 6
    missing = cq.affected_slices(report, tmp_path / "nothing.npz")
    assert missing["prepared_slices"].isna().all()
    np.savez(tmp_path / "bad.npz", image=np.zeros(3))
    with pytest.raises(CrossmodError, match="bad.npz.*slice_index"):
        cq.affected_slices(report, tmp_path / "bad.npz")


def test_phantom_defects_bad_files(tmp_path):
    with pytest.raises(CrossmodError, match="nothing.json: not found"):
        cq.phantom_defects(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CrossmodError, match="bad.json: unreadable"):
        cq.phantom_defects(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(CrossmodError, match="no 'defects' list"):
        cq.phantom_defects(tmp_path / "other.json")


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A demo-sized CT cohort of the phantom (12 patients, half the glands damaged)."""
    from crossmod_lib.config import load_profile

    profile = load_profile("smoke")
    profile["phantom"].update(n_ct=12, n_mr=1, ct_matrix=208, ct_slices=[50, 54], mr_matrix=400,
                              mr_slices=4, partial_rate=0.5, missing_rate=0.5, workers=1)
    return RunFolder.open(profile, tmp_path_factory.mktemp("quality") / "run")


def test_detection_on_the_phantom(phantom_run):
    assessed = cq.assess_run(phantom_run)
    record = json.loads((phantom_run.root / "raw" / "phantom" / "phantom.json").read_text())
    defects = assessed["defects"]
    assert defects["defect"].nunique() == len(record["defects"]) > 5
    acc = assessed["accuracy"].set_index(["level", "kind"])
    # measured on this cohort (seed 2021): slice sensitivity 0.97, precision 0.98; every defect found
    assert acc.loc[("slice", "all"), "sensitivity"] >= 0.85
    assert acc.loc[("slice", "all"), "precision"] >= 0.9
    assert acc.loc[("slice", "missing"), "sensitivity"] == 1.0
    assert acc.loc[("defect", "all"), "sensitivity"] >= 0.95
    metrics = phantom_run.root / "metrics"
    for name in ("contour_quality_glands.csv", "contour_quality_slices.csv", "contour_quality_detection.csv"):
        assert (metrics / name).is_file(), name
    glands = pd.read_csv(metrics / "contour_quality_glands.csv")
    assert len(glands) == 24 and glands["volume_z"].notna().all()
    # a gland without defects is (almost) never flagged: the false alarms sit beside real defects
    damaged = set(zip(defects["patient"], defects["structure"]))
    clean = [not (p, s) in damaged for p, s in zip(glands["patient"], glands["structure"])]
    assert glands.loc[clean, "n_flagged"].sum() <= 1


def test_figure9_examples(phantom_run):
    import matplotlib

    matplotlib.use("Agg")
    assessed = cq.assess_run(phantom_run)
    examples = cq.figure9_examples(phantom_run, assessed, n=3)
    assert len(examples) == 3
    assert {"missing", "partial"} <= {("missing" if "missing" in e["rule"] else "partial") for e in examples}
    flagged = set(zip(assessed["report"].flagged_slices["patient"],
                      assessed["report"].flagged_slices["structure"],
                      assessed["report"].flagged_slices["slice"]))
    for e in examples:
        assert (e["patient"], e["structure"], e["slice"]) in flagged
        assert e["ct"].shape == e["mask"].shape and 0 <= e["ct"].min() and e["ct"].max() <= 1
        assert (e["patient"], e["structure"], e["neighbour"]) not in flagged
        assert e["neighbour_mask"].sum() > e["mask"].sum()
    fig = plots.figure_contour_defects(examples)
    assert len(fig.axes) == 6
    fig = plots.area_profiles(assessed["report"].profiles, [(e["patient"], e["structure"]) for e in examples])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3


def test_gland_without_contour_is_flagged():
    base = np.round(parabola(12, 400)).astype(int)
    case = _case("ct_0", {"Parotid_L": base})  # no Parotid_R at all
    report = cq.assess_cohort([case])
    glands = report.glands.set_index("structure")
    assert glands.loc["Parotid_R", "rules"] == "no contour" and glands.loc["Parotid_R", "flagged"]
    assert not glands.loc["Parotid_L", "flagged"]
    with pytest.raises(CrossmodError, match="no cases"):
        cq.assess_cohort([])

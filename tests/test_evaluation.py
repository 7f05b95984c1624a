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


# ----------------------------------------------------------------------------------------------
# Chapter 5: the automatic contours (Table II, paired tests, Figs. 7 and 8)

import math
from pathlib import Path

import pandas as pd
from scipy import ndimage, stats

from crossmod_lib import io as cio
from crossmod_lib import paper, plots
from crossmod_lib.runs import RunFolder

SPACING = (0.5, 0.5, 4.0)  # (x, y, z) mm, as the paper's MR


def _image(array, spacing=SPACING):
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    return image


def _cubes(shift_left=0, extra_voxel=False):
    """Left parotid (1): a 4 x 4 x 4 cube, shifted ``shift_left`` voxels along x; right (2): a cube."""
    labels = np.zeros((8, 20, 30), np.uint8)
    labels[2:6, 4:8, 4 + shift_left:8 + shift_left] = 1
    labels[2:6, 4:8, 20:24] = 2
    if extra_voxel:
        labels[0, 18, 0] = 1  # a stray voxel of the left gland, far from it
    return labels


def _write_index(root: Path, rows: list[dict]) -> Path:
    index = pd.DataFrame(rows, columns=list(evaluation.INDEX_COLUMNS))
    path = root / "predictions" / "index.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    index.to_csv(path, index=False)
    return path


def _tiny_run(tmp_path) -> RunFolder:
    """A run folder with one model and patient: left cube shifted by one voxel, a stray voxel in
    the raw prediction only, the right cube exact."""
    root = tmp_path / "run"
    cio.write_image(_image(_cubes()), root / "predictions/reference/MR/p1_labels.nii.gz")
    cio.write_image(_image(_cubes(1, extra_voxel=True)), root / "predictions/m/p1_labels.nii.gz")
    cio.write_image(_image(_cubes(1)), root / "predictions/m/p1_labels_lcc.nii.gz")
    _write_index(root, [{"model": "cross_modality", "title": "Cross", "patient": "p1",
                         "modality": "MR", "labels": "predictions/m/p1_labels.nii.gz",
                         "labels_lcc": "predictions/m/p1_labels_lcc.nii.gz",
                         "reference": "predictions/reference/MR/p1_labels.nii.gz",
                         "seconds": 0.5, "common": True}])
    return RunFolder(root=root, profile={"name": "test"})


def test_evaluate_predictions_known_overlaps(tmp_path):
    run = _tiny_run(tmp_path)
    metrics = evaluation.evaluate_predictions(run)
    assert list(metrics.columns) == evaluation.SEGMENTATION_COLUMNS
    assert len(metrics) == 4  # 2 versions x 2 glands
    on_disk = pd.read_csv(run.root / "metrics" / "segmentation.csv")
    assert len(on_disk) == 4 and not list((run.root / "metrics").glob(".*tmp"))
    row = metrics.set_index(["postprocess", "structure"])
    # a 4-voxel cube shifted by one voxel along x: overlap 3/4, DSC 0.75, HD one voxel (0.5 mm)
    assert row.loc[("lcc", "Parotid_L"), "dsc"] == pytest.approx(0.75)
    assert row.loc[("lcc", "Parotid_L"), "hd"] == pytest.approx(0.5)
    assert row.loc[("lcc", "Parotid_R"), "dsc"] == 1.0 and row.loc[("lcc", "Parotid_R"), "hd"] == 0.0
    # raw: the stray voxel adds one predicted voxel and a far surface point
    assert row.loc[("raw", "Parotid_L"), "dsc"] == pytest.approx(2 * 48 / (64 + 65))
    # HD: from the stray voxel (z 0, y 18, x 0) to the nearest voxel of the manual cube (z 2, y 7, x 4)
    far = math.dist((0 * 4.0, 18 * 0.5, 0 * 0.5), (2 * 4.0, 7 * 0.5, 4 * 0.5))
    assert row.loc[("raw", "Parotid_L"), "hd"] == pytest.approx(far)
    assert row.loc[("raw", "Parotid_L"), "prediction_voxels"] == 65


def test_evaluate_predictions_bad_input(tmp_path):
    run = _tiny_run(tmp_path)
    index = pd.read_csv(run.root / "predictions" / "index.csv")
    index.drop(columns=["labels_lcc"]).to_csv(run.root / "predictions" / "index.csv", index=False)
    with pytest.raises(CrossmodError, match="index.csv: missing column.*labels_lcc"):
        evaluation.evaluate_predictions(run)
    index.assign(labels="predictions/m/nowhere.nii.gz").to_csv(run.root / "predictions" / "index.csv",
                                                               index=False)
    with pytest.raises(CrossmodError, match="nowhere.nii.gz"):
        evaluation.evaluate_predictions(run)
    # no reference: an unannotated MR patient (predicted, not scored); a CT always has one
    index.assign(reference="", modality="CT").to_csv(run.root / "predictions" / "index.csv", index=False)
    with pytest.raises(CrossmodError, match="index.csv: row 2 has no reference"):
        evaluation.evaluate_predictions(run)
    index.assign(reference="", modality="MR").to_csv(run.root / "predictions" / "index.csv", index=False)
    assert evaluation.evaluate_predictions(run).empty
    pd.concat([index, index]).to_csv(run.root / "predictions" / "index.csv", index=False)
    with pytest.raises(CrossmodError, match="lists patient p1 twice"):
        evaluation.evaluate_predictions(run)
    (run.root / "predictions" / "index.csv").unlink()
    with pytest.raises(CrossmodError, match="stage output missing"):
        evaluation.evaluate_predictions(run)


def _metrics_table(values: dict, postprocess="lcc") -> pd.DataFrame:
    """A segmentation metrics table from {(model, modality): [(patient, structure, dsc, hd, msd)]}."""
    rows = []
    for (model, modality), records in values.items():
        for patient, structure, dsc, hd, msd in records:
            rows.append({"model": model, "title": model.replace("_", " ").title(), "patient": patient,
                         "modality": modality, "common": True, "postprocess": postprocess,
                         "structure": structure, "label": 1 if structure == "Parotid_L" else 2,
                         "dsc": dsc, "hd": hd, "hd95": hd, "msd": msd, "reference_voxels": 10,
                         "prediction_voxels": 10, "seconds": 1.0})
    return pd.DataFrame(rows, columns=evaluation.SEGMENTATION_COLUMNS)


def test_table_ii_layout_and_values():
    metrics = pd.concat([
        _metrics_table({("ct_only", "CT"): [("c1", "Parotid_L", 0.8, 10, 1), ("c1", "Parotid_R", 0.9, 12, 1),
                                            ("c2", "Parotid_L", 0.6, 14, 3), ("c2", "Parotid_R", 0.7, 12, 1)],
                        ("cross_modality", "MR"): [("m1", "Parotid_L", 0.7, 20, 2), ("m1", "Parotid_R", 0.5, 2, 2),
                                                   ("m2", "Parotid_L", 0.5, 30, 4), ("m2", "Parotid_R", 0.5, 4, 2)]}),
        _metrics_table({("cross_modality", "MR"): [("m1", "Parotid_L", 0.1, 1, 1), ("m1", "Parotid_R", 0.1, 1, 1)]},
                       postprocess="raw"),
    ])
    inter = pd.DataFrame({"patient": ["m1", "m1", "m2", "m2"],
                          "structure": ["Parotid_L", "Parotid_R", "Parotid_L", "Parotid_R"],
                          "dsc": [0.8, 0.9, 0.8, 0.7], "hd": [5.0, 6, 7, 8], "msd": [1.0, 1, 1, 1]})
    table = evaluation.table_ii(metrics, inter)
    assert list(table.index) == [
        ("Right parotid", "Cross Modality"), ("Right parotid", "Ct Only"),
        ("Right parotid", "Interobserver variability"),
        ("Left parotid", "Cross Modality"), ("Left parotid", "Ct Only"),
        ("Left parotid", "Interobserver variability")]
    assert table.loc[("Left parotid", "Cross Modality"), "DSC"] == "0.60 ± 0.14"
    assert table.loc[("Left parotid", "Cross Modality"), "HD (mm)"] == "25.00 ± 7.07"
    assert table.loc[("Right parotid", "Ct Only"), "MSD (mm)"] == "1.00 ± 0.00"
    assert table.loc[("Right parotid", "Interobserver variability"), "DSC"] == "0.80 ± 0.14"
    assert table.loc[("Left parotid", "Ct Only"), "tested on"] == "CT"
    raw = evaluation.table_ii(metrics, None, postprocess="raw")
    assert raw.loc[("Left parotid", "Cross Modality"), "DSC"] == "0.10 ± 0.00"
    assert raw.loc[("Left parotid", "Cross Modality"), "n"] == 1
    with pytest.raises(CrossmodError, match="postprocess='smooth'"):
        evaluation.table_ii(metrics, postprocess="smooth")
    with pytest.raises(CrossmodError, match="no metrics for model"):
        evaluation.table_ii(metrics, models=["cross_modality", "nnunet"])


def test_paired_tests_match_scipy():
    rng = np.random.default_rng(3)
    patients = [f"m{k}" for k in range(9)]
    cross = rng.uniform(0.6, 0.8, (9, 2))
    naive = cross - rng.uniform(0.0, 0.2, (9, 2)) + 0.03
    ct = rng.uniform(0.7, 0.9, (6, 2))
    values = {("cross_modality", "MR"): [], ("naive", "MR"): [], ("ct_only", "CT"): []}
    for k, p in enumerate(patients):
        for side, structure in enumerate(("Parotid_L", "Parotid_R")):
            values[("cross_modality", "MR")].append((p, structure, cross[k, side], 10 + k + side, 1.0 + k))
            values[("naive", "MR")].append((p, structure, naive[k, side], 12 + k, 1.5 + k))
    for k in range(6):
        for side, structure in enumerate(("Parotid_L", "Parotid_R")):
            values[("ct_only", "CT")].append((f"c{k}", structure, ct[k, side], 9.0 + k, 1.0))
    metrics = _metrics_table(values)
    metrics.loc[(metrics["model"] == "naive") & (metrics["patient"] == "m8"), "common"] = False
    tests = evaluation.paired_tests(metrics, against=["naive", "ct_only"], values=("dsc",))
    paired = tests.set_index("other").loc["naive"]
    a, b = cross[:8].mean(axis=1), naive[:8].mean(axis=1)  # m8 is not a common patient
    expected = stats.wilcoxon(a, b)
    assert paired["n_reference"] == 8 and "Wilcoxon" in paired["test"]
    assert paired["p"] == pytest.approx(expected.pvalue)
    assert paired["statistic"] == pytest.approx(expected.statistic)
    assert paired["median_difference"] == pytest.approx(np.median(a - b))
    unpaired = tests.set_index("other").loc["ct_only"]
    expected = stats.mannwhitneyu(cross.mean(axis=1), ct.mean(axis=1), alternative="two-sided")
    assert "Mann-Whitney" in unpaired["test"] and "unpaired" in unpaired["test"]
    assert unpaired["p"] == pytest.approx(expected.pvalue)
    assert (unpaired["n_reference"], unpaired["n_other"]) == (9, 6)
    assert tests["p_holm"].tolist() == pytest.approx(sorted_holm(tests["p"].tolist()))


def sorted_holm(p):
    """Holm's adjustment written out for two p-values."""
    lo, hi = sorted(p)
    adjusted = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}
    return [adjusted[v] for v in p]


def test_paired_tests_too_few_and_undefined():
    values = {("cross_modality", "MR"): [("m1", "Parotid_L", 0.7, 10, 1), ("m1", "Parotid_R", 0.7, 10, 1),
                                         ("m2", "Parotid_L", 0.6, np.inf, np.inf),
                                         ("m2", "Parotid_R", 0.6, 10, 1)],
              ("naive", "MR"): [("m1", "Parotid_L", 0.5, 12, 2), ("m1", "Parotid_R", 0.5, 12, 2),
                                ("m2", "Parotid_L", 0.4, 14, 3), ("m2", "Parotid_R", 0.4, 14, 3)]}
    tests = evaluation.paired_tests(_metrics_table(values), values=("dsc", "hd"))
    dsc, hd = tests.set_index("metric").loc["dsc"], tests.set_index("metric").loc["hd"]
    assert dsc["n_reference"] == 2 and np.isfinite(dsc["p"]) and dsc["smallest_exact_p"] == 0.5
    assert hd["n_reference"] == 1 and np.isnan(hd["p"])
    assert "too few pairs (n=1)" in hd["note"] and "1 patient(s) with an undefined distance" in hd["note"]
    with pytest.raises(CrossmodError, match="reference model 'ct_only'"):
        evaluation.paired_tests(_metrics_table(values), reference="ct_only")


def test_holm_adjustment():
    adjusted = evaluation._holm([0.01, 0.04, np.nan, 0.03])
    np.testing.assert_allclose(adjusted[[0, 1, 3]], [0.03, 0.06, 0.06])
    assert np.isnan(adjusted[2])


def test_paper_table_ii_is_the_papers():
    table = paper.TABLE_II
    assert table.loc[("Right parotid", "Cross-modality learning"), "HD (mm)"] == "18.32 ± 10.12"
    assert table.loc[("Left parotid", "CT only"), "DSC"] == "0.82 ± 0.05"
    assert table.loc[("Left parotid", "Interobserver variability"), "MSD (mm)"] == "1.59 ± 0.63"
    # the interobserver rows agree with the chapter 1 copy of them
    assert table.loc[("Right parotid", "Interobserver variability"), "DSC"] == \
        paper.INTEROBSERVER.loc["Parotid_R", "DSC"]


def test_method_boxplots_band_is_mean_sd():
    import matplotlib

    matplotlib.use("Agg")
    values = {("cross_modality", "MR"): [("m1", "Parotid_L", 0.7, 10, 1), ("m1", "Parotid_R", 0.7, 10, 1),
                                         ("m2", "Parotid_L", 0.5, np.inf, np.inf),
                                         ("m2", "Parotid_R", 0.6, 10, 1)],
              ("ct_only", "CT"): [("c1", "Parotid_L", 0.8, 8, 1), ("c1", "Parotid_R", 0.8, 8, 1)]}
    table = evaluation.per_patient(_metrics_table(values))
    assert table.set_index(["model", "patient"]).loc[("cross_modality", "m2"), "dsc"] == pytest.approx(0.55)
    assert np.isinf(table.set_index(["model", "patient"]).loc[("cross_modality", "m2"), "hd"])
    inter = pd.DataFrame({"patient": ["a", "b", "c"], "dsc": [0.8, 0.85, 0.9], "hd": [5.0, 6, 7],
                          "msd": [1.0, 1.2, 1.4]})
    fig = plots.method_boxplots(table, inter, order=["cross_modality", "ct_only"])
    band = next(p for p in fig.axes[0].patches if p.get_alpha() == 0.5 and p.get_width() >= 1)
    lo, hi = band.get_y(), band.get_y() + band.get_height()
    assert (lo, hi) == pytest.approx((0.85 - 0.05, 0.85 + 0.05))
    assert any("1 undefined" in t.get_text() for t in fig.axes[1].texts)
    fig = plots.method_boxplots(table, inter, band="range")
    band = next(p for p in fig.axes[1].patches if p.get_alpha() == 0.5 and p.get_width() >= 1)
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((5.0, 7.0))
    # medians 9 vs 8 mm: linear axes; a baseline 110 mm off the glands: log distance axes, DSC linear
    assert [ax.get_yscale() for ax in fig.axes[:3]] == ["linear"] * 3
    far = pd.concat([table, table[table["model"] == "ct_only"].assign(model="naive", title="naive",
                                                                      hd=110.0, msd=55.0)])
    fig = plots.method_boxplots(far, inter)
    assert [ax.get_yscale() for ax in fig.axes[:3]] == ["linear", "log", "log"]
    assert "log scale" in fig.axes[1].get_ylabel()
    fig = plots.method_boxplots(far, inter, distance_scale="linear")
    assert [ax.get_yscale() for ax in fig.axes[:3]] == ["linear"] * 3
    with pytest.raises(ValueError, match="distance_scale"):
        plots.method_boxplots(far, inter, distance_scale="cubic")


# ----------------------------------------------------------------------------------------------
# Fabricated predictions on a small phantom (test scaffolding only: chapter 4 writes the real ones)


def fabricate_predictions(run_root, seed: int = 0) -> pd.DataFrame:
    """Write ``predictions/`` as chapter 4 would, from a run's phantom (``raw/phantom``).

    Every "model" is a known corruption of the manual labels, so its metrics are predictable:
    ``cross_modality`` shifts the labels by one voxel along x and (raw only) adds a stray blob;
    ``naive`` erodes them in-plane by two voxels; ``mr_oracle`` is the second observer's contour;
    ``few_shot_k1`` dilates them by one voxel and skips the first MR patient (its fine-tuning
    patient); ``ct_only`` shifts the CT labels by one voxel along y, on the CT patients.
    """
    root = Path(run_root)
    rng = np.random.default_rng(seed)
    plane = np.zeros((1, 3, 3), bool)
    plane[0] = True

    def write(labels, like, path):
        image = sitk.GetImageFromArray(labels.astype(np.uint8))
        image.CopyInformation(like)
        cio.write_image(image, root / path)
        return path

    def per_label(labels, operation):
        out = np.zeros_like(labels)
        for value in (1, 2):
            out[operation(labels == value)] = value
        return out

    rows = []
    for modality, folder in (("MR", "mr"), ("CT", "ct")):
        cases = cio.list_cases(root / "raw" / "phantom" / folder)
        for k, case_dir in enumerate(cases):
            case = cio.read_case(case_dir)
            patient = case.patient_id
            manual = case.label_array()
            reference = write(manual, case.image, f"predictions/reference/{modality}/{patient}_labels.nii.gz")
            if modality == "MR":
                shifted = np.roll(manual, 1, axis=2)
                stray = shifted.copy()
                stray[manual.shape[0] // 2, 2:5, 2:5] = 1
                observer2 = cio.read_case(case_dir, structures_dir="structures_observer2").label_array()
                models = {
                    "cross_modality": ("Cross-modality (fabricated)", stray, shifted),
                    "naive": ("Naive (fabricated)", *(2 * [per_label(manual, lambda m: ndimage.binary_erosion(m, plane, 2))])),
                    "mr_oracle": ("MR oracle (fabricated)", observer2, observer2),
                }
                if k > 0:
                    dilated = per_label(manual, lambda m: ndimage.binary_dilation(m, plane))
                    models["few_shot_k1"] = ("Few-shot k=1 (fabricated)", dilated, dilated)
            else:
                moved = np.roll(manual, 1, axis=1)
                models = {"ct_only": ("CT only (fabricated)", moved, moved)}
            for model, (title, raw, lcc) in models.items():
                rows.append({"model": model, "title": title, "patient": patient, "modality": modality,
                             "labels": write(raw, case.image, f"predictions/{model}/{patient}_labels.nii.gz"),
                             "labels_lcc": write(lcc, case.image, f"predictions/{model}/{patient}_labels_lcc.nii.gz"),
                             "reference": reference, "seconds": float(rng.uniform(0.5, 1.5))})
    index = pd.DataFrame(rows)
    mr = index[index["modality"] == "MR"]
    common = set.intersection(*(set(g["patient"]) for _, g in mr.groupby("model")))
    index["common"] = (index["modality"] == "MR") & index["patient"].isin(common)
    index = index[list(evaluation.INDEX_COLUMNS)]
    _write_index(root, index.to_dict("records"))
    return index


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    from crossmod_lib.config import load_profile
    from crossmod_lib.preparation import cohort_sources

    profile = load_profile("smoke")
    profile["phantom"].update(n_ct=2, n_mr=3, ct_matrix=208, ct_slices=[40, 42], mr_matrix=400,
                              mr_slices=8, workers=1)
    run = RunFolder.open(profile, tmp_path_factory.mktemp("evaluation") / "run")
    cohort_sources(run, progress=False)  # writes the phantom
    fabricate_predictions(run.root)
    return run


def test_fabricated_predictions_give_expected_metrics(phantom_run):
    metrics = evaluation.evaluate_predictions(phantom_run)
    lcc = metrics[metrics["postprocess"] == "lcc"]
    assert set(lcc["model"]) == {"cross_modality", "naive", "mr_oracle", "few_shot_k1", "ct_only"}
    assert len(metrics) == 2 * 2 * (3 * 3 + 2 + 2)  # versions x glands x predictions
    # the oracle here is the second observer: its metrics are chapter 1's interobserver metrics
    inter = evaluation.interobserver(phantom_run.root / "raw" / "phantom" / "mr")
    oracle = lcc[lcc["model"] == "mr_oracle"].sort_values(["patient", "structure"])
    np.testing.assert_allclose(oracle[["dsc", "hd", "msd"]], inter.sort_values(["patient", "structure"])[["dsc", "hd", "msd"]])
    # a one-voxel shift along x: HD is one voxel (0.5 mm); the stray blob makes raw worse
    shifted = metrics[metrics["model"] == "cross_modality"].set_index(["postprocess", "patient", "structure"])
    np.testing.assert_allclose(shifted.loc["lcc", "hd"], 0.5)
    raw, lcc = shifted.loc["raw"], shifted.loc["lcc"]
    assert (raw.xs("Parotid_L", level="structure")["dsc"] < lcc.xs("Parotid_L", level="structure")["dsc"]).all()
    assert (raw.xs("Parotid_L", level="structure")["hd"] > 10).all()  # the blob lies far from the gland
    assert (raw.xs("Parotid_R", level="structure")["dsc"] == lcc.xs("Parotid_R", level="structure")["dsc"]).all()
    assert (metrics.loc[metrics["model"] == "few_shot_k1", "patient"] != "mr_000").all()
    tests = evaluation.paired_tests(metrics)
    assert set(tests["other"]) == {"naive", "mr_oracle", "few_shot_k1", "ct_only"}
    assert (tests.loc[tests["other"] != "ct_only", "n_reference"] == 2).all()  # mr_001, mr_002
    table = evaluation.table_ii(metrics, inter, interobserver_title="Interobserver (phantom)")
    assert table.loc[("Left parotid", "Interobserver (phantom)"), "n"] == 3


def test_contour_examples_and_figure(phantom_run):
    import matplotlib

    matplotlib.use("Agg")
    metrics = evaluation.evaluate_predictions(phantom_run)
    examples = evaluation.contour_examples(phantom_run, metrics, n=2)
    assert len(examples) == 2
    dsc = evaluation.per_patient(metrics).query("model == 'cross_modality'").set_index("patient")["dsc"]
    median = dsc.median()
    chosen = {e["patient"] for e in examples}
    assert chosen == set((dsc - median).abs().sort_values(kind="stable").index[:2])
    for e in examples:
        assert e["reference"].shape == sitk.GetArrayViewFromImage(e["image"]).shape
        assert e["dsc"] == pytest.approx(dsc[e["patient"]])
    fig = plots.figure_contours(examples)
    assert len(fig.axes) == 3 * 2
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["axial", "sagittal", "coronal"]
    with pytest.raises(CrossmodError, match="no MR metrics for model 'ct_only'"):
        evaluation.contour_examples(phantom_run, metrics, model="ct_only")

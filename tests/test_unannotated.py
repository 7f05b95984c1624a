"""An MR cohort without (some, or any) manual contours: the user's case (issue 15, item 1).

The unannotated patients feed the CycleGAN and get a prediction from every model that may be
tested on them; the oracle and few-shot baselines train on the annotated ones only (or are left
out, with the reason, when too few are); evaluation scores the annotated ones only.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from crossmod_lib import evaluation, preparation
from crossmod_lib import segmentation as seg
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import Case, read_case, write_image
from crossmod_lib.runs import RunFolder
from crossmod_lib.slices import annotated_patients, read_slices


def _small_smoke():
    profile = load_profile("smoke")
    profile["phantom"].update({"ct_matrix": 208, "ct_slices": [44, 48], "mr_matrix": 400})
    return profile


def _mr_as_dicom(run, folder, unannotated):
    """The run's phantom MR cohort written as DICOM patients; ``unannotated`` lose their RTSTRUCT."""
    from crossmod_lib.dicom import write_case_dicom

    sources = preparation.cohort_sources(run, progress=False)
    for item in sources["MR"].items:
        case = read_case(item)
        write_case_dicom(case, folder / case.patient_id)
        if case.patient_id in unannotated:
            (folder / case.patient_id / "RS.dcm").unlink()
    return sorted(p.name for p in folder.iterdir())


def _dicom_mr_run(tmp_path, unannotated):
    phantom_run = RunFolder.open(_small_smoke(), tmp_path / "phantom_run")
    patients = _mr_as_dicom(phantom_run, tmp_path / "mr_dicom", unannotated)
    profile = _small_smoke()
    profile["data"]["mr"] = {"dataset": "dicom", "root": str(tmp_path / "mr_dicom"),
                             "source": None, "patients": None, "observer": None, "split": None,
                             "format": None}
    run = RunFolder.open(profile, tmp_path / "run")
    shutil.copytree(phantom_run.root / "raw" / "phantom", run.root / "raw" / "phantom")
    preparation.prepare_run(run)
    shutil.copy(run.root / "prepared" / "ct_slices.npz", run.stage("cleaned") / "training_slices.npz")
    return run, patients


@pytest.fixture(scope="module")
def partly_annotated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("partly")
    run, patients = _dicom_mr_run(tmp, unannotated={"mr_002"})
    seg.train_run(run)
    index = seg.predict_run(run)
    return run, patients, index


def test_unannotated_dicom_patients_are_prepared_and_flagged(partly_annotated):
    run, patients, _ = partly_annotated
    assert patients == ["mr_000", "mr_001", "mr_002"]
    slices = read_slices(run.root / "prepared" / "mr_slices.npz", "MR", ("image", "annotated"))
    assert annotated_patients(slices) == ["mr_000", "mr_001"]
    unannotated = slices["patient"] == "mr_002"
    assert unannotated.any() and not slices["labels"][unannotated].any()
    assert slices["labels"][~unannotated].any()
    import pandas as pd

    cases = pd.read_csv(run.root / "prepared" / "mr_cases.csv")
    assert dict(zip(cases["patient"], cases["annotated"])) == {"mr_000": True, "mr_001": True,
                                                              "mr_002": False}


def test_every_mr_patient_is_predicted_and_only_the_annotated_are_scored(partly_annotated):
    run, patients, index = partly_annotated
    for model in ("cross_modality", "naive", "domain_random"):
        assert sorted(index[index["model"] == model]["patient"]) == patients
    # the oracle trains and tests on manual contours only: the unannotated patient is not in it
    assert sorted(index[index["model"] == "mr_oracle"]["patient"]) == ["mr_000", "mr_001"]
    # few-shot fine-tunes on an annotated patient and predicts every other, unannotated included
    few = index[index["model"] == "few_shot_k1"]
    assert "mr_002" in set(few["patient"]) and len(few) == 2
    unannotated = index[index["patient"] == "mr_002"]
    assert (unannotated["reference"] == "").all()
    assert not (run.root / "predictions" / "reference" / "MR" / "mr_002_labels.nii.gz").exists()
    for path in unannotated["labels_lcc"]:
        assert (run.root / path).is_file()  # a prediction on its own MR grid
    metrics = evaluation.evaluate_predictions(run)
    assert "mr_002" not in set(metrics["patient"])
    assert {"mr_000", "mr_001"} <= set(metrics[metrics["modality"] == "MR"]["patient"])
    read_back = evaluation.read_prediction_index(run.root / "predictions" / "index.csv")
    assert evaluation.annotation_counts(read_back) == (2, 3)
    assert evaluation.annotation_sentence(read_back).startswith("2 of 3 MR patients have manual contours")


def test_with_no_manual_mr_contours_the_mr_label_baselines_are_left_out(tmp_path, monkeypatch):
    run, patients = _dicom_mr_run(tmp_path, unannotated={"mr_000", "mr_001", "mr_002"})
    trained = seg.train_run(run)
    skipped = dict(zip(trained["name"], trained["skipped"]))
    assert skipped["cross_modality"] == "" and skipped["domain_random"] == ""
    assert "0 MR patients with manual contours" in skipped["mr_oracle_fold0"]
    assert "0 MR patients with manual contours" in skipped["few_shot_k1"]
    assert not (run.root / "model" / "mr_oracle_fold0").exists()
    index = seg.predict_run(run)
    assert set(index["model"]) == {"cross_modality", "ct_only", "naive", "domain_random"}
    mr = index[index["modality"] == "MR"]
    assert sorted(mr[mr["model"] == "cross_modality"]["patient"]) == patients
    assert (mr["reference"] == "").all()
    assert evaluation.annotation_counts(index) == (0, 3)
    assert "None of the 3 MR patients" in evaluation.annotation_sentence(index)
    metrics = evaluation.evaluate_predictions(run)
    assert set(metrics["modality"]) == {"CT"}  # only the CT-only network's CT test is scored
    # chapter 5 shows the gallery instead of failing
    from crossmod_lib import pipeline

    monkeypatch.setenv("CROSSMOD_HEADLESS", "1")
    (executed,) = pipeline.run_notebooks(run, stages=[5], log=lambda *a: None)
    assert "None of the 3 MR patients has manual contours" in _cells_text(executed)
    assert (run.root / "figures" / "unannotated_contours_1.png").is_file()


def test_a_broken_rtstruct_is_still_an_error_not_an_unannotated_patient(tmp_path):
    phantom_run = RunFolder.open(_small_smoke(), tmp_path / "phantom_run")
    _mr_as_dicom(phantom_run, tmp_path / "mr", unannotated=set())
    rs = tmp_path / "mr" / "mr_001" / "RS.dcm"
    rs.write_bytes(rs.read_bytes()[:300])
    source = preparation.CohortSource("MR", "dicom", sorted((tmp_path / "mr").iterdir()),
                                      tmp_path / "mr", contours="optional")
    with pytest.raises(CrossmodError, match="RS.dcm"):
        source.read(source.items[1])


def test_mr_label_shortfall_names_what_is_missing():
    profile = _small_smoke()
    recipes = {r["name"]: r for r in seg.model_recipes(profile)}
    assert seg.mr_label_shortfall(recipes["cross_modality"], 0, profile) is None
    assert seg.mr_label_shortfall(recipes["mr_oracle_fold0"], 2, profile) is None
    assert "needs 2" in seg.mr_label_shortfall(recipes["mr_oracle_fold0"], 1, profile)
    assert seg.mr_label_shortfall(recipes["few_shot_k1"], 2, profile) is None
    assert "1 MR patient with" in seg.mr_label_shortfall(recipes["few_shot_k1"], 1, profile)


# ----------------------------------------------------------------------------------------------
# The other layouts: NIfTI case folders, a flat folder of images, nnU-Net without labels


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.uniform(0, 400, (6, 20, 20)).astype(np.float32))
    image.SetSpacing((1.5, 1.5, 3.0))
    return image


def test_case_folders_and_image_files_without_contours_read_as_unannotated(tmp_path):
    from crossmod_lib import datasets

    write_image(_volume(), tmp_path / "pddca" / "p1" / "img.nii.gz")
    case = datasets.read_pddca_case(tmp_path / "pddca" / "p1", contours="optional")
    assert case.structures == {} and case.patient_id == "p1"
    with pytest.raises(CrossmodError, match="no such file"):
        datasets.read_pddca_case(tmp_path / "pddca" / "p1")  # a CT must have its contours

    for name in ("pt_a.nii.gz", "pt_b.nrrd"):
        write_image(_volume(), tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    profile = _small_smoke()
    profile["data"]["mr"] = {"dataset": "images", "root": str(tmp_path / "images"), "patients": None}
    run = RunFolder.open(profile, tmp_path / "run")
    source = preparation.cohort_sources(run, progress=False)["MR"]
    assert source.patient_ids() == ["pt_a", "pt_b"]
    case = source.read(source.items[1])
    assert case.patient_id == "pt_b" and case.structures == {}
    profile["data"]["ct"] = {"dataset": "images", "root": str(tmp_path / "images")}
    with pytest.raises(CrossmodError, match="only be the MR cohort"):
        preparation.cohort_sources(RunFolder.open(profile, tmp_path / "run2"), progress=False)


def test_nnunet_images_without_labels_read_as_unannotated(tmp_path):
    import json

    from crossmod_lib import datasets

    folder = tmp_path / "Dataset001_MR"
    write_image(_volume(0), folder / "imagesTr" / "a_0000.nii.gz")
    labels = sitk.GetImageFromArray(np.zeros((6, 20, 20), np.uint8))
    labels.CopyInformation(_volume(0))
    arr = sitk.GetArrayFromImage(labels)
    arr[2:4, 5:8, 5:8], arr[2:4, 12:15, 12:15] = 1, 2
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(_volume(0))
    write_image(labels, folder / "labelsTr" / "a.nii.gz")
    write_image(_volume(1), folder / "imagesTr" / "b_0000.nii.gz")
    write_image(_volume(2), folder / "imagesTs" / "c_0000.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "Parotid_L": 1, "Parotid_R": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    with pytest.raises(CrossmodError, match="b.nii.gz: no such file"):
        datasets.read_nnunet_dataset(folder)
    cases = {c.patient_id: c for c in datasets.read_nnunet_dataset(folder, contours="optional")}
    assert sorted(cases) == ["a", "b", "c"]
    assert set(cases["a"].structures) == {"Parotid_L", "Parotid_R"}
    assert cases["b"].structures == {} and cases["c"].structures == {}
    assert isinstance(cases["c"], Case)


# ----------------------------------------------------------------------------------------------
# Chapter 5 without scores: the gallery and the contour review


def test_the_gallery_shows_the_unannotated_patients_predictions(partly_annotated):
    import matplotlib

    matplotlib.use("Agg")
    from crossmod_lib import plots

    run, _, _ = partly_annotated
    examples = evaluation.prediction_gallery(run)
    assert [e["patient"] for e in examples] == ["mr_002"] and examples[0]["reference"] is None
    assert examples[0]["prediction"].shape == sitk.GetArrayViewFromImage(examples[0]["image"]).shape
    every = evaluation.prediction_gallery(run, unannotated_only=False)
    assert [e["reference"] is None for e in every] == [False, False, True]
    fig = plots.figure_contours(every)
    assert "no manual contours" in fig.axes[2].get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["automatic", "manual"]
    assert [t.get_text() for t in plots.figure_contours(examples).legends[0].get_texts()] == ["automatic"]
    with pytest.raises(CrossmodError, match="no prediction for mr_009"):
        evaluation.prediction_gallery(run, patients=["mr_009"])


def test_contour_review_accepts_and_flags_and_keeps_its_decisions(partly_annotated, tmp_path):
    import json

    from crossmod_lib import contour_review as cr

    run, _, _ = partly_annotated
    path = run.contour_review
    path.unlink(missing_ok=True)
    state = cr.ContourReviewState.from_run(run)
    assert list(state.patients["patient"]) == ["mr_000", "mr_001", "mr_002"]
    assert state.example("mr_002")["reference"] is None
    state.go(2)
    state.flag(note="left gland leaks into the masseter")
    state.accept("mr_000")
    assert state.counts() == {"patients": 3, "accept": 1, "flag": 1, "undecided": 1}
    saved = json.loads(path.read_text())
    assert saved["format"] == cr.FORMAT
    assert saved["decisions"]["cross_modality/mr_002"]["note"] == "left gland leaks into the masseter"
    again = cr.ContourReviewState.from_run(run)  # decisions survive a restart
    table = again.decisions_table().set_index("patient")
    assert table.loc["mr_002", "decision"] == "flag" and table.loc["mr_001", "decision"] == "undecided"
    again.clear("mr_002")
    assert again.decision("mr_002") == "undecided"
    with pytest.raises(CrossmodError, match="not a patient"):
        again.accept("mr_042")
    only = cr.review_contours(run, interactive=False)
    assert list(only["patient"]) == ["mr_002"]
    widget = cr.ContourReviewWidget(cr.ContourReviewState.from_run(run, unannotated_only=True))
    widget._on_flag(None)
    assert cr.load_contour_review(path)["cross_modality/mr_002"]["decision"] == "flag"
    assert widget.image.value[:4] == b"\x89PNG"
    path.write_text('{"format": "something else"}')
    with pytest.raises(CrossmodError, match="not a contour review file"):
        cr.load_contour_review(path)
    path.unlink()


# ----------------------------------------------------------------------------------------------
# The chapters themselves (papermill), on the same runs: 4 and 5 with some patients unannotated


def _cells_text(path) -> str:
    import json

    notebook = json.loads(path.read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            texts.append("".join(data.get("text/markdown", "")) + "".join(data.get("text/plain", ""))
                         + "".join(output.get("text", "")))
    return "\n".join(texts)


def test_chapters_4_and_5_run_and_say_who_was_scored(partly_annotated, monkeypatch):
    from crossmod_lib import pipeline

    run, _, _ = partly_annotated
    monkeypatch.setenv("CROSSMOD_HEADLESS", "1")
    executed = pipeline.run_notebooks(run, stages=[4, 5], log=lambda *a: None)
    chapter5 = _cells_text(executed[-1])
    assert "2 of 3 MR patients have manual contours" in chapter5
    assert (run.root / "figures" / "unannotated_contours_1.png").is_file()  # the review gallery
    assert (run.root / "metrics" / "table_2_lcc.csv").is_file()

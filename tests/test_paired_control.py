"""The controls of an MR cohort simulated from CT: the paired control (the CT-only network on the
CT each simulated MR patient was made from) and the ideal translation (the cross-modality U-Net
trained on the simulator's own MR of the CT patients).

A run whose MR is simulated from CT patients (here synthetic CTs in the PDDCA layout, so no
data is needed) contours those patients' own CT with the CT-only network beside its held-out CT
test; chapter 5 compares it with the MR methods paired, on the same patients, and the
convergence study's tier criteria set it beside CT only. Chapter 10 sets the ideal translation
beside the CycleGAN's cross-modality network: what the translator costs.
"""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from crossmod_lib import convergence, evaluation, preparation
from crossmod_lib import segmentation as seg
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import write_image
from crossmod_lib.runs import RunFolder
from test_simulation import _synthetic_ct

CT_PATIENTS = ["case_a", "case_b", "case_c", "case_d", "case_e"]
MR_PATIENTS = ["case_f", "case_g"]


def _pddca(root):
    for i, name in enumerate(CT_PATIENTS + MR_PATIENTS):
        case = _synthetic_ct(n_slices=40 + 2 * i)
        write_image(case.image, root / name / "img.nrrd")
        for structure, mask in case.structures.items():
            write_image(mask, root / name / "structures" / f"{structure}.nrrd")
    return root


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """A smoke run on synthetic CTs with an MR cohort simulated from two other patients; the
    CT-only network trained (a second or two) and every model predicted."""
    tmp = tmp_path_factory.mktemp("paired")
    source = _pddca(tmp / "ctdata")
    path = tmp / "sim.yaml"
    path.write_text(yaml.safe_dump({"extends": "smoke", "name": "sim", "data": {
        "ct": {"dataset": "pddca", "root": str(source), "patients": CT_PATIENTS},
        "mr": {"dataset": "simulated_mr", "source": "pddca", "root": str(source),
               "patients": MR_PATIENTS},
        "mr_simulation": {"pixel_mm": 2.0, "matrix": 64, "slices": 16, "min_slices": 8,
                          "workers": 1}}}))
    run = RunFolder.open(load_profile(path), tmp / "run")
    preparation.prepare_run(run)
    seg.train_run(run, kinds=["ct_only", "naive"])
    index = seg.predict_run(run, models=["ct_only", "naive"])
    return run, index


def test_the_simulated_mr_patients_own_ct_is_their_source(simulated_run):
    run, _ = simulated_run
    sources = preparation.cohort_sources(run, progress=False)
    ct, table = seg.paired_ct_source(sources)
    assert ct.modality == "CT" and ct.dataset == "pddca"
    assert sorted(table) == MR_PATIENTS
    assert all(folder.name == patient for patient, folder in table.items())
    case = ct.read(table["case_f"])
    assert set(case.structures) == {"Parotid_L", "Parotid_R"}
    # a cohort that is not simulated from CT has none
    assert seg.paired_ct_source({"CT": sources["CT"], "MR": preparation.CohortSource("MR", "dicom", [])}) is None
    assert seg.paired_ct_source({"CT": sources["CT"]}) is None


def test_predict_run_contours_the_mr_patients_ct_with_the_ct_network(simulated_run):
    run, index = simulated_run
    paired = index[index["model"] == seg.PAIRED_CT]
    assert sorted(paired["patient"]) == MR_PATIENTS
    assert (paired["modality"] == "CT").all() and not paired["common"].any()
    assert (paired["title"] == seg.PAIRED_CT_TITLE).all()
    held_out = index[index["model"] == "ct_only"]
    assert set(held_out["patient"]) <= set(CT_PATIENTS)  # the held-out test is unchanged
    for _, row in paired.iterrows():
        assert (run.root / row["labels_lcc"]).is_file()
        assert row["reference"] == f"predictions/reference/CT/{row['patient']}_labels.nii.gz"
    metrics = evaluation.evaluate_predictions(run)
    assert set(metrics[metrics["model"] == seg.PAIRED_CT]["patient"]) == set(MR_PATIENTS)
    assert evaluation.method_order(metrics["model"])[:2] == ["ct_only", seg.PAIRED_CT]
    # only the networks asked for: no control without the CT-only network
    index = seg.predict_run(run, models=["naive"])
    assert seg.PAIRED_CT not in set(index["model"])


def _metrics(rows):
    out = []
    for model, modality, patient, dsc in rows:
        for structure in ("Parotid_L", "Parotid_R"):
            out.append({"model": model, "title": model, "patient": patient, "modality": modality,
                        "common": modality == "MR", "postprocess": "lcc", "structure": structure,
                        "label": 1, "dsc": dsc, "hd": 5.0 + dsc, "hd95": 4.0, "msd": 1.0 + dsc,
                        "reference_voxels": 10, "prediction_voxels": 10, "seconds": 0.1})
    return pd.DataFrame(out)


def test_the_mr_methods_are_compared_with_the_control_paired_and_with_ct_only_unpaired():
    mr_patients = [f"p{i}" for i in range(6)]
    rows = [("cross_modality", "MR", p, 0.6 + 0.01 * i) for i, p in enumerate(mr_patients)]
    rows += [(seg.PAIRED_CT, "CT", p, 0.7 + 0.01 * i) for i, p in enumerate(mr_patients)]
    rows += [("ct_only", "CT", f"c{i}", 0.8) for i in range(4)]
    metrics = _metrics(rows)
    metrics.loc[metrics["patient"].isin(["p0", "p1"]), "common"] = False  # e.g. few-shot's patients
    tests = evaluation.paired_tests(metrics)
    dsc = tests[tests["metric"] == "dsc"].set_index("other")
    assert dsc.loc[seg.PAIRED_CT, "test"].startswith("Wilcoxon signed-rank (paired: the same patients")
    assert dsc.loc[seg.PAIRED_CT, "n_reference"] == 6  # every patient both have, not only the common
    assert np.isclose(dsc.loc[seg.PAIRED_CT, "median_difference"], -0.1)
    assert dsc.loc["ct_only", "test"].startswith("Mann-Whitney U")


def test_tier_criteria_set_the_paired_control_beside_ct_only():
    rows = []
    for seed, (cross, ct, paired) in {2021: (0.63, 0.72, 0.66), 2022: (0.66, 0.68, 0.61)}.items():
        for model, value in (("cross_modality", cross), ("ct_only", ct), (seg.PAIRED_CT, paired),
                             ("domain_random", 0.55), ("naive", 0.02)):
            for structure in ("Parotid_L", "Parotid_R"):
                rows.append({"seed": seed, "budget": 8600, "model": model, "title": model,
                             "structure": structure, "dsc_mean": value, "dsc_sd": 0.1, "n": 12,
                             "note": ""})
    criteria = convergence.tier_criteria(pd.DataFrame(rows), 8600)
    by_seed = criteria.groupby("seed").first()
    assert list(by_seed["vs_ct_only"]) == [False, True]  # 0.63 < 0.72 - 0.05
    assert list(by_seed[f"vs_{seg.PAIRED_CT}"]) == [True, True]  # 0.63 >= 0.66 - 0.05
    assert list(by_seed["holds"]) == [False, True]  # the criteria themselves are unchanged
    verdict = convergence.tier_verdict(criteria, 8600)
    assert "holds for 2 of 4" in verdict and "same patients' own CT" in verdict
    assert "for 4 of 4 pairs" in verdict
    # seeds pooled per side: (0.63 - 0.66 + 0.66 - 0.61) / 2 = +0.01 on each side
    assert "seed mean of cross-modality minus the control: right +0.01, left +0.01." in verdict
    # without the control, no column and no sentence
    plain = convergence.tier_criteria(pd.DataFrame([r for r in rows if r["model"] != seg.PAIRED_CT]), 8600)
    assert seg.PAIRED_CT not in plain and "same patients" not in convergence.tier_verdict(plain, 8600)


def test_scored_models_add_the_control_only_with_ct_only():
    assert convergence.scored_models(["cross_modality", "ct_only"]) == ["cross_modality", "ct_only", seg.PAIRED_CT]
    assert convergence.scored_models(["cross_modality"]) == ["cross_modality"]


def test_a_study_on_phantom_mr_has_no_control_to_add(tmp_path):
    runs_info = {"points": {"seed2021/budget00430": {"seed": 2021, "budget": 430, "dsc": []}}}
    convergence._add_paired_control(runs_info, tmp_path, load_profile("smoke"))
    assert "paired_control" not in runs_info["points"]["seed2021/budget00430"]


def test_the_unet_spread_sentence_reads_only_the_runs_trained_as_the_point():
    rows = []
    for variant, values in {"paper": (0.80, 0.84, 0.82), "+augment=True": (0.10, 0.20, 0.30)}.items():
        for seed, value in zip((2021, 2022, 2023), values):
            for structure in ("Parotid_R", "Parotid_L"):
                rows.append({"variant": variant, "unet_seed": seed, "model": "cross_modality", "title": "",
                             "structure": structure, "dsc_mean": value, "dsc_sd": 0.1, "n": 8})
    info = {"variants": {"paper": {}, "+augment=True": {"augment": True}}}
    sentence = convergence.unet_spread_sentence("unet-seeds-x", info, pd.DataFrame(rows))
    assert "3 U-Net seeds" in sentence and "`unet-seeds-x`" in sentence
    assert "right 0.82 ± 0.02 (0.80–0.84), left 0.82 ± 0.02 (0.80–0.84)" in sentence  # augment ignored
    # one seed as the point: no spread to give; another model: nothing either
    assert convergence.unet_spread_sentence("s", info, pd.DataFrame(rows[:2] + rows[6:])) == ""
    assert convergence.unet_spread_sentence("s", info, pd.DataFrame(rows), model="ct_only") == ""


# ----------------------------------------------------------------------------------------------
# The ideal translation: the simulator's own MR of the CT patients in place of the synthetic MR


def test_the_ideal_translation_trains_on_the_simulators_mr_of_the_ct_patients(simulated_run, tmp_path):
    import shutil

    run, _ = simulated_run
    point = tmp_path / "point"
    shutil.copytree(run.root, point, symlinks=True)
    ct = preparation.load_slices(RunFolder.ct_slices.at(point))
    # the cleaned synthetic MR stands in as the CT slices of three of the CT patients
    chosen = np.isin(ct["patient"], CT_PATIENTS[:3])
    (point / "synthetic").mkdir()
    (point / "cleaned").mkdir()
    np.savez(RunFolder.training_slices.at(point), **{k: ct[k][chosen] for k in ("image", "labels", "patient")})
    table = convergence.run_ideal_translation_study(point, tmp_path / "study", seeds=[5], log=lambda *a: None)
    assert set(table["structure"]) == {"Parotid_L", "Parotid_R"} and (table["variant"] == "ideal-translation").all()
    assert table["dsc_mean"].notna().all()
    ideal = preparation.load_slices(RunFolder.training_slices.at(tmp_path / "study" / "ideal_point"))
    assert sorted(set(ideal["patient"])) == CT_PATIENTS[:3]  # the cleaned slices' patients, no others
    assert (ideal["labels"] > 0).any() and ideal["image"].shape[1:] == ct["image"].shape[1:]
    # MR of the CT patients, not their CT: 4 mm slices (16 at most), other intensities
    assert len(ideal["image"]) <= 3 * 16 < chosen.sum()
    info = json.loads(RunFolder.unet_seeds_runs.at(tmp_path / "study").read_text())
    assert info["training"] == convergence.IDEAL_TRAINING and info["translated_point"] == str(point)
    assert info["translated_profile"] == "sim" and info["ideal_slice_mm"] == 4.0
    with pytest.raises(CrossmodError, match="drawn at 4.0 mm slices, not 2 mm; give another --out"):
        convergence.run_ideal_translation_study(point, tmp_path / "study", seeds=[5], slice_mm=2.0)
    # not a spread of the point's own U-Net; a row of the translator's cost
    assert convergence.unet_spread_sentence("s", info, table) == ""
    rows = convergence.ideal_translation_table([("ideal-x", info, table)])
    assert list(rows["structure"]) == ["Parotid_R", "Parotid_L"] and rows["ideal"].notna().all()


def test_the_ideal_translation_needs_an_mr_cohort_simulated_from_ct(tmp_path):
    RunFolder.open(load_profile("smoke"), tmp_path / "point")
    with pytest.raises(CrossmodError, match="needs an MR cohort simulated from CT"):
        convergence.run_ideal_translation_study(tmp_path / "point", tmp_path / "study")
    with pytest.raises(CrossmodError, match="not a run folder"):
        convergence.run_ideal_translation_study(tmp_path / "nothing", tmp_path / "study")


def test_the_ideal_translation_refuses_a_broken_cohort_record(tmp_path):
    from crossmod_lib import simulation

    record = tmp_path / "simulation.json"
    record.write_text("{")
    with pytest.raises(CrossmodError, match=r"simulation.json: not a simulated MR cohort's record"):
        simulation.ideal_translation_slices(record, [tmp_path], {})
    record.write_text(json.dumps({"arguments": {"dataset": "pddca", "seed": 1, "settings": {}}}))
    with pytest.raises(CrossmodError, match="missing: CT patient folder not found"):
        simulation.ideal_translation_slices(record, [tmp_path / "missing"], {})
    with pytest.raises(CrossmodError, match="slice_mm=0 must be a number > 0"):
        simulation.ideal_translation_slices(record, [tmp_path], {}, slice_mm=0)


def test_the_ideal_translation_draws_the_same_slab_in_thinner_slices(tmp_path):
    from dataclasses import asdict

    from crossmod_lib import simulation

    _pddca(tmp_path / "ct")
    settings = simulation.SimulationSettings(pixel_mm=2.0, matrix=64, slices=16, min_slices=8)
    record = tmp_path / "simulation.json"
    record.write_text(json.dumps({"arguments": {"dataset": "pddca", "seed": 3, "settings": asdict(settings)}}))
    pre = load_profile("smoke")["preprocessing"]
    thick = simulation.ideal_translation_slices(record, [tmp_path / "ct" / "case_a"], pre)
    thin = simulation.ideal_translation_slices(record, [tmp_path / "ct" / "case_a"], pre, slice_mm=2.0)
    assert len(thick["image"]) == 16 and len(thin["image"]) == 32
    span = {name: np.ptp(arrays["z_mm"]) for name, arrays in (("thick", thick), ("thin", thin))}
    assert span["thin"] == pytest.approx(span["thick"], abs=2.5)  # the same slab
    assert (thin["labels"] > 0).any() and set(thin["patient"]) == {"case_a"}


def test_the_translators_cost_is_the_ideal_minus_the_cyclegan():
    rows = [{"variant": "ideal-translation", "unet_seed": seed, "model": "cross_modality", "title": "",
             "structure": side, "dsc_mean": value + (0.02 if side == "Parotid_L" else 0.0), "dsc_sd": 0.1, "n": 12}
            for seed, value in ((1, 0.70), (2, 0.74)) for side in ("Parotid_R", "Parotid_L")]
    info = {"training": convergence.IDEAL_TRAINING, "translated_point": "/x/study/seed2021/budget08600",
            "point_dsc": [{"model": "cross_modality", "structure": "Parotid_R", "dsc_mean": 0.62},
                          {"model": "cross_modality", "structure": "Parotid_L", "dsc_mean": 0.65},
                          {"model": "ct_only_paired", "structure": "Parotid_R", "dsc_mean": 0.66}]}
    other = {"variants": {"paper": {}}}  # a U-Net seed study of the point's own slices: not a row
    table = convergence.ideal_translation_table([("ideal", info, pd.DataFrame(rows)), ("seeds", other, pd.DataFrame(rows))])
    assert list(table["study"]) == ["ideal", "ideal"] and set(table["point"]) == {"study/seed2021/budget08600"}
    cost = table.set_index("structure")["translator_cost"]
    assert cost["Parotid_R"] == pytest.approx(0.10) and cost["Parotid_L"] == pytest.approx(0.09)
    assert table.set_index("structure").loc["Parotid_R", "ct_only_paired"] == pytest.approx(0.66)
    assert np.isnan(table.set_index("structure").loc["Parotid_L", "ct_only_paired"])


def test_the_ideal_translation_sentence_names_the_translators_cost_and_the_appearances():
    rows = [{"variant": "ideal-translation", "unet_seed": seed, "model": "cross_modality", "title": "",
             "structure": side, "dsc_mean": value, "dsc_sd": 0.1, "n": 12}
            for seed, value in ((1, 0.68), (2, 0.70)) for side in ("Parotid_R", "Parotid_L")]
    info = {"training": convergence.IDEAL_TRAINING, "translated_point": "/x/mr2/seed2021/budget08600",
            "translated_profile": "mr2-seed2021", "ideal_slice_mm": 4.0,
            "point_dsc": [{"model": m, "structure": side, "dsc_mean": v}
                          for m, v in (("cross_modality", 0.58), ("ct_only_paired", 0.65))
                          for side in ("Parotid_R", "Parotid_L")]}
    sentence = convergence.ideal_translation_sentence(convergence.ideal_translation_table([("ideal-mr2", info, pd.DataFrame(rows))]))
    assert "`ideal-mr2` (profile `mr2-seed2021`, point `mr2/seed2021/budget08600`)" in sentence
    assert "the ideal translation in 4 mm slices scores right 0.69, left 0.69 (mean of 2 U-Net seeds, right 0.68–0.70, left 0.68–0.70)" in sentence
    assert "against the CycleGAN's right 0.58, left 0.58: the translator costs right +0.11, left +0.11" in sentence
    assert "(the paired control, right 0.65, left 0.65): right +0.04, left +0.04." in sentence

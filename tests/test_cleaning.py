"""Section 2.D data cleaning on fabricated slices built here: outline QC, elastix refinement
registration, the cleaning stage's outputs, Fig. 6 data and the nnU-Net export."""

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from crossmod_lib import cleaning
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.preparation import head_mask

SIZE, PIXEL = 56, 3.0

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute")


def fast_settings(**changes):
    """The smoke profile's cleaning settings, fewer iterations: small test images, fast."""
    settings = cleaning.cleaning_settings(load_profile("smoke"))
    settings.update(pixel_mm=PIXEL, spatial_samples=1024, rigid_resolutions=2, rigid_iterations=50,
                    bspline_resolutions=2, bspline_iterations=60, workers=1, examples=2, timeout_s=60.0)
    settings.update(changes)
    return settings


def fabricate_slice(kind, seed, position):
    """CT slice, its labels/head mask, and a fabricated synthetic MR of the given kind.

    good: MR contrast of the same anatomy with a known small deformation (narrower, rotated,
    shifted); shrunk: the head squeezed to 55 % width; garbage: smooth noise over the whole image;
    constant: a flat image (elastix would crash on it).
    """
    scale = 1.0 - 0.5 * abs(position - 0.5)  # smaller heads towards the ends
    case = cleaning.synthetic_registration_case(
        SIZE, PIXEL, seed=seed, rotation_deg=2.0, shift_mm=(1.5, -1.5), amplitude_mm=2.0,
        scale_x=0.95, scale=scale, parotids=0.25 <= position <= 0.75)
    rng = np.random.default_rng(seed)
    if kind == "good":
        synthetic = case["moving"]
    elif kind == "shrunk":
        synthetic = cleaning.warp_image(case["truth"], PIXEL, scale_x=0.55)
    elif kind == "garbage":
        from scipy import ndimage

        noise = ndimage.gaussian_filter(rng.uniform(0, 255, (SIZE, SIZE)), 3)
        synthetic = np.clip((noise - noise.min()) / np.ptp(noise) * 255, 0, 255).astype(np.uint8)
    elif kind == "constant":
        synthetic = np.full((SIZE, SIZE), 100, np.uint8)
    else:
        raise ValueError(kind)
    return case, synthetic


KINDS = {  # patient -> kinds of its slices, inferior to superior
    "pA": ["garbage", "shrunk", "good", "good", "good", "garbage"],
    "pB": ["shrunk", "good", "good", "good", "constant"],
}


def fabricate_inputs(folder, kinds=KINDS):
    """prepared/ct_slices.npz and synthetic/synthetic_mr.npz in the row order of the stage contract."""
    ct = {k: [] for k in ("image", "labels", "head_mask", "patient", "slice_index", "z_mm")}
    synthetic, truth, kind_of_row = [], [], []
    seed = 0
    for patient, patient_kinds in kinds.items():
        for k, kind in enumerate(patient_kinds):
            position = k / (len(patient_kinds) - 1)
            case, syn = fabricate_slice(kind, seed, position)
            seed += 1
            ct["image"].append(case["ct"])
            ct["labels"].append(case["labels"])
            ct["head_mask"].append(case["head_mask"])
            ct["patient"].append(patient)
            ct["slice_index"].append(10 + k)
            ct["z_mm"].append(-20.0 + 2.5 * k)
            synthetic.append(syn)
            truth.append(case["truth"])
            kind_of_row.append(kind)
    ct = {k: np.array(v) for k, v in ct.items()}
    ct["slice_index"] = ct["slice_index"].astype(np.int32)
    ct["z_mm"] = ct["z_mm"].astype(np.float32)
    (folder / "prepared").mkdir(parents=True, exist_ok=True)
    (folder / "synthetic").mkdir(parents=True, exist_ok=True)
    ct_path = folder / "prepared" / "ct_slices.npz"
    syn_path = folder / "synthetic" / "synthetic_mr.npz"
    np.savez_compressed(ct_path, **ct)
    np.savez_compressed(syn_path, image=np.stack(synthetic).astype(np.uint8), patient=ct["patient"],
                        slice_index=ct["slice_index"], z_mm=ct["z_mm"], labels=ct["labels"],
                        head_mask=ct["head_mask"])
    return syn_path, ct_path, np.array(kind_of_row), np.stack(truth)


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """One cleaning run on the fabricated inputs, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("clean")
    syn, ct, kinds, truth = fabricate_inputs(root)
    start = time.perf_counter()
    table = cleaning.clean(syn, ct, root / "cleaned", fast_settings(), progress=False)
    return {"root": root, "syn": syn, "ct": ct, "kinds": kinds, "truth": truth, "table": table,
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# Settings and parameter maps


def test_full_profile_has_the_papers_cleaning_settings():
    settings = cleaning.cleaning_settings(load_profile("full"))
    assert settings["outline_dice_threshold"] == 0.8
    assert settings["bspline_grid_spacing_mm"] == 8.0
    assert cleaning.grid_spacing_mm(settings) == 8.0  # 1 mm pixels: the paper's grid
    assert settings["metric"] == "AdvancedMattesMutualInformation"
    assert "GradientDescent" in settings["optimizer"]
    for name in ("demo", "smoke"):
        cleaning.cleaning_settings(load_profile(name))


def test_grid_spacing_is_never_finer_than_min_grid_spacing_px():
    demo = cleaning.cleaning_settings(load_profile("demo"))
    assert demo["pixel_mm"] == 2.5 and demo["bspline_min_grid_spacing_px"] == 8
    assert cleaning.grid_spacing_mm(demo) == 20.0  # 8 pixels of 2.5 mm, not 3.2 pixels
    assert cleaning.elastix_parameter_maps(demo)["bspline"]["FinalGridSpacingInPhysicalUnits"] == ["20", "20"]
    assert cleaning.grid_spacing_mm(dict(demo, bspline_min_grid_spacing_px=0)) == 8.0
    assert cleaning.grid_spacing_mm(dict(demo, bspline_grid_spacing_mm=30.0)) == 30.0  # coarser stays
    with pytest.raises(CrossmodError, match="cleaning.bspline.min_grid_spacing_px"):
        cleaning.cleaning_settings(dict(demo, bspline_min_grid_spacing_px=-1))


def test_run_folder_profile_without_newer_settings_gets_the_full_defaults():
    profile = load_profile("demo")
    del profile["cleaning"]["max_folded_fraction"]  # as in a run folder's profile.yaml from before
    del profile["cleaning"]["bspline"]["min_grid_spacing_px"]
    settings = cleaning.cleaning_settings(profile)
    full = load_profile("full")["cleaning"]
    assert settings["max_folded_fraction"] == full["max_folded_fraction"]
    assert settings["bspline_min_grid_spacing_px"] == full["bspline"]["min_grid_spacing_px"]
    assert settings["bspline_iterations"] == load_profile("demo")["cleaning"]["bspline"]["iterations"]


def test_bad_setting_is_a_one_line_error_naming_it():
    profile = load_profile("smoke")
    profile["cleaning"]["outline_dice_threshold"] = 1.5
    with pytest.raises(CrossmodError, match="cleaning.outline_dice_threshold") as err:
        cleaning.cleaning_settings(profile)
    assert "\n" not in str(err.value)
    profile = load_profile("smoke")
    profile["cleaning"]["optimizer"] = "LBFGS"
    with pytest.raises(CrossmodError, match="cleaning.optimizer"):
        cleaning.cleaning_settings(profile)
    with pytest.raises(CrossmodError, match="cleaning"):
        cleaning.cleaning_settings({"name": "x", "preprocessing": {}})


def test_parameter_maps_follow_the_paper_and_elastix_reads_the_files(tmp_path):
    settings = cleaning.cleaning_settings(load_profile("full"))
    maps = cleaning.elastix_parameter_maps(settings)
    assert maps["rigid"]["Transform"] == ["EulerTransform"]
    assert maps["bspline"]["Transform"] == ["BSplineTransform"]
    assert maps["bspline"]["FinalGridSpacingInPhysicalUnits"] == ["8", "8"]
    assert maps["bspline"]["GridSpacingSchedule"][-1] == "1"
    for m in maps.values():
        assert m["Metric"] == ["AdvancedMattesMutualInformation"]
        assert m["Optimizer"] == ["AdaptiveStochasticGradientDescent"]
    itk = cleaning._itk()
    for name, m in maps.items():
        path = cleaning.write_parameter_file(m, tmp_path / f"{name}.txt")
        read = itk.ParameterObject.New()
        read.ReadParameterFile(str(path))
        back = read.GetParameterMap(0)
        for key, values in m.items():
            assert tuple(back[key]) == tuple(values), key


# ----------------------------------------------------------------------------------------------
# Outline QC


def test_outline_qc_accepts_good_and_rejects_shrunk_and_garbage():
    results = {}
    for kind in ("good", "shrunk", "garbage", "constant"):
        case, synthetic = fabricate_slice(kind, seed=3, position=0.5)
        results[kind] = cleaning.outline_dice(synthetic, case["head_mask"], 20)
    assert results["good"] >= 0.9
    assert results["shrunk"] < 0.8
    assert results["garbage"] < 0.8
    assert results["constant"] < 0.8
    # the outline is preparation.head_mask: a perfect copy scores 1
    case, _ = fabricate_slice("good", seed=3, position=0.5)
    assert cleaning.outline_dice(case["truth"], head_mask(case["truth"], 20), 20) == 1.0
    stack = cleaning.outline_dice(np.stack([case["moving"]] * 2), np.stack([case["head_mask"]] * 2), 20)
    assert stack.shape == (2,) and stack[0] == pytest.approx(results["good"], abs=0.05)


def test_decisions_give_outline_rejections_with_reasons(cleaned):
    table, kinds = cleaned["table"], cleaned["kinds"]
    for kind in ("shrunk", "garbage", "constant"):
        rows = table[kinds == kind]
        assert not rows["accepted_auto"].any(), kind
        assert rows["reason"].str.startswith("outline Dice ").all(), kind
        assert (rows["registration_status"] == "not_run").all()
        assert (rows["outline_dice"] < 0.8).all()
    good = table[kinds == "good"]
    assert good["accepted_auto"].all(), good[["reason"]]
    assert (good["registration_status"] == "ok").all()
    assert (good["outline_dice_after"] >= 0.9).all()
    assert (good["reason"] == "ok").all()


# ----------------------------------------------------------------------------------------------
# Registration


def test_registration_recovers_a_known_deformation():
    settings = cleaning.cleaning_settings(load_profile("demo"))  # 96 x 96 at 2.5 mm
    case = cleaning.synthetic_registration_case(96, 2.5, seed=5, rotation_deg=4.0, shift_mm=(3.0, -4.0),
                                                amplitude_mm=3.0, scale_x=0.88)
    warped, info = cleaning.register_slice(case["ct"], case["moving"], settings, fixed_mask=case["head_mask"])
    assert info["status"] == "ok" and info["accepted"] and info["reason"] == "ok"
    assert warped.dtype == np.uint8 and warped.shape == case["ct"].shape
    before = cleaning.outline_dice(case["moving"], case["head_mask"], 20)
    assert info["outline_dice_after"] >= 0.95 > before
    head = case["head_mask"]
    mse_before = np.mean((case["moving"].astype(float) - case["truth"])[head] ** 2)
    mse_after = np.mean((warped.astype(float) - case["truth"])[head] ** 2)
    assert mse_after < 0.4 * mse_before
    assert info["nmi_after"] > info["nmi_before"]
    # closer to the undeformed MR-like image than before, by mutual information too
    assert cleaning.mutual_information(warped, case["truth"]) > cleaning.mutual_information(case["moving"], case["truth"])
    assert 0 < info["max_displacement_mm"] < 25


def test_similarity_first_stage_takes_out_a_uniformly_smaller_head():
    from scipy import ndimage

    settings = cleaning.cleaning_settings(load_profile("demo"))
    case = cleaning.synthetic_registration_case(96, 2.5, seed=3, rotation_deg=0.0, shift_mm=(0.0, 0.0),
                                                amplitude_mm=0.0, scale_x=1.0)
    centre = (np.array(case["truth"].shape) - 1) / 2
    shrunk = ndimage.affine_transform(case["truth"].astype(np.float32), np.eye(2) / 0.9,
                                      centre - centre / 0.9, order=1)  # 10 % smaller about the centre
    moving = np.clip(np.rint(shrunk), 0, 255).astype(np.uint8)
    similarity = {**settings, "rigid_transform": "similarity"}
    maps = cleaning.elastix_parameter_maps(similarity)
    assert maps["rigid"]["Transform"] == ["SimilarityTransform"]
    assert cleaning.elastix_parameter_maps(settings)["rigid"]["Transform"] == ["EulerTransform"]
    head = case["head_mask"]
    mse_before = np.mean((moving.astype(float) - case["truth"])[head] ** 2)
    warped, info = cleaning.register_slice(case["ct"], moving, similarity, fixed_mask=head)
    assert info["status"] == "ok" and info["accepted"]
    assert np.mean((warped.astype(float) - case["truth"])[head] ** 2) < 0.4 * mse_before
    # (scale, angle, tx, ty): the angle and the translation are read from their places
    assert abs(info["rotation_deg"]) < 2 and info["translation_mm"] < 3
    profile = load_profile("smoke")
    profile["cleaning"]["rigid"]["transform"] = "affine"
    with pytest.raises(CrossmodError, match="cleaning.rigid.transform: expected one of euler, similarity"):
        cleaning.cleaning_settings(profile)


@pytest.mark.parametrize("value", [0, 100])
def test_constant_moving_image_is_rejected_with_a_reason(value):
    case = cleaning.synthetic_registration_case(SIZE, PIXEL, seed=1)
    warped, info = cleaning.register_slice(case["ct"], np.full((SIZE, SIZE), value, np.uint8), fast_settings())
    assert warped is None
    assert info["status"] == "error" and not info["accepted"]
    assert "constant" in info["reason"]


def test_diverging_registration_is_rejected():
    case = cleaning.synthetic_registration_case(SIZE, PIXEL, seed=2)
    _, info = cleaning.register_slice(case["ct"], case["moving"], fast_settings(max_displacement_mm=0.01))
    assert info["status"] == "diverged" and not info["accepted"]
    assert "diverged" in info["reason"]


def test_folded_fraction_counts_where_the_jacobian_is_not_positive():
    mask = np.ones((20, 30), bool)
    assert cleaning.folded_fraction(np.zeros((20, 30, 2)), 2.5, mask) == 0.0
    yy, xx = np.mgrid[0:20, 0:30] * 2.5
    stretch = np.stack([0.5 * xx, 0.2 * yy], -1)  # det (1.5)(1.2) > 0: no fold
    assert cleaning.folded_fraction(stretch, 2.5, mask) == 0.0
    field = np.zeros((20, 30, 2))
    field[:, 10:20, 0] = -2.0 * (xx[:, 10:20] - xx[0, 10])  # x -> -x over ten columns: turned over
    fraction = cleaning.folded_fraction(field, 2.5, mask)
    assert 8 / 30 <= fraction <= 12 / 30
    half = mask.copy()
    half[:, 15:] = False
    assert cleaning.folded_fraction(field, 2.5, half) == pytest.approx(
        float(np.mean((np.gradient(field[..., 0], 2.5, axis=1) <= -1)[half])))
    assert cleaning.folded_fraction(field, 2.5, np.zeros((20, 30), bool)) == 0.0
    with pytest.raises(CrossmodError, match="folded_fraction"):
        cleaning.folded_fraction(field, 2.5, np.ones((5, 5), bool))


def test_folding_registration_is_rejected_with_its_share(monkeypatch):
    case = cleaning.synthetic_registration_case(SIZE, PIXEL, seed=2)
    monkeypatch.setattr(cleaning, "folded_fraction", lambda field, pixel_mm, mask: 0.034)
    warped, info = cleaning.register_slice(case["ct"], case["moving"], fast_settings())
    assert info["status"] == "folded" and not info["accepted"]
    assert "folded 3.4% of the head" in info["reason"]
    assert info["folded_fraction"] == 0.034 and warped is not None
    monkeypatch.undo()
    _, info = cleaning.register_slice(case["ct"], case["moving"], fast_settings())
    assert info["status"] == "ok" and info["folded_fraction"] == 0.0


def textured_mismatch(seed, size=96, pixel=2.5):
    """A demo-sized CT-like slice and a synthetic-MR-like one that lost the bone (a faint spot left
    in the vertebra) and carries strong texture inside the head, as the demo CycleGAN's output."""
    from scipy import ndimage

    case = cleaning.synthetic_registration_case(size, pixel, seed=seed, rotation_deg=1.0, shift_mm=(1.0, -1.0),
                                                amplitude_mm=1.0, scale_x=0.98)
    classes, _ = cleaning._head_classes(size, pixel, seed=seed)
    bone = ndimage.binary_dilation(np.isin(classes, (4, 5)), iterations=1)
    moving = np.where(bone, 80, case["moving"]).astype(float)
    cy, cx = np.argwhere(classes == 5).mean(axis=0).round().astype(int)
    moving[cy - 1:cy + 2, cx - 1:cx + 2] = 150
    noise = np.random.default_rng(seed).normal(0, 50, moving.shape)
    moving = np.clip(moving + np.where(case["head_mask"], noise, 0), 0, 255).astype(np.uint8)
    return case, moving


def test_grid_of_8_pixels_does_not_fold_where_8_mm_on_coarse_pixels_does():
    settings = cleaning.cleaning_settings(load_profile("demo"))  # 2.5 mm pixels
    folded = {0.0: [], 8.0: []}
    moved = {0.0: [], 8.0: []}
    for seed in range(3):
        case, moving = textured_mismatch(seed)
        for min_px, shares in folded.items():  # 0: the paper's 8 mm = 3.2 pixels; 8: 20 mm
            _, info = cleaning.register_slice(case["ct"], moving, dict(settings, bspline_min_grid_spacing_px=min_px),
                                              fixed_mask=case["head_mask"])
            shares.append(info["folded_fraction"])
            moved[min_px].append(info["max_displacement_mm"])
    assert max(folded[8.0]) == 0.0
    assert sum(folded[0.0]) > 0.0
    assert sum(moved[8.0]) < sum(moved[0.0])


def _crashing_register(fixed, moving, settings, fixed_mask=None, maps=None):
    if int(moving[0, 0]) == 1:
        os._exit(3)  # like an elastix segfault: the worker dies without a word
    if int(moving[0, 0]) == 2:
        time.sleep(30)
    return None, {"status": "error", "accepted": False, "reason": "fake", "time_s": 0.0}


def test_a_crashing_or_hanging_worker_rejects_only_its_slice(monkeypatch):
    monkeypatch.setattr(cleaning, "register_slice", _crashing_register)  # forked workers inherit it
    tasks = []
    for row, marker in enumerate([0, 1, 0, 2, 0]):
        moving = np.zeros((8, 8), np.uint8)
        moving[0, 0] = marker
        tasks.append((row, moving, moving, moving > 0, {}, {}))
    results = cleaning.register_many(tasks, workers=2, timeout_s=2.0, progress=False)
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert "crashed" in results[1][1]["reason"]
    assert "timed out" in results[3][1]["reason"]
    for row in (0, 2, 4):
        assert results[row][1]["reason"] == "fake"


def test_parallel_workers_give_the_same_decisions(cleaned, tmp_path):
    two = cleaning.clean(cleaned["syn"], cleaned["ct"], tmp_path / "two", fast_settings(workers=2),
                         progress=False, use_cache=False)
    one = cleaned["table"]
    columns = ["accepted_auto", "reason", "registration_status", "outline_dice_after", "nmi_after",
               "max_displacement_mm", "accepted_final"]
    pd.testing.assert_frame_equal(one[columns], two[columns])
    a = np.load(cleaned["root"] / "cleaned" / "training_slices.npz")
    b = np.load(tmp_path / "two" / "training_slices.npz")
    assert np.array_equal(a["image"], b["image"])


# ----------------------------------------------------------------------------------------------
# The stage's outputs


def test_clean_writes_decisions_training_slices_and_parameter_maps(cleaned):
    out = cleaned["root"] / "cleaned"
    table = cleaned["table"]
    assert list(table.columns) == cleaning.DECISION_COLUMNS
    assert len(table) == sum(len(v) for v in KINDS.values())
    on_disk = cleaning.load_decisions(out)
    assert list(on_disk["accepted_final"]) == list(table["accepted_final"])
    assert on_disk["reason"].tolist() == table["reason"].tolist()
    assert (table["decided_by"] == "auto").all()

    with np.load(out / "training_slices.npz") as data:
        training = {k: data[k] for k in data.files}
    accepted = table.loc[table["accepted_final"], "row"].to_numpy()
    assert np.array_equal(training["source_row"], accepted)
    assert training["image"].dtype == np.uint8 and training["image"].shape == (len(accepted), SIZE, SIZE)
    with np.load(cleaned["ct"]) as ct:
        assert np.array_equal(training["labels"], ct["labels"][accepted])
        assert np.array_equal(training["head_mask"], ct["head_mask"][accepted])
        assert list(training["patient"]) == list(ct["patient"][accepted])
        assert np.array_equal(training["slice_index"], ct["slice_index"][accepted])
    with np.load(cleaned["syn"]) as syn:  # registered, not the raw synthetic MR
        assert not np.array_equal(training["image"], syn["image"][accepted])
    assert float(training["pixel_mm"]) == PIXEL
    # registered images are closer to the MR-like truth than the synthetic ones were
    truth = cleaned["truth"][accepted]
    with np.load(cleaned["syn"]) as syn:
        before = np.mean((syn["image"][accepted].astype(float) - truth) ** 2)
    assert np.mean((training["image"].astype(float) - truth) ** 2) < before

    assert "EulerTransform" in (out / "elastix" / "rigid.txt").read_text()
    # 8 mm on 3 mm pixels would be 2.7 pixels per control point: min_grid_spacing_px (8) gives 24 mm
    assert "(FinalGridSpacingInPhysicalUnits 24 24)" in (out / "elastix" / "bspline.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted_final"] == len(accepted)
    assert summary["bspline_grid_spacing_used_mm"] == 24.0
    assert summary["rejected_outline"] == int((~table["accepted_auto"]).sum())
    assert not list(out.glob("**/.*.tmp"))


def test_examples_and_figure6_data(cleaned):
    out = cleaned["root"] / "cleaned"
    fig6 = cleaning.figure6_examples(out)
    assert 1 <= len(fig6["selected"]) <= 2 and 1 <= len(fig6["rejected"]) <= 2
    for item in fig6["selected"]:
        assert item["dice"] >= 0.8 and item["registered"] is not None
        assert item["ct"].shape == item["synthetic"].shape == (SIZE, SIZE)
    for item in fig6["rejected"]:
        assert item["reason"] != "ok" and item["kind"] == "outline"
        assert item["reason"] in item["caption"].replace("\n", " ") and f"{item['dice']:.3f}" in item["caption"]
    for item in fig6["selected"]:
        assert item["caption"].startswith("kept") and f"{item['dice']:.3f} → {item['dice_after']:.3f}" in item["caption"]
    patients = [item["patient"] for item in fig6["selected"]]
    assert len(set(patients)) == len(patients)  # different patients where possible


def _decision_rows(kinds):
    """A decisions table with the given (patient, outline Dice, status, reason, manual) rows."""
    rows = []
    for i, (patient, dice, status, reason, manual) in enumerate(kinds):
        rows.append({"row": i, "patient": patient, "outline_dice": dice, "registration_status": status,
                     "reason": reason, "manual_decision": manual,
                     "accepted_auto": reason == "ok",
                     "accepted_final": (reason == "ok") if not manual else manual == "accept",
                     "position": i / max(len(kinds) - 1, 1)})
    return pd.DataFrame(rows)


def test_rejected_examples_cover_every_reason_present():
    outline = [(f"p{i}", 0.3 + 0.01 * i, "not_run", f"outline Dice {0.3 + 0.01 * i:.3f} < 0.8", "") for i in range(20)]
    table = _decision_rows(
        outline
        + [("p1", 0.99, "ok", "ok", "")] * 5
        + [("p2", 0.98, "diverged", "registration diverged (displacement up to 28.1 mm > 25 mm)", "")]
        + [("p3", 0.97, "folded", "registration folded 3.0% of the head (> 1.0%): not invertible", "")] * 2
        + [("p4", 0.95, "ok", "outline Dice after registration 0.700 < 0.8", "")]
        + [("p5", 0.99, "ok", "ok", "reject")]
    )
    kinds = cleaning.drop_kind(table)
    assert kinds[table["accepted_final"]].eq("").all()
    assert set(kinds[~table["accepted_final"]]) == {"outline", "diverged", "folded", "outline after", "by hand"}
    selected, rejected = cleaning.pick_examples(table, n=2)
    assert len(selected) == 2 and table.loc[selected, "accepted_final"].all()
    assert sorted(kinds[rejected]) == sorted(["outline", "diverged", "folded", "outline after", "by hand"])
    assert list(kinds[rejected]) == sorted(kinds[rejected], key=cleaning.DROP_KINDS.index)
    _, many = cleaning.pick_examples(table, n=8)
    assert len(many) == 8 and len(set(many)) == 8 and (kinds[many] == "outline").sum() == 4
    assert cleaning.pick_examples(table, n=0) == ([], [])


def test_example_caption_names_the_reason_and_the_outline_dice():
    item = {"patient": "ct_007", "position": 0.0, "dice": 0.9943, "dice_after": 0.9672, "accepted": False,
            "kind": "diverged", "reason": "registration diverged (displacement up to 32.0 mm > 25 mm)"}
    caption = cleaning.example_caption(item)
    assert caption.replace("\n", " ").startswith("rejected: diverged (displacement")
    assert "32.0 mm > 25 mm" in caption.replace("\n", " ") and "0.994 → 0.967" in caption
    assert "ct_007 · 0% up" in caption
    manual = dict(item, kind="by hand", reason="ok")
    assert cleaning.example_caption(manual).startswith("rejected by hand\nct_007")
    overridden = dict(item, kind="by hand", reason="outline Dice after registration 0.700 < 0.8")
    assert cleaning.example_caption(overridden).replace("\n", " ").startswith(
        "rejected by hand (auto: outline Dice after registration 0.700 < 0.8)")
    kept = dict(item, accepted=True, kind="", reason="ok", decided_by="manual", dice_after=float("nan"))
    assert cleaning.example_caption(kept).startswith("kept (by hand)") and "→" not in cleaning.example_caption(kept)


def test_counts_per_patient_and_position(cleaned):
    table = cleaned["table"]
    per_patient = cleaning.counts_by_patient(table)
    assert per_patient["slices"].sum() == len(table)
    assert per_patient.loc["pA", "kept"] == 3 and per_patient.loc["pA", "dropped"] == 3
    by_position = cleaning.counts_by_position(table, bins=3)
    assert by_position["slices"].sum() == len(table)
    assert list(by_position.index) == ["0%–33% (inferior end)", "33%–67%", "67%–100% (superior end)"]
    assert (by_position["dropped"] == by_position[["dropped_outline", "dropped_registration",
                                                   "dropped_by_hand"]].sum(axis=1)).all()
    assert by_position["dropped_outline"].sum() == int((~table["accepted_final"]).sum())
    # the fabricated failures sit at the ends, as the paper saw
    assert by_position["kept_fraction"].iloc[1] == 1.0
    assert by_position["kept_fraction"].iloc[0] < 1.0 and by_position["kept_fraction"].iloc[-1] < 1.0
    by_mm = cleaning.counts_by_position(table, by="z_rel_mm", bins=[-20, -5, 5, 20])
    assert by_mm["slices"].sum() == len(table)
    assert list(by_mm.index) == ["-20 to -5 mm", "-5 to +5 mm", "+5 to +20 mm"]
    with pytest.raises(CrossmodError, match="must increase"):
        cleaning.counts_by_position(table, by="z_rel_mm", bins=[5, -5])


def test_registration_disabled_keeps_outline_decisions(cleaned, tmp_path):
    table = cleaning.clean(cleaned["syn"], cleaned["ct"], tmp_path, fast_settings(register=False), progress=False)
    assert (table["accepted_auto"] == (table["outline_dice"] >= 0.8)).all()
    assert set(table["registration_status"]) == {"disabled"}
    assert not (tmp_path / "elastix" / "rigid.txt").exists()
    with np.load(tmp_path / "training_slices.npz") as data, np.load(cleaned["syn"]) as syn:
        assert np.array_equal(data["image"], syn["image"][data["source_row"]])


def test_nothing_is_half_written_when_clean_fails(cleaned, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "decisions.csv").write_text("old\n")
    (out / "training_slices.npz").write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cleaning, "_stage_cache", broken)  # fails after the first files are staged
    with pytest.raises(OSError):
        cleaning.clean(cleaned["syn"], cleaned["ct"], out, fast_settings(), progress=False)
    assert (out / "decisions.csv").read_text() == "old\n"
    assert (out / "training_slices.npz").read_bytes() == b"old"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["decisions.csv", "training_slices.npz"]


def test_second_run_reuses_the_registration_cache(cleaned, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(cleaned["root"] / "cleaned", out)
    start = time.perf_counter()
    table = cleaning.clean(cleaned["syn"], cleaned["ct"], out, fast_settings(), progress=False)
    registered = table["registration_status"] == "ok"
    assert table.loc[registered, "cached"].all()
    pd.testing.assert_series_equal(table["accepted_final"], cleaned["table"]["accepted_final"])
    assert time.perf_counter() - start < max(2.0, cleaned["seconds"])


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_synthetic_file_names_the_file(cleaned, tmp_path):
    missing = tmp_path / "synthetic_mr.npz"
    with pytest.raises(CrossmodError, match="synthetic_mr.npz") as err:
        cleaning.clean(missing, cleaned["ct"], tmp_path / "out", fast_settings(), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "decisions.csv").exists()


def test_row_mismatch_names_the_synthetic_file(cleaned, tmp_path):
    with np.load(cleaned["syn"]) as data:
        arrays = {k: data[k] for k in data.files}
    order = np.r_[1, 0, np.arange(2, len(arrays["image"]))]
    shuffled = tmp_path / "synthetic_mr.npz"
    np.savez(shuffled, **{k: v[order] for k, v in arrays.items()})
    with pytest.raises(CrossmodError, match="synthetic_mr.npz.*rows do not match") as err:
        cleaning.clean(shuffled, cleaned["ct"], tmp_path / "out", fast_settings(), progress=False)
    assert "\n" not in str(err.value)
    short = tmp_path / "short" / "synthetic_mr.npz"
    short.parent.mkdir()
    np.savez(short, **{k: v[:-1] for k, v in arrays.items()})
    with pytest.raises(CrossmodError, match="short/synthetic_mr.npz"):
        cleaning.clean(short, cleaned["ct"], tmp_path / "out", fast_settings(), progress=False)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(CrossmodError, match="broken.npz"):
        cleaning.clean(broken, cleaned["ct"], tmp_path / "out", fast_settings(), progress=False)


# ----------------------------------------------------------------------------------------------
# Export


def test_export_nnunet_writes_a_valid_dataset(cleaned, tmp_path):
    folder = cleaning.export_nnunet(cleaned["root"] / "cleaned", tmp_path)
    assert folder.name == "Dataset501_CrossmodSyntheticMR"
    meta = json.loads((folder / "dataset.json").read_text())
    accepted = int(cleaned["table"]["accepted_final"].sum())
    assert meta["numTraining"] == accepted
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"background": 0, "Parotid_L": 1, "Parotid_R": 2}
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    labels = sorted(p.name for p in (folder / "labelsTr").iterdir())
    assert len(images) == len(labels) == accepted
    assert [name.replace("_0000.nii.gz", ".nii.gz") for name in images] == labels
    import SimpleITK as sitk

    image = sitk.ReadImage(str(folder / "imagesTr" / images[0]))
    assert image.GetSpacing()[:2] == (PIXEL, PIXEL)
    with pytest.raises(CrossmodError, match="training_slices.npz"):
        cleaning.export_nnunet(tmp_path / "nowhere", tmp_path)

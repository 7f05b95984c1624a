"""The convergence study: its settings, its quality measures and its summaries (crossmod_lib.convergence)."""

import copy

import numpy as np
import pandas as pd
import pytest

from crossmod_lib import convergence
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.slices import write_slices


def heads(n, size=48, seed=0, checker=0.0, brightness=120.0, parotid_gain=1.6):
    """Elliptic heads with two bright 'parotids', optional 2 x 2 checkerboard artefact."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks, labels = [], [], []
    for _ in range(n):
        ry, rx = rng.uniform(0.3, 0.42, 2) * size
        head = ((yy - size / 2) / ry) ** 2 + ((xx - size / 2) / rx) ** 2 <= 1
        label = np.zeros((size, size), np.uint8)
        for value, cx in ((1, size / 2 + rx * 0.6), (2, size / 2 - rx * 0.6)):
            label[((yy - size / 2) ** 2 + (xx - cx) ** 2 <= (size / 12) ** 2) & head] = value
        image = np.where(head, brightness + rng.normal(0, 10, (size, size)), 2.0)
        image = np.where(label > 0, image * parotid_gain, image)
        image = image + checker * ((yy + xx) % 2 * 2 - 1) * head
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        masks.append(head)
        labels.append(label)
    return {"image": np.stack(images), "head_mask": np.stack(masks), "labels": np.stack(labels),
            "patient": np.array([f"p{i % 4}" for i in range(n)])}


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, _ = convergence.kernel_inception_distance(a, b, subsets=20)
    shifted, _ = convergence.kernel_inception_distance(a, b + 1.0, subsets=20)
    assert abs(same) < 0.05 and shifted > 10 * abs(same) and shifted > 0.5


def test_kid_refuses_mismatched_features():
    with pytest.raises(CrossmodError, match="feature sets"):
        convergence.kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_texture_features_see_the_checkerboard():
    clean = heads(4, seed=2)
    checkered = heads(4, seed=2, checker=25.0)
    f_clean = convergence.texture_features(clean["image"], clean["head_mask"])
    f_checker = convergence.texture_features(checkered["image"], checkered["head_mask"])
    assert f_clean.shape == (4, 36)
    assert np.allclose(f_clean[:, :16].sum(axis=1), 1.0, atol=0.02)   # a histogram per slice
    assert (f_checker[:, 32] > 2 * f_clean[:, 32]).all()              # 2 x 2 checkerboard energy


def test_synthesis_quality_ranks_an_artefact_free_synthesis_first(tmp_path):
    real = heads(40, seed=3)
    ct = heads(40, seed=4, brightness=90.0, parotid_gain=0.9)
    good = heads(40, seed=4)                       # the CT's heads with MR-like intensities
    bad = heads(40, seed=4, checker=40.0, parotid_gain=1.0)
    write_slices(real, tmp_path / "mr.npz")
    write_slices(ct, tmp_path / "ct.npz")
    write_slices(good, tmp_path / "good.npz")
    write_slices(bad, tmp_path / "bad.npz")
    q_good = convergence.synthesis_quality(tmp_path / "good.npz", tmp_path / "ct.npz",
                                           tmp_path / "mr.npz", 20.0)
    q_bad = convergence.synthesis_quality(tmp_path / "bad.npz", tmp_path / "ct.npz",
                                          tmp_path / "mr.npz", 20.0)
    assert set(q_good) == (set(convergence.QUALITY_COLUMNS) - {"seed", "budget"}) | {"definition"}
    # the real MR's floor does not depend on the synthetic set measured
    assert q_bad["real_kid"] == q_good["real_kid"]
    assert q_good["outline_dice_median"] > 0.95 and q_good["outline_dice_share"] == 1.0
    assert q_good["parotid_ratio"] == pytest.approx(q_good["real_parotid_ratio"], rel=0.1)
    assert q_bad["parotid_ratio"] < q_good["parotid_ratio"] - 0.2
    assert q_bad["kid"] > q_good["kid"] and q_bad["histogram_w1"] > q_good["histogram_w1"]


def test_study_settings_of_the_profiles_and_bad_blocks():
    study = convergence.study_settings(load_profile("openkbp"))
    assert study["budgets"][-1] >= 10 * study["budgets"][0]     # one order of magnitude
    assert len(study["seeds"]) >= 3
    base = load_profile("openkbp")
    for change, message in (({"budgets": [430, 431]}, "multiple of 2"),
                            ({"budgets": [860, 430]}, "must increase"),
                            ({"iterations_per_epoch": 0}, "positive integer"),
                            ({"seeds": ["a"]}, "list of integers"),
                            ({"models": ["ct_only"]}, "cross_modality")):
        profile = {**base, "convergence": {**base["convergence"], **change}}
        with pytest.raises(CrossmodError, match=message):
            convergence.study_settings(profile)


def test_point_profile_changes_only_the_budget_and_the_training_seeds():
    base = load_profile("openkbp")
    point = convergence.point_profile(base, 7, 2150, 215)
    assert point["cyclegan"]["epochs_constant"] == point["cyclegan"]["epochs_decay"] == 5
    assert point["cyclegan"]["max_iterations_per_epoch"] == 215
    assert point["cyclegan"]["seed"] == 7 and point["segmentation"]["seed"] == 7
    assert point["seed"] == base["seed"]          # the data (simulated MR) stays the same
    assert base["cyclegan"]["epochs_constant"] != 5 or base["cyclegan"]["seed"] is None
    # what a point sets for itself is POINT_SETTINGS, which comparisons with a study's profile skip
    other = convergence.point_profile(base, 8, 4300, 215)
    assert set(convergence.settings_differences(point, other)) <= set(convergence.POINT_SETTINGS)
    assert not convergence.settings_differences(point, other, convergence.POINT_SETTINGS)


def points_table():
    rows = []
    for seed, shift in ((1, 0.0), (2, 0.05), (3, -0.05)):
        for budget, ours in ((430, 0.2), (860, 0.5), (2150, 0.62), (4300, 0.7)):
            for structure in convergence.SIDES:
                rows.append({"seed": seed, "budget": budget, "model": "cross_modality", "title": "X",
                             "structure": structure, "dsc_mean": ours + shift, "dsc_sd": 0.1, "n": 12})
                rows.append({"seed": seed, "budget": budget, "model": "domain_random", "title": "DR",
                             "structure": structure, "dsc_mean": 0.6, "dsc_sd": 0.2, "n": 12})
    return pd.DataFrame(rows)


def test_summary_and_overtaking_budget():
    points = points_table()
    summary = convergence.summary_table(points)
    row = summary[(summary["budget"] == 2150) & (summary["model"] == "cross_modality")
                  & (summary["structure"] == "Parotid_L")].iloc[0]
    assert row["seeds"] == 3 and row["dsc"] == pytest.approx(0.62)
    assert row["seed_sd"] == pytest.approx(0.05) and row["worst_seed"] == pytest.approx(0.57)
    found = convergence.overtakes(points)
    assert found["Parotid_L"] == {"mean": 2150, "all_seeds": 4300}
    never = convergence.overtakes(points[points["budget"] < 2150])
    assert never["Parotid_R"] == {"mean": None, "all_seeds": None}


def test_convergence_figure_draws_every_panel():
    from crossmod_lib import plots

    points = points_table()
    quality = pd.DataFrame([{"seed": s, "budget": b, "parotid_ratio": 1.0 + b / 1e4,
                             "real_parotid_ratio": 1.5, "outline_dice_median": 0.9,
                             "outline_dice_share": 0.95, "histogram_w1": 20 - b / 1e3, "kid": 3.0,
                             "kid_sd": 0.1, "real_kid": 0.5}
                            for s in (1, 2, 3) for b in (430, 860, 2150, 4300)])
    fig = plots.convergence_curves(points, quality)
    axes = fig.get_axes()
    assert len(axes) == 6
    assert len(axes[0].get_lines()) == 2 * (3 + 1)       # two models, 3 seeds + the mean each
    assert axes[0].get_xscale() == "log"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_verdict_names_the_budget_or_says_it_is_not_reached():
    points = points_table()
    text = convergence.verdict(points)
    assert "from 2,150 CycleGAN iterations" in text and "every seed from 4,300" in text
    low = convergence.verdict(points[points["budget"] < 2150])
    assert low.count("does **not** reach") == 2 and "at 860 iterations 0.50" in low
    assert convergence.verdict(points.iloc[0:0]) == "No study point has finished yet."
    # a larger budget run for one seed only: its numbers are named as that seed's, and it is no
    # budget from which "every seed" reaches the baseline
    one = points[(points["budget"] == 2150) & (points["seed"] == 2)].assign(budget=8600)
    lower = points[points["budget"] < 4300]
    text = convergence.verdict(pd.concat([lower, one]))
    assert "every seed from" not in text and "at 8,600 iterations 0.67 against 0.60, seed 2 only" in text


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One seed, two budgets of the smoke profile's networks (about a minute on 2 cores)."""
    profile = load_profile("smoke")
    profile["name"] = "smoke-study"
    profile["convergence"] = {**profile["convergence"], "iterations_per_epoch": 30,
                              "budgets": [60, 120], "seeds": [5]}
    out = tmp_path_factory.mktemp("study") / "study"
    logged = []
    tables = convergence.run_study(profile, out, log=logged.append)
    return profile, out, tables, logged


def test_study_runs_every_point_and_keeps_its_tables(tiny_study):
    profile, out, tables, logged = tiny_study
    points, quality = tables["points"], tables["quality"]
    assert sorted(quality["budget"]) == [60, 120] and set(quality["seed"]) == {5}
    assert set(points["model"]) == {"cross_modality", "ct_only", "naive", "domain_random"}
    assert len(points) == 2 * 4 * 2                        # budgets x models x parotids
    assert (out / "metrics" / "convergence.csv").is_file()
    runs_info = __import__("json").loads((out / "metrics" / "convergence_runs.json").read_text())
    point = runs_info["points"]["seed5/budget00120"]
    assert point["cyclegan_iterations"] == 120 and point["commit"] and point["device"]
    # the baselines were trained once per seed and copied, the budget's own network trained
    first = (out / "seed5" / "budget00060" / "model" / "domain_random" / "best.pt").read_bytes()
    assert (out / "seed5" / "budget00120" / "model" / "domain_random" / "best.pt").read_bytes() == first
    assert point["seconds"]["segmentation"] < runs_info["points"]["seed5/budget00060"]["seconds"]["segmentation"]
    # the 120-iteration point is exactly the run a 60 + 60 profile would train
    summary = __import__("json").loads(
        (out / "seed5" / "budget00120" / "synthetic" / "cyclegan" / "summary.json").read_text())
    assert summary["epochs_total"] == 4 and summary["completed"]


def test_a_finished_study_is_not_run_again_and_records_with_provenance(tiny_study, tmp_path):
    from crossmod_lib import record

    profile, out, _, _ = tiny_study
    logged = []
    again = convergence.run_study(profile, out, log=logged.append)
    assert logged == [] and len(again["quality"]) == 2
    # a point measured under an older quality definition is measured again from its slices
    import json

    runs_path = out / "metrics" / "convergence_runs.json"
    info = json.loads(runs_path.read_text())
    current = info["points"]["seed5/budget00060"]["quality"]
    info["points"]["seed5/budget00060"]["quality"] = {**current, "kid": -1.0, "definition": 1}
    runs_path.write_text(json.dumps(info))
    more = {**profile, "convergence": {**profile["convergence"], "budgets": [60, 120, 240]}}
    again = convergence.run_study(more, out, log=logged.append, new_points=False)  # no 240 point
    assert logged == [f"seed5/budget00060: synthesis quality recomputed (definition "
                      f"{convergence.QUALITY_DEFINITION})"]
    assert again["quality"].set_index("budget").loc[60, "kid"] == pytest.approx(current["kid"])
    assert json.loads(runs_path.read_text())["points"]["seed5/budget00060"]["quality"] == current
    info = record.record_run(out, tmp_path / "rec", note="tiny")
    assert info["kind"] == "study" and set(info["chapters"]) == {"seed5/budget00060", "seed5/budget00120"}
    rec = record.read_record(tmp_path / "rec")
    assert rec.table("metrics/convergence.csv").shape[0] == 16
    assert list(rec.provenance_table().index) == ["seed5/budget00060", "seed5/budget00120"]


def test_a_study_carried_on_with_a_larger_budget_lengthens_its_trunk(tiny_study, tmp_path):
    import json
    import shutil

    profile, out, _, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy, symlinks=True)
    more = {**profile, "convergence": {**profile["convergence"], "budgets": [60, 120, 240]}}
    logged = []
    tables = convergence.run_study(more, copy, log=logged.append)
    assert any("trunk lengthened from 2 to 4 constant-rate epochs" in line for line in logged)
    assert sorted(tables["quality"]["budget"]) == [60, 120, 240]
    summary = json.loads((copy / "seed5" / "budget00240" / "synthetic" / "cyclegan" / "summary.json").read_text())
    assert summary["epochs_total"] == 8 and summary["completed"]
    # only the new budget's own network was trained; the seed's baselines were copied
    first = (out / "seed5" / "budget00060" / "model" / "ct_only" / "best.pt").read_bytes()
    assert (copy / "seed5" / "budget00240" / "model" / "ct_only" / "best.pt").read_bytes() == first


def load_profile_name(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "profile.yaml").read_text())["name"]


def test_unet_seed_study_retrains_a_points_networks_per_seed_and_variant(tiny_study, tmp_path, capsys):
    from crossmod_lib import cli

    _, out, tables, _ = tiny_study
    point = out / "seed5" / "budget00120"
    variants = {"paper": {}, "appearance": {"cross_modality_appearance": True}}
    logged = []
    table = convergence.run_unet_seed_study(point, tmp_path / "u", [5, 6], variants, log=logged.append)
    assert list(table.columns) == list(convergence.UNET_SEED_COLUMNS)
    assert len(table) == 2 * 2 * 2 and set(table["model"]) == {"cross_modality"}  # variants x seeds x sides
    # seed 5 without changes is the point's own network: the same numbers as the study's
    same = table[(table["variant"] == "paper") & (table["unet_seed"] == 5)].set_index("structure")["dsc_mean"]
    study = tables["points"]
    study = study[(study["budget"] == 120) & (study["model"] == "cross_modality")].set_index("structure")["dsc_mean"]
    assert same.to_dict() == pytest.approx(study.to_dict())
    import json

    runs = json.loads((tmp_path / "u" / "metrics" / "unet_seeds_runs.json").read_text())
    assert set(runs["runs"]) == {"paper/seed5", "paper/seed6", "appearance/seed5", "appearance/seed6"}
    assert runs["runs"]["appearance/seed6"]["commit"] and runs["point"] == str(point.absolute())
    summary = json.loads((tmp_path / "u" / "appearance" / "seed6" / "model" / "cross_modality"
                          / "summary.json").read_text())
    assert summary["transform"] == "appearance"
    # recorded as a study of its own kind, each run's provenance kept
    from crossmod_lib import record

    record.record_run(tmp_path / "u", tmp_path / "rec_u")
    rec = record.read_record(tmp_path / "rec_u")
    assert rec.info["kind"] == "unet-seeds" and rec.info["profile"] == load_profile_name(point)
    assert list(rec.provenance_table().index) == sorted(runs["runs"])
    summary_table = convergence.unet_seed_summary(rec.table("metrics/unet_seeds.csv"))
    row = summary_table[(summary_table["variant"] == "paper") & (summary_table["structure"] == "Parotid_R")].iloc[0]
    both = table[(table["variant"] == "paper") & (table["structure"] == "Parotid_R")]["dsc_mean"]
    assert row["unet_seeds"] == 2 and row["dsc"] == pytest.approx(both.mean())
    assert row["lowest"] == pytest.approx(both.min()) and row["seed_sd"] == pytest.approx(both.std())
    logged.clear()
    again = convergence.run_unet_seed_study(point, tmp_path / "u", [5, 6], variants, log=logged.append)
    assert logged == [] and again.equals(table)  # finished runs are kept
    with pytest.raises(CrossmodError, match="variant 'bad'.*unknown setting"):
        convergence.run_unet_seed_study(point, tmp_path / "v", [5], {"bad": {"no_such": 1}})
    with pytest.raises(CrossmodError, match="not a run folder"):
        convergence.run_unet_seed_study(tmp_path, tmp_path / "v", [5], variants)
    with pytest.raises(CrossmodError, match="no U-Net named nnunet"):
        convergence.run_unet_seed_study(point, tmp_path / "v", [5], variants, models=["nnunet"])
    # the MR oracle by its kind: its cross-validation folds train, scored as one method
    oracle = convergence.run_unet_seed_study(point, tmp_path / "o", [5], {"paper": {}}, models=["mr_oracle"])
    assert set(oracle["model"]) == {"mr_oracle"} and len(oracle) == 2
    assert oracle["n"].min() >= 1 and oracle["dsc_mean"].between(0, 1).all()
    assert cli.main(["study", "unet-seeds", "--point", str(point), "--out", str(tmp_path / "w"),
                     "--seeds", "5"]) == 0
    assert "cross_modality" in capsys.readouterr().out
    assert cli.main(["study", "unet-seeds", "--out", str(tmp_path / "w")]) == 2


def test_translator_table_sets_each_translator_beside_the_same_seeds_baselines():
    main = points_table()
    cut_rows = main[(main["model"] == "cross_modality") & (main["budget"] == 2150)
                    & (main["seed"] < 3)].copy()
    cut_rows["dsc_mean"] += 0.1
    table = convergence.translator_table({"CycleGAN": main, "CUT": cut_rows})
    row = table[(table["translator"] == "CUT") & (table["structure"] == "Parotid_R")].iloc[0]
    assert row["seeds"] == 2 and row["dsc"] == pytest.approx(0.745)
    assert row["domain_random"] == pytest.approx(0.6)
    assert len(table[table["translator"] == "CycleGAN"]) == 4 * 2
    # beside the reference study's cross-modality network on the same seeds (not its mean)
    one_seed = cut_rows[cut_rows["seed"] == 1]
    versus = convergence.translator_table({"CycleGAN": main, "CUT": one_seed}, reference="CycleGAN")
    row = versus[(versus["translator"] == "CUT") & (versus["structure"] == "Parotid_R")].iloc[0]
    same = main[(main["model"] == "cross_modality") & (main["budget"] == 2150) & (main["seed"] == 1)
                & (main["structure"] == "Parotid_R")]["dsc_mean"].iloc[0]
    assert row["reference_dsc"] == pytest.approx(same) and row["dsc"] == pytest.approx(same + 0.1)


def test_tier_criteria_name_every_failing_seed_and_side():
    points = points_table()
    extra = []
    for seed in (1, 2, 3):
        for structure in convergence.SIDES:
            extra.append({"seed": seed, "budget": 4300, "model": "ct_only", "title": "CT",
                          "structure": structure, "dsc_mean": 0.69, "dsc_sd": 0.1, "n": 12})
            extra.append({"seed": seed, "budget": 4300, "model": "naive", "title": "N",
                          "structure": structure, "dsc_mean": 0.1 if seed != 2 else 0.55,
                          "dsc_sd": 0.1, "n": 12})
    points = pd.concat([points, pd.DataFrame(extra)], ignore_index=True)
    table = convergence.tier_criteria(points, 4300)
    assert len(table) == 6
    # seed 3: 0.65 >= 0.69 - 0.05 and >= 0.6; seed 2: naive 0.55 fails; seed 1: 0.70 passes
    holds = table.set_index(["seed", "structure"])["holds"]
    assert holds[(1, "Parotid_L")] and holds[(3, "Parotid_R")] and not holds[(2, "Parotid_L")]
    text = convergence.tier_verdict(table, 4300)
    assert "4 of 6" in text and "seed 2 left (naive above 0.5)" in text
    # at 860 there is no CT-only network: nothing passes the CT-only criterion
    low = convergence.tier_criteria(points, 860)
    assert not low["vs_ct_only"].any() and not low["holds"].any()
    with pytest.raises(CrossmodError, match="no study point at budget 999"):
        convergence.tier_criteria(points, 999)


def test_profile_budget_is_a_study_point_only_when_the_epochs_match():
    profile = {"cyclegan": {"epochs_constant": 5, "epochs_decay": 5, "max_iterations_per_epoch": 215},
               "convergence": {"iterations_per_epoch": 215}}
    assert convergence.profile_budget(profile) == 2150
    profile["cyclegan"]["epochs_decay"] = 4            # not k + k: no point of the study
    assert convergence.profile_budget(profile) is None
    profile["cyclegan"].update(epochs_decay=5, max_iterations_per_epoch=600)
    assert convergence.profile_budget(profile) is None
    assert convergence.profile_budget(profile, iterations_per_epoch=600) == 6000


def test_a_recorded_study_is_carried_on_only_with_the_same_settings(tmp_path):
    import json

    import yaml

    profile = load_profile("smoke")
    rec = tmp_path / "rec"
    (rec / "metrics").mkdir(parents=True)
    recorded = {**profile, "convergence": {**profile["convergence"], "budgets": [60, 120], "seeds": [5]}}
    (rec / "profile.yaml").write_text(yaml.safe_dump(recorded))
    points = {"seed5/budget00060": {"seed": 5, "budget": 60, "dsc": [], "quality": {}}}
    (rec / "metrics" / "convergence_runs.json").write_text(json.dumps({"points": points}))
    # more seeds and budgets than recorded: the same study, carried on
    wider = {**profile, "convergence": {**profile["convergence"], "budgets": [60, 120, 180], "seeds": [5, 6]}}
    carried = convergence.carried_points(wider, rec)
    assert set(carried) == {"seed5/budget00060"} and carried["seed5/budget00060"]["carried_from"] == str(rec)
    # other settings than the recorded ones: refused, naming the setting
    other = {**wider, "segmentation": {**wider["segmentation"], "epochs": 99}}
    with pytest.raises(CrossmodError, match="segmentation.epochs"):
        convergence.carried_points(other, rec)
    with pytest.raises(CrossmodError, match="not a recorded study"):
        convergence.carried_points(wider, tmp_path)
    # a setting added to full.yaml after the record: carried on at its default, refused otherwise
    older = copy.deepcopy(recorded)
    del older["segmentation"]["cross_modality_appearance"]
    (rec / "profile.yaml").write_text(yaml.safe_dump(older))
    assert set(convergence.carried_points(wider, rec)) == {"seed5/budget00060"}
    changed = {**wider, "segmentation": {**wider["segmentation"], "cross_modality_appearance": True}}
    with pytest.raises(CrossmodError, match="segmentation.cross_modality_appearance"):
        convergence.carried_points(changed, rec)


def test_quality_sentence_reads_the_smallest_and_largest_budget():
    quality = pd.DataFrame([{"seed": s, "budget": b, "parotid_ratio": 1.2 + b / 10_000 + 0.01 * s,
                             "real_parotid_ratio": 1.5, "kid": 5.0 - b / 1000, "real_kid": 3.0}
                            for s in (1, 2) for b in (430, 4300)])
    text = convergence.quality_sentence(quality)
    assert "1.50 on the real MR" in text and "1.26 (KID 4.6, floor 3.0) at 430" in text
    assert "1.65 (KID 0.7, floor 3.0) at 4,300" in text
    assert convergence.quality_sentence(quality.iloc[0:0]) == ""


def _fake_study(folder, profile, rows, seconds=None):
    """A recorded study folder as crossmod record leaves it: profile.yaml and the tables."""
    import json

    import yaml

    (folder / "metrics").mkdir(parents=True)
    (folder / "profile.yaml").write_text(yaml.safe_dump(profile))
    pd.DataFrame(rows, columns=list(convergence.POINT_COLUMNS)).to_csv(folder / "metrics" / "convergence.csv",
                                                                     index=False)
    points = {f"seed{r['seed']}/budget{r['budget']:05d}": {"seed": r["seed"], "budget": r["budget"],
                                                          "seconds": seconds or {}} for r in rows}
    (folder / "metrics" / "convergence_runs.json").write_text(json.dumps({"points": points}))
    return folder


def test_tier_run_takes_its_settings_study_and_the_baselines_of_the_same_seeds(tmp_path):
    tier = load_profile("smoke")
    tier["convergence"]["iterations_per_epoch"] = 10
    tier["cyclegan"].update(epochs_constant=3, epochs_decay=3, max_iterations_per_epoch=10,
                            lambda_identity=0.0)
    # the study of the tier's own settings: the cross-modality network only (study profiles keep
    # the profile's schedule and seeds; each point sets its own)
    own = copy.deepcopy(tier)
    own["cyclegan"].update(epochs_constant=1, epochs_decay=1, max_iterations_per_epoch=99, seed=7)
    own["convergence"]["models"] = ["cross_modality"]
    row = {"title": "t", "dsc_sd": 0.1, "n": 4, "note": ""}
    _fake_study(tmp_path / "own", own, [
        {**row, "seed": s, "budget": b, "model": "cross_modality", "structure": side, "dsc_mean": 0.7}
        for s in (1, 2) for b in (60, 120) for side in convergence.SIDES],
        seconds={"cyclegan_total": 100.0, "cleaning": 20.0, "trunk_this_point": 50.0, "segmentation": 10.0})
    # another CycleGAN setting: its baselines count (they never see the CycleGAN), its
    # cross-modality network does not
    other = copy.deepcopy(tier)
    other["cyclegan"]["lambda_identity"] = 0.5
    _fake_study(tmp_path / "other", other, [
        {**row, "seed": s, "budget": 30, "model": m, "structure": side, "dsc_mean": d}
        for s in (1, 2, 3) for side in convergence.SIDES
        for m, d in (("cross_modality", 0.1), ("ct_only", 0.72), ("domain_random", 0.6), ("naive", 0.0),
                     ("ct_only_paired", 0.66))],
        seconds={"segmentation": 40.0})
    # other U-Net settings: neither counts
    unet = copy.deepcopy(other)
    unet["segmentation"]["epochs"] = 99
    _fake_study(tmp_path / "unet", unet, [
        {**row, "seed": 1, "budget": 30, "model": "ct_only", "structure": side, "dsc_mean": 0.01}
        for side in convergence.SIDES])
    folders = [tmp_path / name for name in ("own", "other", "unet")]

    found = convergence.tier_run(tier, folders)
    assert found["budget"] == 60 and found["reason"] is None
    assert found["cross_modality_from"] == ["own"] and found["baselines_from"] == ["other"]
    points = found["points"]
    assert set(points["seed"]) == {1, 2} and set(points["budget"]) == {60}
    assert len(points) == 2 * 2 * 5  # the paired control comes with the baselines
    assert points[points["model"] == "ct_only"]["dsc_mean"].eq(0.72).all()
    assert points[points["model"] == "cross_modality"]["dsc_mean"].eq(0.7).all()
    # the point's stages from the CycleGAN on, plus the baselines' U-Nets
    assert found["seconds"] == {1: pytest.approx(170.0), 2: pytest.approx(170.0)}
    criteria = convergence.tier_criteria(points, found["budget"])
    assert criteria["holds"].all() and len(criteria) == 4
    assert criteria["ct_only_paired"].eq(0.66).all() and criteria["vs_ct_only_paired"].all()

    # a later study of the tier's settings with all four networks: the seed it adds takes its
    # baselines from it (the same run), not from the first study that has that seed's
    late = copy.deepcopy(own)
    late["convergence"]["models"] = ["cross_modality", "ct_only", "naive", "domain_random"]
    _fake_study(tmp_path / "late", late, [
        {**row, "seed": s, "budget": 60, "model": m, "structure": side, "dsc_mean": d}
        for s in (2, 3) for side in convergence.SIDES
        for m, d in (("cross_modality", 0.65), ("ct_only", 0.74), ("domain_random", 0.62), ("naive", 0.0))],
        seconds={"cyclegan_total": 300.0, "segmentation": 60.0})
    found = convergence.tier_run(tier, folders + [tmp_path / "late"])
    assert found["cross_modality_from"] == ["own", "late"]
    assert found["baselines_from"] == ["other", "late"]
    ct_only = found["points"][found["points"]["model"] == "ct_only"].groupby("seed")["dsc_mean"].first()
    assert ct_only.to_dict() == {1: 0.72, 2: 0.72, 3: 0.74}   # seed 2's network is own's: other's baselines
    cross = found["points"][found["points"]["model"] == "cross_modality"].groupby("seed")["dsc_mean"].first()
    assert cross.to_dict() == {1: 0.7, 2: 0.7, 3: 0.65}
    assert found["seconds"][3] == pytest.approx(300.0 + 60.0)  # its baselines trained in that very point: once

    # a budget no study ran, a budget that is no study point: nothing, and why
    tier["cyclegan"].update(epochs_constant=4, epochs_decay=4)
    missing = convergence.tier_run(tier, folders)
    assert missing["points"].empty and "no recorded study" in missing["reason"]
    with pytest.raises(CrossmodError, match="not a recorded study"):
        convergence.tier_run(tier, [tmp_path])
    tier["cyclegan"]["epochs_decay"] = 2
    assert "no study point" in convergence.tier_run(tier, folders)["reason"]


def test_variant_table_sets_each_profile_beside_the_tier_with_its_own_runs(tmp_path):
    tier = load_profile("smoke")
    tier["convergence"]["iterations_per_epoch"] = 10
    tier["cyclegan"].update(epochs_constant=3, epochs_decay=3, max_iterations_per_epoch=10)
    variant = copy.deepcopy(tier)
    variant["data"]["mr_simulation"]["psf_mm"] = 2.0   # another MR appearance: its own baselines
    unrun = copy.deepcopy(tier)
    unrun["data"]["mr_simulation"]["psf_mm"] = 3.0
    row = {"title": "t", "dsc_sd": 0.1, "n": 4, "note": ""}

    def rows(seeds, cross, dr):
        return [{**row, "seed": s, "budget": 60, "model": m, "structure": side, "dsc_mean": d}
                for s in seeds for side in convergence.SIDES
                for m, d in (("cross_modality", cross + 0.01 * s), ("ct_only", 0.65),
                             ("domain_random", dr), ("naive", 0.0))]

    _fake_study(tmp_path / "tier", tier, rows((1, 2, 3), 0.6, 0.615))
    _fake_study(tmp_path / "variant", variant, rows((1, 2), 0.5, 0.4))
    pd.DataFrame([{"seed": s, "budget": b, "parotid_ratio": 1.2, "real_parotid_ratio": 2.0, "kid": 100.0 * s,
                   "real_kid": 0.5} for s in (1, 2, 9) for b in (60, 120)],
                 columns=list(convergence.QUALITY_COLUMNS)).to_csv(
        tmp_path / "variant" / "metrics" / "convergence_quality.csv", index=False)
    table, missing = convergence.variant_table(
        {"tier": tier, "second MR": variant, "unrun": unrun},
        [tmp_path / "tier", tmp_path / "variant"])
    assert set(table["profile"]) == {"tier", "second MR"} and "no recorded study" in missing["unrun"]
    # the variant's baselines are its own (other MR), never the tier's
    assert table[table["profile"] == "second MR"]["domain_random"].eq(0.4).all()
    summary = convergence.variant_summary(table).set_index(["profile", "structure"])
    assert summary.loc[("tier", "Parotid_L"), "seeds"] == 3
    assert summary.loc[("tier", "Parotid_L"), "cross_modality"] == pytest.approx(0.62)
    # tier: 0.61-0.63 against DR 0.615: seeds 2 and 3 hold; variant: 0.51-0.52 below CT only 0.65 - 0.05
    assert summary.loc[("tier", "Parotid_R"), "seeds_holding"] == 2
    assert summary.loc[("second MR", "Parotid_R"), "seeds_holding"] == 0
    # each variant's synthetic MR beside it (the tier's study kept no quality table here)
    assert summary.loc[("second MR", "Parotid_R"), "kid"] == pytest.approx(150.0)
    assert summary.loc[("second MR", "Parotid_R"), "real_parotid_ratio"] == pytest.approx(2.0)
    assert summary.loc[("tier", "Parotid_R"), ["kid", "parotid_ratio"]].isna().all()
    empty, why = convergence.variant_table({"unrun": unrun}, [tmp_path / "tier"])
    assert empty.empty and list(why) == ["unrun"]


def test_a_study_of_other_unet_settings_takes_the_translators_and_trains_only_its_unets(tiny_study, tmp_path):
    import json

    profile, out, tables, _ = tiny_study
    cosine = copy.deepcopy(profile)
    cosine["segmentation"]["lr_schedule"] = "cosine"
    cosine["convergence"]["models"] = ["cross_modality"]
    logged = []
    taken = convergence.run_study(cosine, tmp_path / "cos", log=logged.append, translator_from=out)
    assert all("translator from" in line for line in logged if line.startswith("seed"))
    runs_info = json.loads((tmp_path / "cos" / "metrics" / "convergence_runs.json").read_text())
    point = runs_info["points"]["seed5/budget00120"]
    assert point["translator_from"] == str(out.absolute() / "seed5" / "budget00120")
    assert point["seconds"]["trunk_this_point"] == 0.0
    assert not (tmp_path / "cos" / "seed5" / "trunk").exists()
    # the same translator: the same synthetic MR and the same slices kept
    for budget in ("budget00060", "budget00120"):
        ours = np.load(tmp_path / "cos" / "seed5" / budget / "synthetic" / "synthetic_mr.npz")["image"]
        theirs = np.load(out / "seed5" / budget / "synthetic" / "synthetic_mr.npz")["image"]
        assert np.array_equal(ours, theirs)
    source = json.loads((out / "metrics" / "convergence_runs.json").read_text())["points"]
    assert point["kept_slices"] == source["seed5/budget00120"]["kept_slices"]
    # the cleaning it took counts at the source's time: what a run of the profile spends
    assert point["seconds"]["cleaning"] == pytest.approx(source["seed5/budget00120"]["seconds"]["cleaning"])
    assert point["seconds"]["cyclegan_total"] == pytest.approx(  # from the copied summary
        source["seed5/budget00120"]["seconds"]["cyclegan_total"], rel=0.05)
    assert set(taken["points"]["model"]) == {"cross_modality"}
    summary = json.loads((tmp_path / "cos" / "seed5" / "budget00120" / "model" / "cross_modality"
                          / "summary.json").read_text())
    assert summary["best_epoch"] == summary["epochs_run"]          # the cosine schedule ran
    # other cleaning settings: the same translator, cleaned again with its own settings and timed
    unregistered = copy.deepcopy(cosine)
    unregistered["cleaning"]["register"] = False
    convergence.run_study(unregistered, tmp_path / "unreg", translator_from=out)
    point_dir = tmp_path / "unreg" / "seed5" / "budget00120"
    assert np.array_equal(np.load(point_dir / "synthetic" / "synthetic_mr.npz")["image"],
                          np.load(out / "seed5" / "budget00120" / "synthetic" / "synthetic_mr.npz")["image"])
    decisions = pd.read_csv(point_dir / "cleaned" / "decisions.csv")
    assert set(decisions["registration_status"]) <= {"disabled", "not_run"}
    assert (decisions["registration_status"] == "disabled").any()
    unreg_point = json.loads((tmp_path / "unreg" / "metrics" / "convergence_runs.json").read_text())[
        "points"]["seed5/budget00120"]
    assert unreg_point["translator_from"] == point["translator_from"]
    assert unreg_point["seconds"]["cleaning"] < source["seed5/budget00120"]["seconds"]["cleaning"]
    # another translator setting: refused, naming it
    other = copy.deepcopy(cosine)
    other["cyclegan"]["lambda_cycle"] = 3.0
    with pytest.raises(CrossmodError, match="other settings than this profile's .*cyclegan.lambda_cycle.*only cleaning and U-Net"):
        convergence.run_study(other, tmp_path / "other", translator_from=out)


def test_a_study_shares_the_tiers_baselines_only_with_the_same_data_and_unet_settings(tmp_path):
    tier = load_profile("smoke")
    row = [{"seed": 1, "budget": 60, "model": "cross_modality", "title": "t", "structure": "Parotid_R",
            "dsc_mean": 0.5, "dsc_sd": 0.1, "n": 4, "note": ""}]
    translator = copy.deepcopy(tier)
    translator["cyclegan"]["translator"] = "cut"
    translator["segmentation"]["cross_modality_appearance"] = True
    other_mr = copy.deepcopy(tier)
    other_mr["data"]["mr_simulation"]["psf_mm"] = 2.0
    other_unet = copy.deepcopy(tier)
    other_unet["segmentation"]["loss"] = "dice_ce"
    for name, profile in (("translator", translator), ("mr", other_mr), ("unet", other_unet)):
        _fake_study(tmp_path / name, profile, row)
    assert convergence.shares_baselines(tier, tmp_path / "translator")
    assert not convergence.shares_baselines(tier, tmp_path / "mr")
    assert not convergence.shares_baselines(tier, tmp_path / "unet")

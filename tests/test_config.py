import pytest
import yaml

from crossmod_lib.config import available_profiles, load_profile
from crossmod_lib.errors import CrossmodError


def test_shipped_profiles_load():
    assert {"smoke", "demo", "full"} <= set(available_profiles())
    for name in available_profiles():
        profile = load_profile(name)
        assert profile["name"] == name
        assert profile["preprocessing"]["crop"] >= 16


def test_full_profile_has_the_papers_settings():
    full = load_profile("full")
    assert full["phantom"]["n_ct"] == 202 and full["phantom"]["n_mr"] == 27
    assert full["preprocessing"]["pixel_mm"] == 1.0 and full["preprocessing"]["crop"] == 256
    assert full["preprocessing"]["ct_window"] == {"level": 40, "width": 350}


def test_extends_overrides_only_what_differs():
    smoke, full = load_profile("smoke"), load_profile("full")
    assert smoke["preprocessing"]["ct_window"] == full["preprocessing"]["ct_window"]
    assert smoke["phantom"]["n_ct"] < full["phantom"]["n_ct"]


def test_openkbp_variants_change_only_what_they_name():
    """A variant of the tier's first settings (openkbp-2150, the settings of the records) changes
    its named settings and nothing else, so its study compares with the tier's points of the same
    seeds; each variant's study runs the tier's budget."""
    from crossmod_lib.convergence import profile_budget, study_settings

    base = load_profile("openkbp-2150")
    tier_budget = profile_budget(base)
    assert tier_budget in study_settings(base)["budgets"]
    named = {"openkbp-identity-loss": {("cyclegan", "lambda_identity")},
             "openkbp-appearance": {("segmentation", "cross_modality_appearance")},
             "openkbp-dice-ce": {("segmentation", "loss"), ("segmentation", "cross_modality_appearance")},
             "openkbp-cut": {("cyclegan", "translator")},
             "openkbp-fastcut": {("cyclegan", "translator")},
             "openkbp-dicom": {("data", "mr")},
             "openkbp-mr2": {("data", "mr_simulation")},
             "openkbp-8600": {("cyclegan", "epochs_constant"), ("cyclegan", "epochs_decay")},
             "openkbp-17200": {("cyclegan", "epochs_constant"), ("cyclegan", "epochs_decay")},
             "openkbp-mr2-8600": {("data", "mr_simulation"), ("cyclegan", "epochs_constant"),
                                  ("cyclegan", "epochs_decay")},
             "openkbp-mr2-cycle-noise": {("data", "mr_simulation"), ("cyclegan", "cycle_noise_sd")},
             "openkbp-mr2-background": {("data", "mr_simulation"), ("preprocessing", "mr_background")},
             "openkbp-mr2-background-8600": {("data", "mr_simulation"), ("preprocessing", "mr_background"),
                                             ("cyclegan", "epochs_constant"), ("cyclegan", "epochs_decay")},
             "openkbp-8600-unet1600": {("cyclegan", "epochs_constant"), ("cyclegan", "epochs_decay"),
                                       ("segmentation", "epochs"), ("segmentation", "max_steps_per_epoch"),
                                       ("segmentation", "cpu_bf16")},
             "openkbp-mr2-background-8600-unet1600": {
                 ("data", "mr_simulation"), ("preprocessing", "mr_background"), ("cyclegan", "epochs_constant"),
                 ("cyclegan", "epochs_decay"), ("segmentation", "epochs"), ("segmentation", "max_steps_per_epoch"),
                 ("segmentation", "cpu_bf16")},
             "openkbp-8600-unet1600-augment": {
                 ("cyclegan", "epochs_constant"), ("cyclegan", "epochs_decay"), ("segmentation", "epochs"),
                 ("segmentation", "max_steps_per_epoch"), ("segmentation", "cpu_bf16"), ("segmentation", "augment")},
             "openkbp-8600-unet1600-appearance": {
                 ("cyclegan", "epochs_constant"), ("cyclegan", "epochs_decay"), ("segmentation", "epochs"),
                 ("segmentation", "max_steps_per_epoch"), ("segmentation", "cpu_bf16"),
                 ("segmentation", "cross_modality_appearance")}}
    for name, keys in named.items():
        variant = load_profile(name)
        changed = {(section, key) for section in base if isinstance(base[section], dict)
                   and section != "convergence"
                   for key in base[section] if variant[section][key] != base[section][key]}
        assert changed == keys, name
        if "-8600" in name or name.endswith("-17200"):  # 4x / 8x the tier's budget: a run of it is that study point
            times = 4 if "-8600" in name else 8
            assert study_settings(variant)["budgets"] == [profile_budget(variant)] == [times * tier_budget]
        elif name != "openkbp-identity-loss":  # the convergence study itself spans the budgets
            assert study_settings(variant)["budgets"] == [tier_budget], name
    assert load_profile("openkbp-identity-loss")["cyclegan"]["lambda_identity"] > base["cyclegan"]["lambda_identity"]
    assert study_settings(load_profile("openkbp-cut"))["models"] == ["cross_modality"]
    assert study_settings(load_profile("openkbp-mr2-cycle-noise"))["models"] == ["cross_modality"]


def test_the_tier_profile_is_the_chosen_variant():
    """`openkbp` runs the settings chosen in chapter 10 (openkbp-8600-unet1600), so the recorded
    3-seed study of that variant is the tier's record; its own convergence block ends at its
    budget, with the tier's networks (the span and seeds: test_convergence)."""
    from crossmod_lib.convergence import profile_budget, settings_differences, study_settings

    tier, chosen = load_profile("openkbp"), load_profile("openkbp-8600-unet1600")
    assert tier["name"] == "openkbp" and not settings_differences(tier, chosen)
    assert settings_differences(tier, load_profile("openkbp-2150"))  # not the first settings
    study = study_settings(tier)
    assert study["budgets"][-1] == profile_budget(tier) == 8600
    assert study["models"] == study_settings(chosen)["models"]
    # its DICOM variant changes where the MR is read from, nothing else; a run of it is the 8,600 point
    dicom = load_profile("openkbp-dicom-8600")
    assert settings_differences(dicom, tier) == ["data.mr.format"] and dicom["data"]["mr"]["format"] == "dicom"
    assert study_settings(dicom)["budgets"] == [profile_budget(dicom)] == [8600]


def _write(tmp_path, data, name="custom.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_profile_file(tmp_path):
    path = _write(tmp_path, {"extends": "smoke", "name": "mine", "phantom": {"n_ct": 5}})
    profile = load_profile(path)
    assert profile["name"] == "mine" and profile["phantom"]["n_ct"] == 5
    assert profile["phantom"]["n_mr"] == load_profile("smoke")["phantom"]["n_mr"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"phantom": {"n_cT": 5}}, "unknown setting 'phantom.n_cT'"),
        ({"preprocessing": {"crop": "big"}}, "'preprocessing.crop' must be int"),
        ({"preprocessing": {"pixel_mm": -1.0}}, "pixel_mm must be > 0"),
        ({"preprocessing": {"cc_rule": "sideways"}}, "cc_rule must be"),
        ({"preprocessing": 3}, "'preprocessing' must be a mapping"),
        # ranges of the networks' settings are checked when the profile is read
        ({"cyclegan": {"ngf": -3}}, "'cyclegan.ngf' must be an integer >= 1"),
        ({"cyclegan": {"n_blocks": 0, "lr": 0.0}}, "cyclegan.lr"),
        ({"cyclegan": {"translator": "pix2pix"}}, "cyclegan.translator"),
        ({"segmentation": {"base_features": 0}}, "segmentation.base_features must be a positive"),
        ({"segmentation": {"val_fraction": 1.5}}, "segmentation.val_fraction must be in [0, 1)"),
        # every stage's settings are checked in the one place a profile is read
        ({"cleaning": {"outline_dice_threshold": 1.5}}, "cleaning.outline_dice_threshold: must be <= 1.0"),
        ({"contour_quality": {"fit_tau": 3}}, "contour_quality.fit_tau=3 must be a number between 0 and 1"),
        ({"convergence": {"budgets": [860, 430]}}, "convergence.budgets must increase"),
    ],
)
def test_bad_profile_is_one_line_error_naming_file(tmp_path, override, message):
    path = _write(tmp_path, {"extends": "smoke", **override})
    with pytest.raises(CrossmodError) as info:
        load_profile(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_unknown_profile_and_invalid_yaml(tmp_path):
    with pytest.raises(CrossmodError, match="not found"):
        load_profile("no-such-profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phantom: [unclosed\n")
    with pytest.raises(CrossmodError, match="not valid YAML"):
        load_profile(bad)


@pytest.mark.parametrize("name, changed", [
    ("openkbp-geo-offset", ["cyclegan.geo_mask_offset_px"]),
    ("openkbp-geo-offset-1px", ["cyclegan.geo_mask_offset_px"]),
    ("openkbp-mind", ["cyclegan.lambda_mind"]),
    ("openkbp-seg", ["cyclegan.lambda_seg"]),
])
def test_tier_cyclegan_variants_change_only_what_they_name(name, changed):
    """CycleGAN settings tried at the tier as it stands: the translator setting they name, and
    only the cross-modality network trains (the baselines are the tier's)."""
    from crossmod_lib.convergence import profile_budget, settings_differences, study_settings

    variant, tier = load_profile(name), load_profile("openkbp")
    assert settings_differences(variant, tier, ["convergence.models"]) == changed
    assert study_settings(variant)["models"] == ["cross_modality"]
    assert study_settings(variant)["budgets"] == [profile_budget(variant)] == [profile_budget(tier)]

"""Cohorts from a profile: the phantom, a public dataset (OpenKBP), or a user's DICOM / nnU-Net MR."""

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from crossmod_lib import datasets, dicom, preparation
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import Case
from crossmod_lib.runs import RunFolder


def _profile(tmp_path, data, **extra):
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump({"extends": "smoke", "name": "custom", "data": data, **extra}))
    return load_profile(path)


def _mr_volume(seed=0):
    """A small MR-like head (bright fat ring, darker inside) with two parotid blobs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:12, :200, :180]
    head = ((y - 100) / 80.0) ** 2 + ((x - 90) / 70.0) ** 2 < 1
    inner = ((y - 100) / 70.0) ** 2 + ((x - 90) / 60.0) ** 2 < 1
    left = ((y - 110) / 14.0) ** 2 + ((x - 130) / 10.0) ** 2 + ((z - 6) / 3.0) ** 2 < 1
    right = ((y - 110) / 14.0) ** 2 + ((x - 50) / 10.0) ** 2 + ((z - 6) / 3.0) ** 2 < 1
    volume = np.abs(rng.normal(0, 5, head.shape))
    volume[head] = 900
    volume[inner] = 300
    volume[left | right] = 700
    return volume, left, right


def _case(volume, left, right, spacing=(1.0, 1.0, 4.0)):
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(spacing)
    masks = {}
    for name, mask in (("Parotid_L", left), ("Parotid_R", right)):
        m = sitk.GetImageFromArray(mask.astype(np.uint8))
        m.CopyInformation(image)
        masks[name] = m
    return Case("user_mr", image, masks)


def test_user_dicom_mr_folder_is_a_cohort(tmp_path):
    volume, left, right = _mr_volume()
    patient = tmp_path / "mr_dicom" / "patient_a"
    dicom.write_dicom_series(patient / "series", volume, spacing=(1.0, 1.0, 4.0), origin=(0, 0, 0),
                            modality="MR", patient_id="A")
    image = dicom.read_dicom_series(patient / "series")
    case = _case(volume, left, right)
    masks = {name: sitk.Cast(m, sitk.sitkUInt8) for name, m in case.structures.items()}
    for m in masks.values():
        m.CopyInformation(image)
    dicom.write_rtstruct({"L Parotid": masks["Parotid_L"], "Parotid Rt": masks["Parotid_R"]}, image,
                         patient / "rtstruct.dcm")
    profile = _profile(tmp_path, {"mr": {"dataset": "dicom", "root": str(tmp_path / "mr_dicom")}})
    run = RunFolder.open(profile, tmp_path / "run")
    sources = preparation.cohort_sources(run, progress=False)
    mr = sources["MR"]
    assert mr.dataset == "dicom" and mr.patient_ids() == ["patient_a"]
    table = preparation.acquisition_table({"MR": mr})
    assert table.loc["Field strength / tube voltage", "MR"].endswith("T")
    cases = preparation.prepare_cohort(mr, "MR", profile["preprocessing"], tmp_path / "prepared",
                                       progress=False)
    slices = preparation.load_slices(tmp_path / "prepared" / "mr_slices.npz")
    assert cases["slices_kept"].iloc[0] == 12
    assert set(np.unique(slices["labels"])) == {0, 1, 2}
    # the CT cohort is still the phantom's
    assert sources["CT"].dataset == "phantom" and len(sources["CT"].items) == profile["phantom"]["n_ct"]


def test_user_nnunet_mr_dataset_is_a_cohort(tmp_path):
    volume, left, right = _mr_volume(1)
    folder = datasets.write_nnunet_dataset([_case(volume, left, right)], tmp_path, "Dataset042_UserMR")
    profile = _profile(tmp_path, {"ct": {"dataset": "phantom"},
                                  "mr": {"dataset": "nnunet", "root": str(folder)}})
    run = RunFolder.open(profile, tmp_path / "run")
    mr = preparation.cohort_sources(run, progress=False)["MR"]
    assert mr.dataset == "nnunet" and len(mr.items) == 1
    preparation.prepare_cohort(mr, "MR", profile["preprocessing"], tmp_path / "prepared", progress=False)
    slices = preparation.load_slices(tmp_path / "prepared" / "mr_slices.npz")
    assert (slices["labels"] == 1).any() and (slices["labels"] == 2).any()


def test_folder_cohort_needs_a_root(tmp_path):
    profile = _profile(tmp_path, {"mr": {"dataset": "dicom"}})
    run = RunFolder.open(profile, tmp_path / "run")
    with pytest.raises(CrossmodError, match="data.mr: dataset 'dicom' needs root"):
        preparation.cohort_sources(run, progress=False)


def _shared_openkbp():
    try:
        root = datasets.data_root()
    except CrossmodError as exc:
        pytest.skip(f"no data root: {exc}")
    if not (root / "openkbp").is_dir():
        pytest.skip(f"OpenKBP not under the data root {root}")
    return root


def test_openkbp_profile_ct_cohort(tmp_path):
    _shared_openkbp()
    profile = load_profile("openkbp")
    assert profile["data"]["ct"]["dataset"] == "openkbp"
    small = _profile(tmp_path, {"ct": {"dataset": "openkbp", "patients": {"first": 2}}})
    run = RunFolder.open(small, tmp_path / "run")
    sources = preparation.cohort_sources(run, progress=False)
    ct = sources["CT"]
    assert ct.patient_ids() == ["pt_1", "pt_2"]
    table = preparation.acquisition_table({"CT": ct})
    assert table.loc["FOV [#pixels]", "CT"] == "128×128"
    coverage = preparation.mr_coverage_mm(sources["MR"])
    cases = preparation.prepare_cohort(ct, "CT", small["preprocessing"], tmp_path / "prepared",
                                       coverage_mm=coverage, progress=False)
    assert list(cases["patient"]) == ["pt_1", "pt_2"]
    slices = preparation.load_slices(tmp_path / "prepared" / "ct_slices.npz")
    # the crop is centred on a real head: the head outline fills a good part of every slice
    assert slices["head_mask"].mean() > 0.2
    assert (slices["labels"] == 1).any() and (slices["labels"] == 2).any()


def test_real_data_sources_follow_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSMOD_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    run = RunFolder.open("smoke", tmp_path / "run")
    assert preparation.real_data_sources(run) == {"openkbp": None, "deepmind": None}

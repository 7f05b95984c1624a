"""The T2w MR simulator (crossmod_lib.simulation) and the simulated_mr cohort of a profile."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from scipy import ndimage

from crossmod_lib import datasets, preparation, simulation
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import Case, write_image
from crossmod_lib.phantom import MR_TE_RANGE, MR_TR_RANGE
from crossmod_lib.runs import RunFolder

SPACING = (2.0, 2.0, 2.5)  # x, y, z (mm)
SHAPE = (64, 96, 96)       # z, y, x
SMALL = simulation.SimulationSettings(pixel_mm=1.0, matrix=112, slices=20, min_slices=8)


def _synthetic_ct(n_slices: int = SHAPE[0], hu_scale: float = 1.0) -> Case:
    """A cylinder 'head': fat ring around muscle, a cortical-bone block, a marrow block and two
    parotid ellipsoids (HU -10), in air; z = 0 at the parotid centre."""
    z, y, x = np.meshgrid((np.arange(n_slices) - (n_slices - 1) / 2) * SPACING[2],
                          (np.arange(SHAPE[1]) - (SHAPE[1] - 1) / 2) * SPACING[1],
                          (np.arange(SHAPE[2]) - (SHAPE[2] - 1) / 2) * SPACING[0], indexing="ij")
    hu = np.full(z.shape, -1000.0)
    hu[(x / 44) ** 2 + (y / 40) ** 2 <= 1] = -100.0
    hu[(x / 36) ** 2 + (y / 32) ** 2 <= 1] = 40.0
    hu[(np.abs(x) < 9) & (y > 10) & (y < 26)] = 1200.0
    hu[(np.abs(x) < 7) & (y > -26) & (y < -14)] = 300.0
    glands = {}
    for name, side in (("Parotid_L", 1), ("Parotid_R", -1)):
        mask = ((x - side * 24) / 8) ** 2 + (y / 10) ** 2 + (z / 15) ** 2 <= 1
        hu[mask] = -10.0
        glands[name] = mask
    image = sitk.GetImageFromArray((hu * hu_scale).astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin((-95.0, -95.0, -(n_slices - 1) / 2 * SPACING[2]))
    structures = {}
    for name, mask in glands.items():
        m = sitk.GetImageFromArray(mask.astype(np.uint8))
        m.CopyInformation(image)
        structures[name] = m
    return Case("synthetic", image, structures)


@pytest.fixture(scope="module")
def simulated():
    return simulation.simulate_mr(_synthetic_ct(), seed=3, settings=SMALL)


def _by_tissue(mr, tissue: int, erode: int = 2) -> np.ndarray:
    """Image values inside the (eroded, so away from partial volume) region of one tissue."""
    classes = sitk.GetArrayFromImage(mr.tissue)
    region = ndimage.binary_erosion(classes == tissue, iterations=erode)
    assert region.sum() > 50, f"too few voxels of {simulation.TISSUES[tissue]}"
    return sitk.GetArrayFromImage(mr.image)[region].astype(float)


def test_t2_contrast_orders_the_tissues(simulated):
    fat = _by_tissue(simulated, simulation.FAT).mean()
    parotid = _by_tissue(simulated, simulation.PAROTID).mean()
    muscle = _by_tissue(simulated, simulation.MUSCLE).mean()
    cortical = _by_tissue(simulated, simulation.CORTICAL, erode=1).mean()
    air = _by_tissue(simulated, simulation.AIR).mean()
    # T2-weighted: fat bright, parotid between muscle and fat, bone and air dark
    assert fat > parotid > muscle > 2 * max(cortical, air)
    assert muscle > 1.5 * cortical
    # the signal table agrees: same order from the spin-echo equation alone
    s = simulation.tissue_signals(100.0, 3500.0)
    assert s[simulation.FAT] > s[simulation.PAROTID] > s[simulation.MUSCLE] > s[simulation.CORTICAL]
    assert s[simulation.CSF] > s[simulation.FAT] and s[simulation.AIR] == 0


def test_geometry_and_labels_on_the_mr_grid(simulated):
    image = simulated.image
    assert image.GetSize() == (112, 112, 20)
    assert np.allclose(image.GetSpacing(), (1.0, 1.0, 4.0))
    z0 = image.GetOrigin()[2]
    centre = z0 + (20 - 1) / 2 * 4.0
    # slab centred on the parotids (z = 0) up to the random offset of +-5 mm
    assert abs(centre) <= simulation.SLAB_OFFSET_MM + 1e-6
    assert simulated.info["slices"] == 20 and simulated.info["slab_shift_mm"] == 0
    for name in ("Parotid_L", "Parotid_R"):
        mask = simulated.structures[name]
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetOrigin(), image.GetOrigin())
        assert np.allclose(mask.GetSpacing(), image.GetSpacing())
        # gland volume (CT mask) preserved on the 4 mm MR grid within 10 %
        ct_cc, mr_cc = simulated.info["ct_volumes_cc"][name], simulated.info["volumes_cc"][name]
        assert mr_cc == pytest.approx(ct_cc, rel=0.10)
        # the label covers parotid tissue of the image
        labels = sitk.GetArrayFromImage(mask) > 0
        classes = sitk.GetArrayFromImage(simulated.tissue)
        assert (classes[labels] == simulation.PAROTID).mean() > 0.9
    # the left gland (patient left = +x) is at larger x than the right one
    left = np.argwhere(sitk.GetArrayFromImage(simulated.structures["Parotid_L"]))[:, 2].mean()
    right = np.argwhere(sitk.GetArrayFromImage(simulated.structures["Parotid_R"]))[:, 2].mean()
    assert left > right
    # the header records a T2w spin echo inside the paper's Table I ranges
    assert image.GetMetaData("Modality") == "MR"
    assert MR_TE_RANGE[0] <= float(image.GetMetaData("EchoTime")) <= MR_TE_RANGE[1]
    assert MR_TR_RANGE[0] <= float(image.GetMetaData("RepetitionTime")) <= MR_TR_RANGE[1] + 1


def test_coverage_limited_by_the_ct():
    # a CT of 40 slices (100 mm) cannot hold 20 x 4 mm centred on the glands with margin: the
    # slab is shifted or shortened to stay inside it
    short = simulation.simulate_mr(_synthetic_ct(n_slices=30), seed=1, settings=SMALL)
    lo, hi = short.info["ct_valid_z_mm"]
    z = short.info["z_range_mm"]
    assert short.info["slices"] == int((hi - lo) // 4.0) < 20
    assert z[0] - 2.0 >= lo - 1e-6 and z[1] + 2.0 <= hi + 1e-6
    with pytest.raises(CrossmodError, match="do not fit"):
        simulation.simulate_mr(_synthetic_ct(n_slices=12), seed=1, settings=SMALL)


def test_deterministic_per_seed(simulated):
    again = simulation.simulate_mr(_synthetic_ct(), seed=3, settings=SMALL)
    other = simulation.simulate_mr(_synthetic_ct(), seed=4, settings=SMALL)
    a = sitk.GetArrayFromImage(simulated.image)
    assert np.array_equal(a, sitk.GetArrayFromImage(again.image))
    assert again.info == simulated.info
    assert not np.array_equal(a, sitk.GetArrayFromImage(other.image))
    assert other.info["acquisition"]["EchoTime"] != simulated.info["acquisition"]["EchoTime"]


def test_rician_noise_floor_in_air(simulated):
    air = _by_tissue(simulated, simulation.AIR, erode=8)
    sd = simulated.info["acquisition"]["noise_sd"]
    # magnitude of complex Gaussian noise of SD sigma: Rayleigh, mean sigma sqrt(pi/2)
    assert air.mean() == pytest.approx(sd * np.sqrt(np.pi / 2), rel=0.05)
    assert air.std() == pytest.approx(sd * np.sqrt(2 - np.pi / 2), rel=0.08)


def test_bad_inputs_are_one_line_errors():
    case = _synthetic_ct()
    empty = {n: sitk.Image(m.GetSize(), sitk.sitkUInt8) for n, m in case.structures.items()}
    for m in empty.values():
        m.CopyInformation(case.image)
    with pytest.raises(CrossmodError, match="no parotid voxels") as error:
        simulation.simulate_mr(Case("x", case.image, empty), seed=0, settings=SMALL)
    assert "\n" not in str(error.value)
    with pytest.raises(CrossmodError, match="Hounsfield"):
        image = sitk.GetImageFromArray(np.full((20, 30, 30), 500, dtype=np.int16))
        simulation.simulate_mr(Case("x", image, {}), seed=0, settings=SMALL)
    with pytest.raises(CrossmodError, match="not on the CT grid"):
        small = sitk.Image(10, 10, 10, sitk.sitkUInt8)
        simulation.simulate_mr(Case("x", case.image, {"Parotid_L": small}), seed=0, settings=SMALL)
    with pytest.raises(CrossmodError, match=r"data.mr_simulation: .*pixel_mm=0"):
        simulation.SimulationSettings.from_dict({"pixel_mm": 0}, "data.mr_simulation")
    with pytest.raises(CrossmodError, match="unknown setting"):
        simulation.SimulationSettings.from_dict({"pixels": 2}, "data.mr_simulation")


# ----------------------------------------------------------------------------------------------
# The simulated_mr cohort of a profile (on synthetic CTs in the PDDCA layout: no data needed)


def _pddca_source(root, names):
    for i, name in enumerate(names):
        case = _synthetic_ct(n_slices=60 + 2 * i)
        write_image(case.image, root / name / "img.nrrd")
        for structure, mask in case.structures.items():
            write_image(mask, root / name / "structures" / f"{structure}.nrrd")
    return root


def _profile(tmp_path, data):
    path = tmp_path / "sim.yaml"
    base = {"mr_simulation": {"pixel_mm": 2.0, "matrix": 64, "slices": 16, "min_slices": 8,
                              "workers": 1}}
    path.write_text(yaml.safe_dump({"extends": "smoke", "name": "sim", "data": {**base, **data}}))
    return load_profile(path)


def test_simulated_mr_cohort_in_the_run_folder(tmp_path):
    source = _pddca_source(tmp_path / "ctdata", ["case_a", "case_b", "case_c"])
    profile = _profile(tmp_path, {
        "ct": {"dataset": "pddca", "root": str(source), "patients": ["case_a"]},
        "mr": {"dataset": "simulated_mr", "source": "pddca", "root": str(source),
               "patients": {"range": [1, 3]}}})
    run = RunFolder.open(profile, tmp_path / "run")
    sources = preparation.cohort_sources(run, progress=False)
    mr = sources["MR"]
    assert mr.dataset == "simulated_mr" and mr.patient_ids() == ["case_b", "case_c"]
    assert mr.root == run.root / "raw" / "simulated_mr"
    assert mr.title == "MR (simulated from pddca CT)"
    record = mr.root / "simulation.json"
    summary = json.loads(record.read_text())
    assert [p["patient_id"] for p in summary["patients"]] == ["case_b", "case_c"]
    case = mr.read(mr.items[0])
    assert set(case.structures) == {"Parotid_L", "Parotid_R"}
    assert case.image.GetSpacing()[2] == 4.0 and case.image.GetMetaData("Modality") == "MR"
    # reused as long as nothing changes; regenerated when a setting changes
    stamp = record.stat().st_mtime_ns
    preparation.cohort_sources(run, progress=False)
    assert record.stat().st_mtime_ns == stamp
    changed = _profile(tmp_path, {
        "ct": {"dataset": "pddca", "root": str(source), "patients": ["case_a"]},
        "mr": {"dataset": "simulated_mr", "source": "pddca", "root": str(source),
               "patients": {"range": [1, 3]}},
        "mr_simulation": {"pixel_mm": 2.0, "matrix": 64, "slices": 12, "min_slices": 8,
                          "workers": 1}})
    mr = preparation.cohort_sources(RunFolder.open(changed, tmp_path / "run"), progress=False)["MR"]
    assert json.loads(record.read_text())["arguments"]["settings"]["slices"] == 12
    assert mr.read(mr.items[0]).image.GetSize()[2] == 12
    # the prepared MR slices come from it like from any MR folder
    table = preparation.prepare_cohort(mr, "MR", changed["preprocessing"], tmp_path / "prepared",
                                       progress=False)
    assert list(table["patient"]) == ["case_b", "case_c"]


def test_overlapping_ct_and_mr_patients_are_refused(tmp_path):
    source = _pddca_source(tmp_path / "ctdata", ["case_a", "case_b"])
    profile = _profile(tmp_path, {
        "ct": {"dataset": "pddca", "root": str(source)},
        "mr": {"dataset": "simulated_mr", "source": "pddca", "root": str(source),
               "patients": ["case_b"]}})
    run = RunFolder.open(profile, tmp_path / "run")
    with pytest.raises(CrossmodError, match=r"share 1 patient\(s\) \(case_b\)"):
        preparation.cohort_sources(run, progress=False)
    assert not (run.root / "raw" / "simulated_mr").exists()  # refused before simulating


def test_simulated_mr_needs_a_source_and_is_mr_only(tmp_path):
    source = _pddca_source(tmp_path / "ctdata", ["case_a"])
    ct = {"dataset": "pddca", "root": str(source)}
    for name, mr, message in (
            ("r1", {"dataset": "simulated_mr"}, "needs source"),
            ("r2", {"dataset": "simulated_mr", "source": "nowhere"}, "not a CT dataset with a reader"),
            ("r3", {"dataset": "pddca", "source": "openkbp"},
             "data.mr.source is only read with dataset simulated_mr")):
        run = RunFolder.open(_profile(tmp_path, {"ct": ct, "mr": mr}), tmp_path / name)
        with pytest.raises(CrossmodError, match=message):
            preparation.cohort_sources(run, progress=False)
    run = RunFolder.open(_profile(tmp_path, {"ct": {"dataset": "simulated_mr"}}), tmp_path / "r4")
    with pytest.raises(CrossmodError, match="can only be the MR cohort"):
        preparation.cohort_sources(run, progress=False)


# ----------------------------------------------------------------------------------------------
# Real anatomy: one OpenKBP patient (skipped without the data)


def _openkbp_root():
    try:
        root = datasets.data_root()
    except CrossmodError as exc:
        pytest.skip(f"no data root: {exc}")
    if not (root / "openkbp").is_dir():
        pytest.skip(f"OpenKBP not under the data root {root}")
    return root


def test_one_real_openkbp_patient():
    _openkbp_root()
    folder = datasets.cohort_cases({"dataset": "openkbp", "patients": {"range": [40, 41]}})[0]
    case = simulation.read_source_case("openkbp", folder)
    settings = simulation.SimulationSettings(pixel_mm=1.0, matrix=256)
    mr = simulation.simulate_mr(case, seed=2021, settings=settings)
    assert mr.image.GetSize()[:2] == (256, 256) and mr.info["slices"] >= settings.min_slices
    for name in ("Parotid_L", "Parotid_R"):
        assert mr.info["volumes_cc"][name] == pytest.approx(mr.info["ct_volumes_cc"][name], rel=0.15)
    fat = _by_tissue(mr, simulation.FAT, erode=1).mean()
    parotid = _by_tissue(mr, simulation.PAROTID, erode=1).mean()
    muscle = _by_tissue(mr, simulation.MUSCLE, erode=1).mean()
    assert fat > parotid > muscle
    # the head is inside the field of view: the edge columns and rows are air
    classes = sitk.GetArrayFromImage(mr.tissue)
    edges = np.concatenate([classes[:, 0], classes[:, -1], classes[:, :, 0], classes[:, :, -1]])
    assert (edges == simulation.AIR).mean() > 0.9


def test_openkbp_profile_uses_a_disjoint_simulated_mr():
    root = _openkbp_root()
    profile = load_profile("openkbp")
    ct, mr = profile["data"]["ct"], profile["data"]["mr"]
    assert ct["dataset"] == "openkbp" and mr["dataset"] == "simulated_mr"
    assert mr["source"] == "openkbp" and len(mr["patients"]) == 12
    ct_ids = {f.name for f in datasets.cohort_cases(ct, root=root)}
    source_spec = {k: v for k, v in mr.items() if k not in ("source", "format")} | {"dataset": "openkbp"}
    mr_ids = {f.name for f in datasets.cohort_cases(source_spec, root=root)}
    assert len(ct_ids) == 40 and not ct_ids & mr_ids


def test_a_profile_extending_openkbp_can_read_real_mr(tmp_path):
    ct_root = _pddca_source(tmp_path / "ctdata", ["ct_a"])
    mr_root = _pddca_source(tmp_path / "mrdata", ["mr_a", "mr_b"])  # stands in for a real MR folder
    path = tmp_path / "real_mr.yaml"
    path.write_text(yaml.safe_dump({"extends": "openkbp", "name": "real_mr", "data": {
        "ct": {"dataset": "pddca", "root": str(ct_root), "patients": {"first": 1}},
        "mr": {"dataset": "pddca", "root": str(mr_root), "source": None, "patients": None}}}))
    run = RunFolder.open(load_profile(path), tmp_path / "run")
    mr = preparation.cohort_sources(run, progress=False)["MR"]
    assert mr.dataset == "pddca" and mr.patient_ids() == ["mr_a", "mr_b"]
    assert not (run.root / "raw" / "simulated_mr").exists()


def test_a_second_appearance_changes_contrast_and_is_checked():
    other = simulation.SimulationSettings(pixel_mm=1.0, matrix=112, slices=20, min_slices=8,
                                          te_ms=(60.0, 70.0), tr_ms=(2000.0, 2500.0),
                                          psf_mm=2.0, contrast={"parotid": 0.7})
    base = simulation.simulate_mr(_synthetic_ct(), seed=3, settings=SMALL)
    changed = simulation.simulate_mr(_synthetic_ct(), seed=3, settings=other)
    assert 60.0 <= changed.info["acquisition"]["EchoTime"] <= 70.0

    def ratio(mr):
        return _by_tissue(mr, simulation.PAROTID).mean() / _by_tissue(mr, simulation.MUSCLE).mean()

    assert ratio(changed) < ratio(base) - 0.2       # the parotid far less bright against muscle
    # the defaults are the paper's sequence: the same draws as before these settings existed
    assert SMALL.te_ms == MR_TE_RANGE and SMALL.tr_ms == MR_TR_RANGE and SMALL.contrast == {}
    for values, message in (({"contrast": {"gland": 2.0}}, "unknown tissue"),
                            ({"contrast": {"fat": 0}}, "contrast.fat=0"),
                            ({"te_ms": [70, 60]}, "te_ms")):
        with pytest.raises(CrossmodError, match=message):
            simulation.SimulationSettings.from_dict(values, "data.mr_simulation")


def test_openkbp_mr2_profile_differs_only_in_the_acquisition():
    base, other = load_profile("openkbp-2150"), load_profile("openkbp-mr2")  # the variant of the first settings
    assert other["data"]["mr"] == base["data"]["mr"] and other["data"]["ct"] == base["data"]["ct"]
    assert other["cyclegan"] == base["cyclegan"] and other["segmentation"] == base["segmentation"]
    settings = simulation.SimulationSettings.from_dict(other["data"]["mr_simulation"])
    assert settings.contrast == {"parotid": 0.85} and settings.psf_mm == 2.0


def test_simulated_mr_cohort_read_back_as_dicom_gives_the_same_case(tmp_path):
    source = _pddca_source(tmp_path / "ctdata", ["case_a", "case_b", "case_c"])
    data = {"ct": {"dataset": "pddca", "root": str(source), "patients": ["case_a"]},
            "mr": {"dataset": "simulated_mr", "source": "pddca", "root": str(source),
                   "patients": {"range": [1, 3]}}}
    nrrd = preparation.cohort_sources(RunFolder.open(_profile(tmp_path, data), tmp_path / "a"),
                                      progress=False)["MR"]
    data["mr"]["format"] = "dicom"
    run = RunFolder.open(_profile(tmp_path, data), tmp_path / "b")
    mr = preparation.cohort_sources(run, progress=False)["MR"]
    assert mr.dataset == "dicom" and mr.patient_ids() == ["case_b", "case_c"]
    assert mr.root == run.root / "raw" / "simulated_mr_dicom"
    assert mr.title == "MR (simulated from pddca CT)"
    patient = mr.root / "case_b"
    assert (patient / "RS.dcm").is_file() and len(list(patient.glob("MR_*.dcm"))) == 16
    from_dicom, original = mr.read(mr.items[0]), nrrd.read(nrrd.items[0])
    assert from_dicom.image.GetSize() == original.image.GetSize()
    assert np.allclose(from_dicom.image.GetOrigin(), original.image.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(from_dicom.image),
                          sitk.GetArrayFromImage(original.image))
    for name in ("Parotid_L", "Parotid_R"):       # contours -> RTSTRUCT -> masks: the same voxels
        a = sitk.GetArrayFromImage(from_dicom.structures[name]) > 0
        b = sitk.GetArrayFromImage(original.structures[name]) > 0
        assert (a & b).sum() * 2 / (a.sum() + b.sum()) > 0.97
    stamp = (mr.root / "export.json").stat().st_mtime_ns      # reused while nothing changes
    preparation.cohort_sources(run, progress=False)
    assert (mr.root / "export.json").stat().st_mtime_ns == stamp


def test_an_unknown_simulated_mr_format_is_one_line(tmp_path):
    source = _pddca_source(tmp_path / "ctdata", ["case_a", "case_b"])
    profile = _profile(tmp_path, {
        "ct": {"dataset": "pddca", "root": str(source), "patients": ["case_a"]},
        "mr": {"dataset": "simulated_mr", "source": "pddca", "root": str(source),
               "patients": ["case_b"], "format": "nifti"}})
    with pytest.raises(CrossmodError, match="data.mr.format: 'nifti' must be nrrd or dicom"):
        preparation.cohort_sources(RunFolder.open(profile, tmp_path / "run"), progress=False)

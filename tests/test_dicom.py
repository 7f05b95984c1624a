"""DICOM series, RTSTRUCT reading/writing and structure-name matching, on series written here."""

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as MplPath

from crossmod_lib.dicom import (
    DEFAULT_ALIASES,
    mask_to_polygons,
    match_structure,
    polygons_to_mask,
    read_dicom_case,
    read_dicom_series,
    read_rtstruct,
    slice_uids,
    write_rtstruct,
    write_dicom_series,
)
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import PAROTIDS

SPACING = (0.9, 0.8, 2.5)
ORIGIN = (-21.6, -16.0, 40.0)
SHAPE = (10, 40, 48)  # z, y, x


def head_ct(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    _, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    head = ((y - 20) / 17.0) ** 2 + ((x - 24) / 21.0) ** 2 < 1
    ct = np.where(head, 40.0, -1000.0) + rng.integers(-20, 20, shape)
    return ct.astype(np.int16).astype(float)


def parotids(shape=SHAPE):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    left = ((y - 22) / 6.5) ** 2 + ((x - 35) / 5.0) ** 2 + ((z - 5) / 3.2) ** 2 < 1
    right = ((y - 21) / 7.0) ** 2 + ((x - 12) / 4.5) ** 2 + ((z - 4.5) / 3.0) ** 2 < 1
    right &= ~(((y - 21) / 2.5) ** 2 + ((x - 12) / 1.5) ** 2 < 1)  # a hole on every slice
    return {"Parotid_L": left.astype(np.uint8), "Parotid_R": right.astype(np.uint8)}


def as_masks(arrays, image):
    masks = {}
    for name, array in arrays.items():
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(image)
        masks[name] = mask
    return masks


def dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


@pytest.fixture()
def ct_folder(tmp_path):
    folder = tmp_path / "patient" / "ct"
    write_dicom_series(folder, head_ct(), SPACING, ORIGIN, "CT", patient_id="P001",
                      SeriesDescription="Head CT")
    return folder


# ----------------------------------------------------------------------------------------------
# Series


def test_ct_series_geometry_values_and_metadata(tmp_path):
    ct = head_ct()
    paths = write_dicom_series(tmp_path / "ct", ct, SPACING, ORIGIN, "CT", patient_id="P001",
                              SeriesDescription="Head CT")
    # file names and InstanceNumber must not decide the slice order: shuffle the names
    rng = np.random.default_rng(1)
    shuffled = [paths[i] for i in rng.permutation(len(paths))]
    for i, path in enumerate(shuffled):
        path.rename(path.with_name(f"tmp{i}.dcm"))
    (tmp_path / "ct" / "README.txt").write_text("not DICOM")  # ignored
    image = read_dicom_series(tmp_path / "ct")
    assert image.GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert np.allclose(image.GetSpacing(), SPACING)
    assert np.allclose(image.GetOrigin(), ORIGIN)
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    assert np.array_equal(sitk.GetArrayFromImage(image), ct)  # HU after rescale
    meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    assert meta["Modality"] == "CT" and meta["PatientID"] == "P001"
    assert meta["KVP"] == "120" and meta["SeriesDescription"] == "Head CT"
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert pydicom.dcmread(tmp_path / "ct" / "tmp0.dcm")[key].value == meta[key]
    # SOPInstanceUIDs in slice order: slice k's file is at z = origin + k * dz
    uids = slice_uids(image)
    assert len(uids) == SHAPE[0]
    for path in (tmp_path / "ct").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        k = round((float(ds.ImagePositionPatient[2]) - ORIGIN[2]) / SPACING[2])
        assert uids[k] == ds.SOPInstanceUID


def test_mr_series_metadata_for_table_one(tmp_path):
    mr = np.random.default_rng(2).integers(0, 4000, (6, 24, 20)).astype(float)
    write_dicom_series(tmp_path / "mr", mr, (0.5, 0.5, 4.0), (10.0, -5.0, -30.0), "MR",
                      patient_id="M7", EchoTime="96.72", RepetitionTime="3198")
    image = read_dicom_series(tmp_path / "mr")
    assert np.allclose(image.GetSpacing(), (0.5, 0.5, 4.0))
    assert np.allclose(image.GetOrigin(), (10.0, -5.0, -30.0))
    assert np.array_equal(sitk.GetArrayFromImage(image), mr)
    meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    assert float(meta["EchoTime"]) == pytest.approx(96.72)
    assert float(meta["RepetitionTime"]) == pytest.approx(3198)
    assert float(meta["MagneticFieldStrength"]) == 3 and float(meta["FlipAngle"]) == 90
    assert meta["Modality"] == "MR" and meta["ScanningSequence"] == "SE" and "SequenceName" in meta


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "both"
    write_dicom_series(folder, head_ct(), SPACING, ORIGIN, "CT", SeriesDescription="Head CT")
    mr = np.full((4, 16, 16), 100.0)
    write_dicom_series(folder, mr, (1, 1, 4), (0, 0, 0), "MR", SeriesDescription="T2 AX")
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(folder)
    text = one_line(err)
    assert str(folder) in text and "CT, 'Head CT', 10 slices" in text and "MR, 'T2 AX', 4 slices" in text
    assert read_dicom_series(folder, modality="mr").GetSize() == (16, 16, 4)
    ct_uid = read_dicom_series(folder, modality="CT").GetMetaData("SeriesInstanceUID")
    assert read_dicom_series(folder, series_uid=ct_uid).GetSize() == (48, 40, 10)
    with pytest.raises(CrossmodError, match="no PT series"):
        read_dicom_series(folder, modality="PT")
    with pytest.raises(CrossmodError, match="no series with SeriesInstanceUID 1.2.3"):
        read_dicom_series(folder, series_uid="1.2.3")


def test_oblique_series_refused_kept_or_resampled(tmp_path):
    angle = np.deg2rad(20)  # tilted about the x axis
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                          [0, np.sin(angle), np.cos(angle)]])
    array = np.full((6, 20, 20), 200.0)
    write_dicom_series(tmp_path / "obl", array, (1, 1, 2), (0, 0, 0), "MR", direction=direction.ravel())
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(tmp_path / "obl")
    assert "not axial" in one_line(err) and str(tmp_path / "obl") in str(err.value)
    kept = read_dicom_series(tmp_path / "obl", oblique="keep")
    assert np.allclose(np.array(kept.GetDirection()).reshape(3, 3), direction, atol=1e-4)
    resampled = read_dicom_series(tmp_path / "obl", oblique="resample")
    assert np.allclose(resampled.GetDirection(), np.eye(3).ravel())
    assert not slice_uids(resampled) and resampled.GetMetaData("Modality") == "MR"
    centre = kept.TransformContinuousIndexToPhysicalPoint([9.5, 9.5, 2.5])
    assert resampled.EvaluateAtPhysicalPoint(centre, sitk.sitkLinear) == pytest.approx(200.0)


def test_missing_slice_refused(ct_folder):
    files = sorted(ct_folder.glob("*.dcm"))
    files[4].unlink()
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(ct_folder)
    assert "missing slice" in one_line(err) and str(ct_folder) in err.value.args[0]


def test_non_uniform_spacing_refused(ct_folder):
    path = sorted(ct_folder.glob("*.dcm"))[5]
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(path)
    with pytest.raises(CrossmodError, match="non-uniform slice spacing"):
        read_dicom_series(ct_folder)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(tmp_path)
    assert one_line(err) == f"{tmp_path}: no DICOM image files found"
    with pytest.raises(CrossmodError, match="no such folder"):
        read_dicom_series(tmp_path / "absent")


@pytest.mark.parametrize("keep", [0.5, 0.97, 0.05])
def test_truncated_slice_named(ct_folder, keep):
    path = sorted(ct_folder.glob("*.dcm"))[3]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(ct_folder)
    assert one_line(err).startswith(f"{path}: ")


def test_not_dicom_dcm_file_named(ct_folder):
    bad = ct_folder / "broken.dcm"
    bad.write_bytes(b"\0" * 50)
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(ct_folder)
    assert one_line(err) == f"{bad}: not a DICOM file (no DICM header)"


def test_mixed_modalities_refused(ct_folder):
    path = sorted(ct_folder.glob("*.dcm"))[2]
    ds = pydicom.dcmread(path)
    ds.Modality = "MR"
    ds.save_as(path)
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(ct_folder)
    assert one_line(err).startswith(f"{path}: Modality MR") and "mixes modalities" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Structure names


@pytest.mark.parametrize("name", ["Parotid_L", "L Parotid", "Parotid Lt", "PAROTID_LT", "Lt_Parotid",
                                  "Parotid-Lt", "LeftParotid", "parotid_l", "Parotid L",
                                  "Left Parotid", "parotid left"])
def test_left_parotid_aliases(name):
    assert match_structure(["Brainstem", name, "Parotid_R"], "Parotid_L") == name


@pytest.mark.parametrize("name", ["R Parotid", "Parotid Rt", "PAROTID_RT", "Rt_Parotid", "Parotid-Rt",
                                  "RightParotid", "parotid_r", "Parotid R"])
def test_right_parotid_aliases(name):
    assert match_structure(["Parotid L", name], "Parotid_R") == name


def test_unmatched_and_ambiguous_names_listed():
    with pytest.raises(CrossmodError) as err:
        match_structure(["Brainstem", "Parotid R"], "Parotid_L", source="rs.dcm")
    text = one_line(err)
    assert text.startswith("rs.dcm: no structure matches Parotid_L")
    assert "'Brainstem', 'Parotid R'" in text
    with pytest.raises(CrossmodError) as err:
        match_structure(["L Parotid", "Parotid_L", "Cord"], "Parotid_L")
    text = one_line(err)
    assert "several structures match Parotid_L: 'L Parotid', 'Parotid_L'" in text and "'Cord'" in text


def test_aliases_are_configurable():
    aliases = {**DEFAULT_ALIASES, "Parotid_L": ["GL_PAROTIS_LI"]}
    assert match_structure(["gl parotis li"], "Parotid_L", aliases) == "gl parotis li"
    with pytest.raises(CrossmodError):
        match_structure(["L Parotid"], "Parotid_L", aliases)  # replaced, no longer an alias
    assert match_structure(["parotid_l"], "Parotid_L", aliases) == "parotid_l"  # canonical always


# ----------------------------------------------------------------------------------------------
# Polygons and RTSTRUCT


def test_polygons_give_back_the_mask_exactly():
    rng = np.random.default_rng(3)
    for _ in range(100):
        mask = rng.random((rng.integers(1, 25), rng.integers(1, 25))) < rng.random()
        assert np.array_equal(polygons_to_mask(mask_to_polygons(mask), mask.shape), mask)


def _contour_points(rtstruct, roi_name):
    """ContourData of an ROI, parsed with pydicom only: [(slice UID, (N, 3) points), ...]."""
    ds = pydicom.dcmread(rtstruct)
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    item = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)
    out = []
    for contour in item.ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints
        out.append((contour.ContourImageSequence[0].ReferencedSOPInstanceUID, points))
    return out


def _check_independently(rtstruct, image, arrays):
    """Contour points on the mask boundary, and an independent even-odd rasterisation."""
    uids = slice_uids(image)
    for name, array in arrays.items():
        raster = np.zeros(array.shape, dtype=bool)
        polygons_per_slice = {}
        for uid, points in _contour_points(rtstruct, name):
            index = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
            k = round(index[0, 2])
            assert np.allclose(index[:, 2], k, atol=1e-3) and uids[k] == uid
            for i, j, _ in index:
                # every vertex is halfway between an inside and an outside voxel centre
                fi, fj = i - np.floor(i), j - np.floor(j)
                if abs(fi - 0.5) < 1e-3:
                    pair = [(k, round(j), int(np.floor(i)) + d) for d in (0, 1)]
                else:
                    assert abs(fj - 0.5) < 1e-3
                    pair = [(k, int(np.floor(j)) + d, round(i)) for d in (0, 1)]
                inside = [0 <= p[1] < array.shape[1] and 0 <= p[2] < array.shape[2] and array[p] > 0
                          for p in pair]
                assert inside[0] != inside[1]
            polygons_per_slice.setdefault(k, []).append(index[:, :2])
        yy, xx = np.mgrid[: array.shape[1], : array.shape[2]]
        centres = np.column_stack([xx.ravel(), yy.ravel()])
        for k, polygons in polygons_per_slice.items():
            for poly in polygons:  # even-odd across polygons: XOR
                raster[k] ^= MplPath(poly).contains_points(centres).reshape(array.shape[1:])
        assert dice(raster, array) >= 0.95, name
        assert np.array_equal(raster, array > 0), name


def test_rtstruct_round_trip(ct_folder, tmp_path):
    image = read_dicom_series(ct_folder)
    arrays = parotids()
    out = tmp_path / "out" / "RS_pred.dcm"
    write_rtstruct(as_masks(arrays, image), image, out)
    assert not list(out.parent.glob(".*"))  # no temporary file left

    ds = pydicom.dcmread(out)  # a proper DICOM file (preamble, file meta)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == image.GetMetaData("StudyInstanceUID")
    assert ds.PatientID == "P001" and ds.SOPInstanceUID not in slice_uids(image)
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(PAROTIDS)
    assert len(ds.RTROIObservationsSequence) == 2
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == image.GetMetaData("FrameOfReferenceUID")
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == image.GetMetaData("SeriesInstanceUID")
    assert [c.ReferencedSOPInstanceUID for c in series.ContourImageSequence] == slice_uids(image)

    masks = read_rtstruct(out, image)
    assert set(masks) == set(PAROTIDS)
    for name, array in arrays.items():
        back = sitk.GetArrayFromImage(masks[name])
        assert back.dtype == np.uint8 and not grid_diff(masks[name], image)
        assert dice(back, array) >= 0.95
        assert np.array_equal(back, array)  # boundary within one voxel: here exactly
    _check_independently(out, image, arrays)


def grid_diff(a, b):
    from crossmod_lib.io import grid_differences

    return grid_differences(a, b)


def test_rtstruct_round_trip_on_rotated_grid(tmp_path):
    """Patient coordinates go through the full direction matrix (here an oblique grid, kept)."""
    c, s = np.cos(np.deg2rad(15)), np.sin(np.deg2rad(15))
    direction = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.diag([1, -1, -1])
    write_dicom_series(tmp_path / "mr", np.full(SHAPE, 300.0), (1.1, 0.7, 3.0), (5, 50, 20), "MR",
                      direction=direction.ravel())
    image = read_dicom_series(tmp_path / "mr", oblique="keep")
    arrays = parotids()
    write_rtstruct(as_masks(arrays, image), image, tmp_path / "rs.dcm")
    masks = read_rtstruct(tmp_path / "rs.dcm", image)
    for name, array in arrays.items():
        assert np.array_equal(sitk.GetArrayFromImage(masks[name]), array)
    _check_independently(tmp_path / "rs.dcm", image, arrays)


def test_read_dicom_case(tmp_path):
    folder = tmp_path / "P001"
    ct = head_ct()
    write_dicom_series(folder / "ct", ct, SPACING, ORIGIN, "CT", patient_id="P001")
    write_dicom_series(folder / "mr", np.full((4, 16, 16), 9.0), (1, 1, 4), (0, 0, 0), "MR",
                      patient_id="P001")
    image = read_dicom_series(folder, modality="CT")
    arrays = parotids()
    renamed = {"Lt Parotid": arrays["Parotid_L"], "PAROTID_RT": arrays["Parotid_R"]}
    write_rtstruct(as_masks(renamed, image), image, folder / "rtss" / "RS.dcm",
                   label_colours={"Lt Parotid": (0, 255, 0)})
    case = read_dicom_case(folder)  # two image series: the one the RTSTRUCT references
    assert case.patient_id == "P001" and case.source == folder
    assert case.image.GetMetaData("Modality") == "CT"
    assert np.array_equal(sitk.GetArrayFromImage(case.image), ct)
    for name in PAROTIDS:
        assert np.array_equal(sitk.GetArrayFromImage(case.structures[name]), arrays[name])
    assert list(pydicom.dcmread(folder / "rtss" / "RS.dcm").ROIContourSequence[0].ROIDisplayColor) \
        == [0, 255, 0]
    # an MR chosen explicitly: the RTSTRUCT does not reference it
    with pytest.raises(CrossmodError) as err:
        read_dicom_case(folder, modality="MR")
    assert one_line(err).startswith(f"{folder / 'rtss' / 'RS.dcm'}: references series")


def test_rtstruct_referencing_another_series(ct_folder, tmp_path):
    image = read_dicom_series(ct_folder)
    rs = tmp_path / "rs.dcm"
    write_rtstruct(as_masks(parotids(), image), image, rs)
    write_dicom_series(tmp_path / "ct2", head_ct(seed=5), SPACING, ORIGIN, "CT", patient_id="P001",
                      SeriesDescription="another CT")
    other = read_dicom_series(tmp_path / "ct2")
    with pytest.raises(CrossmodError) as err:
        read_rtstruct(rs, other)
    text = one_line(err)
    assert text.startswith(f"{rs}: references series") and other.GetMetaData("SeriesInstanceUID") in text


def test_empty_and_missing_structures(ct_folder, tmp_path):
    image = read_dicom_series(ct_folder)
    arrays = parotids()
    arrays["Parotid_R"][:] = 0
    rs = tmp_path / "rs.dcm"
    write_rtstruct(as_masks(arrays, image), image, rs)
    with pytest.raises(CrossmodError) as err:
        read_rtstruct(rs, image)
    assert one_line(err) == f"{rs}: structure 'Parotid_R' has no contour data (empty structure)"
    assert set(read_rtstruct(rs, image, structures=["Parotid_L"])) == {"Parotid_L"}
    with pytest.raises(CrossmodError) as err:
        read_rtstruct(rs, image, structures=["Brainstem"])
    assert one_line(err) == (f"{rs}: no structure matches Brainstem (or its aliases); "
                             "structures found: 'Parotid_L', 'Parotid_R'")


def test_rtstruct_bad_files(ct_folder, tmp_path):
    image = read_dicom_series(ct_folder)
    with pytest.raises(CrossmodError, match="no such file"):
        read_rtstruct(tmp_path / "absent.dcm", image)
    ct_file = min(ct_folder.glob("*.dcm"))
    with pytest.raises(CrossmodError) as err:
        read_rtstruct(ct_file, image)
    assert one_line(err) == f"{ct_file}: not an RTSTRUCT (Modality CT)"
    # an image that did not come from DICOM cannot be referenced
    plain = sitk.Image(image.GetSize(), sitk.sitkInt16)
    plain.CopyInformation(image)
    with pytest.raises(CrossmodError) as err:
        write_rtstruct(as_masks(parotids(), plain), plain, tmp_path / "rs.dcm")
    assert one_line(err).startswith(f"{tmp_path / 'rs.dcm'}: the reference image carries no DICOM")
    assert not (tmp_path / "rs.dcm").exists()


def test_case_without_rtstruct(ct_folder):
    with pytest.raises(CrossmodError) as err:
        read_dicom_case(ct_folder)
    assert one_line(err) == f"{ct_folder}: no RTSTRUCT file found"


def test_written_series_is_valid_dicom(tmp_path):
    paths = write_dicom_series(tmp_path / "s", np.zeros((2, 4, 5)), (1, 1, 1), (0, 0, 0), "MR")
    ds = pydicom.dcmread(paths[0])  # no force: preamble and file meta present
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.pixel_array.shape == (4, 5)
    again = write_dicom_series(tmp_path / "t", np.zeros((2, 4, 5)), (1, 1, 1), (0, 0, 0), "MR")
    assert pydicom.dcmread(again[1]).SOPInstanceUID == pydicom.dcmread(paths[1]).SOPInstanceUID
    shutil.rmtree(tmp_path / "t")


def test_contours_through_voxel_centres_include_their_boundary():
    """OpenCV-style contours (through the boundary voxels' centres, outline and hole) read back."""
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:8, 2:7] = True
    mask[3:6, 4] = False  # a hole one voxel wide
    outline = np.array([[2, 1], [6, 1], [6, 7], [2, 7]], dtype=float)
    hole = np.array([[4, 2], [5, 3], [5, 5], [4, 6], [3, 5], [3, 3]], dtype=float)
    assert np.array_equal(polygons_to_mask([outline, hole], mask.shape), mask)
    strict = polygons_to_mask([outline], mask.shape, boundary_eps=None)
    assert strict.sum() < mask[1:8, 2:7].sum()  # without the rule only part of the rim is in


def test_metadata_survives_nrrd_for_table_one(tmp_path):
    from crossmod_lib.io import read_header, write_image

    write_dicom_series(tmp_path / "mr", np.full((3, 8, 8), 5.0), (0.5, 0.5, 4), (0, 0, 0), "MR",
                      EchoTime="107.3")
    write_image(read_dicom_series(tmp_path / "mr"), tmp_path / "img.nrrd")
    header = read_header(tmp_path / "img.nrrd")
    assert header.GetMetaData("EchoTime") == "107.3" and header.GetMetaData("Modality") == "MR"


def test_truncated_rtstruct_named(ct_folder, tmp_path):
    image = read_dicom_series(ct_folder)
    rs = write_rtstruct(as_masks(parotids(), image), image, tmp_path / "rs.dcm")
    data = rs.read_bytes()
    for keep in (0.3, 0.6, 0.9):
        rs.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CrossmodError) as err:
            read_rtstruct(rs, image)
        assert one_line(err).startswith(f"{rs}: truncated")


def test_oblique_case_resampled_with_its_masks(tmp_path):
    angle = np.deg2rad(10)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                          [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                                                  [0, np.sin(angle), np.cos(angle)]])
    folder = tmp_path / "P9"
    write_dicom_series(folder / "mr", np.full(SHAPE, 100.0), (1.0, 1.0, 2.0), (0, 0, 0), "MR",
                      direction=direction.ravel())
    native = read_dicom_series(folder, oblique="keep")
    arrays = parotids()
    write_rtstruct(as_masks(arrays, native), native, folder / "RS.dcm")
    with pytest.raises(CrossmodError, match="not axial"):
        read_dicom_case(folder)
    case = read_dicom_case(folder, oblique="resample")
    assert np.allclose(case.image.GetDirection(), np.eye(3).ravel())
    for name, array in arrays.items():
        mask = case.structures[name]
        assert not grid_diff(mask, case.image)
        volume = sitk.GetArrayViewFromImage(mask).sum() * np.prod(mask.GetSpacing())
        assert volume == pytest.approx(array.sum() * 2.0, rel=0.2)  # native voxels are 2 mm^3


def test_several_rtstructs(tmp_path):
    folder = tmp_path / "P2"
    write_dicom_series(folder / "ct", head_ct(), SPACING, ORIGIN, "CT")
    image = read_dicom_series(folder)
    masks = as_masks(parotids(), image)
    write_rtstruct(masks, image, folder / "RS1.dcm")
    write_rtstruct(masks, image, folder / "RS2.dcm", structure_set_label="second")
    with pytest.raises(CrossmodError) as err:
        read_dicom_case(folder)
    assert "2 RTSTRUCT files reference series" in one_line(err) and "RS1.dcm, RS2.dcm" in str(err.value)
    case = read_dicom_case(folder, rtstruct=folder / "RS2.dcm")
    assert set(case.structures) == set(PAROTIDS)


def test_sheared_and_duplicated_slices_refused(ct_folder, tmp_path):
    files = sorted(ct_folder.glob("*.dcm"))
    for k, path in enumerate(files):  # gantry tilt: each slice shifted 0.4 mm in y
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.4 * k
        ds.save_as(path)
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(ct_folder)
    assert "gantry tilt" in one_line(err)
    twice = tmp_path / "twice"
    write_dicom_series(twice, head_ct(), SPACING, ORIGIN, "CT", file_prefix="a")
    uid = read_dicom_series(twice).GetMetaData("SeriesInstanceUID")
    write_dicom_series(twice, head_ct(), SPACING, ORIGIN, "CT", series_uid=uid, file_prefix="b",
                      EchoNumbers="2")
    with pytest.raises(CrossmodError) as err:
        read_dicom_series(twice)
    assert "at the same position" in one_line(err)


# ----------------------------------------------------------------------------------------------
# A folder of patient folders (crossmod data inspect FOLDER)


def _mr_patient(folder, patient_id, names=None, seed=0):
    """An MR patient folder; ``names`` maps Parotid_L / Parotid_R to the ROI names to write (None:
    no RTSTRUCT: an unannotated patient)."""
    write_dicom_series(folder, head_ct(seed=seed) + 1000.0, SPACING, ORIGIN, "MR", patient_id=patient_id,
                      SeriesDescription="T2 AX")
    if names is not None:
        image = read_dicom_series(folder)
        arrays = parotids()
        write_rtstruct(as_masks({names[k]: arrays[k] for k in names}, image), image, folder / "RS.dcm")


def test_cohort_view_one_row_per_patient_with_the_alias_that_matched(tmp_path, capsys):
    from crossmod_lib import cli, datasets

    cohort = tmp_path / "cohort"
    _mr_patient(cohort / "A", "A", {"Parotid_L": "Parotid_L", "Parotid_R": "Parotid_R"})
    _mr_patient(cohort / "B", "B", {"Parotid_L": "Lt Parotid", "Parotid_R": "PAROTID RT"}, seed=1)
    _mr_patient(cohort / "C", "C", None, seed=2)                        # unannotated
    broken = cohort / "D"
    _mr_patient(broken, "D", None, seed=3)
    first = sorted(broken.glob("*.dcm"))[0]
    first.write_bytes(first.read_bytes()[:600])                         # a truncated slice
    (cohort / "cases.csv").write_text("patient\nA\n")                   # a side file is allowed
    assert datasets.detect_layout(cohort) == "cohort"
    assert datasets.detect_layout(cohort / "A") == "dicom"
    table = datasets.inspect_cohort(cohort).set_index("patient")
    assert list(table.index) == ["A", "B", "C", "D"]
    assert table.loc["A", "Parotid_L"].startswith("Parotid_L (")
    assert table.loc["B", "Parotid_L"].startswith("Lt Parotid (") and table.loc["B", "Parotid_R"].startswith("PAROTID RT")
    assert table.loc["C", "Parotid_L"] == "no contours" and table.loc["C", "problem"] == ""
    assert table.loc["C", "modality"] == "MR" and table.loc["C", "size"] == "48x40x10"
    assert str(first) in table.loc["D", "problem"] and table.loc["A", "problem"] == ""
    # the CLI prints the table, one line per patient, and a problem does not stop the others
    assert cli.main(["data", "inspect", str(cohort)]) == 0
    out = capsys.readouterr().out
    assert "4 patient folders, 1 could not be read" in out and "Lt Parotid" in out
    assert max(len(line) for line in out.splitlines()) < 500


def test_many_series_in_one_folder_give_a_short_error(tmp_path):
    folder = tmp_path / "all"
    for k in range(5):
        write_dicom_series(folder / f"s{k}", head_ct(seed=k), SPACING, ORIGIN, "MR" if k else "CT",
                          patient_id=f"P{k}", series_uid=f"1.2.826.0.1.3680043.8.498.{k + 1}")
    with pytest.raises(CrossmodError) as info:
        read_dicom_series(folder)
    text = one_line(info)
    assert "5 image series found (1 CT, 4 MR; 5 PatientIDs)" in text and "1.2.826" not in text
    assert len(text) < 400


@pytest.mark.parametrize("keep", [300, 2000])
def test_a_truncated_rtstruct_is_never_read_as_no_contours(tmp_path, keep):
    from crossmod_lib import datasets

    folder = tmp_path / "P"
    _mr_patient(folder, "P", {"Parotid_L": "Parotid_L", "Parotid_R": "Parotid_R"})
    rs = folder / "RS.dcm"
    rs.write_bytes(rs.read_bytes()[:keep])
    with pytest.raises(CrossmodError) as info:
        datasets.read_any(folder)
    assert str(rs) in one_line(info)
    # without any RTSTRUCT the patient is unannotated, which read_any accepts
    rs.unlink()
    (case,) = datasets.read_any(folder)
    assert case.structures == {}


def test_profile_init_writes_a_checked_profile_for_a_dicom_mr_cohort(tmp_path, capsys):
    import yaml

    from crossmod_lib import cli
    from crossmod_lib.config import load_profile

    cohort = tmp_path / "mr"
    _mr_patient(cohort / "A", "A", {"Parotid_L": "Parotid_L", "Parotid_R": "Parotid_R"})
    _mr_patient(cohort / "B", "B", {"Parotid_L": "Lt Parotid", "Parotid_R": "Rt Parotid"}, seed=1)
    _mr_patient(cohort / "C", "C", None, seed=2)                        # unannotated: kept
    _mr_patient(cohort / "D", "D", {"Parotid_L": "Parotid_L"}, seed=3)  # half contoured: left out
    assert cli.main(["profile", "init", "--mr", str(cohort), "--as", "mine"]) == 0
    text = capsys.readouterr().out
    assert "4 DICOM patients (MR), 2 with both parotids contoured, 1 without contours" in text
    assert "left out (cannot be read): D: " in text and "Parotid_R" in text.split("D: ")[1].splitlines()[0]
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    profile = load_profile(path)
    mr = profile["data"]["mr"]
    assert mr["dataset"] == "dicom" and mr["root"] == str(cohort.absolute())
    assert mr["patients"] == ["A", "B", "C"]
    assert profile["data"]["ct"]["dataset"] == "openkbp" and yaml.safe_load(text)["extends"] == "openkbp"
    # the chosen patients are the ones the pipeline's cohort reader takes
    from crossmod_lib.preparation import cohort_sources
    from crossmod_lib.runs import RunFolder

    try:
        sources = cohort_sources(RunFolder.open(path, tmp_path / "run"), progress=False)
    except CrossmodError as exc:  # the CT side is OpenKBP, read from the data root
        pytest.skip(f"the CT cohort (OpenKBP) is not under the data root: {exc}")
    assert sources["MR"].patient_ids() == ["A", "B", "C"]
    assert sources["MR"].read(sources["MR"].items[2]).structures == {}

    # a folder that is not a cohort, or a CT cohort without contours: one line, no profile
    assert cli.main(["profile", "init", "--mr", str(cohort / "A")]) == 2
    assert cli.main(["profile", "init", "--mr", str(cohort), "--ct", str(cohort)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "CT patients lack a parotid contour" in err[1]

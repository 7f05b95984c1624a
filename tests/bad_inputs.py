"""The bad-input corpus: generators of broken inputs for the ``crossmod`` command line.

Every input is written afresh under a temporary folder (no binary file is committed). Each
generator, registered in :data:`CASES` under its name (the test id), takes that folder and returns
a :class:`BadCase`: the ``crossmod`` arguments that must fail, the substrings the one-line error
must contain (the offending file's path, or the setting for a profile), and for commands that
write, the output folder that must be left absent or unchanged.

tests/test_bad_inputs.py runs each through ``crossmod_lib.cli.main`` in-process.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from crossmod_lib.dicom import read_dicom_series, write_rtstruct, write_dicom_series


@dataclass
class BadCase:
    argv: list[str]                      # crossmod arguments (without the program name)
    expect: tuple[str, ...]              # substrings of the error line (file path, setting, problem)
    output: Path | None = None           # an output folder: absent or unchanged afterwards
    patch: Callable | None = None        # patch(monkeypatch): simulate a failure of the system
    skip: str | None = None              # a reason this case cannot run here


CASES: dict[str, Callable[[Path], BadCase]] = {}


def case(fn: Callable[[Path], BadCase]) -> Callable[[Path], BadCase]:
    CASES[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------------------------
# Small valid inputs, broken one way per case

SPACING = (0.9, 0.8, 2.5)   # x, y, z (mm)
ORIGIN = (-21.6, -16.0, 40.0)
SHAPE = (10, 40, 48)        # z, y, x


def head(shape=SHAPE, seed=0) -> np.ndarray:
    """An MR-like head: an ellipse of tissue with noise, zero air."""
    rng = np.random.default_rng(seed)
    _, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    inside = ((y - 20) / 17.0) ** 2 + ((x - 24) / 21.0) ** 2 < 1
    return (np.where(inside, 1040.0, 0.0) + rng.integers(0, 20, shape)).astype(float)


def parotids(shape=SHAPE) -> dict[str, np.ndarray]:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    left = ((y - 22) / 6.5) ** 2 + ((x - 35) / 5.0) ** 2 + ((z - 5) / 3.2) ** 2 < 1
    right = ((y - 21) / 7.0) ** 2 + ((x - 12) / 4.5) ** 2 + ((z - 4.5) / 3.0) ** 2 < 1
    return {"Parotid_L": left.astype(np.uint8), "Parotid_R": right.astype(np.uint8)}


def as_masks(arrays: dict[str, np.ndarray], image: sitk.Image) -> dict[str, sitk.Image]:
    masks = {}
    for name, array in arrays.items():
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(image)
        masks[name] = mask
    return masks


def mr_series(folder: Path, patient_id: str = "P001", modality: str = "MR", seed: int = 0,
              **tags) -> list[Path]:
    return write_dicom_series(folder, head(seed=seed), SPACING, ORIGIN, modality,
                             patient_id=patient_id, SeriesDescription=f"T2 AX {seed}", **tags)


def dicom_patient(folder: Path, arrays: dict[str, np.ndarray] | None = None) -> tuple[list[Path], Path]:
    """An MR patient folder: the series' slices and RS.dcm (both parotids by default)."""
    slices = mr_series(folder)
    image = read_dicom_series(folder)
    rs = write_rtstruct(as_masks(parotids() if arrays is None else arrays, image), image,
                        folder / "RS.dcm")
    return slices, rs


def inspect(folder: Path, named: Path, *expect: str) -> BadCase:
    """crossmod data inspect FOLDER (one patient), whose error must name ``named``."""
    return BadCase(["data", "inspect", str(folder)], (str(named), *expect))


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def labels_image(shape=(8, 24, 20), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                 dtype=np.uint8, fill=1) -> sitk.Image:
    array = np.zeros(shape, dtype=dtype)
    array[2:6, 6:14, 5:12] = fill
    array[2:6, 6:14, 13:18] = 2 if dtype != np.float32 else array[2:6, 6:14, 13:18]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def write(image: sitk.Image, path: Path, compress: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def metrics(tmp: Path, prediction: Path, *expect: str, reference: Path | None = None) -> BadCase:
    if reference is None:
        reference = write(labels_image(), tmp / "reference.nrrd")
    return BadCase(["metrics", "--reference", str(reference), "--prediction", str(prediction)],
                   tuple(expect))


def profile(tmp: Path, text: str, *expect: str, name: str = "mine.yaml",
            named: Path | None = None) -> BadCase:
    """crossmod profile FILE, whose error must name FILE (or ``named``, the file at fault)."""
    path = tmp / name
    path.write_text(text)
    return BadCase(["profile", str(path)], (str(named or path), *expect))


# ----------------------------------------------------------------------------------------------
# DICOM: crossmod data inspect PATIENT_FOLDER


@case
def dicom_garbage_dcm_file(tmp):
    folder = tmp / "P001"
    dicom_patient(folder)
    bad = folder / "MR_extra.dcm"
    bad.write_bytes(b"this is not a DICOM file\n" * 40)
    return inspect(folder, bad, "not a DICOM file")


@case
def dicom_corrupt_after_preamble(tmp):
    folder = tmp / "P001"
    slices, _ = dicom_patient(folder)
    rng = np.random.default_rng(7)
    slices[4].write_bytes(b"\0" * 128 + b"DICM" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    return inspect(folder, slices[4])


@case
def dicom_truncated_slice_pixels(tmp):
    folder = tmp / "P001"
    slices, _ = dicom_patient(folder)
    truncate(slices[3], 0.6)
    return inspect(folder, slices[3], "truncated")


@case
def dicom_truncated_slice_header(tmp):
    folder = tmp / "P001"
    slices, _ = dicom_patient(folder)
    truncate(slices[3], 0.08)
    return inspect(folder, slices[3])


@case
def dicom_truncated_rtstruct(tmp):
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    truncate(rs, 0.5)
    return inspect(folder, rs, "truncated")


def garble(path: Path, tag: bytes, start: int, count: int) -> None:
    """Overwrite ``count`` bytes with 0xFF, ``start`` bytes after the element ``tag`` (the file
    keeps its length: corrupt, not truncated)."""
    data = bytearray(path.read_bytes())
    at = data.find(tag)
    assert at > 0, f"{tag!r} not in {path}"
    data[at + start: at + start + count] = b"\xff" * count
    path.write_bytes(bytes(data))


@case
def dicom_corrupt_rtstruct_contours(tmp):
    """The contour sequence overwritten with garbage."""
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    garble(rs, b"\x06\x30\x39\x00", 12, 388)  # (3006,0039) ROIContourSequence, little endian
    return inspect(folder, rs, "corrupt")


@case
def dicom_corrupt_rtstruct_roi_list(tmp):
    """The list of ROIs (names and numbers) overwritten with garbage."""
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    garble(rs, b"\x06\x30\x20\x00", 12, 60)  # (3006,0020) StructureSetROISequence
    return inspect(folder, rs, "corrupt")


@case
def dicom_corrupt_rtstruct_references(tmp):
    """The references to the image (frame of reference, study, series) overwritten with garbage."""
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    garble(rs, b"\x06\x30\x10\x00", 12, 60)  # (3006,0010) ReferencedFrameOfReferenceSequence
    return inspect(folder, rs, "corrupt")


@case
def dicom_rtstruct_of_another_series(tmp):
    other = tmp / "other_series"
    mr_series(other, seed=5)
    image = read_dicom_series(other)
    folder = tmp / "P001"
    mr_series(folder)
    rs = write_rtstruct(as_masks(parotids(), image), image, folder / "RS.dcm")
    return inspect(folder, rs, "references series")


@case
def dicom_rtstruct_other_frame_of_reference(tmp):
    """An RTSTRUCT naming no series, in another frame of reference than the image's."""
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    ds = pydicom.dcmread(rs)
    for frame in ds.ReferencedFrameOfReferenceSequence:
        frame.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.999"
        if "RTReferencedStudySequence" in frame:
            del frame.RTReferencedStudySequence
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.999"
    ds.save_as(rs)
    return inspect(folder, rs, "frame of reference")


@case
def dicom_contour_outside_image(tmp):
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    ds = pydicom.dcmread(rs)
    for item in ds.ROIContourSequence:
        for contour in item.ContourSequence:
            points = [float(v) for v in contour.ContourData]
            points[2::3] = [z + 100 * SPACING[2] for z in points[2::3]]  # 100 slices above
            contour.ContourData = [f"{v:.4f}" for v in points]
    ds.save_as(rs)
    return inspect(folder, rs, "outside the image")


@case
def dicom_contour_between_slices(tmp):
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    ds = pydicom.dcmread(rs)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    points = [float(v) for v in contour.ContourData]
    points[2::3] = [z + 0.5 * SPACING[2] for z in points[2::3]]
    contour.ContourData = [f"{v:.4f}" for v in points]
    ds.save_as(rs)
    return inspect(folder, rs, "between the image's slices")


@case
def dicom_missing_slice(tmp):
    folder = tmp / "P001"
    slices, _ = dicom_patient(folder)
    slices[4].unlink()
    return inspect(folder, folder, "missing slice")


@case
def dicom_non_uniform_spacing(tmp):
    folder = tmp / "P001"
    slices, _ = dicom_patient(folder)
    ds = pydicom.dcmread(slices[5])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(slices[5])
    return inspect(folder, folder, "non-uniform slice spacing")


@case
def dicom_ct_and_mr_series_without_choice(tmp):
    folder = tmp / "P001"
    mr_series(folder / "mr")
    write_dicom_series(folder / "ct", head() - 1000.0, SPACING, ORIGIN, "CT", patient_id="P001")
    return inspect(folder, folder, "2 image series found")


@case
def dicom_modalities_mixed_in_one_series(tmp):
    folder = tmp / "P001"
    slices, _ = dicom_patient(folder)
    ds = pydicom.dcmread(slices[2])
    ds.Modality = "CT"
    ds.save_as(slices[2])
    return inspect(folder, slices[2], "mixes modalities")


@case
def dicom_only_non_image_modality(tmp):
    """A 'series' whose Modality is RTDOSE: not an image series the reader accepts."""
    folder = tmp / "P001"
    mr_series(folder, Modality="RTDOSE")
    return inspect(folder, folder, "no DICOM image files found")


@case
def dicom_missing_parotid(tmp):
    folder = tmp / "P001"
    _, rs = dicom_patient(folder, {"Parotid_L": parotids()["Parotid_L"]})
    return inspect(folder, rs, "no structure matches Parotid_R")


@case
def dicom_empty_structure(tmp):
    folder = tmp / "P001"
    arrays = parotids()
    arrays["Parotid_R"][:] = 0
    _, rs = dicom_patient(folder, arrays)
    return inspect(folder, rs, "'Parotid_R' has no contour data")


@case
def dicom_two_rtstructs(tmp):
    folder = tmp / "P001"
    _, rs = dicom_patient(folder)
    image = read_dicom_series(folder)
    write_rtstruct(as_masks(parotids(), image), image, folder / "RS2.dcm", structure_set_label="second")
    return inspect(folder, folder, "2 RTSTRUCT files reference series")


# ----------------------------------------------------------------------------------------------
# Label images: crossmod metrics --reference A --prediction B


@case
def metrics_truncated_nrrd(tmp):
    bad = write(labels_image(), tmp / "prediction.nrrd")
    truncate(bad, 0.6)
    return metrics(tmp, bad, str(bad))


@case
def metrics_truncated_raw_nrrd(tmp):
    bad = write(labels_image(), tmp / "prediction.nrrd", compress=False)
    truncate(bad, 0.6)
    return metrics(tmp, bad, str(bad))


@case
def metrics_truncated_nii_gz(tmp):
    bad = write(labels_image(), tmp / "prediction.nii.gz")
    truncate(bad, 0.6)
    return metrics(tmp, bad, str(bad))


@case
def metrics_truncated_nii(tmp):
    bad = write(labels_image(), tmp / "prediction.nii", compress=False)
    truncate(bad, 0.6)
    return metrics(tmp, bad, str(bad), "truncated")


@case
def metrics_truncated_mha(tmp):
    bad = write(labels_image(), tmp / "prediction.mha", compress=False)
    truncate(bad, 0.6)
    return metrics(tmp, bad, str(bad))


@case
def metrics_text_named_nrrd(tmp):
    bad = tmp / "prediction.nrrd"
    bad.write_text("label,value\nParotid_L,1\n")
    return metrics(tmp, bad, str(bad))


@case
def metrics_text_named_nii_gz(tmp):
    bad = tmp / "prediction.nii.gz"
    bad.write_bytes(gzip.compress(b"not a NIfTI header at all\n" * 30))
    return metrics(tmp, bad, str(bad))


@case
def metrics_empty_nii_gz(tmp):
    bad = tmp / "prediction.nii.gz"
    bad.write_bytes(b"")
    return metrics(tmp, bad, str(bad))


@case
def metrics_missing_reference(tmp):
    prediction = write(labels_image(), tmp / "prediction.nrrd")
    missing = tmp / "absent" / "reference.nrrd"
    return metrics(tmp, prediction, str(missing), "no such file", reference=missing)


@case
def metrics_folder_as_file(tmp):
    folder = tmp / "prediction.nii.gz"
    folder.mkdir()
    return metrics(tmp, folder, str(folder), "is a directory")


@case
def metrics_grid_spacing_differs(tmp):
    bad = write(labels_image(spacing=(1.0, 1.0, 3.0)), tmp / "prediction.nrrd")
    return metrics(tmp, bad, str(bad), "not on the same grid", "spacing")


@case
def metrics_grid_size_differs(tmp):
    bad = write(labels_image(shape=(9, 24, 20)), tmp / "prediction.nrrd")
    return metrics(tmp, bad, str(bad), "not on the same grid", "size")


@case
def metrics_grid_origin_differs(tmp):
    bad = write(labels_image(origin=(0.0, 5.0, 0.0)), tmp / "prediction.nrrd")
    return metrics(tmp, bad, str(bad), "not on the same grid", "origin")


@case
def metrics_nan_labels(tmp):
    image = labels_image(dtype=np.float32)
    array = sitk.GetArrayFromImage(image)
    array[3, 10, 8] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    bad = write(nan_image, tmp / "prediction.nrrd")
    return metrics(tmp, bad, str(bad), "not a label image")


@case
def metrics_fractional_labels(tmp):
    bad = write(labels_image(dtype=np.float32, fill=0.5), tmp / "prediction.nii.gz")
    return metrics(tmp, bad, str(bad), "not a label image")


@case
def metrics_vector_image(tmp):
    array = sitk.GetArrayFromImage(labels_image())
    rgb = sitk.GetImageFromArray(np.stack([array] * 3, axis=-1), isVector=True)
    rgb.SetSpacing((1.0, 1.0, 2.0))
    bad = write(rgb, tmp / "prediction.nrrd")
    return metrics(tmp, bad, str(bad))


# ----------------------------------------------------------------------------------------------
# Profiles: crossmod profile FILE.yaml


@case
def profile_negative_width(tmp):
    return profile(tmp, "extends: full\ncyclegan: {ngf: -3}\n", "cyclegan.ngf")


@case
def profile_zero_width(tmp):
    return profile(tmp, "extends: full\nsegmentation: {base_features: 0}\n", "segmentation.base_features")


@case
def profile_wrong_type(tmp):
    return profile(tmp, "extends: full\nsegmentation: {epochs: many}\n", "segmentation.epochs")


@case
def profile_block_not_a_mapping(tmp):
    return profile(tmp, "extends: full\npreprocessing: 4\n", "preprocessing", "mapping")


@case
def profile_unknown_key(tmp):
    return profile(tmp, "extends: full\nsegmentation: {epochz: 3}\n", "segmentation.epochz", "unknown")


@case
def profile_extends_cycle(tmp):
    (tmp / "b.yaml").write_text("extends: a.yaml\nseed: 3\n")
    return profile(tmp, "extends: b.yaml\nseed: 4\n", "cycle", name="a.yaml")


@case
def profile_extends_missing_parent(tmp):
    missing = tmp / "base.yaml"
    bad = profile(tmp, "extends: base.yaml\nseed: 4\n", "not found", named=missing)
    # the profile that refers to the missing parent is named too
    bad.expect = (*bad.expect, f"{tmp / 'mine.yaml'}: extends 'base.yaml'")
    return bad


@case
def profile_invalid_yaml(tmp):
    return profile(tmp, "extends: full\nsegmentation: {epochs: 3\n  levels: [\n", "not valid YAML")


@case
def profile_not_a_mapping(tmp):
    return profile(tmp, "- extends: full\n- seed: 3\n", "mapping")


@case
def profile_empty_file(tmp):
    return profile(tmp, "", "mapping")


@case
def profile_unknown_translator(tmp):
    return profile(tmp, "extends: full\ncyclegan: {translator: pix2pix}\n", "cyclegan.translator")


@case
def profile_fraction_out_of_range(tmp):
    return profile(tmp, "extends: full\nsegmentation: {val_fraction: 1.5}\n", "segmentation.val_fraction")


@case
def profile_percentile_out_of_range(tmp):
    return profile(tmp, "extends: full\npreprocessing: {mr_upper_percentile: 140}\n",
                   "preprocessing.mr_upper_percentile")


# ----------------------------------------------------------------------------------------------
# crossmod predict --model CKPT --input MR --output OUT


def tiny_checkpoint(path: Path, **changes) -> Path:
    """A small untrained U-Net checkpoint in the format crossmod predict reads; ``changes``
    replace entries of the checkpoint dict (None removes one)."""
    import torch

    from crossmod_lib.config import load_profile
    from crossmod_lib.segmentation import CHECKPOINT_FORMAT, UNet, save_checkpoint

    torch.manual_seed(0)
    model = UNet(base_features=2, levels=2)
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "arch": model.arch,
            "config": {"base_features": 2, "levels": 2},
            "meta": {"kind": "bad-input test", "preprocessing": load_profile("smoke")["preprocessing"]}}
    for key, value in changes.items():
        if value is None:
            ckpt.pop(key, None)
        else:
            ckpt[key] = value
    return save_checkpoint(ckpt, path)


def small_mr(path: Path) -> Path:
    """A 128 x 128 x 4 MR-like volume (2 mm pixels): a bright head on dark air."""
    _, y, x = np.mgrid[:4, :128, :128]
    inside = ((y - 64) / 45.0) ** 2 + ((x - 64) / 38.0) ** 2 < 1
    rng = np.random.default_rng(0)
    volume = np.where(inside, 300.0, 5.0) + rng.normal(0, 10, inside.shape)
    image = sitk.GetImageFromArray(np.abs(volume).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 4.0))
    return write(image, path)


def predict(tmp: Path, *expect: str, model: Path | None = None, output: Path | None = None,
            patch=None, skip=None) -> BadCase:
    model = model or tiny_checkpoint(tmp / "model" / "best.pt")
    mr = small_mr(tmp / "mr" / "P001.nii.gz")
    output = output or tmp / "out"
    return BadCase(["predict", "--model", str(model), "--input", str(mr), "--output", str(output)],
                   tuple(expect), output=output, patch=patch, skip=skip)


@case
def predict_checkpoint_of_another_architecture(tmp):
    from crossmod_lib.segmentation import UNet

    bad = tiny_checkpoint(tmp / "model" / "best.pt", arch=UNet(base_features=4, levels=2).arch)
    return predict(tmp, str(bad), "do not fit", model=bad)


@case
def predict_checkpoint_with_unknown_arch_setting(tmp):
    arch = {"base_features": 2, "levels": 2, "in_channels": 1, "classes": 3, "norm": "batch",
            "attention": True}
    bad = tiny_checkpoint(tmp / "model" / "best.pt", arch=arch)
    return predict(tmp, str(bad), "architecture", model=bad)


@case
def predict_checkpoint_without_weights(tmp):
    bad = tiny_checkpoint(tmp / "model" / "best.pt", model=None)
    return predict(tmp, str(bad), model=bad)


@case
def predict_checkpoint_of_another_format(tmp):
    bad = tiny_checkpoint(tmp / "model" / "best.pt", format="crossmod-cyclegan-1")
    return predict(tmp, str(bad), "not a crossmod U-Net checkpoint", model=bad)


@case
def predict_model_not_a_checkpoint(tmp):
    bad = tmp / "model" / "best.pt"
    bad.parent.mkdir(parents=True)
    bad.write_text("these are not the weights you are looking for\n")
    return predict(tmp, str(bad), "cannot read checkpoint", model=bad)


@case
def predict_truncated_checkpoint(tmp):
    bad = tiny_checkpoint(tmp / "model" / "best.pt")
    truncate(bad, 0.5)
    return predict(tmp, str(bad), "cannot read checkpoint", model=bad)


@case
def predict_missing_checkpoint(tmp):
    missing = tmp / "model" / "best.pt"
    return predict(tmp, str(missing), "not found", model=missing)


@case
def predict_truncated_input(tmp):
    bad = predict(tmp)
    mr = Path(bad.argv[bad.argv.index("--input") + 1])
    truncate(mr, 0.5)
    bad.expect = (str(mr),)
    return bad


@case
def predict_output_is_a_file(tmp):
    out = tmp / "out"
    out.write_text("a file where the output folder should go\n")
    return predict(tmp, str(out), "is a file", output=out)


@case
def predict_output_inside_a_file(tmp):
    blocker = tmp / "results"
    blocker.write_text("a file where a folder should go\n")
    out = blocker / "out"
    return predict(tmp, str(out), "cannot write", "Not a directory", output=out)


@case
def predict_unwritable_output(tmp):
    locked = tmp / "locked"
    locked.mkdir()
    out = locked / "out"
    patch = None
    if os.geteuid() == 0:  # root writes into a 0o500 folder: refuse its mkdir as the kernel would
        def patch(monkeypatch):
            real_mkdir = os.mkdir

            def mkdir(path, *args, **kwargs):
                if Path(os.fspath(path)).absolute().is_relative_to(locked):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", mkdir)
    bad = predict(tmp, str(out), "Permission denied", output=out, patch=patch)
    locked.chmod(0o500)
    return bad


def _disk_full(monkeypatch):
    """SimpleITK's writer runs out of space after writing part of its (temporary) file."""
    def write_image(image, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\x1f\x8b partial data")
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(sitk, "WriteImage", write_image)


def _disk_full_itk(monkeypatch):
    """As ITK reports it: a RuntimeError with ITK's multi-line message."""
    def write_image(image, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\x1f\x8b partial data")
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: /src/itk/"
                           f"itkNiftiImageIO.cxx:2192:\nITK ERROR: NiftiImageIO(0x55d0c0ffee00): "
                           f"Could not write {filename}: No space left on device\n")

    monkeypatch.setattr(sitk, "WriteImage", write_image)


@case
def predict_disk_full_itk_error(tmp):
    out = tmp / "out"
    return predict(tmp, str(out), "cannot write", "No space left on device", output=out,
                   patch=_disk_full_itk)


@case
def predict_disk_full_new_output(tmp):
    out = tmp / "out"
    return predict(tmp, str(out), "No space left on device", output=out, patch=_disk_full)


@case
def predict_disk_full_existing_output(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "P001_labels.nii.gz").write_bytes(b"yesterday's result, kept as it was")
    (out / "notes.txt").write_text("a user's file\n")
    return predict(tmp, str(out), "No space left on device", output=out, patch=_disk_full)

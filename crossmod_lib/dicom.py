"""DICOM in and out: image series, RT structure sets (RTSTRUCT), structure-name matching.

Clinical data arrive as DICOM: a folder of image slices (one file per slice) and an RTSTRUCT whose
contours are closed polygons in patient coordinates (mm, LPS). This module turns them into the
in-memory form the rest of the project uses (:class:`crossmod_lib.io.Case`: an image and uint8
masks on its grid), and writes predicted masks back as an RTSTRUCT a planning system can import.

Reading an image series (:func:`read_dicom_series`)
    Headers are read with pydicom (so a broken file is reported by name), slices are grouped by
    SeriesInstanceUID and sorted by their position along the slice normal (file names and
    InstanceNumber are ignored); the pixels are read by SimpleITK/GDCM (which applies
    RescaleSlope/Intercept, so CT comes out in HU, and decodes compressed transfer syntaxes), and
    the geometry is set from the headers checked here. Useful header values are kept as image
    metadata under their DICOM keywords (``Modality``, ``EchoTime``, ``KVP``, ...; see
    :data:`METADATA_KEYWORDS`), plus ``SOPInstanceUIDs``: the slices' SOP Instance UIDs in slice
    order (index k of the image), backslash-separated. These are what :func:`write_rtstruct` needs
    to reference the slices and what a Table I of acquisition parameters is computed from. They
    include identifying values (PatientID, PatientName, dates) exactly as in the files.

    Refused, each with a one-line :class:`~crossmod_lib.errors.CrossmodError`: a folder without
    DICOM image files; a ``.dcm`` file that is not DICOM, or a truncated/corrupt file (header cut
    short, pixel data shorter than the header promises); several modalities within one series;
    slices of different size, pixel spacing or orientation in one series; two slices at the same
    position; missing slices or non-uniform slice spacing (steps differing by more than 5 %: a
    gap is not interpolated over, since the slices around it would then be mislabelled);
    slices shifted in-plane from one another (gantry tilt); multi-frame (enhanced) objects.

    Orientation: the paper's method works on axial slices. A series whose slice normal is the
    patient z axis (within 1e-3) is returned on its own grid (in-plane rotations and flips are
    kept in the direction matrix). Any other orientation (oblique, sagittal, coronal) is refused
    by default (``oblique="refuse"``); ``oblique="keep"`` returns it on its native grid (the
    RTSTRUCT reader and writer handle any direction matrix), ``oblique="resample"`` resamples it
    linearly onto an axial grid (identity direction) covering the same volume, with the native
    spacings assigned to the nearest patient axes. A resampled image no longer corresponds to
    the DICOM slices, so its ``SOPInstanceUIDs`` are dropped and it cannot be written back as
    an RTSTRUCT reference.

Structure names (:func:`match_structure`)
    Names are compared after lower-casing and dropping spaces, underscores, hyphens and dots,
    against the canonical AAPM TG-263 name and its aliases (:data:`DEFAULT_ALIASES`). No match,
    or several matching names, is a one-line error listing the names found.

Reading an RTSTRUCT (:func:`read_rtstruct`)
    The RTSTRUCT must reference the image's series (RTReferencedSeriesSequence), or, where it
    names no series, its frame of reference. Each CLOSED_PLANAR contour is mapped through the
    image's origin, spacing and direction to voxel indices, assigned to the slice it lies on
    (it must lie within a quarter slice of one) and rasterised at voxel centres with the
    even-odd rule: all polygons of a structure on one slice are XOR-ed, so a contour inside
    another is a hole. A voxel whose centre lies on a contour (within 0.01 voxel) counts as
    inside, so contours drawn through the boundary voxels' centres (OpenCV-based writers such as
    rt-utils) give back their mask exactly. Other contour types (POINT, OPEN_PLANAR) are ignored.
    Without DICOM metadata on the image (e.g. one read from NRRD) the reference check is skipped.

Writing an RTSTRUCT (:func:`write_rtstruct`)
    Polygons are extracted per slice by a marching-squares pass written here (no scikit-image):
    vertices are the midpoints between an inside and an outside voxel centre, so the polygon
    passes half a voxel outside the mask's outer voxel centres and re-rasterising it at voxel
    centres gives back exactly the mask. Diagonal-only contacts are kept apart (each
    4-connected part of the mask gets its own polygon, holes get their own), so the polygons
    never touch. Collinear vertices are dropped. The contour thus encloses the voxels' area
    (volume computed from the contours is close to the voxel volume); tools that rasterise by
    rounding vertices and filling inclusively (rt-utils) read it back up to a one-voxel rim.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from .errors import CrossmodError, NoContoursError
from .io import PAROTIDS, Case, _one_line, grid_differences
from .runs import PredictionFiles

__all__ = [
    "DEFAULT_ALIASES",
    "METADATA_KEYWORDS",
    "mask_to_polygons",
    "match_structure",
    "normalise_name",
    "polygons_to_mask",
    "read_dicom_case",
    "read_dicom_series",
    "read_rtstruct",
    "slice_uids",
    "write_rtstruct",
    "write_dicom_series",
]

# ----------------------------------------------------------------------------------------------
# Constants

#: Header values kept as image metadata (under these keys, as strings; multi-valued joined by "\").
METADATA_KEYWORDS = (
    "Modality", "SOPClassUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "FrameOfReferenceUID", "Manufacturer", "ManufacturerModelName",
    "BodyPartExamined", "PatientPosition", "SliceThickness", "SpacingBetweenSlices",
    "KVP", "XRayTubeCurrent", "ConvolutionKernel", "EchoTime", "RepetitionTime", "FlipAngle",
    "MagneticFieldStrength", "SequenceName", "ScanningSequence", "SequenceVariant",
    "MRAcquisitionType", "EchoTrainLength", "ImagingFrequency",
)
SOP_UIDS_KEY = "SOPInstanceUIDs"

#: Modalities whose objects are not slices of an image volume (never read as a series).
NON_VOLUME_MODALITIES = frozenset({
    "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "REG", "SEG", "SR", "KO", "PR", "DOC",
    "PLAN", "FID",
})

AXIAL_TOLERANCE = 1e-3       # |slice normal - (0, 0, +-1)|: axial within this
GEOMETRY_TOLERANCE = 1e-3    # mm / direction cosines: slices agree within this
SPACING_TOLERANCE = 0.05     # relative: slice steps may differ from their mean by this much
PLANE_TOLERANCE = 0.25       # slices: a contour must lie this close to one slice's plane

# The Detached Study Management SOP class (retired, but what RTReferencedStudySequence carries).
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

_SIDES = {"L": ("L", "Lt", "Left"), "R": ("R", "Rt", "Right")}


def _side_aliases(organ: str, side: str) -> tuple[str, ...]:
    names = [f"{organ}_{side}"]
    for token in _SIDES[side]:
        names += [f"{organ} {token}", f"{token} {organ}"]
    return tuple(names)


#: Metadata key of a mask read from an RTSTRUCT: the ROI name that matched its canonical name.
ROI_NAME_KEY = "crossmod_roi_name"

#: TG-263 name -> accepted aliases (compared after :func:`normalise_name`).
DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "Parotid_L": _side_aliases("Parotid", "L"),
    "Parotid_R": _side_aliases("Parotid", "R"),
}


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters) for ``value``, rounded to 1e-4."""
    text = f"{float(value):.4f}".rstrip("0").rstrip(".")
    if text in ("", "-0", "-"):
        text = "0"
    return text if len(text) <= 16 else format_number_as_ds(float(value))


def _image_meta(image: sitk.Image, key: str, default: str = "") -> str:
    return image.GetMetaData(key) if image.HasMetaDataKey(key) else default


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# ----------------------------------------------------------------------------------------------
# Structure names


def normalise_name(name: str) -> str:
    """A structure name for comparison: lower case, without spaces, underscores, hyphens, dots."""
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


def match_structure(names: Iterable[str], canonical: str,
                    aliases: Mapping[str, Iterable[str]] | None = None, *, source=None) -> str:
    """The one name in ``names`` that is ``canonical`` or one of its aliases.

    ``aliases`` maps a canonical name to its accepted alternatives (default
    :data:`DEFAULT_ALIASES`; pass ``{**DEFAULT_ALIASES, "Parotid_L": [...]}`` to extend it). The
    canonical name itself always matches. Comparison ignores case, spaces, underscores, hyphens
    and dots. No match, or several names matching, is a one-line :class:`CrossmodError` that
    lists the names found, prefixed with ``source`` (e.g. the file) when given.
    """
    names = list(names)
    table = DEFAULT_ALIASES if aliases is None else aliases
    extra = table.get(canonical, ())
    extra = [extra] if isinstance(extra, str) else extra
    wanted = {normalise_name(canonical)} | {normalise_name(a) for a in extra}
    hits = [n for n in names if normalise_name(n) in wanted]
    prefix = f"{source}: " if source is not None else ""
    found = ", ".join(repr(n) for n in names) if names else "none"
    if not hits:
        raise CrossmodError(f"{prefix}no structure matches {canonical} (or its aliases); "
                            f"structures found: {found}")
    if len(hits) > 1:
        raise CrossmodError(f"{prefix}several structures match {canonical}: "
                            + ", ".join(repr(n) for n in hits) + f"; structures found: {found}")
    return hits[0]


# ----------------------------------------------------------------------------------------------
# Scanning a folder


@dataclass
class _Slice:
    path: Path
    ds: Dataset  # header; pixel data deferred


@dataclass
class _Series:
    uid: str
    slices: list[_Slice] = field(default_factory=list)

    @property
    def modalities(self) -> list[str]:
        return sorted({str(s.ds.get("Modality", "")) for s in self.slices})

    def describe(self) -> str:
        first = self.slices[0].ds
        description = str(first.get("SeriesDescription", "") or "")
        return (f"{self.uid} ({'/'.join(self.modalities) or '?'}, {description!r}, "
                f"{len(self.slices)} slice{'s' if len(self.slices) != 1 else ''})")


@dataclass
class _Scan:
    folder: Path
    series: dict[str, _Series]
    rtstructs: list[Path]


def _dicom_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return files


def _pixel_problem(path: Path, ds: Dataset) -> str | None:
    """Why the slice's pixel data are missing or cut short, or None."""
    raw = ds._dict.get(0x7FE00010)
    if raw is None:
        return "no pixel data (file truncated or corrupt)"
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None or length == 0xFFFFFFFF:  # read in full or encapsulated: GDCM checks those
        value = getattr(raw, "value", None)
        if value is None and tell is None:
            return "no pixel data (file truncated or corrupt)"
        return None
    size = path.stat().st_size
    if tell is not None and tell + length > size:
        return f"truncated: pixel data end at byte {tell + length}, the file has {size}"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * frames * int(ds.BitsAllocated) // 8)
        except (AttributeError, TypeError, ValueError):
            return "incomplete image header (Rows, Columns or BitsAllocated missing)"
        if length < expected:
            return f"truncated: {length} bytes of pixel data where the header promises {expected}"
    return None


def _dcmread(path: Path, **kwargs) -> Dataset:
    """pydicom.dcmread, also for files without the 128-byte preamble and "DICM" prefix.

    Such files (older exports) start directly with a group 0x0002 or 0x0008 element; anything
    else without the prefix is not DICOM (InvalidDicomError).
    """
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        with path.open("rb") as fh:
            head = fh.read(2)
        if head not in (b"\x02\x00", b"\x08\x00"):
            raise
        return pydicom.dcmread(path, force=True, **kwargs)


def _read_header(path: Path) -> Dataset | None:
    """The file's dataset with large values deferred; None if it is not DICOM (and not *.dcm)."""
    try:
        with warnings.catch_warnings():  # pydicom's complaints about odd values: not ours to show
            warnings.simplefilter("ignore")
            ds = _dcmread(path, defer_size=4096)
    except InvalidDicomError:
        if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
            raise CrossmodError(f"{path}: not a DICOM file (no DICM header)") from None
        return None
    except Exception as exc:  # noqa: BLE001 (pydicom raises many types for broken files)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CrossmodError(f"{path}: corrupt DICOM file ({reason[:200]})") from None
    return ds


def _scan(folder: Path) -> _Scan:
    """Every DICOM file below ``folder``: image slices grouped by series, and RTSTRUCTs."""
    if not folder.exists():
        raise CrossmodError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CrossmodError(f"{folder}: not a folder (expected a folder of DICOM files)")
    series: dict[str, _Series] = {}
    rtstructs = []
    for path in _dicom_files(folder):
        ds = _read_header(path)
        if ds is None:
            continue
        modality = str(ds.get("Modality", "") or "").upper()
        sop_class = str(ds.get("SOPClassUID", "") or "")
        media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if modality == "RTSTRUCT" or RTStructureSetStorage in (sop_class, media_class):
            rtstructs.append(path)
            continue
        if media_class == "1.2.840.10008.1.3.10" or modality in NON_VOLUME_MODALITIES:
            continue  # DICOMDIR, plans, doses, ...
        image_like = (0x7FE00010 in ds._dict or "Rows" in ds
                      or any("Image Storage" in pydicom.uid.UID(c).name for c in (sop_class, media_class)))
        if not image_like:
            if not modality and not sop_class:
                raise CrossmodError(f"{path}: truncated or corrupt DICOM file (no Modality or SOP "
                                    "class in what could be read)")
            continue  # some other non-image object
        problem = _pixel_problem(path, ds)
        if problem:
            raise CrossmodError(f"{path}: {problem}")
        if not modality:
            raise CrossmodError(f"{path}: image without Modality (truncated or corrupt file?)")
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise CrossmodError(f"{path}: image without SeriesInstanceUID")
        series.setdefault(uid, _Series(uid)).slices.append(_Slice(path, ds))
    return _Scan(folder, series, rtstructs)


def _choose_series(scan: _Scan, series_uid=None, modality=None) -> _Series:
    folder = scan.folder
    if not scan.series:
        raise CrossmodError(f"{folder}: no DICOM image files found")
    listing = _series_summary(scan.series.values())
    candidates = list(scan.series.values())
    if series_uid is not None:
        candidates = [s for s in candidates if s.uid == str(series_uid)]
        if not candidates:
            raise CrossmodError(f"{folder}: no series with SeriesInstanceUID {series_uid}; "
                                f"series found: {listing}")
    if modality is not None:
        candidates = [s for s in candidates if str(modality).upper() in s.modalities]
        if not candidates:
            raise CrossmodError(f"{folder}: no {str(modality).upper()} series; series found: {listing}")
    if len(candidates) > 1:
        raise CrossmodError(f"{folder}: {_series_summary(candidates)}: choose one with series_uid= "
                            "or modality=, or, for a folder of patient folders, read each patient's "
                            "folder (crossmod data inspect FOLDER lists them)")
    return candidates[0]


def _series_summary(series, listed: int = 3) -> str:
    """'N image series found (…)': each described when there are at most ``listed``, otherwise
    counted per modality and patient, so an error line stays short however many series a
    folder holds (the UIDs of a whole cohort would run to thousands of characters)."""
    series = list(series)
    head = f"{len(series)} image series found"
    if len(series) <= listed:
        return f"{head}: " + "; ".join(s.describe() for s in series)
    modalities: dict[str, int] = {}
    patients = set()
    for one in series:
        key = "/".join(one.modalities) or "?"
        modalities[key] = modalities.get(key, 0) + 1
        patients.add(str(one.slices[0].ds.get("PatientID", "") or "?"))
    counts = ", ".join(f"{n} {m}" for m, n in sorted(modalities.items()))
    return f"{head} ({counts}; {len(patients)} PatientID{'s' if len(patients) != 1 else ''})"


# ----------------------------------------------------------------------------------------------
# Series geometry


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        values = np.array([])
    if values.size != n:
        raise CrossmodError(f"{path}: {keyword} missing or malformed ({value!r})")
    return values


@dataclass
class _Geometry:
    slices: list[_Slice]  # sorted along the normal
    origin: np.ndarray
    spacing: np.ndarray   # x (along rows), y (down columns), z (along the normal)
    direction: np.ndarray  # 3x3, columns = axes
    size: tuple[int, int, int]


def _check_series(series: _Series, folder: Path) -> _Geometry:
    slices = series.slices
    # mixed modalities: name a file of the rarer modality
    by_modality: dict[str, list[_Slice]] = {}
    for s in slices:
        by_modality.setdefault(str(s.ds.get("Modality", "") or "?"), []).append(s)
    if len(by_modality) > 1:
        counts = ", ".join(f"{m}: {len(v)}" for m, v in sorted(by_modality.items()))
        odd_modality, odd = min(by_modality.items(), key=lambda kv: len(kv[1]))
        raise CrossmodError(f"{odd[0].path}: Modality {odd_modality} in series {series.uid}, "
                            f"which mixes modalities ({counts}); refusing it")
    first = slices[0]
    for s in slices:
        if "Rows" not in s.ds or "Columns" not in s.ds:
            raise CrossmodError(f"{s.path}: image without Rows/Columns (truncated or corrupt file?)")
        frames = int(s.ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise CrossmodError(f"{s.path}: multi-frame object ({frames} frames); only one slice "
                                "per file is supported")
    iop = _floats(first.ds, "ImageOrientationPatient", 6, first.path)
    pixel = _floats(first.ds, "PixelSpacing", 2, first.path)
    rows, cols = int(first.ds.Rows), int(first.ds.Columns)
    for s in slices[1:]:
        if (int(s.ds.Rows), int(s.ds.Columns)) != (rows, cols):
            raise CrossmodError(f"{s.path}: {int(s.ds.Columns)}x{int(s.ds.Rows)} pixels where "
                                f"{first.path.name} has {cols}x{rows} (same series {series.uid})")
        if np.abs(_floats(s.ds, "ImageOrientationPatient", 6, s.path) - iop).max() > GEOMETRY_TOLERANCE:
            raise CrossmodError(f"{s.path}: ImageOrientationPatient differs from {first.path.name}'s "
                                f"(same series {series.uid})")
        if np.abs(_floats(s.ds, "PixelSpacing", 2, s.path) - pixel).max() > GEOMETRY_TOLERANCE:
            raise CrossmodError(f"{s.path}: PixelSpacing differs from {first.path.name}'s "
                                f"(same series {series.uid})")
    row_dir, col_dir = iop[:3], iop[3:]
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_floats(s.ds, "ImagePositionPatient", 3, s.path) for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    n = len(slices)
    if n > 1:
        steps = np.diff(along)
        same = np.nonzero(steps < GEOMETRY_TOLERANCE)[0]
        if same.size:
            i = same[0]
            raise CrossmodError(f"{slices[i + 1].path}: at the same position ({along[i]:.3f} mm along "
                                f"the slice normal) as {slices[i].path.name} in series {series.uid} "
                                "(several acquisitions or echoes in one series?)")
        offsets = positions - positions[0] - np.outer(along - along[0], normal)
        shifted = np.linalg.norm(offsets, axis=1)
        if shifted.max() > 0.1 * float(pixel.min()):  # header rounding is far below this
            i = int(np.argmax(shifted))
            raise CrossmodError(f"{slices[i].path}: shifted {shifted[i]:.3f} mm in-plane from the "
                                f"first slice (gantry tilt or sheared series {series.uid}); refusing it")
        step = float(np.median(steps))
        bad = np.nonzero(np.abs(steps - step) > SPACING_TOLERANCE * step)[0]
        if bad.size:
            i = int(bad[0])
            gap = steps[i]
            what = (f"missing slice(s): a {gap:.3g} mm gap where the slice step is {step:.3g} mm"
                    if gap > 1.5 * step else
                    f"non-uniform slice spacing ({steps.min():.3g} to {steps.max():.3g} mm)")
            raise CrossmodError(f"{folder}: series {series.uid}: {what}, between "
                                f"{slices[i].path.name} and {slices[i + 1].path.name}; refusing it")
        dz = float((along[-1] - along[0]) / (n - 1))
    else:
        dz = float(first.ds.get("SpacingBetweenSlices") or first.ds.get("SliceThickness") or 1.0)
    spacing = np.array([pixel[1], pixel[0], dz])  # PixelSpacing is (row spacing, column spacing)
    direction = np.column_stack([row_dir, col_dir, normal])
    return _Geometry(slices, positions[0], spacing, direction, (cols, rows, n))


def _is_axial(direction: np.ndarray) -> bool:
    return bool(np.allclose(np.abs(direction[:, 2]), [0.0, 0.0, 1.0], atol=AXIAL_TOLERANCE))


def _meta_value(value) -> str:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _read_pixels(files: list[Path], folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # spacing warnings: checked here already
    try:
        return reader.Execute()
    except RuntimeError as exc:
        reason = _one_line(exc)
        named = next((f for f in files if str(f) in str(exc)), None)
        raise CrossmodError(f"{named or folder}: cannot read pixel data ({reason})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _series_image(scan: _Scan, series: _Series, oblique: str) -> sitk.Image:
    if oblique not in ("refuse", "keep", "resample"):
        raise CrossmodError(f"oblique={oblique!r}: expected 'refuse', 'keep' or 'resample'")
    geometry = _check_series(series, scan.folder)
    axial = _is_axial(geometry.direction)
    if not axial and oblique == "refuse":
        raise CrossmodError(f"{scan.folder}: series {series.uid} is not axial (slice normal "
                            f"{_fmt(geometry.direction[:, 2])}); pass oblique='resample' to resample "
                            "it to axial or oblique='keep' to keep its grid")
    image = _read_pixels([s.path for s in geometry.slices], scan.folder)
    if tuple(image.GetSize()) != geometry.size:
        raise CrossmodError(f"{scan.folder}: series {series.uid}: pixel data give size "
                            f"{tuple(image.GetSize())}, the headers {geometry.size}")
    if image.GetPixelID() in (sitk.sitkInt32, sitk.sitkInt64):  # GDCM widens rescaled int16 data
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        if -32768 <= stats.GetMinimum() and stats.GetMaximum() <= 32767:
            image = sitk.Cast(image, sitk.sitkInt16)
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetDirection(tuple(float(v) for v in geometry.direction.ravel()))
    first = geometry.slices[0].ds
    for keyword in METADATA_KEYWORDS:
        value = first.get(keyword)
        if value is not None and str(value) != "":
            image.SetMetaData(keyword, _meta_value(value))
    image.SetMetaData(SOP_UIDS_KEY, "\\".join(str(s.ds.SOPInstanceUID) for s in geometry.slices))
    if not axial and oblique == "resample":
        image = _resample_axial(image)
    return image


def read_dicom_series(folder, series_uid: str | None = None, modality: str | None = None, *,
                      oblique: str = "refuse") -> sitk.Image:
    """Read one DICOM image series from ``folder`` (searched recursively) as a 3D image.

    Several image series in the folder: the one with ``series_uid`` and/or ``modality`` (e.g.
    "CT", "MR") is read; without a choice, or several still matching, a one-line error lists the
    series found with their modality, description and slice count. Non-image objects (RTSTRUCT,
    RTPLAN, RTDOSE, ...) and non-DICOM files (other than ``*.dcm``) are ignored.

    The image has the slices' geometry (origin = first slice along the normal, direction columns
    = row, column and normal cosines) and their header values as metadata (see the module
    docstring for what is kept, what is refused and how ``oblique`` works).
    """
    folder = Path(folder)
    scan = _scan(folder)
    series = _choose_series(scan, series_uid, modality)
    return _series_image(scan, series, oblique)


def slice_uids(image: sitk.Image) -> list[str]:
    """The SOP Instance UIDs of the image's slices, in slice order (empty if not from DICOM)."""
    if not image.HasMetaDataKey(SOP_UIDS_KEY):
        return []
    text = image.GetMetaData(SOP_UIDS_KEY)
    return text.split("\\") if text else []


def _resample_axial(image: sitk.Image, mask: bool = False) -> sitk.Image:
    """``image`` on an axial grid (identity direction) covering it, its spacings on the nearest axes.

    Images are interpolated linearly (outside: the image's minimum), keeping their pixel type;
    masks (``mask=True``) are interpolated linearly as 0/1 and thresholded at 0.5.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    # each patient axis gets the spacing of the image axis most aligned with it
    new_spacing = np.array([spacing[int(np.argmax(np.abs(direction[axis, :])))] for axis in range(3)])
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1)
                        for k in (0, size[2] - 1)], dtype=float)
    points = np.array(image.GetOrigin()) + (corners * spacing) @ direction.T
    lo, hi = points.min(axis=0), points.max(axis=0)
    new_size = [int(v) for v in np.floor((hi - lo) / new_spacing + 1e-6).astype(int) + 1]
    if mask:
        source, default, pixel = sitk.Cast(image > 0, sitk.sitkFloat32), 0.0, sitk.sitkFloat32
    else:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        source, default, pixel = image, stats.GetMinimum(), image.GetPixelID()
    out = sitk.Resample(source, new_size, sitk.Transform(), sitk.sitkLinear,
                        [float(v) for v in lo], [float(v) for v in new_spacing],
                        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], float(default), pixel)
    if mask:
        return sitk.Cast(out > 0.5, sitk.sitkUInt8)
    for key in image.GetMetaDataKeys():
        if key != SOP_UIDS_KEY:
            out.SetMetaData(key, image.GetMetaData(key))
    out.SetMetaData("ResampledToAxial", "1")
    return out


# ----------------------------------------------------------------------------------------------
# Polygons <-> masks (one 2D slice at a time; coordinates are (column, row) voxel indices)

# Corner bits of a marching-squares cell: top-left, top-right, bottom-right, bottom-left.
_CORNERS = {1: (0.0, 0.0), 2: (1.0, 0.0), 4: (1.0, 1.0), 8: (0.0, 1.0)}  # (dx, dy)
_EDGES = {  # edge name -> (midpoint (dx, dy), the two corner bits it joins)
    "top": ((0.5, 0.0), (1, 2)), "right": ((1.0, 0.5), (2, 4)),
    "bottom": ((0.5, 1.0), (4, 8)), "left": ((0.0, 0.5), (8, 1)),
}


def _segment_table() -> dict[int, list[tuple[tuple[float, float], tuple[float, float]]]]:
    """Per cell case (0-15): oriented segments (start, end) as midpoint offsets (dx, dy).

    Each segment is oriented with the inside on its left in (x right, y down) coordinates, so
    every boundary vertex has exactly one outgoing and one incoming segment. The saddle cases (5,
    10) cut off the two inside corners separately: diagonal-only contacts stay apart.
    """
    table = {}
    for case in range(16):
        inside = {bit for bit in _CORNERS if case & bit}
        crossed = [name for name, (_, (a, b)) in _EDGES.items() if (a in inside) != (b in inside)]
        if not crossed:
            table[case] = []
            continue
        if len(crossed) == 2:
            pairs = [tuple(crossed)]
        else:  # saddle: pair the edges around each inside corner
            pairs = [tuple(name for name, (_, bits) in _EDGES.items() if bit in bits)
                     for bit in sorted(inside)]
        segments = []
        for a_name, b_name in pairs:
            a, b = np.array(_EDGES[a_name][0]), np.array(_EDGES[b_name][0])
            # the side with fewer corners is all inside or all outside
            sides = {bit: (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
                     for bit, c in _CORNERS.items()}
            pos = [bit for bit, s in sides.items() if s > 0]
            neg = [bit for bit, s in sides.items() if s < 0]
            small, sign = (pos, 1) if len(pos) <= len(neg) else (neg, -1)
            inside_sign = sign if small[0] in inside else -sign
            if inside_sign < 0:
                a, b = b, a
            segments.append((tuple(float(v) for v in a), tuple(float(v) for v in b)))
        table[case] = segments
    return table


_SEGMENTS = _segment_table()


def mask_to_polygons(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed polygons around a 2D mask ``[row, column]``, as (N, 2) arrays of (column, row).

    Marching squares on voxel centres: each vertex is the midpoint between an inside and an
    outside voxel centre, so rasterising the polygons at voxel centres with the even-odd rule
    (:func:`polygons_to_mask`) gives back the mask exactly. Outer boundaries and holes are
    separate polygons (opposite orientation); collinear vertices are dropped; the first vertex is
    not repeated at the end.
    """
    m = np.asarray(mask2d) > 0
    if not m.any():
        return []
    ny, nx = m.shape
    padded = np.zeros((ny + 2, nx + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = m
    codes = (padded[:-1, :-1] * 1 + padded[:-1, 1:] * 2 + padded[1:, 1:] * 4
             + padded[1:, :-1] * 8)
    width = 2 * (nx + 2) + 1  # vertex keys: doubled coordinates (exact integers)
    starts, ends = [], []
    for case in range(1, 15):
        rows, cols = np.nonzero(codes == case)
        if rows.size == 0:
            continue
        for (ax, ay), (bx, by) in _SEGMENTS[case]:
            starts.append((2 * rows + int(2 * ay)) * width + 2 * cols + int(2 * ax))
            ends.append((2 * rows + int(2 * by)) * width + 2 * cols + int(2 * bx))
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    following = np.searchsorted(starts, ends)  # index of the segment that starts where one ends
    visited = np.zeros(starts.size, dtype=bool)
    polygons = []
    for first in range(starts.size):
        if visited[first]:
            continue
        loop = []
        i = first
        while not visited[i]:
            visited[i] = True
            loop.append(starts[i])
            i = following[i]
        keys = np.array(loop)
        pts = np.column_stack([keys % width, keys // width]).astype(np.int64)  # doubled (x, y)
        before = pts - np.roll(pts, 1, axis=0)
        after = np.roll(pts, -1, axis=0) - pts
        turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        pts = pts[turn != 0]
        polygons.append(pts / 2.0 - 1.0)  # undo doubling and padding
    return polygons


def _edge_voxels(p: np.ndarray, shape: tuple[int, int], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the voxel centres lying on the closed polygon ``p``'s edges (within eps)."""
    ny, nx = shape
    x0, y0 = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows, cols = [], []
    # edges that are not horizontal: each row they cross, is the crossing at a voxel centre?
    slanted = np.abs(y1 - y0) > eps
    lo = np.clip(np.ceil(np.minimum(y0, y1) - eps), 0, ny)
    hi = np.clip(np.floor(np.maximum(y0, y1) + eps) + 1, 0, ny)
    counts = np.where(slanted, np.maximum(hi - lo, 0), 0).astype(np.int64)
    if counts.sum():
        edge = np.repeat(np.arange(len(p)), counts)
        row = lo[edge].astype(np.int64) + (np.arange(counts.sum())
                                            - np.repeat(np.cumsum(counts) - counts, counts))
        x = x0[edge] + (row - y0[edge]) / (y1[edge] - y0[edge]) * (x1[edge] - x0[edge])
        hit = np.abs(x - np.rint(x)) <= eps
        rows.append(row[hit])
        cols.append(np.rint(x[hit]).astype(np.int64))
    # horizontal edges on a row of centres: every centre between their ends
    flat = ~slanted & (np.abs(y0 - np.rint(y0)) <= eps)
    for i in np.nonzero(flat)[0]:
        a, b = sorted((x0[i], x1[i]))
        xs = np.arange(int(np.ceil(a - eps)), int(np.floor(b + eps)) + 1)
        rows.append(np.full(xs.size, int(np.rint(y0[i]))))
        cols.append(xs)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    return rows[keep], cols[keep]


def polygons_to_mask(polygons: Sequence[np.ndarray], shape: tuple[int, int],
                     boundary_eps: float | None = 0.01) -> np.ndarray:
    """Rasterise closed polygons ((N, 2) arrays of (column, row)) at voxel centres, even-odd rule.

    A voxel is inside when a ray from its centre crosses the polygons' edges an odd number of
    times, counting all polygons together: overlapping polygons cancel (holes, XOR). A voxel
    whose centre lies on an edge (within ``boundary_eps`` voxels; None: no such rule) is inside:
    contours drawn through the boundary voxels' centres (as OpenCV-based tools write them, for
    outlines and holes alike) then give back their mask. Polygons from :func:`mask_to_polygons`
    never pass through a voxel centre.
    """
    ny, nx = shape
    parity = np.zeros((ny, nx + 1), dtype=np.int64)
    on_edge = []
    for poly in polygons:
        p = np.asarray(poly, dtype=float)
        if p.ndim != 2 or len(p) < 3:
            continue
        if boundary_eps is not None:
            on_edge.append(_edge_voxels(p, shape, boundary_eps))
        x0, y0 = p[:, 0], p[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # rows j with lo <= j < hi (half-open: a vertex on a row counts once)
        first = np.clip(np.ceil(lo), 0, ny).astype(np.int64)
        last = np.clip(np.ceil(hi), 0, ny).astype(np.int64)
        counts = np.maximum(last - first, 0)
        if counts.sum() == 0:
            continue
        edge = np.repeat(np.arange(len(p)), counts)
        row = first[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        t = (row - y0[edge]) / (y1[edge] - y0[edge])
        x = x0[edge] + t * (x1[edge] - x0[edge])
        column = np.clip(np.ceil(x), 0, nx).astype(np.int64)  # voxels i >= x are right of it
        np.add.at(parity, (row, column), 1)
    mask = (np.cumsum(parity, axis=1)[:, :nx] % 2).astype(bool)
    for rows, cols in on_edge:
        mask[rows, cols] = True
    return mask


# ----------------------------------------------------------------------------------------------
# RTSTRUCT reading


def _truncation(path: Path, ds: Dataset, caught) -> str | None:
    """Why a freshly read dataset is cut short, or None (pydicom reads truncated files silently).

    A top-level element whose declared length runs past the end of the file, or pydicom's warning
    that the file ended inside an undefined-length sequence, means the file was truncated.
    """
    size = path.stat().st_size
    for tag, elem in ds._dict.items():
        length, tell = getattr(elem, "length", None), getattr(elem, "value_tell", None)
        if length is None or tell is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            return (f"truncated: element {pydicom.tag.Tag(tag)} ends at byte {tell + length}, "
                    f"the file has {size}")
    if any("end of file" in str(w.message).lower() for w in caught):
        # a sequence runs past the end: the file was cut short, or its bytes are garbled
        return "truncated or corrupt: a sequence runs past the end of the file"
    return None


def _read_rtstruct_dataset(path: Path) -> Dataset:
    if not path.exists():
        raise CrossmodError(f"{path}: no such file")
    if path.is_dir():
        raise CrossmodError(f"{path}: is a folder, expected an RTSTRUCT file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = _dcmread(path)
            # first the declared lengths of the raw top-level elements (parsing converts them)
            problem = _truncation(path, ds, caught)
            # pydicom parses nested sequence items lazily: walk every element now, inside this
            # block, so a garbled sequence is reported here (its warnings caught, not printed)
            if not problem:
                for _ in ds.iterall():
                    pass
                problem = _truncation(path, ds, caught)
        if problem:
            raise CrossmodError(f"{path}: {problem}")
        garbled = [str(w.message) for w in caught if "delimiter" in str(w.message).lower()
                   or "sequence" in str(w.message).lower()]
        if garbled:
            raise CrossmodError(f"{path}: corrupt RTSTRUCT (a sequence cannot be parsed: "
                                f"{' '.join(garbled[0].split())[:120]})")
    except CrossmodError:
        raise
    except InvalidDicomError:
        raise CrossmodError(f"{path}: not a DICOM file (no DICM header)") from None
    except Exception as exc:  # noqa: BLE001 (pydicom raises many types for broken files)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CrossmodError(f"{path}: corrupt DICOM file ({reason[:200]})") from None
    modality = str(ds.get("Modality", "") or "")
    media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if modality != "RTSTRUCT" and RTStructureSetStorage not in (str(ds.get("SOPClassUID", "")),
                                                                 media_class):
        raise CrossmodError(f"{path}: not an RTSTRUCT (Modality {modality or 'missing'})")
    for keyword in ("StructureSetROISequence", "ROIContourSequence"):
        if keyword not in ds:
            raise CrossmodError(f"{path}: RTSTRUCT without {keyword} (truncated or incomplete file)")
    return ds


def _referenced_series(ds: Dataset) -> set[str]:
    uids = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in series:
                    uids.add(str(series.SeriesInstanceUID))
    return uids


def _referenced_frames(ds: Dataset) -> set[str]:
    uids = {str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])
            if "FrameOfReferenceUID" in f}
    uids |= {str(r.ReferencedFrameOfReferenceUID) for r in ds.get("StructureSetROISequence", [])
             if "ReferencedFrameOfReferenceUID" in r}
    return uids


def _check_references(ds: Dataset, path: Path, image: sitk.Image) -> None:
    series_uid = _image_meta(image, "SeriesInstanceUID")
    frame_uid = _image_meta(image, "FrameOfReferenceUID")
    referenced = _referenced_series(ds)
    if series_uid and referenced:
        if series_uid not in referenced:
            raise CrossmodError(f"{path}: references series {', '.join(sorted(referenced))}, not the "
                                f"image's series {series_uid}")
        return
    frames = _referenced_frames(ds)
    if frame_uid and frames and frame_uid not in frames:
        raise CrossmodError(f"{path}: references frame of reference {', '.join(sorted(frames))}, "
                            f"not the image's {frame_uid}")


def _rtstruct_masks(ds: Dataset, path: Path, image: sitk.Image, structures, aliases) -> dict:
    _check_references(ds, path, image)
    rois = {}
    for roi in ds.get("StructureSetROISequence", []):
        number = roi.get("ROINumber")
        if number is None:
            raise CrossmodError(f"{path}: corrupt RTSTRUCT (an ROI without ROINumber in "
                                "StructureSetROISequence)")
        rois[str(roi.get("ROIName", ""))] = int(number)
    contours_of = {int(item.ReferencedROINumber): item
                   for item in ds.get("ROIContourSequence", []) if "ReferencedROINumber" in item}
    size = image.GetSize()
    nx, ny, nz = size
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    inverse = np.linalg.inv(np.array(image.GetDirection()).reshape(3, 3))
    masks = {}
    for canonical in structures:
        name = match_structure(list(rois), canonical, aliases, source=path)
        label = f"structure {name!r}" + (f" ({canonical})" if name != canonical else "")
        item = contours_of.get(rois[name])
        by_slice: dict[int, list[np.ndarray]] = {}
        types = set()
        for contour in (item.get("ContourSequence", []) if item is not None else []):
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
            data = contour.get("ContourData")
            if data is None:
                continue
            points = np.array([float(v) for v in data], dtype=float)
            if points.size % 3:
                raise CrossmodError(f"{path}: {label}: ContourData with {points.size} values "
                                    "(not x, y, z triples)")
            types.add(kind)
            if kind != "CLOSED_PLANAR" or points.size < 9:
                continue
            index = ((points.reshape(-1, 3) - origin) @ inverse.T) / spacing
            k = index[:, 2]
            if k.max() - k.min() > 2 * PLANE_TOLERANCE:
                raise CrossmodError(f"{path}: {label} has a contour that is not in one of the "
                                    f"image's slice planes (it spans {k.max() - k.min():.2f} slices)")
            k_mid = float(k.mean())
            slice_index = round(k_mid)
            if abs(k_mid - slice_index) > PLANE_TOLERANCE:
                raise CrossmodError(f"{path}: {label} has a contour between the image's slices "
                                    f"({k_mid:.2f} in slice units); contours must lie on slices")
            if not 0 <= slice_index < nz:
                raise CrossmodError(f"{path}: {label} has a contour outside the image (slice "
                                    f"{k_mid:.1f} of 0..{nz - 1})")
            by_slice.setdefault(slice_index, []).append(index[:, :2])
        if not by_slice:
            extra = f" (only {', '.join(sorted(types))} contours)" if types else ""
            raise CrossmodError(f"{path}: {label} has no contour data (empty structure){extra}")
        array = np.zeros((nz, ny, nx), dtype=np.uint8)
        for k, polygons in by_slice.items():
            array[k] = polygons_to_mask(polygons, (ny, nx))
        if not array.any():
            raise CrossmodError(f"{path}: {label}: its contours enclose no voxel centre of the image")
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(image)
        mask.SetMetaData(ROI_NAME_KEY, name)  # which alias matched (crossmod data inspect shows it)
        masks[canonical] = mask
    return masks


def read_rtstruct(rtstruct_path, image: sitk.Image, structures: Sequence[str] = PAROTIDS,
                  aliases: Mapping[str, Iterable[str]] | None = None) -> dict[str, sitk.Image]:
    """Rasterise the named structures of an RTSTRUCT onto ``image``'s grid.

    Returns ``{canonical name: uint8 mask}`` for each name in ``structures`` (matched to the
    file's ROI names through :func:`match_structure` with ``aliases``). When ``image`` carries
    the DICOM metadata :func:`read_dicom_series` sets, the RTSTRUCT must reference its series (or,
    naming no series, its frame of reference). Errors (one line, naming the file): not an
    RTSTRUCT, another series referenced, a structure missing/ambiguous, a structure without
    closed planar contours (empty), a contour off the image's slices.
    """
    path = Path(rtstruct_path)
    ds = _read_rtstruct_dataset(path)
    return _rtstruct_masks(ds, path, image, structures, aliases)


def read_dicom_case(folder, structures: Sequence[str] = PAROTIDS,
                    aliases: Mapping[str, Iterable[str]] | None = None, *,
                    series_uid: str | None = None, modality: str | None = None,
                    rtstruct=None, oblique: str = "refuse", contours: str = "required") -> Case:
    """One patient folder holding an image series and an RTSTRUCT (searched recursively) -> Case.

    The series is chosen as in :func:`read_dicom_series`; when the folder holds several and no
    choice is given, the one the (single) RTSTRUCT references is taken. The RTSTRUCT is the one
    referencing that series (or ``rtstruct``, a path); none, or several, is an error. The case's
    ``patient_id`` is the folder name (the header's PatientID is in the image metadata).
    With ``oblique="resample"`` the masks are rasterised on the native grid, then resampled with
    the image. ``contours="optional"``: a folder without any RTSTRUCT is an unannotated patient
    (a Case without structures: a user's MR usually has no contours); a broken or unmatched
    RTSTRUCT is still an error, never read as "no contours".
    """
    if contours not in ("required", "optional"):
        raise CrossmodError(f"contours={contours!r}: required or optional")
    folder = Path(folder)
    scan = _scan(folder)
    if rtstruct is not None:
        rt_path = Path(rtstruct)
        candidates = [(rt_path, _read_rtstruct_dataset(rt_path))]
    elif scan.rtstructs:
        candidates = [(p, _read_rtstruct_dataset(p)) for p in scan.rtstructs]
    elif contours == "optional":
        candidates = []  # an unannotated patient: the series alone
    else:
        raise NoContoursError(f"{folder}: no RTSTRUCT file found")
    if series_uid is None and modality is None and len(scan.series) > 1 and len(candidates) == 1:
        referenced = _referenced_series(candidates[0][1]) & set(scan.series)
        if len(referenced) == 1:
            series_uid = referenced.pop()
    series = _choose_series(scan, series_uid, modality)
    if len(candidates) > 1:
        matching = [(p, ds) for p, ds in candidates if series.uid in _referenced_series(ds)]
        if len(matching) != 1:
            raise CrossmodError(f"{folder}: {len(matching) or 'no'} RTSTRUCT files reference series "
                                f"{series.uid} among {', '.join(p.name for p, _ in candidates)}; "
                                "pass rtstruct= to choose one")
        candidates = matching
    native = _series_image(scan, series, "keep" if oblique == "resample" else oblique)
    masks = _rtstruct_masks(candidates[0][1], candidates[0][0], native, structures, aliases) \
        if candidates else {}
    image = native
    if oblique == "resample" and not _is_axial(np.array(native.GetDirection()).reshape(3, 3)):
        image = _resample_axial(native)
        masks = {name: _resample_axial(mask, mask=True) for name, mask in masks.items()}
    return Case(patient_id=folder.name, image=image, structures=masks, source=folder)


# ----------------------------------------------------------------------------------------------
# RTSTRUCT writing

_PALETTE = ((255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 255), (0, 220, 200))


def _save_atomically(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_rtstruct(masks: Mapping[str, sitk.Image], image: sitk.Image, path, *,
                   label_colours: Mapping[str, Sequence[int]] | None = None,
                   structure_set_label: str = "crossmod",
                   roi_generation: str = "AUTOMATIC") -> Path:
    """Write ``masks`` (name -> mask on ``image``'s grid) as a DICOM RTSTRUCT at ``path``.

    ``image`` must come from :func:`read_dicom_series` (it carries the slices' SOP Instance
    UIDs, the series, study and frame-of-reference UIDs). One ROI per mask, in the given order,
    named by its key; each slice's mask boundary becomes CLOSED_PLANAR contours (see
    :func:`mask_to_polygons`) in patient coordinates, each referencing its slice. An empty mask
    gives an ROI without contours. ``label_colours`` maps names to RGB display colours. The file
    is written atomically (temporary file, then rename) and ``path`` returned.
    """
    path = Path(path)
    uids = slice_uids(image)
    needed = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPClassUID")
    missing = [k for k in needed if not _image_meta(image, k)]
    if not uids or missing:
        raise CrossmodError(f"{path}: the reference image carries no DICOM slice UIDs"
                            f"{' (' + ', '.join(missing) + ')' if missing else ''}; read it with "
                            "read_dicom_series (a resampled image cannot be referenced)")
    nz = image.GetSize()[2]
    if len(uids) != nz:
        raise CrossmodError(f"{path}: the image has {nz} slices but {len(uids)} slice UIDs")
    if not masks:
        raise CrossmodError(f"{path}: no masks to write")
    arrays = {}
    for name, mask in masks.items():
        differences = grid_differences(mask, image)
        if differences:
            raise CrossmodError(f"{path}: mask {name!r} is not on the image grid: "
                                + "; ".join(differences))
        arrays[name] = sitk.GetArrayViewFromImage(mask) > 0
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    image_class = _image_meta(image, "SOPClassUID")
    frame_uid = _image_meta(image, "FrameOfReferenceUID")
    date, time = _now()

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    # patient and study: those of the image, so the structure set joins its study
    ds.PatientName = _image_meta(image, "PatientName")
    ds.PatientID = _image_meta(image, "PatientID")
    ds.PatientBirthDate = _image_meta(image, "PatientBirthDate")
    ds.PatientSex = _image_meta(image, "PatientSex")
    ds.StudyInstanceUID = _image_meta(image, "StudyInstanceUID")
    ds.StudyDate = _image_meta(image, "StudyDate")
    ds.StudyTime = _image_meta(image, "StudyTime")
    ds.ReferringPhysicianName = _image_meta(image, "ReferringPhysicianName")
    ds.StudyID = _image_meta(image, "StudyID")
    ds.AccessionNumber = _image_meta(image, "AccessionNumber")
    # RT series, equipment, structure set
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 999
    ds.SeriesDescription = structure_set_label
    ds.OperatorsName = ""
    ds.Manufacturer = "crossmod"
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetDate, ds.StructureSetTime = date, time
    # Frame of Reference module (the RT Structure Set IOD has it since DICOM 2020; dciodvfy
    # requires it): the image's frame, no position reference indicator (type 2, empty)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""

    contour_images = []
    for uid in uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = image_class
        ref.ReferencedSOPInstanceUID = uid
        contour_images.append(ref)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = _image_meta(image, "SeriesInstanceUID")
    series_ref.ContourImageSequence = DicomSequence(contour_images)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    roi_items, contour_items, observations = [], [], []
    for number, (name, array) in enumerate(arrays.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = str(name)
        roi.ROIGenerationAlgorithm = roi_generation
        roi_items.append(roi)

        colour = (label_colours or {}).get(name, _PALETTE[(number - 1) % len(_PALETTE)])
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = [int(c) for c in colour]
        roi_contour.ReferencedROINumber = number
        contours = []
        rows = np.nonzero(array.any(axis=(0, 2)))[0]
        cols = np.nonzero(array.any(axis=(0, 1)))[0]
        for k in np.nonzero(array.reshape(nz, -1).any(axis=1))[0]:
            box = array[k, rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]  # faster on the box
            for poly in mask_to_polygons(box):
                poly = poly + [cols[0], rows[0]]
                index = np.column_stack([poly, np.full(len(poly), float(k))])
                points = origin + (index * spacing) @ direction.T
                contour = Dataset()
                ref = Dataset()
                ref.ReferencedSOPClassUID = image_class
                ref.ReferencedSOPInstanceUID = uids[k]
                contour.ContourImageSequence = DicomSequence([ref])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourNumber = len(contours) + 1
                contour.ContourData = [_ds(v) for v in points.ravel()]
                contours.append(contour)
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    _save_atomically(ds, path)
    return path


# ----------------------------------------------------------------------------------------------
# DICOM SEG writing (highdicom)


def series_datasets(image: sitk.Image, folder) -> list[Dataset]:
    """The headers (no pixel data) of the DICOM files below ``folder`` that make up ``image``
    (read by :func:`read_dicom_series`), in the image's slice order."""
    uids = slice_uids(image)
    if not uids:
        raise CrossmodError(f"{folder}: the image carries no DICOM slice UIDs (not read from DICOM)")
    found: dict[str, Dataset] = {}
    wanted = set(uids)
    for path in _dicom_files(Path(folder)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 (other files in the folder: not ours to judge here)
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in wanted:
            found[uid] = ds
    missing = [u for u in uids if u not in found]
    if missing:
        raise CrossmodError(f"{folder}: {len(missing)} of the series' {len(uids)} slice files are "
                            "no longer there (moved or deleted since it was read)")
    return [found[u] for u in uids]


#: SNOMED CT codes of a parotid segment (pydicom's code dictionary) and its laterality.
def _parotid_codes(name: str):
    from pydicom.sr.codedict import codes

    side = {"Parotid_L": codes.SCT.Left, "Parotid_R": codes.SCT.Right}.get(name)
    return codes.SCT.AnatomicalStructure, codes.SCT.ParotidGland, side


def write_seg(masks: Mapping[str, sitk.Image], image: sitk.Image, source_folder, path, *,
              series_description: str = "crossmod parotids") -> Path:
    """Write ``masks`` (name -> mask on ``image``'s grid, ``image`` read by
    :func:`read_dicom_series` from ``source_folder``) as a DICOM Segmentation (SEG) object with
    highdicom: one binary segment per mask (parotids coded as SNOMED CT "Parotid gland" with
    their laterality as the property-type modifier), referencing the source series' slices. The
    file is written atomically and ``path`` returned."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    path = Path(path)
    sources = series_datasets(image, source_folder)
    names = list(masks)
    labelmap = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    for number, name in enumerate(names, start=1):
        problems = grid_differences(image, masks[name])
        if problems:
            raise CrossmodError(f"{path}: mask {name!r} is not on the image grid: " + "; ".join(problems))
        labelmap[sitk.GetArrayViewFromImage(masks[name]) > 0] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name="crossmod U-Net", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    modifiers = []
    for number, name in enumerate(names, start=1):
        category, kind, side = _parotid_codes(name)
        if not name.startswith("Parotid"):
            kind, side = codes.SCT.Organ, None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
        modifiers.append(side)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=labelmap,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="crossmod",
            manufacturer_model_name="crossmod", software_versions=__version__,
            device_serial_number="0", series_description=series_description,
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CrossmodError(f"{path}: cannot build a DICOM SEG for this series ({reason})") from None
    for item, side in zip(seg.SegmentSequence, modifiers):
        if side is not None:
            item.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(side)]
    _save_atomically(seg, path)
    return path


# ----------------------------------------------------------------------------------------------
# Synthetic series for tests and demos


def write_case_dicom(case, folder, *, series_description: str = "T2w (simulated)") -> Path:
    """Write an MR case (image + structure masks) as a DICOM MR series and an RTSTRUCT.

    ``folder`` receives ``MR_<k>.dcm`` (one per slice, unsigned 16-bit, the case's geometry and its
    EchoTime / RepetitionTime / MagneticFieldStrength metadata where present) and ``RS.dcm`` with
    one ROI per mask of ``case.structures``, written from the series as read back (so its
    references are the files'). The folder is built aside and renamed into place when complete.
    Used to run the simulated MR cohort through the same DICOM reader as a user's MR.
    """
    from .io import staged_folder

    image = case.image
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3:
        raise CrossmodError(f"{folder}: {case.patient_id}: the MR must be a 3D volume")
    tags = {"SeriesDescription": series_description,
            "Manufacturer": _image_meta(image, "Manufacturer", "crossmod")}
    for key in ("EchoTime", "RepetitionTime", "MagneticFieldStrength", "FlipAngle"):
        if _image_meta(image, key):
            tags[key] = _image_meta(image, key)
    with staged_folder(folder) as tmp:
        write_dicom_series(tmp, np.clip(np.rint(array), 0, 65535), image.GetSpacing(), image.GetOrigin(),
                          modality="MR", patient_id=case.patient_id, direction=image.GetDirection(),
                          file_prefix="MR", **tags)
        series = read_dicom_series(tmp)
        masks = {}
        for name, mask in case.structures.items():
            masks[name] = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), series,
                                        sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        write_rtstruct(masks, series, tmp / PredictionFiles.RTSTRUCT_IN_SERIES)
    return Path(folder)


def write_dicom_series(folder, array: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                       modality: str = "CT", patient_id: str = "CROSSMOD_TEST",
                       series_uid: str | None = None, *, direction: Sequence[float] | None = None,
                       file_prefix: str | None = None, **tags) -> list[Path]:
    """Write ``array`` ``[z, y, x]`` as a DICOM series of ``modality`` "CT" or "MR", one file a slice.

    ``spacing`` and ``origin`` are (x, y, z) in mm, ``direction`` a 3x3 matrix (row-major, as
    SimpleITK's; default identity) whose columns are the row, column and slice directions. CT
    values are Hounsfield units, stored as signed 16-bit with RescaleIntercept -1024 and
    RescaleSlope 1; MR values are stored as unsigned 16-bit (rounded, clipped to 0..65535). MR
    slices carry EchoTime, RepetitionTime, FlipAngle, MagneticFieldStrength and the sequence;
    CT slices KVP. UIDs not given are derived deterministically from the arguments (the same call
    writes the same UIDs). ``tags`` (DICOM keywords) override or add header values of every slice
    (e.g. ``SeriesDescription="T2 AX"``, ``StudyInstanceUID=...``); a value of None removes one.
    Files are ``<prefix>_<k>.dcm`` in ``folder``; returns their paths in slice order.
    """
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', not {modality!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(array)
    if volume.ndim == 2:
        volume = volume[None]
    nz, rows, cols = volume.shape
    spacing = [float(v) for v in spacing]
    origin = np.array([float(v) for v in origin])
    matrix = np.eye(3) if direction is None else np.array(direction, dtype=float).reshape(3, 3)
    seed = [patient_id, modality, str(volume.shape), str(spacing), str(origin.tolist()),
            str(matrix.ravel().tolist()), repr(sorted((k, str(v)) for k, v in tags.items()))]
    series_uid = series_uid or generate_uid(entropy_srcs=seed + ["series"])
    study_uid = generate_uid(entropy_srcs=[patient_id, modality, "study"])
    frame_uid = generate_uid(entropy_srcs=[patient_id, modality, "frame"])
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    prefix = file_prefix or modality
    date = "20200101"
    paths = []
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "crossmod synthetic"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = f"synthetic {modality}"
        ds.PatientName = f"Test^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.SliceThickness = _ds(spacing[2])
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1 if modality == "CT" else 2
        ds.InstanceNumber = k + 1
        position = origin + matrix @ np.array([0.0, 0.0, k * spacing[2]])
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([matrix[:, 0], matrix[:, 1]])]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(position[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        plane = np.asarray(volume[k], dtype=float)
        if modality == "CT":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.KVP = "120"
            ds.WindowCenter, ds.WindowWidth = "40", "350"
            stored = np.clip(np.rint(plane + 1024), -32768, 32767).astype("<i2")
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "SK"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.SequenceName = "*tse2d1_15"
            ds.EchoTime = "100"
            ds.RepetitionTime = "3500"
            ds.FlipAngle = "90"
            ds.MagneticFieldStrength = "3"
            ds.EchoTrainLength = "15"
            ds.ImagingFrequency = "123.2"
            stored = np.clip(np.rint(plane), 0, 65535).astype("<u2")
        ds.PixelData = stored.tobytes()
        for keyword, value in tags.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        path = folder / f"{prefix}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

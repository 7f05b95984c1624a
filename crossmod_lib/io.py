"""Reading and writing images and structure masks (SimpleITK underneath).

The in-memory form of a case is a :class:`Case`: one image with its geometry (spacing, origin,
direction) and named binary masks on the same grid. This module reads the folder layout the
embedded phantom writes, which is that of the MICCAI 2015 head-and-neck challenge (PDDCA)::

    <case>/img.nrrd
    <case>/structures/Parotid_L.nrrd, Parotid_R.nrrd
    <case>/structures_observer2/...      (optional second observer)

Every read error is a one-line :class:`~crossmod_lib.errors.CrossmodError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import CrossmodError

PAROTIDS = ("Parotid_L", "Parotid_R")
IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")
GRID_TOLERANCE = 1e-4  # mm (spacing, origin) and direction cosines: equal grids within this


@dataclass
class Case:
    """One patient's image and its named masks (uint8, on the image grid)."""

    patient_id: str
    image: sitk.Image
    structures: dict[str, sitk.Image] = field(default_factory=dict)
    source: Path | None = None

    def label_array(self, names=PAROTIDS) -> np.ndarray:
        """A label map [z, y, x]: 0 background, i + 1 for ``names[i]`` (absent structure: no voxels)."""
        labels = np.zeros(sitk.GetArrayViewFromImage(self.image).shape, dtype=np.uint8)
        for value, name in enumerate(names, start=1):
            if name in self.structures:
                labels[sitk.GetArrayViewFromImage(self.structures[name]) > 0] = value
        return labels


def _one_line(exc: BaseException) -> str:
    """The informative part of a multi-line SimpleITK/ITK exception message, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    main = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else type(exc).__name__)
    main = re.sub(r"^.*?(ITK ERROR|sitk::ERROR|itk::ERROR):\s*", "", main)
    main = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", main)  # "NrrdImageIO(0x55...): "
    parts = [main.rstrip(":")]
    # Teem (NRRD) puts the actual cause on the last line of its error stack.
    if lines and lines[-1].startswith("[") and lines[-1] != main:
        parts.append(re.sub(r"^\[\w+\]\s*\w+:\s*", "", lines[-1]))
    text = " ".join(": ".join(parts).split())
    return text if len(text) <= 240 else text[:237] + "..."


_NIFTI1_MAGICS = (b"n+1\0",)
_NIFTI2_MAGIC = b"n+2\0\r\n\x1a\n"


def _nifti_expected_size(head: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/-2 file must hold (header, extensions, voxel data), from its header.

    None when ``head`` is not the header of a single-file (``.nii``) NIfTI image.
    """
    if len(head) < 348:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348 and head[344:348] in _NIFTI1_MAGICS:
            dims = struct.unpack(endian + "8h", head[40:56])
            (bitpix,) = struct.unpack(endian + "h", head[72:74])
            (vox_offset,) = struct.unpack(endian + "f", head[108:112])
            data_start = max(int(vox_offset), 352)
            break
        if sizeof_hdr == 540 and len(head) >= 540 and head[4:12] == _NIFTI2_MAGIC:
            dims = struct.unpack(endian + "8q", head[16:80])
            (bitpix,) = struct.unpack(endian + "h", head[14:16])
            (vox_offset,) = struct.unpack(endian + "q", head[168:176])
            data_start = max(int(vox_offset), 544)
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d <= 0 for d in dims[1 : ndim + 1]):
        return None
    return data_start + math.prod(dims[1 : ndim + 1]) * bitpix // 8


def _nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file (plain or gzipped) holds less than its header promises, or None if it is complete.

    ITK's NIfTI reader does not notice a truncated file: it returns an image whose missing voxels
    are left over from whatever was in memory. So the data are counted here: for a gzipped file
    this decompresses it once more (a label volume compresses well, this is quick); for a plain
    file the size on disk is enough. Files that are not single-file NIfTI are left alone.
    """
    with path.open("rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as fh:
            head = fh.read(544)
            expected = _nifti_expected_size(head)
            if expected is None:
                return None
            if compressed:
                available = len(head)
                while chunk := fh.read(1 << 20):
                    available += len(chunk)
            else:
                available = path.stat().st_size
    except (EOFError, OSError, zlib.error) as exc:
        return f"compressed data truncated or corrupt: {' '.join(str(exc).split())}"
    if available < expected:
        return f"truncated: {available} bytes where the NIfTI header promises {expected}"
    return None


@contextmanager
def _native_stderr(captured: list):
    """Collect into ``captured`` what C++ code prints straight to file descriptor 2 during the
    block (ITK's MetaImage reader reports a truncated file there, beside the exception it raises)."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no usable descriptor 2: leave it alone
        saved = None
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def read_image(path: str | PathLike) -> sitk.Image:
    """Read one image file; a missing, unreadable or truncated file is a one-line error naming it."""
    import sys

    p = Path(path)
    if not p.exists():
        raise CrossmodError(f"{p}: no such file")
    if p.is_dir():
        raise CrossmodError(f"{p}: is a directory, expected an image file (.nrrd, .nii, .nii.gz, .mha)")
    printed: list[str] = []
    try:
        # only MetaImage reports its problems on descriptor 2; redirecting it is process-wide,
        # so other formats (read from worker threads too) are left alone
        metaimage = p.suffix.lower() in (".mha", ".mhd")
        with _native_stderr(printed) if metaimage else nullcontext():
            image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        reason = _one_line(exc)
        native = " ".join("".join(printed).split())
        if "Unable to determine ImageIO" in reason:
            reason = "not an image format SimpleITK can read, or a corrupt header"
        elif native:  # the reader's own report (e.g. MetaImage: data not read completely) says more
            reason = native if len(native) <= 240 else native[:237] + "..."
        raise CrossmodError(f"{p}: cannot read image ({reason})") from exc
    if "".join(printed):  # a successful read's warnings are still shown
        sys.stderr.write("".join(printed))
    problem = _nifti_truncation(p)
    if problem:
        raise CrossmodError(f"{p}: cannot read image ({problem})")
    return image


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def grid_differences(a: sitk.Image, b: sitk.Image, tol: float = GRID_TOLERANCE) -> list[str]:
    """What differs between two images' grids (size, spacing, origin, direction); empty if nothing."""
    if a.GetDimension() != b.GetDimension():
        return [f"dimension {a.GetDimension()} vs {b.GetDimension()}"]
    diffs = []
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        diffs.append(f"size {tuple(a.GetSize())} vs {tuple(b.GetSize())}")
    for what, get in (("spacing", "GetSpacing"), ("origin", "GetOrigin"), ("direction", "GetDirection")):
        va = np.asarray(getattr(a, get)(), dtype=float)
        vb = np.asarray(getattr(b, get)(), dtype=float)
        if va.shape != vb.shape or not np.all(np.abs(va - vb) <= tol):
            diffs.append(f"{what} {_fmt(va)} vs {_fmt(vb)}")
    return diffs


def read_header(path: str | Path) -> sitk.ImageFileReader:
    """Read only a file's header (size, spacing, metadata) without its pixels."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CrossmodError(f"{path}: cannot read header ({_one_line(exc)})") from None
    return reader


def find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def image_files(folder: Path) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`) directly in ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def image_stem(path: Path) -> str:
    """A patient id from an image file's name: the name without its image suffix."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_case(folder: str | Path, structures=PAROTIDS, structures_dir: str = "structures") -> Case:
    """Read ``img.*`` and ``<structures_dir>/<name>.*`` from a case folder.

    A structure file that is missing is left out of ``Case.structures`` (callers decide whether
    that is an error); one on a different grid than the image is an error.
    """
    folder = Path(folder)
    image_path = find_image(folder, "img")
    if image_path is None:
        raise CrossmodError(f"{folder}: no image (expected img.nrrd, img.nii.gz or img.mha)")
    image = read_image(image_path)
    masks = {}
    for name in structures:
        mask_path = find_image(folder / structures_dir, name)
        if mask_path is None:
            continue
        mask = read_image(mask_path)
        differences = grid_differences(mask, image)
        if differences:
            raise CrossmodError(
                f"{mask_path}: mask grid differs from its image {image_path.name}: "
                + "; ".join(differences)
            )
        masks[name] = mask
    return Case(patient_id=folder.name, image=image, structures=masks, source=folder)


def list_cases(cohort_dir: str | Path) -> list[Path]:
    """The case folders of a cohort (sorted), each holding an ``img.*``."""
    cohort_dir = Path(cohort_dir)
    if not cohort_dir.is_dir():
        raise CrossmodError(f"{cohort_dir}: cohort folder not found")
    cases = sorted(p for p in cohort_dir.iterdir() if p.is_dir() and find_image(p, "img"))
    if not cases:
        raise CrossmodError(f"{cohort_dir}: no case folders with an img.nrrd / img.nii.gz inside")
    return cases


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write atomically (temporary file, then rename) so no half-written file is left.

    A failed write (folder not writable, disk full, ...) is a one-line error naming ``path``.
    """
    path = Path(path)
    # Keep the real suffix last so ITK picks the right writer for the temporary file.
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.tmp{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        tmp.replace(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != str(tmp) else ""
        raise CrossmodError(f"{path}: cannot write ({reason}{where})") from None
    except RuntimeError as exc:  # ITK's writer: no space, no permission, ...
        raise CrossmodError(f"{path}: cannot write ({_one_line(exc)})") from None
    finally:
        if tmp.is_file() or tmp.is_symlink():  # (no folder: nothing to remove)
            tmp.unlink(missing_ok=True)


def label_map(masks: dict[str, sitk.Image], reference: sitk.Image, names=PAROTIDS) -> sitk.Image:
    """One uint8 label image on ``reference``'s grid: 0 background, i + 1 for ``names[i]``.

    Every mask must already lie on the reference grid (an error names the structure otherwise);
    absent names simply have no voxels.
    """
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint8)
    for value, name in enumerate(names, start=1):
        if name not in masks:
            continue
        differences = grid_differences(masks[name], reference)
        if differences:
            raise CrossmodError(f"{name}: mask grid differs from the reference image: "
                                + "; ".join(differences))
        array[sitk.GetArrayViewFromImage(masks[name]) > 0] = value
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_label_map(masks: dict[str, sitk.Image], reference: sitk.Image, path: str | Path,
                    names=PAROTIDS) -> Path:
    """Write named masks as one label map (NIfTI ``.nii.gz`` or NRRD by suffix) on the source grid."""
    path = Path(path)
    write_image(label_map(masks, reference, names), path)
    return path


def replace_folder(new: str | Path, target: str | Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing what was there; if the move
    fails the previous folder is put back (a reader never sees a half-written one)."""
    import shutil
    import tempfile

    new, target = Path(new), Path(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise CrossmodError(f"{target}: exists and is not a folder")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old / target.name, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


@contextmanager
def staged_folder(target: str | Path):
    """Build a folder that replaces ``target`` only when complete.

    Yields an empty sibling folder to fill; when the block ends normally it becomes ``target``
    (:func:`replace_folder`), when it raises it is removed, so a failure leaves no half-written
    folder behind and an existing ``target`` untouched.
    """
    import shutil
    import tempfile

    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise CrossmodError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

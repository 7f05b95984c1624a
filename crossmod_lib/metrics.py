"""Geometric evaluation of contours (paper section 2.G): DSC, HD, HD95 and MSD per structure.

The paper compares manual and automatically generated parotid contours with the Dice similarity
coefficient (DSC), the Hausdorff distance (HD) and the mean surface distance (MSD); we also report
the 95th-percentile Hausdorff distance (HD95). All distances are in millimetres, computed from the
voxel spacing. The exact convention, which this module implements and the tests check against a
brute-force oracle, is:

Masks
    A mask is any array; every non-zero voxel is foreground. Both masks of a pair must have the
    same shape (else :class:`~crossmod_lib.errors.CrossmodError`).

DSC
    ``2 |A ∩ B| / (|A| + |B|)`` over voxels (3D, not slice by slice).

Surface
    The surface of a mask is the mask minus its erosion by the 6-connected cross
    (``scipy.ndimage.generate_binary_structure(3, 1)``), eroded with ``border_value=0``: voxels on
    the array border count as surface. A one-voxel-thick structure is all surface.

Directed distances
    For each surface voxel of one mask, the Euclidean distance (anisotropic voxel spacing, in mm)
    to the nearest surface voxel of the other mask, computed with
    ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``. Spacing is given in numpy axis
    order, i.e. ``(z, y, x)`` for an array obtained from SimpleITK.

HD, HD95, MSD
    HD is the larger of the two directed maxima (MedPy's ``hd``). HD95 is the 95th percentile of
    the two directions' distances pooled (``numpy.percentile``, linear interpolation), as MedPy's
    ``hd95``. MSD is the mean of the two directed mean distances, so each direction weighs the
    same however many surface voxels it has (MedPy 0.4's ``assd``).

Other conventions, reported beside (not in Table II)
    ``hd95_max``: the larger of the two directed 95th percentiles (the stricter reading of
    "95 % Hausdorff", and this module's HD95 before issue 15: on the DeepMind pair 0522c0017
    Parotid-Lt 5.50 mm against the pooled 3.92 mm). ``assd``: the mean over the pooled
    distances, MedPy >= 0.5's ``assd``; it weighs the direction with more surface voxels more,
    hence 1.028 mm against MSD 1.019 mm on that pair. :data:`METRIC_CONVENTIONS` says all of
    this in one line per metric, for tables and the CLI's JSON.

Empty masks
    Never an error; the result is defined as follows.

    - both empty: DSC 1.0 and HD = HD95 = MSD = 0.0 (the two contours agree: there is nothing);
    - exactly one empty: DSC 0.0 and HD = HD95 = MSD = ``inf``, the distance to an empty set.

    :func:`compare_masks` and :func:`compare_images` also report ``reference_voxels`` and
    ``prediction_voxels``; :func:`empty_case` turns these into ``"none"``, ``"both"``,
    ``"reference"`` or ``"prediction"`` (which mask is empty). :func:`summarise` leaves ``inf``
    out of means and SDs and counts it separately.

Speed
    Metrics are computed on the bounding box of the union of both masks, padded by one voxel of
    zeros on every side. Outside the box both masks are empty, and where the box touches the array
    border the zero padding plays the role of ``border_value=0``, so the erosion, the surfaces and
    all distances are exactly those of the full arrays. The bounding box itself is found with
    per-axis ``any`` reductions, each on the slab left by the previous axis, so only the first
    reduction reads the whole array.

Images and files
    :func:`compare_images` compares two SimpleITK label images label by label; the two grids must
    agree in size, spacing, origin and direction within ``1e-4`` (absolute). :func:`compare_files`
    reads NRRD, NIfTI (``.nii``, ``.nii.gz``) or MetaImage (``.mha``/``.mhd``) files with
    SimpleITK. Problems are reported as a one-line ``CrossmodError`` naming the file(s). ITK reads
    a truncated NIfTI file without complaint (the missing voxels are garbage), so NIfTI files are
    also checked against the data size their header promises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import GRID_TOLERANCE, grid_differences, read_image

__all__ = [
    "GRID_TOLERANCE",
    "EXTRA_METRICS",
    "METRICS",
    "METRIC_CONVENTIONS",
    "compare_files",
    "compare_images",
    "compare_masks",
    "dice",
    "empty_case",
    "summarise",
    "surface",
    "surface_distances",
]

#: The four per-structure metrics, in report order.
METRICS = ("dsc", "hd", "hd95", "msd")
#: The other conventions for HD95 and the mean surface distance, computed beside (see above).
EXTRA_METRICS = ("hd95_max", "assd")

#: One line per metric: what it computes (for tables, the book and ``crossmod metrics --json``).
METRIC_CONVENTIONS = {
    "dsc": "Dice similarity coefficient 2|A∩B|/(|A|+|B|) over 3D voxels",
    "hd": "Hausdorff distance: the larger directed maximum surface distance, mm (MedPy hd)",
    "hd95": "95th percentile of both directions' surface distances pooled, mm (MedPy hd95)",
    "msd": "mean of the two directed mean surface distances, mm (MedPy 0.4 assd)",
    "hd95_max": "larger of the two directed 95th-percentile surface distances, mm",
    "assd": "mean of both directions' surface distances pooled, mm (MedPy >= 0.5 assd)",
}

_COLUMNS = ["structure", "label", *METRICS, *EXTRA_METRICS, "reference_voxels", "prediction_voxels"]


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def _as_array(mask, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CrossmodError(f"{what} mask: expected a numeric or boolean array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise CrossmodError(f"{what} mask: expected an array with at least one axis, got a scalar")
    return arr


def _as_pair(reference, prediction) -> tuple[np.ndarray, np.ndarray]:
    ref = _as_array(reference, "reference")
    pred = _as_array(prediction, "prediction")
    if ref.shape != pred.shape:
        raise CrossmodError(
            f"reference mask has shape {ref.shape} but prediction mask has shape {pred.shape}; "
            "masks must have the same shape"
        )
    return ref, pred


def _as_spacing(spacing, ndim: int) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in np.ravel(np.asarray(spacing, dtype=float)))
    except (TypeError, ValueError):
        raise CrossmodError(f"spacing {spacing!r}: expected {ndim} positive numbers (mm)") from None
    if len(values) != ndim:
        raise CrossmodError(
            f"spacing {values}: expected {ndim} values (one per array axis, numpy order), got {len(values)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise CrossmodError(f"spacing {values}: every value must be a finite positive number (mm)")
    return values


def _union_box(arrays: Sequence[np.ndarray]) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels of all ``arrays`` (same shape), or None if all are empty.

    Axis by axis: the profile along axis ``k`` is an ``any`` over the other axes of the arrays
    already cut down to the range found for axes ``0..k-1``, so only the first pass reads the whole
    volume. On a 512x512x150 uint8 volume (2-core machine) the first pass takes ~0.5 ms with the
    64-bit-word reduction, ~1.2 ms with ``any``; three independent ``any`` passes take ~5 ms and
    ``np.flatnonzero``/``argmax`` approaches 2.5-12 ms.
    """
    ndim = arrays[0].ndim
    views = list(arrays)
    box: list[slice] = []
    for axis in range(ndim):
        profile = None
        for view in views:
            p = _nonzero_profile(view, axis)
            profile = p if profile is None else (profile | p)
        hits = np.flatnonzero(profile)
        if hits.size == 0:
            return None
        cut = slice(int(hits[0]), int(hits[-1]) + 1)
        box.append(cut)
        index = (slice(None),) * axis + (cut,)
        views = [view[index] for view in views]
    return tuple(box)


def _nonzero_profile(arr: np.ndarray, axis: int) -> np.ndarray:
    """Boolean vector along ``axis``: does the hyperplane at each index hold a non-zero voxel?

    For integer and boolean arrays whose last axis is contiguous and a whole number of 8-byte
    words long, the last axis is read as ``uint64`` words and reduced with ``max``: a word is
    non-zero exactly when one of its voxels is. That is about twice as fast as ``any`` (which
    converts every voxel to bool first); floats are excluded because ``-0.0`` has a non-zero byte.
    """
    others = tuple(a for a in range(arr.ndim) if a != axis)
    if not others:
        return arr != 0
    if (
        axis != arr.ndim - 1
        and arr.size
        and arr.dtype.kind in "biu"
        and arr.strides[-1] == arr.itemsize
        and (arr.shape[-1] * arr.itemsize) % 8 == 0
    ):
        try:
            words = arr.view(np.uint64)
        except ValueError:
            pass
        else:
            return words.max(axis=others) != 0
    return arr.any(axis=others)


def _padded_crop(arr: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Boolean copy of ``arr[box]`` with one voxel of zeros added on every side."""
    out = np.zeros(tuple(s.stop - s.start + 2 for s in box), dtype=bool)
    inner = out[tuple(slice(1, -1) for _ in box)]
    part = arr[box]
    if part.dtype == bool:
        inner[...] = part
    else:
        np.not_equal(part, 0, out=inner)
    return out


def _cropped_pair(ref: np.ndarray, pred: np.ndarray):
    """Padded boolean crops of both masks to the box of their union, or None if both are empty."""
    box = _union_box((ref, pred))
    if box is None:
        return None
    return _padded_crop(ref, box), _padded_crop(pred, box), box


_CROSS: dict[int, np.ndarray] = {}


def _surface_of(mask: np.ndarray) -> np.ndarray:
    """Surface of a boolean mask, eroded with border_value=0 (see the module docstring)."""
    cross = _CROSS.get(mask.ndim)
    if cross is None:
        cross = _CROSS[mask.ndim] = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=cross, border_value=0)
    return mask & ~eroded


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing) -> np.ndarray:
    """Distance from each voxel of ``from_surface`` to the nearest voxel of ``to_surface`` (mm)."""
    field = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return field[from_surface]


# --------------------------------------------------------------------------------------------
# Public mask-level API
# --------------------------------------------------------------------------------------------


def dice(reference, prediction) -> float:
    """3D Dice similarity coefficient of two masks (non-zero = foreground); 1.0 if both are empty."""
    ref, pred = _as_pair(reference, prediction)
    crops = _cropped_pair(ref, pred)
    if crops is None:
        return 1.0
    r, p, _ = crops
    return _dice_counts(int(np.count_nonzero(r)), int(np.count_nonzero(p)), int(np.count_nonzero(r & p)))


def _dice_counts(n_ref: int, n_pred: int, n_both: int) -> float:
    total = n_ref + n_pred
    return 1.0 if total == 0 else 2.0 * n_both / total


def surface(mask) -> np.ndarray:
    """Boolean array, same shape as ``mask``: its surface voxels (mask minus its 6-connected erosion,
    array-border voxels counting as surface)."""
    arr = _as_array(mask, "input")
    out = np.zeros(arr.shape, dtype=bool)
    box = _union_box((arr,))
    if box is None:
        return out
    crop_surface = _surface_of(_padded_crop(arr, box))
    out[box] = crop_surface[tuple(slice(1, -1) for _ in box)]
    return out


def surface_distances(reference, prediction, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (reference→prediction, prediction→reference).

    Each array has one entry per surface voxel of the source mask, in C (raster) order. ``spacing``
    is the voxel size in numpy axis order. If the target mask is empty, every distance from the
    source is ``inf``; an empty source gives an empty array.
    """
    ref, pred = _as_pair(reference, prediction)
    step = _as_spacing(spacing, ref.ndim)
    crops = _cropped_pair(ref, pred)
    if crops is None:
        return np.zeros(0), np.zeros(0)
    r, p, _ = crops
    return _distances_of_crops(r, p, step)


def _distances_of_crops(r: np.ndarray, p: np.ndarray, step) -> tuple[np.ndarray, np.ndarray]:
    surf_r = _surface_of(r)
    surf_p = _surface_of(p)
    has_r = bool(surf_r.any())
    has_p = bool(surf_p.any())
    if has_r and has_p:
        return _directed(surf_r, surf_p, step), _directed(surf_p, surf_r, step)
    # At most one of the two is empty here (the crop exists, so the union is non-empty).
    return (
        np.full(int(np.count_nonzero(surf_r)), np.inf) if not has_p else np.zeros(0),
        np.full(int(np.count_nonzero(surf_p)), np.inf) if not has_r else np.zeros(0),
    )


def compare_masks(reference, prediction, spacing) -> dict:
    """DSC, HD, HD95 and MSD of two masks (and HD95 / mean distance in the other conventions,
    ``hd95_max`` and ``assd``), plus their voxel counts.

    Returns ``{"dsc", "hd", "hd95", "msd", "hd95_max", "assd"}`` as floats (distances in mm) and
    ``{"reference_voxels", "prediction_voxels"}`` as ints. ``spacing`` is in numpy axis order
    (``(z, y, x)`` for SimpleITK arrays). Empty masks follow the module convention.
    """
    ref, pred = _as_pair(reference, prediction)
    step = _as_spacing(spacing, ref.ndim)
    crops = _cropped_pair(ref, pred)
    if crops is None:
        return {"dsc": 1.0, **dict.fromkeys((*METRICS[1:], *EXTRA_METRICS), 0.0),
                "reference_voxels": 0, "prediction_voxels": 0}
    r, p, _ = crops
    n_ref = int(np.count_nonzero(r))
    n_pred = int(np.count_nonzero(p))
    result = {
        "dsc": _dice_counts(n_ref, n_pred, int(np.count_nonzero(r & p))),
        "reference_voxels": n_ref,
        "prediction_voxels": n_pred,
    }
    if n_ref == 0 or n_pred == 0:
        result.update(dict.fromkeys((*METRICS[1:], *EXTRA_METRICS), math.inf))
    else:
        d_rp, d_pr = _distances_of_crops(r, p, step)
        pooled = np.concatenate([d_rp, d_pr])
        result.update(
            hd=float(max(d_rp.max(), d_pr.max())),
            hd95=float(np.percentile(pooled, 95)),
            msd=float((d_rp.mean() + d_pr.mean()) / 2.0),
            hd95_max=float(max(np.percentile(d_rp, 95), np.percentile(d_pr, 95))),
            assd=float(pooled.mean()),
        )
    return {key: result[key] for key in (*METRICS, *EXTRA_METRICS, "reference_voxels", "prediction_voxels")}


def empty_case(result: Mapping) -> str:
    """Which mask of a compared pair was empty: ``"none"``, ``"both"``, ``"reference"`` or ``"prediction"``.

    ``result`` is a :func:`compare_masks` dict or a row of a :func:`compare_images` DataFrame. When it
    is not ``"none"``, DSC and the distances are the conventional values, not measurements.
    """
    try:
        ref_empty = int(result["reference_voxels"]) == 0
        pred_empty = int(result["prediction_voxels"]) == 0
    except (KeyError, TypeError, ValueError):
        raise CrossmodError(
            "empty_case: expected a result with 'reference_voxels' and 'prediction_voxels'"
        ) from None
    if ref_empty and pred_empty:
        return "both"
    if ref_empty:
        return "reference"
    if pred_empty:
        return "prediction"
    return "none"


# --------------------------------------------------------------------------------------------
# Images and files
# --------------------------------------------------------------------------------------------


def _label_array(image: sitk.Image, name: str) -> np.ndarray:
    if not isinstance(image, sitk.Image):
        raise CrossmodError(f"{name}: expected a SimpleITK image, got {type(image).__name__}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CrossmodError(
            f"{name}: expected a scalar label image, got {image.GetNumberOfComponentsPerPixel()} "
            "components per pixel"
        )
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind not in "biuf":
        pixel = image.GetPixelIDTypeAsString()
        raise CrossmodError(f"{name}: expected an integer label image, got pixel type {pixel}")
    return arr


def _present_labels(arr: np.ndarray, name: str) -> list[int]:
    values = np.unique(arr)
    values = values[values != 0]
    if arr.dtype.kind == "f":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            raise CrossmodError(f"{name}: not a label image (non-integer value {bad[0]:g})")
    return [int(v) for v in values]


def _check_labels(labels) -> dict[int, str]:
    if not isinstance(labels, Mapping):
        raise CrossmodError(
            f"labels: expected a mapping {{label value: structure name}}, got {type(labels).__name__}"
        )
    checked = {}
    for value, structure in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CrossmodError(f"labels: label value {value!r} is not an integer")
        checked[int(value)] = str(structure)
    return checked


def compare_images(
    reference: sitk.Image,
    prediction: sitk.Image,
    labels: dict[int, str] | None = None,
    *,
    names: tuple[str, str] = ("reference", "prediction"),
) -> pd.DataFrame:
    """Per-structure DSC, HD, HD95, MSD between two SimpleITK label images on the same grid.

    ``labels`` maps label values to structure names, e.g. ``{1: "Parotid_L", 2: "Parotid_R"}``;
    with ``None`` every non-zero value present in either image is compared, named ``label_<v>``.
    ``names`` label the two images in error messages (file paths, for instance). Returns one row per
    structure with columns ``structure, label, dsc, hd, hd95, msd, hd95_max, assd,
    reference_voxels, prediction_voxels``. The spacing comes from the image and is reversed to numpy ``(z, y, x)``
    order.
    """
    ref_name, pred_name = names
    ref_arr = _label_array(reference, ref_name)
    pred_arr = _label_array(prediction, pred_name)
    diffs = grid_differences(reference, prediction)
    if diffs:
        raise CrossmodError(f"{ref_name} and {pred_name} are not on the same grid: " + "; ".join(diffs))
    spacing = tuple(reversed(reference.GetSpacing()))

    # Every label lies inside the box of the non-zero voxels of either image: cut both down once.
    # A box of zero size when both images are all background: every label is then empty in both.
    box = _union_box((ref_arr, pred_arr)) or tuple(slice(0, 0) for _ in range(ref_arr.ndim))
    ref_arr, pred_arr = ref_arr[box], pred_arr[box]

    if labels is None:
        present = sorted(set(_present_labels(ref_arr, ref_name)) | set(_present_labels(pred_arr, pred_name)))
        wanted = {v: f"label_{v}" for v in present}
    else:
        wanted = _check_labels(labels)

    rows = []
    for value, structure in wanted.items():
        result = compare_masks(ref_arr == value, pred_arr == value, spacing)
        rows.append({"structure": structure, "label": value, **result})
    frame = pd.DataFrame(rows, columns=_COLUMNS)
    dtypes = {"label": "int64", **dict.fromkeys((*METRICS, *EXTRA_METRICS), "float64")}
    dtypes.update(reference_voxels="int64", prediction_voxels="int64")
    return frame.astype(dtypes)


def compare_files(
    reference_path: str | PathLike,
    prediction_path: str | PathLike,
    labels: dict[int, str] | None = None,
) -> pd.DataFrame:
    """:func:`compare_images` on two label image files (NRRD, NIfTI ``.nii``/``.nii.gz``, MetaImage).

    A missing, unreadable or truncated file is a one-line ``CrossmodError`` naming it.
    """
    reference = read_image(reference_path)
    prediction = read_image(prediction_path)
    return compare_images(reference, prediction, labels, names=(str(reference_path), str(prediction_path)))


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def summarise(df: pd.DataFrame, by: Sequence[str] | str = ("structure",)) -> pd.DataFrame:
    """Mean ± SD of each metric per group (e.g. per structure, over patients).

    Returns one row per group with the ``by`` columns, ``n`` (rows in the group) and, for each of
    ``dsc, hd, hd95, msd`` present in ``df``: ``<m>_mean``, ``<m>_sd`` (sample SD, ``ddof=1``; NaN
    with fewer than two finite values) and ``<m>_n_inf``, the number of ``inf`` values (a contour
    missing on one side) left out of the mean and SD. NaN values are left out as well. ``by=()``
    summarises the whole table in one row.
    """
    keys = [by] if isinstance(by, str) else list(by)
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise CrossmodError(
            f"summarise: grouping column(s) {missing} not in the table (columns: {list(df.columns)})"
        )
    metrics = [m for m in METRICS if m in df.columns]
    if not metrics:
        raise CrossmodError(f"summarise: the table has none of the metric columns {list(METRICS)}")

    groups = df.groupby(keys, sort=False, dropna=False) if keys else [((), df)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        row["n"] = len(group)
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").to_numpy(dtype=float)
            infinite = np.isinf(values)
            finite = values[np.isfinite(values)]
            row[f"{m}_mean"] = float(finite.mean()) if finite.size else math.nan
            row[f"{m}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
            row[f"{m}_n_inf"] = int(infinite.sum())
        rows.append(row)
    columns = [*keys, "n", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd", "n_inf"))]
    return pd.DataFrame(rows, columns=columns)

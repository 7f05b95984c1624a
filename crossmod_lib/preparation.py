"""Paper section 2.A: data acquisition and preparation.

CT and MR come with different resolutions and fields of view. Before the 2D networks see them:

1. both are resampled to ``pixel_mm`` in-plane (paper: 1 x 1 mm); the slice spacing is kept, since
   the method is 2D and the CycleGAN's input is unpaired;
2. intensities are mapped to 0-255: CT through the soft-tissue window (level 40, width 350 HU),
   MR by a histogram-based standardisation (:func:`standardise_mr`);
3. the head is found from its outline (:func:`head_mask`) and a ``crop`` x ``crop`` window
   (paper: 256 x 256) is cut centred on it;
4. the CT's cranio-caudal range is restricted to match the MR's (:func:`cc_range`);
5. 2D axial slices are extracted with their labels and head masks.

The head outline of step 3 is the same mask the CycleGAN's geometric loss and the cleaning step
use, so all three agree on what "the head" is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from .errors import CrossmodError
from .io import (IMAGE_SUFFIXES, PAROTIDS, Case, find_image, image_files, image_stem, list_cases,
                 read_case, read_header, read_image)
from .slices import read_slices, write_slices
from .runs import RawFiles, RunFolder

# ----------------------------------------------------------------------------------------------
# Table I: acquisition parameters from the headers


def _value_range(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n.a."
    if all(isinstance(v, str) for v in values):
        unique = sorted(set(values))
        return unique[0] if len(unique) == 1 else " / ".join(unique)
    lo, hi = min(values), max(values)
    fmt = (lambda v: f"{v:g}") if all(float(v).is_integer() for v in values) else (lambda v: f"{v:.2f}")
    return fmt(lo) if lo == hi else f"[{fmt(lo)}, {fmt(hi)}]"


def _meta(reader: sitk.ImageFileReader, key: str):
    if not reader.HasMetaDataKey(key):
        return None
    text = reader.GetMetaData(key).strip()
    try:
        return float(text)
    except ValueError:
        return text


def _headers(cohort) -> list:
    if isinstance(cohort, CohortSource):
        return list(cohort.headers())
    return [read_header(find_image(case, "img")) for case in list_cases(cohort)]


def acquisition_table(cohorts: dict) -> pd.DataFrame:
    """Table I: imaging parameters of each cohort, read from the image headers.

    ``cohorts`` maps a column title (e.g. "T2w MR") to a :class:`CohortSource` or a cohort folder
    of ``<case>/img.*``. Numeric parameters that vary between patients are shown as ``[min, max]``;
    a parameter no header records is "n.a.".
    """
    rows = {
        "FOV [#pixels]": [], "#slices": [], "Voxel size [mm³]": [], "TE [ms]": [], "TR [ms]": [],
        "Flip angle [°]": [], "Sequence type": [], "Field strength / tube voltage": [],
        "#patients": [],
    }
    columns = []
    for title, folder in cohorts.items():
        headers = _headers(folder)
        sizes = [h.GetSize() for h in headers]
        spacing = np.array([h.GetSpacing() for h in headers])
        fovs = sorted({f"{s[0]}×{s[1]}" for s in sizes})
        rows["FOV [#pixels]"].append(" / ".join(fovs))
        rows["#slices"].append(_value_range([s[2] for s in sizes]))
        med = np.median(spacing, axis=0)
        rows["Voxel size [mm³]"].append(f"{med[0]:.2g}×{med[1]:.2g}×{med[2]:.2g}")
        rows["TE [ms]"].append(_value_range([_meta(h, "EchoTime") for h in headers]))
        rows["TR [ms]"].append(_value_range([_meta(h, "RepetitionTime") for h in headers]))
        rows["Flip angle [°]"].append(_value_range([_meta(h, "FlipAngle") for h in headers]))
        rows["Sequence type"].append(_value_range([_meta(h, "SequenceName") for h in headers]))
        field = [_meta(h, "MagneticFieldStrength") for h in headers]
        kvp = [_meta(h, "KVP") for h in headers]
        if any(v is not None for v in field):
            rows["Field strength / tube voltage"].append(f"{_value_range(field)} T")
        elif any(v is not None for v in kvp):
            rows["Field strength / tube voltage"].append(f"{_value_range(kvp)} kVp")
        else:
            rows["Field strength / tube voltage"].append("n.a.")
        rows["#patients"].append(str(len(headers)))
        columns.append(title)
    table = pd.DataFrame(rows, index=columns).T
    table.index.name = "Parameter"
    return table


# ----------------------------------------------------------------------------------------------
# Small transforms, one job each


def resample_inplane(image: sitk.Image, pixel_mm: float, interpolator=sitk.sitkLinear,
                     antialias: bool = True) -> sitk.Image:
    """Resample to ``pixel_mm`` x ``pixel_mm`` in-plane, keeping the slice positions.

    When shrinking, the image is first smoothed in-plane with a Gaussian matched to the new pixel
    size so fine structures (noise, skin line) do not alias. Labels use a label interpolator and no
    smoothing.
    """
    spacing = np.array(image.GetSpacing(), dtype=float)
    size = np.array(image.GetSize())
    new_spacing = np.array([pixel_mm, pixel_mm, spacing[2]])
    new_size = np.maximum(1, np.round(size * spacing / new_spacing)).astype(int)
    source = image
    factor = pixel_mm / spacing[:2]
    if antialias and np.any(factor > 1.0):
        sigma_px = 0.5 * np.sqrt(np.maximum(factor**2 - 1.0, 0.0))  # in input pixels (x, y)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array = ndimage.gaussian_filter(array, sigma=(0.0, sigma_px[1], sigma_px[0]))
        source = sitk.GetImageFromArray(array)
        source.CopyInformation(image)
    # Centre the new grid on the old one: the first voxel centre moves by half the size change.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((new_spacing - spacing) / 2.0 * np.array([1, 1, 0]))
    origin = np.array(image.GetOrigin()) + shift
    return sitk.Resample(
        source, [int(v) for v in new_size], sitk.Transform(), interpolator, origin.tolist(),
        new_spacing.tolist(), image.GetDirection(), 0.0, source.GetPixelID(),
    )


def window_ct(hu: np.ndarray, level: float = 40.0, width: float = 350.0) -> np.ndarray:
    """Map Hounsfield units through a window to 0-255 (float32): below the window 0, above 255."""
    low = level - width / 2.0
    return (np.clip((hu - low) / width, 0.0, 1.0) * 255.0).astype(np.float32)


def standardise_mr(volume: np.ndarray, upper_percentile: float = 99.0) -> np.ndarray:
    """Histogram-based MR intensity standardisation to 0-255 (float32).

    MR intensities have no absolute scale (each scanner and patient differ). The head is separated
    from the background by Otsu's threshold on the intensity histogram; the ``upper_percentile`` of
    the head's intensities then maps to 255 and zero signal to 0, clipping above. This removes the
    per-patient scale while keeping the tissue contrast.
    """
    values = volume.astype(np.float32)
    if not np.any(values > 0):
        raise CrossmodError("MR volume has no signal (all voxels <= 0)")
    image = sitk.GetImageFromArray(values)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(image)
    foreground = values[values > otsu.GetThreshold()]
    if foreground.size == 0:
        foreground = values[values > 0]
    upper = float(np.percentile(foreground, upper_percentile))
    return (np.clip(values / upper, 0.0, 1.0) * 255.0).astype(np.float32)


def mr_foreground(volume: np.ndarray, smooth_px: float = 1.0, dilate_px: int = 0,
                  close_px: int = 2) -> np.ndarray:
    """The head of a standardised (0-255) MR volume [n, H, W] against a noisy background.

    Real MR has a noise floor: magnitude images turn the background's Gaussian noise into a Rician
    one of mean ~1.25 sigma, which at SNR 10 lands near the fixed ``head_threshold`` (20 of 255),
    so the fixed-threshold outline of :func:`head_mask` swallows the whole field of view. Here the
    slices are smoothed (Gaussian, ``smooth_px``) and thresholded at the lower of two Otsu
    thresholds over the whole smoothed volume (three classes: background, soft tissue, bright
    fat and fluid; whatever the noise level). A single Otsu threshold is not enough: on a T2
    image it can fall between soft tissue and the bright subcutaneous fat, and a slice whose fat
    ring is open then kept only fragments of its head (seen on 11 of 353 slices of a simulated
    cohort at SNR 10-15). Gaps in the outline up to ~2 ``close_px`` are closed, each slice is
    reduced to its largest component with holes filled, and grown by ``dilate_px`` to keep the
    skin's edge.
    """
    volume = np.asarray(volume, dtype=np.float32)
    smoothed = ndimage.gaussian_filter(volume, sigma=(0.0, smooth_px, smooth_px)) if smooth_px > 0 else volume
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(smoothed))
    above = smoothed > min(otsu.GetThresholds())
    if close_px > 0:  # padded, so that a head touching the frame's edge is not eroded there
        pad = ((0, 0), (close_px, close_px), (close_px, close_px))
        above = ndimage.binary_closing(np.pad(above, pad), structure=np.ones((1, 3, 3), bool),
                                       iterations=close_px)[:, close_px:-close_px, close_px:-close_px]
    mask = head_mask(above.astype(np.uint8), 0)
    if dilate_px > 0:
        mask = ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool), iterations=dilate_px)
    return mask


def zero_mr_background(volume: np.ndarray, smooth_px: float = 1.0) -> np.ndarray:
    """The standardised MR volume with everything outside its head (:func:`mr_foreground`) set to
    0: the noise floor removed, as on the CT's air and the synthetic MR's background, so that the
    head outline, the CycleGAN's discriminator and the U-Net see the same kind of background."""
    return np.where(mr_foreground(volume, smooth_px), volume, 0.0).astype(np.float32)


def head_mask(image: np.ndarray, threshold: float = 20.0) -> np.ndarray:
    """The head outline of 0-255 image(s) [..., H, W]: threshold, largest component, holes filled.

    Works slice by slice (a 2D mask per axial slice), the form the 2D networks and the cleaning
    step use. Dark structures inside the head (airway, cortical bone on MR) are holes and get
    filled, so the mask is the external outline, as in the paper.
    """
    image = np.asarray(image)
    flat = image.reshape((-1,) + image.shape[-2:])
    out = np.zeros(flat.shape, dtype=bool)
    for k, plane in enumerate(flat):
        above = plane > threshold
        labels, count = ndimage.label(above)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        out[k] = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    return out.reshape(image.shape)


def slice_positions(image: sitk.Image) -> np.ndarray:
    """Physical cranio-caudal position (mm) of each axial slice; refuses non-axial volumes."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction[:, 2]), [0, 0, 1], atol=1e-3):
        raise CrossmodError(
            "volume is not axial (slice normal is not the z axis); reorient it to axial first"
        )
    z0 = image.GetOrigin()[2]
    return z0 + direction[2, 2] * image.GetSpacing()[2] * np.arange(image.GetSize()[2])


def cc_range(z: np.ndarray, labels: np.ndarray, rule: str, coverage_mm: float | None = None,
             margin_mm: float = 0.0) -> np.ndarray:
    """Which slices of a CT to keep (boolean per slice) so its range matches the MR's.

    ``parotid_centred``: a window of the MR coverage (``coverage_mm``, from the MR headers) plus
    ``margin_mm`` each side, centred on the parotids; ``parotid_extent``: the slices holding parotid
    label, plus ``margin_mm``; ``none``: every slice.
    """
    if rule == "none":
        return np.ones(len(z), dtype=bool)
    labelled = labels.reshape(len(z), -1).any(axis=1)
    if not labelled.any():
        raise CrossmodError(f"no parotid voxels: cannot place the cranio-caudal range (cc_rule={rule})")
    z_lab = z[labelled]
    if rule == "parotid_extent":
        lo, hi = z_lab.min() - margin_mm, z_lab.max() + margin_mm
    elif rule == "parotid_centred":
        if coverage_mm is None:
            raise CrossmodError("cc_rule=parotid_centred needs the MR coverage (coverage_mm)")
        centre = 0.5 * (z_lab.min() + z_lab.max())
        half = coverage_mm / 2.0 + margin_mm
        lo, hi = centre - half, centre + half
    else:
        raise CrossmodError(f"unknown cc_rule {rule!r}")
    return (z >= lo - 1e-6) & (z <= hi + 1e-6)


def crop_origin(mask: np.ndarray, crop: int) -> tuple[int, int]:
    """Top-left (row, column) of a ``crop`` x ``crop`` window centred on the mask's centroid."""
    if not mask.any():
        raise CrossmodError("head outline is empty: nothing above the head threshold")
    rows, cols = np.nonzero(mask.reshape((-1,) + mask.shape[-2:]).any(axis=0))
    weights = mask.reshape((-1,) + mask.shape[-2:]).sum(axis=0)[rows, cols]
    cy = np.average(rows, weights=weights)
    cx = np.average(cols, weights=weights)
    return round(cy - crop / 2.0), round(cx - crop / 2.0)


def crop_slices(volume: np.ndarray, y0: int, x0: int, crop: int, fill=0) -> np.ndarray:
    """Cut [..., y0:y0+crop, x0:x0+crop], padding with ``fill`` where the window leaves the image."""
    h, w = volume.shape[-2:]
    out = np.full(volume.shape[:-2] + (crop, crop), fill, dtype=volume.dtype)
    ys, ye = max(y0, 0), min(y0 + crop, h)
    xs, xe = max(x0, 0), min(x0 + crop, w)
    if ys < ye and xs < xe:
        out[..., ys - y0:ye - y0, xs - x0:xe - x0] = volume[..., ys:ye, xs:xe]
    return out


# ----------------------------------------------------------------------------------------------
# Composed: one case, one cohort


@dataclass
class PreparedCase:
    patient_id: str
    modality: str
    image: np.ndarray          # uint8 [n, crop, crop]
    labels: np.ndarray         # uint8 [n, crop, crop]: 0 background, 1 Parotid_L, 2 Parotid_R
    head_mask: np.ndarray      # bool  [n, crop, crop]
    slice_index: np.ndarray    # int   [n]: index of the slice in the source volume
    z_mm: np.ndarray           # float [n]
    info: dict
    labels_observer2: np.ndarray | None = None


def normalise_intensity(array: np.ndarray, modality: str, settings: dict) -> np.ndarray:
    if modality == "CT":
        window = settings["ct_window"]
        return window_ct(array, window["level"], window["width"])
    if modality == "MR":
        standardised = standardise_mr(array, settings["mr_upper_percentile"])
        background = settings.get("mr_background", "keep")
        if background == "zero":
            return zero_mr_background(standardised)
        if background != "keep":
            raise CrossmodError(f"preprocessing.mr_background must be keep or zero, got {background!r}")
        return standardised
    raise CrossmodError(f"unknown modality {modality!r} (CT or MR)")


def prepare_case(case: Case, modality: str, settings: dict, coverage_mm: float | None = None,
                 observer2: Case | None = None) -> PreparedCase:
    """Section 2.A for one patient: resample, normalise, range-restrict (CT), crop, slice."""
    where = case.source or case.patient_id
    try:
        resampled = resample_inplane(case.image, settings["pixel_mm"])
        array = sitk.GetArrayFromImage(resampled).astype(np.float32)
        normalised = normalise_intensity(array, modality, settings)

        def labels_on_grid(source: Case) -> np.ndarray:
            label_image = sitk.GetImageFromArray(source.label_array(PAROTIDS))
            label_image.CopyInformation(source.image)
            label_image = resample_inplane(label_image, settings["pixel_mm"],
                                           sitk.sitkLabelLinear, antialias=False)
            return sitk.GetArrayFromImage(label_image).astype(np.uint8)

        labels = labels_on_grid(case)
        z = slice_positions(resampled)
        if modality == "CT":
            keep = cc_range(z, labels, settings["cc_rule"], coverage_mm, settings["cc_margin_mm"])
        else:
            keep = np.ones(len(z), dtype=bool)
        index = np.flatnonzero(keep)
        mask = head_mask(normalised[index], settings["head_threshold"])
        without_head = 0
        if modality == "CT":
            # A CT slice without a head has nothing to translate: the cleaning step would only
            # reject it. Beyond the scan a volume may be padded with air (OpenKBP's fixed 128-slice
            # grid) or hold a small island of residue (0.2-19 cm2 on OpenKBP, where such slices made
            # most of the outline rejections), far below any head or neck in the range.
            area_cm2 = mask.sum(axis=(1, 2)) * settings["pixel_mm"] ** 2 / 100.0
            has_head = (area_cm2 > 0) & (area_cm2 >= settings["min_head_area_cm2"])
            without_head = int((~has_head).sum())
            if not has_head.any():
                raise CrossmodError(
                    "no CT slice in the cranio-caudal range contains a head outline of at least "
                    f"{settings['min_head_area_cm2']:g} cm2 (preprocessing.min_head_area_cm2)")
            index, mask = index[has_head], mask[has_head]
        y0, x0 = crop_origin(mask, settings["crop"])
    except CrossmodError as exc:
        raise CrossmodError(f"{where}: {exc}") from None
    crop = settings["crop"]
    image = np.round(crop_slices(normalised[index], y0, x0, crop)).astype(np.uint8)
    prepared = PreparedCase(
        patient_id=case.patient_id,
        modality=modality,
        image=image,
        labels=crop_slices(labels[index], y0, x0, crop),
        head_mask=crop_slices(mask, y0, x0, crop),
        slice_index=index.astype(np.int32),
        z_mm=z[index].astype(np.float32),
        info={
            "patient": case.patient_id,
            "modality": modality,
            "source": str(case.source) if case.source else "",
            "slices_total": len(z),
            "slices_kept": len(index),
            "slices_without_head": without_head,
            "z_min_mm": float(z[index].min()),
            "z_max_mm": float(z[index].max()),
            "crop_row": y0,
            "crop_col": x0,
            "pixel_mm": float(settings["pixel_mm"]),
            "slice_mm": float(resampled.GetSpacing()[2]),
            "resampled_origin": ";".join(f"{v:.4f}" for v in resampled.GetOrigin()),
            "resampled_size": "x".join(str(v) for v in resampled.GetSize()),
            "structures": ";".join(sorted(case.structures)),
            # manual parotid contours: an unannotated MR patient feeds the CycleGAN and gets a
            # prediction, but cannot test the method nor train the MR-label baselines
            "annotated": any(name in case.structures for name in PAROTIDS),
        },
    )
    if observer2 is not None:
        prepared.labels_observer2 = crop_slices(labels_on_grid(observer2)[index], y0, x0, crop)
    return prepared


def mr_coverage_mm(mr_cohort) -> float:
    """Median cranio-caudal coverage of the MR cohort (slices x spacing), from its headers."""
    return float(np.median([h.GetSize()[2] * h.GetSpacing()[2] for h in _headers(mr_cohort)]))


def save_slices(cases: list[PreparedCase], path: Path) -> None:
    """All slices of a cohort in one compressed .npz (written atomically), the 2D networks' input."""
    write_slices(stack_slices(cases), path)


def stack_slices(cases: list[PreparedCase]) -> dict[str, np.ndarray]:
    """The slices of prepared cases as one set of arrays, in case order (what :func:`save_slices`
    writes): image, labels, head_mask, patient, slice_index, z_mm, annotated (and
    labels_observer2 where every case has a second observer)."""
    arrays = {
        "image": np.concatenate([c.image for c in cases]),
        "labels": np.concatenate([c.labels for c in cases]),
        "head_mask": np.concatenate([c.head_mask for c in cases]),
        "patient": np.concatenate([np.full(len(c.image), c.patient_id) for c in cases]),
        "slice_index": np.concatenate([c.slice_index for c in cases]),
        "z_mm": np.concatenate([c.z_mm for c in cases]),
        "annotated": np.concatenate([np.full(len(c.image), bool(c.info["annotated"])) for c in cases]),
    }
    if all(c.labels_observer2 is not None for c in cases):
        arrays["labels_observer2"] = np.concatenate([c.labels_observer2 for c in cases])
    return arrays


def load_slices(path: str | Path) -> dict[str, np.ndarray]:
    """Read a cohort's slices written by :func:`save_slices` (see :mod:`crossmod_lib.slices`)."""
    return read_slices(path, "prepared slices", ("image", "labels", "patient"))


def prepare_run(run, cohorts: dict | None = None, progress: bool = False) -> dict:
    """Stage 1 of a run folder: both cohorts prepared into ``<run>/prepared/``.

    The MR cohort first: the CT's cranio-caudal range is cut to the MR's median coverage (read
    from the MR headers, :func:`mr_coverage_mm`). ``cohorts``: the run's
    :func:`cohort_sources`, if already opened. Returns ``coverage_mm`` and the per-case tables
    ``MR`` and ``CT`` (as :func:`prepare_cohort`).
    """
    cohorts = cohorts or cohort_sources(run, progress=progress)
    settings = run.profile["preprocessing"]
    prepared_dir = run.stage("prepared")
    coverage_mm = mr_coverage_mm(cohorts["MR"])
    mr_cases = prepare_cohort(cohorts["MR"], "MR", settings, prepared_dir, progress=progress)
    ct_cases = prepare_cohort(cohorts["CT"], "CT", settings, prepared_dir, coverage_mm=coverage_mm,
                              progress=progress)
    return {"coverage_mm": coverage_mm, "MR": mr_cases, "CT": ct_cases}


def parotid_level_slices(slices: dict[str, np.ndarray], count: int = 6) -> list[int]:
    """Indices of example slices: per patient (in order), the slice with the most parotid label
    (a patient without contours: its middle slice)."""
    area = (slices["labels"] > 0).reshape(len(slices["labels"]), -1).sum(axis=1)
    picked = []
    for patient in np.unique(slices["patient"]):
        own = np.flatnonzero(slices["patient"] == patient)
        picked.append(int(own[np.argmax(area[own])]) if area[own].any() else int(own[len(own) // 2]))
    return picked[:count]


def prepare_cohort(cohort, modality: str, settings: dict, out_dir: str | Path,
                   coverage_mm: float | None = None, progress: bool = True) -> pd.DataFrame:
    """Prepare every case of a cohort; writes ``<out>/<ct|mr>_slices.npz`` and ``..._cases.csv``.

    ``cohort`` is a :class:`CohortSource` or a folder of ``<case>/img.*`` + ``structures/``.
    """
    from tqdm.auto import tqdm

    if not isinstance(cohort, CohortSource):
        cohort = CohortSource(modality, "folder", list_cases(cohort), Path(cohort))
        reader = read_case
    else:
        reader = cohort.read
    out_dir = Path(out_dir)
    prepared = []
    for item in tqdm(cohort.items, desc=f"prepare {modality}", disable=not progress):
        case = reader(item)
        missing = [name for name in PAROTIDS if name not in case.structures]
        if modality == "CT" and len(missing) == len(PAROTIDS):
            raise CrossmodError(f"{case.source or case.patient_id}: no parotid structures "
                                f"(expected {', '.join(PAROTIDS)})")
        prepared.append(prepare_case(case, modality, settings, coverage_mm, cohort.observer2(item)))
    slices_file, cases_file = RunFolder.prepared(modality)
    save_slices(prepared, out_dir / slices_file.in_folder)
    table = pd.DataFrame([c.info for c in prepared])
    tmp = out_dir / f".{cases_file.in_folder}.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out_dir / cases_file.in_folder)
    return table


# ----------------------------------------------------------------------------------------------
# Where the raw cohorts come from


def phantom_arguments(profile: dict) -> dict:
    """Keyword arguments of :func:`crossmod_lib.phantom.write_phantom` from a profile."""
    settings = dict(profile["phantom"])
    settings["ct_slices"] = tuple(settings["ct_slices"])
    return {"seed": profile["seed"], **settings}


def _phantom_folder(run, progress: bool = True) -> Path:
    """The run's phantom (``raw/phantom``), generated first if missing or made with other settings."""
    import json

    from . import phantom

    folder, record = run.raw_phantom, run.phantom_record
    wanted = phantom_arguments(run.profile)
    current = json.loads(record.read_text()).get("arguments") if record.is_file() else None
    comparable = {k: v for k, v in wanted.items() if k != "workers"}
    if current is None or {k: (tuple(v) if isinstance(v, list) else v)
                           for k, v in current.items() if k in comparable} != comparable:
        phantom.write_phantom(folder, progress=progress, **wanted)
    return folder


@dataclass
class CohortSource:
    """Where one cohort's cases come from, and how to read each (lazily: one case in memory)."""

    modality: str                   # "CT" or "MR"
    dataset: str                    # phantom, openkbp, pddca, dicom, nnunet, simulated_mr, ...
    items: list                     # case folders (or, for nnU-Net, preloaded Cases)
    root: Path | None = None
    origins: list | None = None     # simulated_mr: the CT folders the cases were simulated from
    simulated_from: str | None = None  # simulated_mr: the source CT dataset
    # "optional" for the MR cohort: its contours only test the method, and a user's MR usually
    # has none, so a patient without any contour is read as unannotated (a Case without
    # structures); the CT's contours are the method's labels: "required".
    contours: str = "required"

    @property
    def title(self) -> str:
        if self.simulated_from:
            return f"{self.modality} (simulated from {self.simulated_from} CT)"
        return f"{self.modality} ({self.dataset})"

    def source_folders(self) -> list[Path]:
        """The real patients' folders behind the cases (for simulated MR: the source CTs)."""
        items = self.origins if self.origins is not None else self.items
        return [Path(item) for item in items if not isinstance(item, Case)]

    def patient_ids(self) -> list[str]:
        if self.dataset == IMAGES:
            return [image_stem(Path(item)) for item in self.items]
        return [item.patient_id if isinstance(item, Case) else Path(item).name for item in self.items]

    def read(self, item) -> Case:
        from . import datasets

        if isinstance(item, Case):
            return item
        if self.dataset == IMAGES:
            return Case(image_stem(Path(item)), read_image(item), {}, Path(item))
        if self.dataset == "dicom":
            from .dicom import read_dicom_case

            return read_dicom_case(item, contours=self.contours)
        if self.dataset == SIMULATED_MR or datasets.COHORT_LAYOUTS.get(self.dataset) == "pddca":
            return datasets.read_pddca_case(item, contours=self.contours)
        return datasets.read_dataset_case(self.dataset, item)

    def observer2(self, item) -> Case | None:
        """The second observer's contours, where the layout has them (``structures_observer2/``)."""
        if isinstance(item, Case) or not (Path(item) / "structures_observer2").is_dir():
            return None
        from .datasets import read_pddca_case

        return read_pddca_case(item, structures_dir="structures_observer2")

    def headers(self):
        """Per case, an object with the header accessors (size, spacing, metadata): the file's
        header where there is an image file, else the image read from the case."""
        for item in self.items:
            image_file = None if isinstance(item, Case) else find_image(Path(item), "img")
            yield read_header(image_file) if image_file else self.read(item).image


SIMULATED_MR = "simulated_mr"
#: A folder of image files (NIfTI, NRRD, MHA), one per patient and without contours: MR only.
IMAGES = "images"



def _simulated_mr_folder(run, spec: dict, ct: CohortSource,
                         progress: bool = True) -> tuple[Path, list[Path]]:
    """The run's simulated MR cohort (``raw/simulated_mr``) and the CT folders it comes from.

    ``spec`` is ``data.mr``: ``source`` names the CT dataset (a dataset of data_manifest.yaml
    with a reader, e.g. ``openkbp``), and ``root`` / ``patients`` / ``split`` / ``observer``
    select its patients as for any cohort. The MR is (re)generated by
    :func:`crossmod_lib.simulation.write_simulated_cohort` when missing or made with other
    settings, source patients, seed or simulator version (recorded in ``simulation.json``).
    """
    import json

    from . import datasets, simulation

    data = run.profile["data"]
    source = spec.get("source")
    if spec.get("format", "nrrd") not in ("nrrd", "dicom"):
        raise CrossmodError(f"data.mr.format: {spec['format']!r} must be nrrd or dicom")
    if not source:
        raise CrossmodError("data.mr: dataset simulated_mr needs source: the CT dataset to "
                            "simulate the MR from (e.g. openkbp)")
    if source not in datasets.COHORT_LAYOUTS:
        raise CrossmodError(f"data.mr.source: {source!r} is not a CT dataset with a reader "
                            f"(known: {', '.join(datasets.COHORT_LAYOUTS)})")
    source_spec = {k: v for k, v in spec.items() if k not in ("dataset", "source", "format")}
    source_spec["dataset"] = source
    folders = datasets.cohort_cases(source_spec, root=data.get("root"))
    _check_disjoint({"CT": ct, "MR": CohortSource("MR", SIMULATED_MR, [], origins=folders)})
    options = dict(data["mr_simulation"])
    workers = options.pop("workers")
    settings = simulation.SimulationSettings.from_dict(options, "data.mr_simulation")
    record = {"patients": [str(Path(f).resolve()) for f in folders]}
    wanted = simulation.cohort_arguments(source, run.profile["seed"], settings, record)
    folder = run.raw_simulated_mr
    summary = folder / RawFiles.SIMULATION
    current = None
    if summary.is_file():
        try:
            current = json.loads(summary.read_text()).get("arguments")
        except (OSError, ValueError):
            current = None
    if current != wanted:
        simulation.write_simulated_cohort(folder, source, folders, seed=run.profile["seed"],
                                          settings=settings, workers=int(workers),
                                          progress=progress, record=record)
    if spec.get("format", "nrrd") == "dicom":
        folder = _simulated_dicom_folder(run, folder, wanted, progress)
    return folder, [Path(f) for f in folders]


def _simulated_dicom_folder(run, nrrd_folder: Path, arguments: dict, progress: bool) -> Path:
    """The simulated MR cohort written as DICOM (``raw/simulated_mr_dicom/<patient>/``: an MR
    series and an RTSTRUCT), so the run reads it through the dicom reader as a user's MR would be;
    rewritten when the simulation changes (its arguments are kept in ``export.json``)."""
    import json

    from tqdm.auto import tqdm

    from .dicom import write_case_dicom
    from .io import staged_folder

    folder = run.raw_simulated_mr_dicom
    stamp = folder / RawFiles.EXPORT
    try:
        current = json.loads(stamp.read_text()).get("arguments") if stamp.is_file() else None
    except (OSError, ValueError):
        current = None
    if current != arguments:
        cases = list_cases(nrrd_folder)
        with staged_folder(folder) as tmp:
            for item in tqdm(cases, desc="MR as DICOM", unit="patient", disable=not progress):
                write_case_dicom(read_case(item), tmp / Path(item).name)
            (tmp / RawFiles.EXPORT).write_text(json.dumps({"arguments": arguments}, indent=1))
    return folder


def _check_disjoint(sources: dict[str, CohortSource]) -> None:
    """Refuse CT and MR cohorts that share a patient (the paper's cohorts are different people)."""
    ct = {p.resolve(): p for p in sources["CT"].source_folders()}
    shared = sorted(ct[p].name for p in {p.resolve() for p in sources["MR"].source_folders()} & set(ct))
    if shared:
        shown = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise CrossmodError(f"data.ct and data.mr share {len(shared)} patient(s) ({shown}): the CT "
                            "and MR cohorts must be different patients; change data.mr.patients")


def cohort_sources(run, progress: bool = True) -> dict[str, CohortSource]:
    """The CT and MR cohorts a run's profile names (``data.ct`` / ``data.mr``).

    ``phantom`` is generated into the run folder; ``simulated_mr`` (MR only) is T2w MR simulated
    from the CTs of ``data.mr.source`` (:mod:`crossmod_lib.simulation`) into the run folder;
    ``dicom`` reads one folder per patient (image series + RTSTRUCT) under ``root``; ``nnunet``
    reads an nnU-Net raw dataset folder; any other name is a dataset of ``data_manifest.yaml``
    read by :mod:`crossmod_lib.datasets`. CT and MR cohorts sharing a patient are refused.
    """
    from . import datasets

    data = run.profile["data"]
    sources = {}
    contours = {"ct": "required", "mr": "optional"}
    for side, modality in (("ct", "CT"), ("mr", "MR")):
        spec = {k: v for k, v in data[side].items() if v is not None}
        dataset = spec.get("dataset")
        if dataset != SIMULATED_MR and spec.get("format"):
            raise CrossmodError(f"data.{side}.format is only read with dataset {SIMULATED_MR} "
                                f"(dataset here: {dataset!r}); set it to null")
        if dataset != SIMULATED_MR and spec.get("source"):
            raise CrossmodError(f"data.{side}.source is only read with dataset {SIMULATED_MR} "
                                f"(dataset here: {dataset!r}); set it to null")
        if dataset == "phantom":
            folder = _phantom_folder(run, progress) / side
            sources[modality] = CohortSource(modality, dataset, list_cases(folder), folder,
                                             contours=contours[side])
        elif dataset == SIMULATED_MR:
            if side != "mr":
                raise CrossmodError(f"data.{side}: dataset {SIMULATED_MR} makes MR; it can only "
                                    "be the MR cohort (data.mr)")
            folder, origins = _simulated_mr_folder(run, spec, sources["CT"], progress)
            if spec.get("format") == "dicom":  # read back as DICOM patients (the user's path)
                items = sorted(p for p in folder.iterdir() if p.is_dir())
                sources[modality] = CohortSource(modality, "dicom", items, folder, origins=origins,
                                                 simulated_from=spec["source"], contours=contours[side])
            else:
                sources[modality] = CohortSource(modality, dataset, list_cases(folder), folder,
                                                 origins=origins, simulated_from=spec["source"],
                                                 contours=contours[side])
        elif dataset in ("dicom", "nnunet", IMAGES):
            if not spec.get("root"):
                raise CrossmodError(f"data.{side}: dataset {dataset!r} needs root: the folder to read")
            if dataset == IMAGES and side != "mr":
                raise CrossmodError(f"data.{side}: dataset {IMAGES} (image files without contours) "
                                    "can only be the MR cohort: the CT's contours are the labels")
            root = Path(spec["root"]).expanduser()
            if dataset == "nnunet":
                items = datasets.read_nnunet_dataset(root, contours=contours[side])
            elif not root.is_dir():
                raise CrossmodError(f"{root}: folder of data.{side} not found")
            elif dataset == IMAGES:
                files = image_files(root)
                if not files:
                    raise CrossmodError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) "
                                        f"(data.{side}, dataset {IMAGES})")
                items = datasets.select_patients(spec.get("patients"),
                                                 {image_stem(p): p for p in files}, str(root))
            else:
                items = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
                if not items:
                    raise CrossmodError(f"{root}: no patient folders (data.{side}, dataset dicom)")
                # data.<side>.patients chooses among the patient folders, as for any cohort
                items = datasets.select_patients(spec.get("patients"), {p.name: p for p in items}, str(root))
            sources[modality] = CohortSource(modality, dataset, items, root, contours=contours[side])
        else:
            items = datasets.cohort_cases(spec, root=data.get("root"))
            sources[modality] = CohortSource(modality, dataset, items, items[0].parent if items else None,
                                             contours=contours[side])
    _check_disjoint(sources)
    return sources


def real_data_sources(run) -> dict:
    """Public real-data examples for chapter 1, where the data root holds them.

    ``openkbp``: a :class:`CohortSource` of the first ``data.openkbp_examples`` OpenKBP patients;
    ``deepmind``: the DeepMind two-observer dataset folder. A missing dataset (or data root, or
    ``data.real_examples: false``) gives None, so the book builds without them.
    """
    from . import datasets

    data = run.profile["data"]
    found = {"openkbp": None, "deepmind": None}
    if not data["real_examples"]:
        return found
    try:
        root = datasets.data_root(data["root"])
    except CrossmodError:
        return found
    if (root / "openkbp").is_dir():
        spec = {"dataset": "openkbp", "patients": {"first": int(data["openkbp_examples"])}}
        items = datasets.cohort_cases(spec, root=root)
        found["openkbp"] = CohortSource("CT", "openkbp", items, root / "openkbp")
    if (root / "deepmind-tcia-hn").is_dir():
        found["deepmind"] = root / "deepmind-tcia-hn"
    return found


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class PreparationResult:
    """What :func:`run` produced (also on disk: ``prepared/``, ``metrics/table_1.csv``, ...)."""

    cohorts: dict            # modality -> CohortSource
    table_1: pd.DataFrame    # imaging parameters per cohort
    coverage_mm: float       # the MR's median cranio-caudal coverage (cuts the CT's range)
    cases: dict              # modality -> per-case table (as prepare_cohort)
    interobserver: pd.DataFrame | None          # MR second observer, per patient and gland
    real: dict                                  # real_data_sources: openkbp / deepmind or None
    interobserver_deepmind: pd.DataFrame | None  # DeepMind oncologist vs radiographer


def run(run, progress: bool = False) -> PreparationResult:
    """Stage 1 (section 2.A) over a run folder: open the cohorts (generating the phantom or the
    simulated MR where the profile asks for them), measure Table I and the interobserver
    variability, prepare both cohorts' slices (MR first: its coverage cuts the CT's range).

    Writes ``prepared/`` (slices and case tables) and ``metrics/table_1.csv``,
    ``metrics/interobserver_mr.csv`` (where the MR has a second observer) and
    ``metrics/interobserver_deepmind.csv`` (where the data root holds the DeepMind set).
    """
    from . import evaluation

    cohorts = cohort_sources(run, progress=progress)
    table_1 = acquisition_table({f"T2w {cohorts['MR'].title}": cohorts["MR"],
                                 cohorts["CT"].title: cohorts["CT"]})
    table_1.to_csv(run.output("table_1"))
    inter = None
    if cohorts["MR"].items and cohorts["MR"].observer2(cohorts["MR"].items[0]) is not None:
        inter = evaluation.interobserver(cohorts["MR"].root)
        inter.to_csv(run.output("interobserver_mr"), index=False)
    else:
        run.interobserver_mr.unlink(missing_ok=True)  # a stale table from another cohort would be read
    prepared = prepare_run(run, cohorts, progress=progress)
    real = real_data_sources(run)
    deepmind = None
    if real.get("deepmind") is not None:
        deepmind = evaluation.interobserver_deepmind(real["deepmind"], progress=progress)
        deepmind.to_csv(run.output("interobserver_deepmind"), index=False)
    return PreparationResult(cohorts=cohorts, table_1=table_1, coverage_mm=prepared["coverage_mm"],
                             cases={"MR": prepared["MR"], "CT": prepared["CT"]}, interobserver=inter,
                             real=real, interobserver_deepmind=deepmind)

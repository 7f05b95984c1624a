"""Paper section 2.D: cleaning the synthetic MR before it trains the segmentation network.

Not every synthetic MR slice the CycleGAN makes shows the anatomy of its source CT (paper Fig. 6,
section 4.A: failures cluster at the superior and inferior boundary slices, and the synthetic head
is systematically narrower). Before the synthetic MR inherits the CT's parotid contours, each slice
goes through:

1. **Outline QC** (:func:`outline_dice`): the head outline of the synthetic MR
   (:func:`crossmod_lib.preparation.head_mask` at ``preprocessing.head_threshold``, the mask the
   CycleGAN's geometric loss uses) against the CT's head mask; a slice with a Dice below
   ``cleaning.outline_dice_threshold`` (paper: 80 %) is rejected.
2. **Refinement registration** (:func:`register_slice`): with elastix, in 2D, the synthetic MR
   (moving) onto its CT slice (fixed): rigid (Euler; beyond the paper, ``cleaning.rigid.transform:
   similarity`` adds one isotropic scale) followed by a deformable B-spline with a final
   control-point spacing of 8 mm (on coarser pixels than the paper's 1 mm, never finer than
   ``cleaning.bspline.min_grid_spacing_px`` pixels: :func:`grid_spacing_mm`), Mattes mutual
   information, and elastix's adaptive stochastic
   gradient descent (the paper says "gradient descent"; ASGD is elastix's standard gradient-descent
   optimiser, ``StandardGradientDescent`` can be chosen instead). The registered synthetic MR sits
   on the CT grid, so the CT labels are its labels. A registration that fails (error, NaN, a
   displacement beyond ``cleaning.max_displacement_mm``, a transform that folds more than
   ``cleaning.max_folded_fraction`` of the head, mutual information falling by more than
   ``cleaning.max_similarity_drop``) or whose outline Dice afterwards is below the threshold
   rejects the slice, with its reason; nothing is kept silently.
3. **Manual review** (:mod:`crossmod_lib.review`): decisions made by hand in ``cleaned/review.json``
   override the automatic ones.

:func:`clean` does all three and writes to the ``cleaned/`` folder (each file atomically, and all
of them only once everything has succeeded)::

    decisions.csv           one row per slice: QC, registration, manual and final decisions
    training_slices.npz     accepted slices: image (registered synthetic MR, uint8), labels and
                            head_mask (the CT's), patient, slice_index, z_mm, source_row, pixel_mm
    examples.npz            a few selected and rejected slices (CT, synthetic, registered) for Fig. 6
    elastix/rigid.txt       the elastix parameter maps used (``elastix -p rigid.txt -p bspline.txt``)
    elastix/bspline.txt
    summary.json            counts and timings
    registration_cache.npz  registered slices keyed by a digest of their inputs and the parameters,
                            so that re-running after a manual review only registers what is new

Registration runs in worker processes (``cleaning.workers``; 0: one per CPU core): elastix can
crash the process on degenerate input, and a crash or a time-out then rejects that slice only.

Columns of ``decisions.csv`` (:data:`DECISION_COLUMNS`):

- ``row`` (in ``ct_slices.npz`` and ``synthetic_mr.npz``), ``patient``, ``slice_index``, ``z_mm``;
  ``z_rel_mm``: z minus the patient's parotid centre (label-area-weighted mean z); ``position``:
  0 for the patient's most inferior slice to 1 for the most superior;
- ``outline_dice``: the outline QC before registration;
- ``registration_status``: ok, error, nan, diverged, folded, worse, not_run (rejected by the outline QC
  and not accepted by hand) or disabled (``cleaning.register: false``); ``registration_reason``:
  the registration's own verdict; ``registration_time_s`` / ``registration_cpu_s``: wall and CPU
  time; ``cached``: taken from an earlier run; ``nmi_before``/``nmi_after``: normalised mutual
  information with the CT; ``max_displacement_mm`` and ``folded_fraction`` (Jacobian
  determinant <= 0) over the head; ``rotation_deg``,
  ``translation_mm`` of the rigid stage; ``outline_dice_after``;
- ``accepted_auto`` and ``reason`` ("ok" or why not): the automatic decision;
- ``manual_decision`` (accept, reject or empty), ``manual_time``, ``decided_by`` (auto/manual);
- ``accepted_final``: used for training; ``image_source``: registered, or unregistered for a slice
  accepted by hand whose registration gave no usable image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import CrossmodError
from .metrics import dice
from .preparation import head_mask
from .slices import read_slices
from .runs import RunFolder

__all__ = [
    "DECISION_COLUMNS",
    "DROP_KINDS",
    "OPTIMIZERS",
    "bench_registration",
    "clean",
    "clean_run",
    "cleaning_settings",
    "compare_grid_spacing",
    "counts_by_patient",
    "counts_by_position",
    "drop_kind",
    "elastix_parameter_maps",
    "example_caption",
    "export_nnunet",
    "figure6_examples",
    "folded_fraction",
    "grid_spacing_mm",
    "load_decisions",
    "load_examples",
    "load_inputs",
    "mutual_information",
    "outline_dice",
    "outline_table",
    "pick_examples",
    "register_slice",
    "registered_images",
    "summarise_decisions",
    "synthetic_registration_case",
    "warp_image",
    "write_parameter_file",
]

OPTIMIZERS = ("AdaptiveStochasticGradientDescent", "StandardGradientDescent")
METRICS = ("AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation")
#: The first stage's transform (``cleaning.rigid.transform``) and elastix's name for it.
RIGID_TRANSFORMS = {"euler": "EulerTransform", "similarity": "SimilarityTransform"}

DECISION_COLUMNS = [
    "row", "patient", "slice_index", "z_mm", "z_rel_mm", "position", "outline_dice",
    "registration_status", "registration_reason", "registration_time_s", "registration_cpu_s",
    "cached", "nmi_before", "nmi_after", "max_displacement_mm", "folded_fraction", "rotation_deg",
    "translation_mm",
    "outline_dice_after", "accepted_auto", "reason", "manual_decision", "manual_time", "decided_by",
    "accepted_final", "drop_kind", "image_source",
]

# Registration statuses: what happened to the registration itself (the QC decision is separate).
STATUS_OK = "ok"
STATUS_ERROR = "error"          # elastix raised, crashed, timed out, or the input is degenerate
STATUS_NAN = "nan"              # the result holds NaN/inf
STATUS_DIVERGED = "diverged"    # displacement beyond cleaning.max_displacement_mm
STATUS_FOLDED = "folded"        # the transform folds more of the head than cleaning.max_folded_fraction
STATUS_WORSE = "worse"          # mutual information with the CT fell
STATUS_NOT_RUN = "not_run"      # rejected by the outline QC before registration
STATUS_DISABLED = "disabled"    # cleaning.register is false


# ----------------------------------------------------------------------------------------------
# Settings


def cleaning_settings(profile: dict) -> dict:
    """The flat settings of this stage from a profile (its ``cleaning`` and ``preprocessing`` blocks).

    A dict that already is such settings (has ``outline_dice_threshold`` at the top) is checked
    and returned as a copy. Problems are one-line :class:`CrossmodError` naming the setting.
    """
    if not isinstance(profile, dict):
        raise CrossmodError(f"cleaning settings: expected a profile dict, got {type(profile).__name__}")
    if "outline_dice_threshold" in profile:
        settings = {"rigid_transform": "euler", **profile}  # flat settings from before the option
    else:
        block = profile.get("cleaning")
        if not isinstance(block, dict):
            raise CrossmodError(f"profile '{profile.get('name', '?')}': no 'cleaning' block (setting cleaning.*)")
        block = _with_full_defaults(block)
        pre = profile.get("preprocessing", {})
        settings = {
            "outline_dice_threshold": block.get("outline_dice_threshold"),
            "register": block.get("register", True),
            "metric": block.get("metric"),
            "optimizer": block.get("optimizer"),
            "histogram_bins": block.get("histogram_bins"),
            "spatial_samples": block.get("spatial_samples"),
            "rigid_resolutions": block.get("rigid", {}).get("resolutions"),
            "rigid_iterations": block.get("rigid", {}).get("iterations"),
            "rigid_transform": block.get("rigid", {}).get("transform"),
            "bspline_grid_spacing_mm": block.get("bspline", {}).get("grid_spacing_mm"),
            "bspline_min_grid_spacing_px": block.get("bspline", {}).get("min_grid_spacing_px"),
            "bspline_resolutions": block.get("bspline", {}).get("resolutions"),
            "bspline_iterations": block.get("bspline", {}).get("iterations"),
            "max_displacement_mm": block.get("max_displacement_mm"),
            "max_similarity_drop": block.get("max_similarity_drop"),
            "max_folded_fraction": block.get("max_folded_fraction"),
            "timeout_s": block.get("timeout_s"),
            "workers": block.get("workers"),
            "examples": block.get("examples"),
            "pixel_mm": pre.get("pixel_mm"),
            "head_threshold": pre.get("head_threshold"),
        }
    _check_settings(settings)
    return settings


def _with_full_defaults(block: dict) -> dict:
    """The ``cleaning`` block with settings it lacks taken from ``profiles/full.yaml``.

    A run folder keeps the profile it started with (``profile.yaml``); a setting added since
    then takes its documented default instead of failing the stage.
    """
    from .defaults import section_defaults

    merged = section_defaults("cleaning")
    for key, value in block.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _check_settings(s: dict) -> None:
    def number(key, low=None, high=None, integer=False, low_open=False):
        value = s.get(key)
        name = _setting_name(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CrossmodError(f"setting {name}: expected a number, got {value!r}")
        if integer and int(value) != value:
            raise CrossmodError(f"setting {name}: expected a whole number, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise CrossmodError(f"setting {name}: must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and value > high:
            raise CrossmodError(f"setting {name}: must be <= {high}, got {value!r}")

    number("outline_dice_threshold", 0.0, 1.0)
    number("histogram_bins", 4, 256, integer=True)
    number("spatial_samples", 64, integer=True)
    for stage in ("rigid", "bspline"):
        number(f"{stage}_resolutions", 1, 8, integer=True)
        number(f"{stage}_iterations", 1, integer=True)
    number("bspline_grid_spacing_mm", 0.0, low_open=True)
    number("bspline_min_grid_spacing_px", 0.0)
    number("max_displacement_mm", 0.0, low_open=True)
    number("max_similarity_drop", 0.0)
    number("max_folded_fraction", 0.0, 1.0)
    number("timeout_s", 0.0, low_open=True)
    number("workers", 0, integer=True)
    number("examples", 0, integer=True)
    number("pixel_mm", 0.0, low_open=True)
    number("head_threshold", 0.0, 255.0)
    if not isinstance(s.get("register"), bool):
        raise CrossmodError(f"setting cleaning.register: expected true or false, got {s.get('register')!r}")
    if s.get("metric") not in METRICS:
        raise CrossmodError(f"setting cleaning.metric: expected one of {', '.join(METRICS)}, got {s.get('metric')!r}")
    if s.get("rigid_transform") not in RIGID_TRANSFORMS:
        raise CrossmodError(f"setting cleaning.rigid.transform: expected one of {', '.join(RIGID_TRANSFORMS)}, "
                            f"got {s.get('rigid_transform')!r}")
    if s.get("optimizer") not in OPTIMIZERS:
        raise CrossmodError(
            f"setting cleaning.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {s.get('optimizer')!r}"
        )


def _setting_name(key: str) -> str:
    if key in ("pixel_mm", "head_threshold"):
        return f"preprocessing.{key}"
    for stage in ("rigid", "bspline"):
        if key.startswith(stage + "_"):
            return f"cleaning.{stage}.{key[len(stage) + 1:]}"
    return f"cleaning.{key}"


def grid_spacing_mm(settings: dict) -> float:
    """The final B-spline control-point spacing used, in mm.

    ``cleaning.bspline.grid_spacing_mm`` (paper: 8 mm), but never finer than
    ``cleaning.bspline.min_grid_spacing_px`` pixels: the paper's 8 mm grid sits on 1 mm pixels,
    8 pixels per control-point interval. On coarser pixels the same 8 mm leaves too few pixels per
    control point (3.2 at 2.5 mm) and the mutual information then folds the image (chapter 3).
    """
    s = settings if "bspline_grid_spacing_mm" in settings else cleaning_settings(settings)
    return max(float(s["bspline_grid_spacing_mm"]),
               float(s.get("bspline_min_grid_spacing_px") or 0.0) * float(s["pixel_mm"]))


def _workers(settings: dict) -> int:
    n = int(settings["workers"])
    return max(1, os.cpu_count() or 1) if n == 0 else n


# ----------------------------------------------------------------------------------------------
# Outline QC


def outline_dice(synthetic, ct_head_mask, threshold: float = 20.0):
    """Dice of the synthetic MR's head outline and the CT's head mask.

    ``synthetic`` is a 0-255 slice [H, W] (or a stack [N, H, W]); its outline is
    :func:`~crossmod_lib.preparation.head_mask` at ``threshold``. Returns a float (or an array of
    floats for a stack). An empty outline against a non-empty CT mask gives 0.0.
    """
    synthetic = np.asarray(synthetic)
    ct_head_mask = np.asarray(ct_head_mask).astype(bool)
    if synthetic.shape != ct_head_mask.shape or synthetic.ndim not in (2, 3):
        raise CrossmodError(
            f"outline Dice: synthetic {synthetic.shape} and CT head mask {ct_head_mask.shape} must be "
            "the same [H, W] or [N, H, W]"
        )
    outline = head_mask(synthetic, threshold)
    if synthetic.ndim == 2:
        return float(dice(ct_head_mask, outline))
    return np.array([dice(c, o) for c, o in zip(ct_head_mask, outline)], dtype=float)


def mutual_information(a, b, bins: int = 32, normalised: bool = True) -> float:
    """Mutual information of two 0-255 images from their joint histogram (``bins`` per image).

    ``normalised``: Studholme's NMI ``(H(a) + H(b)) / H(a, b)``, in [1, 2]; else MI in nats.
    """
    a = np.clip(np.asarray(a, dtype=np.float64), 0, 255)
    b = np.clip(np.asarray(b, dtype=np.float64), 0, 255)
    ia = np.minimum((a * bins / 256.0).astype(np.int64), bins - 1).ravel()
    ib = np.minimum((b * bins / 256.0).astype(np.int64), bins - 1).ravel()
    joint = np.bincount(ia * bins + ib, minlength=bins * bins).astype(np.float64)
    joint /= joint.sum()
    pa = joint.reshape(bins, bins).sum(axis=1)
    pb = joint.reshape(bins, bins).sum(axis=0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    ha, hb, hab = entropy(pa), entropy(pb), entropy(joint)
    if normalised:
        return (ha + hb) / hab if hab > 0 else 2.0
    return ha + hb - hab


# ----------------------------------------------------------------------------------------------
# elastix parameter maps


def elastix_parameter_maps(settings: dict) -> dict[str, dict[str, list[str]]]:
    """The two elastix parameter maps (``rigid``, ``bspline``) of the refinement registration.

    Plain dicts of lists of strings, every parameter spelled out (no reliance on elastix defaults)
    so that the files written by :func:`write_parameter_file` reproduce the registration with the
    elastix command line: ``elastix -f ct.mha -m synthetic.mha -p rigid.txt -p bspline.txt``.
    """
    s = cleaning_settings(settings)
    common = {
        "FixedImageDimension": ["2"], "MovingImageDimension": ["2"],
        "FixedInternalImagePixelType": ["float"], "MovingInternalImagePixelType": ["float"],
        "UseDirectionCosines": ["true"],
        "Registration": ["MultiResolutionRegistration"],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
        "Interpolator": ["LinearInterpolator"],
        "Metric": [s["metric"]],
        "NumberOfHistogramBins": [str(int(s["histogram_bins"]))],
        "Optimizer": [s["optimizer"]],
        "ImageSampler": ["RandomCoordinate"],
        "NumberOfSpatialSamples": [str(int(s["spatial_samples"]))],
        "NewSamplesEveryIteration": ["true"],
        "CheckNumberOfSamples": ["true"],
        "MaximumNumberOfSamplingAttempts": ["8"],
        "HowToCombineTransforms": ["Compose"],
        "Resampler": ["DefaultResampler"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["3"],
        "DefaultPixelValue": ["0"],
        "ResultImagePixelType": ["float"],
        "ResultImageFormat": ["mha"],
        "WriteIterationInfo": ["false"],
    }
    if s["optimizer"] == "AdaptiveStochasticGradientDescent":
        common.update({
            "AutomaticParameterEstimation": ["true"],
            "ASGDParameterEstimationMethod": ["Original"],
            "NumberOfSamplesForExactGradient": ["4096"],
        })
    else:  # elastix's documented starting values for the gain sequence a / (A + k + 1)^alpha
        common.update({"SP_a": ["1000"], "SP_A": ["50"], "SP_alpha": ["0.602"]})
    rigid = dict(common)
    rigid.update({
        "Transform": [RIGID_TRANSFORMS[s["rigid_transform"]]],
        "AutomaticScalesEstimation": ["true"],
        "AutomaticTransformInitialization": ["true"],
        "AutomaticTransformInitializationMethod": ["GeometricalCenter"],
        "NumberOfResolutions": [str(int(s["rigid_resolutions"]))],
        "MaximumNumberOfIterations": [str(int(s["rigid_iterations"]))],
        "WriteResultImage": ["false"],
    })
    levels = int(s["bspline_resolutions"])
    spacing = grid_spacing_mm(s)
    bspline = dict(common)
    bspline.update({
        "Transform": ["BSplineTransform"],
        "BSplineTransformSplineOrder": ["3"],
        "FinalGridSpacingInPhysicalUnits": [_fmt(spacing), _fmt(spacing)],
        # the control-point grid is 2^k times coarser at level k (coarsest first), elastix's default
        "GridSpacingSchedule": [_fmt(2.0 ** (levels - 1 - k)) for k in range(levels)],
        "NumberOfResolutions": [str(levels)],
        "MaximumNumberOfIterations": [str(int(s["bspline_iterations"]))],
        "WriteResultImage": ["true"],
    })
    return {"rigid": rigid, "bspline": bspline}


def _fmt(value: float) -> str:
    return f"{float(value):.6g}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parameter_file_text(parameter_map: dict) -> str:
    """A parameter map in elastix's text format: ``(Key value ...)``, strings quoted."""
    lines = ["// elastix parameter file written by crossmod_lib.cleaning (paper section 2.D)"]
    for key in sorted(parameter_map):
        values = [v if _is_number(v) else f'"{v}"' for v in parameter_map[key]]
        lines.append(f"({key} {' '.join(values)})")
    return "\n".join(lines) + "\n"


def write_parameter_file(parameter_map: dict, path: str | os.PathLike) -> Path:
    """Write one parameter map as an elastix parameter file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(parameter_file_text(parameter_map))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# Registration of one slice

_ITK = None


def _itk():
    """itk with the elastix classes loaded (the first call takes several seconds: lazy loading)."""
    global _ITK
    if _ITK is None:
        try:
            import itk
        except ImportError:
            raise CrossmodError("itk-elastix is not installed (pip install itk-elastix); needed for cleaning") from None
        itk.ParameterObject.New()
        itk.ElastixRegistrationMethod[itk.Image[itk.F, 2], itk.Image[itk.F, 2]]
        _ITK = itk
    return _ITK


def _parameter_object(maps: dict):
    itk = _itk()
    po = itk.ParameterObject.New()
    for name in ("rigid", "bspline"):
        po.AddParameterMap({k: tuple(v) for k, v in maps[name].items()})
    return po


def _to_itk(array: np.ndarray, pixel_mm: float):
    image = _itk().image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(pixel_mm), float(pixel_mm)])
    return image


def _floats(parameter_map, key: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in parameter_map[key]], dtype=float)
    except (KeyError, ValueError):
        return np.array([], dtype=float)


def _rigid_parameters(transforms) -> tuple[float, float]:
    """(rotation in degrees, translation in mm) of the first stage: elastix's 2D Euler parameters
    are (angle, tx, ty), its 2D similarity's (scale, angle, tx, ty)."""
    p = _floats(transforms.GetParameterMap(0), "TransformParameters")
    if p.size == 4:
        p = p[1:]
    if p.size != 3:
        return math.nan, math.nan
    return math.degrees(p[0]), float(math.hypot(p[1], p[2]))


def folded_fraction(field: np.ndarray, pixel_mm: float, mask: np.ndarray) -> float:
    """Fraction of the ``mask`` pixels where the transform ``x -> x + u(x)`` folds.

    ``field``: the displacement ``u`` in mm, [H, W, 2] with the components in ITK order (x along
    the columns, y along the rows). Folding: the Jacobian determinant ``det(I + du/dx)`` is <= 0,
    so the map is not invertible there (tissue is turned inside out or pushed through itself);
    the derivatives are central differences on the pixel grid.
    """
    field = np.asarray(field, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if field.shape[:2] != mask.shape or field.shape[2:] != (2,):
        raise CrossmodError(f"folded_fraction: field {field.shape} does not match mask {mask.shape} (+ 2 components)")
    if not mask.any():
        return 0.0
    dux_dy, dux_dx = np.gradient(field[..., 0], float(pixel_mm))
    duy_dy, duy_dx = np.gradient(field[..., 1], float(pixel_mm))
    det = (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx
    return float(np.mean(det[mask] <= 0.0))


def _displacement(fixed_image, transform, mask: np.ndarray, pixel_mm: float) -> tuple[float, float]:
    """Largest displacement (mm) and folded fraction of the composed rigid + B-spline transform
    over the head pixels (:func:`folded_fraction`).

    The field comes from ITK's TransformToDisplacementFieldFilter on elastix's combination
    transform (identical to transformix's deformation field, which would also write a file).
    """
    itk = _itk()
    field_type = itk.Image[itk.Vector[itk.F, 2], 2]
    to_field = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New()
    to_field.SetTransform(transform)
    to_field.SetReferenceImage(fixed_image)
    to_field.SetUseReferenceImage(True)
    to_field.SetNumberOfWorkUnits(1)
    to_field.Update()
    field = np.asarray(itk.array_from_image(to_field.GetOutput()), dtype=np.float64)
    length = np.sqrt((field ** 2).sum(axis=-1))
    region = mask if mask.any() else np.ones(length.shape, dtype=bool)
    values = length[region]
    if not np.all(np.isfinite(values)):
        return math.nan, math.nan
    return float(values.max()), folded_fraction(field, pixel_mm, region)


def _elastix_run(fixed_image, moving_image, maps: dict):
    """Run elastix in memory (no files): (result array, transform parameter object, transform)."""
    itk = _itk()
    method = itk.ElastixRegistrationMethod[itk.Image[itk.F, 2], itk.Image[itk.F, 2]].New()
    method.SetFixedImage(fixed_image)
    method.SetMovingImage(moving_image)
    method.SetParameterObject(_parameter_object(maps))
    method.SetLogToConsole(False)
    method.SetLogToFile(False)
    method.SetNumberOfThreads(1)
    method.UpdateLargestPossibleRegion()
    result = np.asarray(itk.array_from_image(method.GetOutput()), dtype=np.float32).copy()
    return result, method.GetTransformParameterObject(), method.GetCombinationTransform()


def register_slice(fixed, moving, settings: dict, fixed_mask=None, maps: dict | None = None):
    """Register a synthetic MR slice (``moving``) onto its CT slice (``fixed``): rigid, then B-spline.

    ``fixed`` and ``moving`` are 0-255 arrays [H, W] on the same grid (``preprocessing.pixel_mm``);
    ``settings`` a profile or :func:`cleaning_settings`; ``fixed_mask`` the CT head mask (computed
    from ``fixed`` when not given). Returns ``(warped, info)``: the registered synthetic MR as
    uint8 on the CT grid (``None`` when the registration produced nothing usable) and a dict with
    ``status`` (ok, error, nan, diverged, folded, worse), ``accepted`` (status ok and outline Dice after
    registration at least the threshold), ``reason``, ``time_s`` (wall) and ``cpu_s`` (this
    process's CPU time), ``nmi_before``, ``nmi_after``
    (normalised mutual information with the CT), ``max_displacement_mm``, ``folded_fraction``
    (of the head pixels, :func:`folded_fraction`), ``rotation_deg``, ``translation_mm`` and
    ``outline_dice_after``. Never raises for a failed registration.

    The checks, in this order: displacement beyond ``max_displacement_mm`` (status diverged), more
    than ``max_folded_fraction`` of the head folded (folded), normalised mutual information with the
    CT falling by more than ``max_similarity_drop`` (worse); then, for status ok, the outline Dice
    after registration against ``outline_dice_threshold``.

    Runs single-threaded (parallelism is over slices). elastix can crash the process on degenerate
    input; constant images are refused before elastix sees them, and :func:`clean` runs each
    registration in a worker process so that a crash rejects that slice only.
    """
    s = cleaning_settings(settings)
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    if fixed.ndim != 2 or fixed.shape != moving.shape:
        raise CrossmodError(f"register_slice: fixed {fixed.shape} and moving {moving.shape} must be the same [H, W]")
    threshold = float(s["head_threshold"])
    mask = head_mask(fixed, threshold) if fixed_mask is None else np.asarray(fixed_mask, dtype=bool)
    info = {
        "status": STATUS_ERROR, "accepted": False, "reason": "", "time_s": 0.0, "cpu_s": 0.0,
        "nmi_before": mutual_information(fixed, moving), "nmi_after": math.nan,
        "max_displacement_mm": math.nan, "folded_fraction": math.nan, "rotation_deg": math.nan,
        "translation_mm": math.nan, "outline_dice_after": math.nan,
    }
    for name, image in (("moving (synthetic MR)", moving), ("fixed (CT)", fixed)):
        if not np.all(np.isfinite(image)):
            info.update(status=STATUS_NAN, reason=f"registration not run: {name} image holds NaN/inf")
            return None, info
        if float(image.max() - image.min()) < 1.0:
            info["reason"] = f"registration not run: {name} image is constant"
            return None, info
    maps = maps or elastix_parameter_maps(s)
    _itk()  # load before the clock starts
    start, cpu = time.perf_counter(), time.process_time()
    try:
        fixed_image = _to_itk(fixed, s["pixel_mm"])
        warped, transforms, transform = _elastix_run(fixed_image, _to_itk(moving, s["pixel_mm"]), maps)
        bound, folded = _displacement(fixed_image, transform, mask, s["pixel_mm"])
    except Exception as exc:  # noqa: BLE001 - elastix reports failures as various errors with a long log
        info["time_s"], info["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        message = " ".join(str(exc).split())
        info["reason"] = f"registration error: {message[-200:]}" if message else "registration error"
        return None, info
    info["time_s"], info["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    if warped.shape != fixed.shape or not np.all(np.isfinite(warped)):
        info.update(status=STATUS_NAN, reason="registration produced NaN/inf or no image")
        return None, info
    rotation, translation = _rigid_parameters(transforms)
    info.update(max_displacement_mm=bound, folded_fraction=folded, rotation_deg=rotation,
                translation_mm=translation)
    if not math.isfinite(bound):
        info.update(status=STATUS_NAN, reason="registration produced a NaN/inf displacement field")
        return None, info
    out = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    info["nmi_after"] = mutual_information(fixed, out)
    info["outline_dice_after"] = outline_dice(out, mask, threshold)
    limit = float(s["max_displacement_mm"])
    drop = float(s["max_similarity_drop"])
    fold_limit = float(s["max_folded_fraction"])
    if bound > limit:
        info.update(status=STATUS_DIVERGED,
                    reason=f"registration diverged (displacement up to {bound:.1f} mm > {limit:g} mm)")
    elif folded > fold_limit:
        info.update(status=STATUS_FOLDED, reason=(
            f"registration folded {folded:.1%} of the head (> {fold_limit:.1%}): not invertible"))
    elif info["nmi_after"] < info["nmi_before"] - drop:
        info.update(status=STATUS_WORSE, reason=(
            f"registration decreased similarity (NMI {info['nmi_before']:.3f} -> {info['nmi_after']:.3f})"))
    else:
        info["status"] = STATUS_OK
        threshold_dice = float(s["outline_dice_threshold"])
        if info["outline_dice_after"] < threshold_dice:
            info["reason"] = (f"outline Dice after registration {info['outline_dice_after']:.3f} "
                              f"< {threshold_dice:g}")
        else:
            info.update(accepted=True, reason="ok")
    return out, info


# ----------------------------------------------------------------------------------------------
# Parallel registration in worker processes


def _task_result(task):
    row, fixed, moving, mask, settings, maps = task
    warped, info = register_slice(fixed, moving, settings, fixed_mask=mask, maps=maps)
    return row, (warped, info)


def _task_error(task, exc) -> tuple:
    info = {"status": STATUS_ERROR, "accepted": False, "time_s": 0.0,
            "reason": f"registration error: {' '.join(str(exc).split())[-200:]}"}
    return task[0], (None, info)


def _lost_task(task, why: str) -> tuple:
    # transient: a crashed or timed-out worker says nothing about the slice; never cached
    return None, {"status": STATUS_ERROR, "accepted": False, "time_s": 0.0,
                  "reason": f"registration error: {why}", "transient": True}


def _single_threaded_itk() -> None:
    try:
        _itk().MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    except Exception:  # noqa: BLE001, S110 - a missing itk shows up as a per-slice error below
        pass


def register_many(tasks: list, workers: int, timeout_s: float, progress: bool = True,
                  desc: str = "register") -> dict:
    """Run ``(row, fixed, moving, mask, settings, maps)`` tasks in ``workers`` processes.

    Returns ``{row: (warped, info)}``. Each worker is fed one slice at a time
    (:func:`crossmod_lib.parallel.run_isolated`), so when a worker dies (elastix crash) or exceeds
    ``timeout_s`` on a slice, exactly that slice is rejected as an error and a fresh worker takes
    over the rest. The results do not depend on ``workers``.
    """
    from .parallel import run_isolated

    if not tasks:
        return {}
    _itk()  # load once here; forked workers inherit it
    return run_isolated(_task_result, tasks, workers, timeout_s, key=lambda task: task[0],
                        on_error=_task_error, on_lost=_lost_task, initializer=_single_threaded_itk,
                        progress=progress, desc=desc)


# ----------------------------------------------------------------------------------------------
# Inputs


def _load_npz(path: Path, what: str, required: tuple) -> dict:
    return read_slices(path, what, required)


def load_inputs(synthetic_path, ct_path) -> tuple[dict, dict]:
    """The synthetic MR and CT slices, checked to be row-aligned (same patient and slice per row)."""
    synthetic_path, ct_path = Path(synthetic_path), Path(ct_path)
    ct = _load_npz(ct_path, "CT slices", ("image", "labels", "head_mask", "patient", "slice_index", "z_mm"))
    syn = _load_npz(synthetic_path, "synthetic MR", ("image", "patient", "slice_index"))
    if syn["image"].shape != ct["image"].shape:
        raise CrossmodError(
            f"{synthetic_path}: synthetic MR image {syn['image'].shape} does not match the CT slices "
            f"{ct['image'].shape} of {ct_path} (row order and size must be the same)"
        )
    same = (syn["patient"].astype(str) == ct["patient"].astype(str)) & (
        syn["slice_index"].astype(np.int64) == ct["slice_index"].astype(np.int64))
    if not np.all(same):
        i = int(np.flatnonzero(~same)[0])
        raise CrossmodError(
            f"{synthetic_path}: rows do not match {ct_path} (row {i}: {syn['patient'][i]} slice "
            f"{int(syn['slice_index'][i])} vs {ct['patient'][i]} slice {int(ct['slice_index'][i])})"
        )
    keys = pd.Series([f"{p}/{int(k)}" for p, k in zip(ct["patient"], ct["slice_index"])])
    if keys.duplicated().any():
        dup = keys[keys.duplicated()].iloc[0]
        raise CrossmodError(f"{ct_path}: slice {dup} (patient/slice_index) appears twice")
    if syn["image"].dtype != np.uint8:
        image = np.asarray(syn["image"], dtype=np.float64)
        if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
            raise CrossmodError(f"{synthetic_path}: synthetic MR intensities must be 0-255")
        syn["image"] = np.rint(image).astype(np.uint8)
    return syn, ct


def _positions(ct: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: z relative to its patient's parotid centre (mm) and the position 0..1 (inferior..superior).

    The parotid centre is the label-area-weighted mean z of the patient's slices (their mid z when
    no slice holds label). ``z_mm`` increases towards the patient's head (LPS).
    """
    z = ct["z_mm"].astype(float)
    area = (ct["labels"] > 0).reshape(len(z), -1).sum(axis=1).astype(float)
    z_rel = np.zeros_like(z)
    position = np.zeros_like(z)
    patients = ct["patient"].astype(str)
    for patient in np.unique(patients):
        own = patients == patient
        zs = z[own]
        centre = float(np.average(zs, weights=area[own])) if area[own].sum() > 0 else float((zs.min() + zs.max()) / 2)
        z_rel[own] = zs - centre
        span = zs.max() - zs.min()
        position[own] = (zs - zs.min()) / span if span > 0 else 0.5
    return z_rel, position


# ----------------------------------------------------------------------------------------------
# The cleaning stage


def _digest(fixed, moving, mask, maps, settings) -> str:
    h = hashlib.blake2b(digest_size=16)
    for array in (fixed, moving, mask):
        array = np.ascontiguousarray(array)
        h.update(str(array.shape).encode() + str(array.dtype).encode())
        h.update(array.tobytes())
    relevant = {k: settings[k] for k in ("pixel_mm", "head_threshold", "outline_dice_threshold",
                                         "max_displacement_mm", "max_similarity_drop", "max_folded_fraction")}
    h.update(json.dumps([maps, relevant], sort_keys=True).encode())
    h.update(_elastix_version().encode())
    return h.hexdigest()


def _elastix_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("itk-elastix")
    except md.PackageNotFoundError:
        return "unknown"


def _read_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {d: (w if ok else None, json.loads(i))
                    for d, w, ok, i in zip(data["digest"], data["warped"], data["has_image"], data["info"])}
    except Exception:  # noqa: BLE001 - an unreadable cache is only a cache: recompute
        return {}


def _manual_decisions(decisions_override, out_dir: Path) -> dict:
    from .review_file import load_review, normalise_decisions

    if decisions_override is None:
        path = out_dir / RunFolder.review.in_folder
        return load_review(path) if path.is_file() else {}
    if decisions_override is False:
        return {}
    if isinstance(decisions_override, (str, os.PathLike)):
        return load_review(Path(decisions_override))
    return normalise_decisions(decisions_override)


def outline_table(syn: dict, ct: dict, settings: dict) -> pd.DataFrame:
    """The outline QC of every slice (before any registration): the first columns of decisions.csv.

    ``syn`` and ``ct`` as returned by :func:`load_inputs`. Columns: row, patient, slice_index,
    z_mm, z_rel_mm, position, outline_dice, accepted_auto (outline Dice >= threshold), reason.
    """
    s = cleaning_settings(settings)
    threshold = float(s["outline_dice_threshold"])
    n = len(ct["image"])
    qc = outline_dice(syn["image"], ct["head_mask"].astype(bool), s["head_threshold"]) if n else np.zeros(0)
    z_rel, position = _positions(ct) if n else (np.zeros(0), np.zeros(0))
    return pd.DataFrame({
        "row": np.arange(n, dtype=np.int64),
        "patient": ct["patient"].astype(str),
        "slice_index": ct["slice_index"].astype(np.int64),
        "z_mm": ct["z_mm"].astype(float),
        "z_rel_mm": z_rel,
        "position": position,
        "outline_dice": qc.astype(float),
        "accepted_auto": qc >= threshold,
        "reason": [("ok" if d >= threshold else f"outline Dice {d:.3f} < {threshold:g}") for d in qc],
    })


def registered_images(out_dir, syn: dict, ct: dict, settings: dict) -> dict[int, np.ndarray]:
    """Registered synthetic MR slices available from an earlier :func:`clean` (its cache), by row."""
    s = cleaning_settings(settings)
    cache = _read_cache(Path(out_dir) / RunFolder.registration_cache.in_folder)
    if not cache:
        return {}
    maps = elastix_parameter_maps(s)
    masks = ct["head_mask"].astype(bool)
    found = {}
    for i in range(len(ct["image"])):
        entry = cache.get(_digest(ct["image"][i], syn["image"][i], masks[i], maps, s))
        if entry is not None and entry[0] is not None:
            found[i] = entry[0]
    return found


class _Outputs:
    """Files written to temporary names first and moved into place together at the end."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.staged: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        final = self.out_dir / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        self.staged.append((tmp, final))
        return tmp

    def npz(self, name: str, **arrays) -> None:
        with open(self.path(name), "wb") as handle:
            np.savez_compressed(handle, **arrays)

    def text(self, name: str, text: str) -> None:
        self.path(name).write_text(text)

    def commit(self) -> None:
        for tmp, final in self.staged:
            tmp.replace(final)
        self.staged = []

    def discard(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []


def clean(synthetic_path, ct_path, out_dir, profile: dict, decisions_override=None,
          progress: bool = True, use_cache: bool = True) -> pd.DataFrame:
    """Section 2.D on explicit paths: outline QC, refinement registration, manual decisions.

    ``synthetic_path``: the synthetic MR slices (``image``, ``patient``, ``slice_index`` in the
    row order of ``ct_path``, the prepared CT slices with ``labels``, ``head_mask``, ``z_mm``).
    ``out_dir``: where the outputs go (see the module docstring). ``profile``: the run's profile
    (or :func:`cleaning_settings`). ``decisions_override``: manual decisions; ``None`` reads
    ``<out_dir>/review.json`` when it exists, ``False`` ignores it, a path reads that file, a
    mapping ``{(patient, slice_index) or "patient/slice_index": "accept" | "reject" | bool}`` is
    used as given. A manual decision overrides the automatic one.

    Every slice that passes the outline QC, or is accepted by hand, is registered. A slice accepted
    by hand whose registration produced no usable image is kept unregistered (``image_source``
    says so). Returns the decisions table (also written to ``decisions.csv``).
    """
    settings = cleaning_settings(profile)
    out_dir = Path(out_dir)
    syn, ct = load_inputs(synthetic_path, ct_path)
    manual = _manual_decisions(decisions_override, out_dir)
    threshold = float(settings["outline_dice_threshold"])
    n = len(ct["image"])
    patients = ct["patient"].astype(str)
    slices = ct["slice_index"].astype(np.int64)
    masks = ct["head_mask"].astype(bool)
    first = outline_table(syn, ct, settings)
    qc = first["outline_dice"].to_numpy(float)
    z_rel, position = first["z_rel_mm"].to_numpy(float), first["position"].to_numpy(float)
    manual_rows = [manual.get((patients[i], int(slices[i]))) for i in range(n)]
    manual_decision = [m["decision"] if m else "" for m in manual_rows]
    qc_pass = first["accepted_auto"].to_numpy(bool)

    registered: dict = {}
    maps = elastix_parameter_maps(settings)
    cache_path = out_dir / RunFolder.registration_cache.in_folder
    cache = _read_cache(cache_path) if (use_cache and settings["register"]) else {}
    new_cache: dict = {}
    if settings["register"]:
        todo = [i for i in range(n) if qc_pass[i] or manual_decision[i] == "accept"]
        tasks = []
        for i in todo:
            key = _digest(ct["image"][i], syn["image"][i], masks[i], maps, settings)
            if key in cache:
                registered[i] = cache[key] + (True,)
                new_cache[key] = cache[key]
            else:
                tasks.append(((i, key), ct["image"][i], syn["image"][i], masks[i], settings, maps))
        done = register_many(tasks, _workers(settings), float(settings["timeout_s"]), progress=progress,
                             desc="register synthetic MR")
        for (i, key), (warped, info) in done.items():
            registered[i] = (warped, info, False)
            if not info.get("transient"):
                new_cache[key] = (warped, info)

    records = []
    final_images = []
    stamp_rows = []
    for i in range(n):
        rec = {
            "row": i, "patient": patients[i], "slice_index": int(slices[i]),
            "z_mm": float(ct["z_mm"][i]), "z_rel_mm": float(z_rel[i]), "position": float(position[i]),
            "outline_dice": float(qc[i]), "registration_status": "", "registration_reason": "",
            "registration_time_s": math.nan,
            "registration_cpu_s": math.nan, "cached": False, "nmi_before": math.nan, "nmi_after": math.nan,
            "max_displacement_mm": math.nan, "folded_fraction": math.nan, "rotation_deg": math.nan,
            "translation_mm": math.nan, "outline_dice_after": math.nan,
        }
        warped = None
        if i in registered:
            warped, info, cached = registered[i]
            rec.update(
                registration_status=info["status"], registration_reason=info.get("reason", ""),
                registration_time_s=float(info.get("time_s", math.nan)),
                registration_cpu_s=float(info.get("cpu_s", math.nan)),
                cached=bool(cached), nmi_before=info.get("nmi_before", math.nan),
                nmi_after=info.get("nmi_after", math.nan),
                max_displacement_mm=info.get("max_displacement_mm", math.nan),
                folded_fraction=info.get("folded_fraction", math.nan),
                rotation_deg=info.get("rotation_deg", math.nan),
                translation_mm=info.get("translation_mm", math.nan),
                outline_dice_after=info.get("outline_dice_after", math.nan),
            )
        if not qc_pass[i]:
            auto, reason, auto_kind = False, f"outline Dice {qc[i]:.3f} < {threshold:g}", "outline"
            if not rec["registration_status"]:
                rec["registration_status"] = STATUS_NOT_RUN if settings["register"] else STATUS_DISABLED
        elif not settings["register"]:
            auto, reason, auto_kind = True, "ok", ""
            rec["registration_status"] = STATUS_DISABLED
        else:
            info = registered[i][1]
            auto, reason = bool(info["accepted"]), info["reason"]
            # a registration that ran but failed its outline check after is "outline after"
            auto_kind = "" if auto else (info["status"] if info["status"] != STATUS_OK else "outline after")
        usable = warped is not None and rec["registration_status"] == STATUS_OK
        decision = manual_decision[i]
        final = auto if not decision else decision == "accept"
        rec.update(
            accepted_auto=auto, reason=reason, manual_decision=decision,
            manual_time=(manual_rows[i] or {}).get("time", ""),
            decided_by="manual" if decision else "auto", accepted_final=final,
            drop_kind="" if final else ("by hand" if decision == "reject" else auto_kind),
            image_source=("registered" if usable else "unregistered") if final else "",
        )
        records.append(rec)
        if final:
            final_images.append(warped if usable else syn["image"][i])
            stamp_rows.append(i)

    table = pd.DataFrame.from_records(records, columns=DECISION_COLUMNS)
    keep = np.array(stamp_rows, dtype=np.int64)
    h, w = ct["image"].shape[1:] if n else (0, 0)
    training = {
        "image": np.stack(final_images).astype(np.uint8) if final_images else np.zeros((0, h, w), np.uint8),
        "labels": ct["labels"][keep].astype(np.uint8),
        "head_mask": masks[keep],
        "patient": patients[keep],
        "slice_index": slices[keep],
        "z_mm": ct["z_mm"][keep],
        "source_row": keep,
        "pixel_mm": np.float64(settings["pixel_mm"]),
    }
    selected, rejected = pick_examples(table, int(settings["examples"]))
    examples = _example_arrays(table, selected + rejected, ct, syn, registered)
    summary = summarise_decisions(table)
    summary.update({
        "settings": {k: v for k, v in settings.items()},
        "bspline_grid_spacing_used_mm": grid_spacing_mm(settings),
        "elastix": _elastix_version(),
        "manual_decisions_unmatched": len(set(manual) - set(zip(patients, slices.tolist()))),
        "registration_time_s_median": _median(table["registration_time_s"][~table["cached"].astype(bool)]),
    })

    outputs = _Outputs(out_dir)
    try:
        outputs.text(RunFolder.decisions.in_folder, table.to_csv(index=False, float_format="%.6g"))
        outputs.npz(RunFolder.training_slices.in_folder, **training)
        outputs.npz(RunFolder.cleaning_examples.in_folder, **examples)
        outputs.text(RunFolder.cleaning_summary.in_folder, json.dumps(summary, indent=2, default=_json_default))
        if settings["register"]:
            outputs.text(RunFolder.elastix_rigid.in_folder, parameter_file_text(maps["rigid"]))
            outputs.text(RunFolder.elastix_bspline.in_folder, parameter_file_text(maps["bspline"]))
            if use_cache:
                _stage_cache(outputs, new_cache, (h, w))
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    if not settings["register"]:
        for name in (RunFolder.elastix_rigid.in_folder, RunFolder.elastix_bspline.in_folder):
            (out_dir / name).unlink(missing_ok=True)
    return table


def _median(values) -> float:
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return float(values.median()) if len(values) else math.nan


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _stage_cache(outputs: _Outputs, cache: dict, shape) -> None:
    keys = sorted(cache)
    warped = np.zeros((len(keys),) + tuple(shape), np.uint8)
    has = np.zeros(len(keys), bool)
    infos = []
    for j, key in enumerate(keys):
        image, info = cache[key]
        if image is not None and image.shape == tuple(shape):
            warped[j], has[j] = image, True
        infos.append(json.dumps(info, default=_json_default))
    outputs.npz(RunFolder.registration_cache.in_folder, digest=np.array(keys, dtype=str), warped=warped,
                has_image=has, info=np.array(infos, dtype=str))


def _run_paths(run):
    synthetic, ct = run.inputs("synthetic_mr", "ct_slices")
    return synthetic, ct, run.stage("cleaned")


def clean_run(run, decisions_override=None, progress: bool = True) -> pd.DataFrame:
    """:func:`clean` on a :class:`~crossmod_lib.runs.RunFolder`: ``synthetic/`` + ``prepared/`` -> ``cleaned/``."""
    synthetic, ct, out = _run_paths(run)
    return clean(synthetic, ct, out, run.profile, decisions_override=decisions_override, progress=progress)


def run(run, progress: bool = False) -> pd.DataFrame:
    """Stage 3 (section 2.D) over a run folder: :func:`clean_run` with the reviewer's decisions
    (``cleaned/review.json``) where there are any. Returns the decisions table."""
    return clean_run(run, progress=progress)


def _cleaned_dir(run_or_dir) -> Path:
    if isinstance(run_or_dir, RunFolder):
        return run_or_dir.inputs("decisions").parent
    path = Path(run_or_dir)
    return path.parent if path.is_file() else path


def load_decisions(run_or_dir) -> pd.DataFrame:
    """The decisions table of a run (or of a ``cleaned/`` folder, or of a decisions.csv file)."""
    path = Path(run_or_dir) if not isinstance(run_or_dir, RunFolder) else None
    csv = path if (path is not None and path.suffix == ".csv") else _cleaned_dir(run_or_dir) / RunFolder.decisions.in_folder
    if not csv.is_file():
        raise CrossmodError(f"{csv}: decisions table not found (run the cleaning step first)")
    try:
        table = pd.read_csv(csv, keep_default_na=False, na_values=[""], dtype={"patient": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CrossmodError(f"{csv}: cannot read the decisions table ({exc})") from None
    missing = [c for c in ("row", "patient", "slice_index", "outline_dice", "accepted_auto", "accepted_final")
               if c not in table.columns]
    if missing:
        raise CrossmodError(f"{csv}: decisions table lacks column(s) {', '.join(missing)}")
    for column in ("manual_decision", "manual_time", "reason", "image_source", "registration_status",
                   "registration_reason", "decided_by"):
        if column in table.columns:
            values = table[column].astype(object)
            table[column] = values.where(values.notna(), "").astype(str)
    for column in ("accepted_auto", "accepted_final", "cached"):
        if column in table.columns:
            table[column] = table[column].astype(str).str.lower().isin(["true", "1"])
    return table


def compare_grid_spacing(run_or_paths, rows, spacings_mm=None) -> pd.DataFrame:
    """Register the given slices again with other final B-spline grid spacings: how each behaves.

    ``run_or_paths``: a :class:`~crossmod_lib.runs.RunFolder` (its ``synthetic/`` and ``prepared/``
    slices and profile) or ``(synthetic_path, ct_path, profile)``. ``rows``: slice rows.
    ``spacings_mm``: final spacings to try (default: the paper's 8 mm and this profile's
    :func:`grid_spacing_mm`). Runs in this process, one slice after the other. One row per slice and
    spacing: row, patient, grid_spacing_mm, grid_spacing_px, status, max_displacement_mm,
    folded_fraction, nmi_before, nmi_after, outline_dice, outline_dice_after, cpu_s.
    """
    if isinstance(run_or_paths, RunFolder):
        synthetic_path, ct_path, _ = _run_paths(run_or_paths)
        profile = run_or_paths.profile
    else:
        synthetic_path, ct_path, profile = run_or_paths
    settings = cleaning_settings(profile)
    syn, ct = load_inputs(synthetic_path, ct_path)
    n = len(ct["image"])
    rows = [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
        raise CrossmodError(f"{ct_path}: no slice row {bad[0]} (it has {n})")
    if spacings_mm is None:
        spacings_mm = sorted({float(settings["bspline_grid_spacing_mm"]), grid_spacing_mm(settings)})
    records = []
    for spacing in spacings_mm:
        trial = dict(settings, bspline_grid_spacing_mm=float(spacing), bspline_min_grid_spacing_px=0.0)
        maps = elastix_parameter_maps(trial)
        for r in rows:
            mask = ct["head_mask"][r].astype(bool)
            _, info = register_slice(ct["image"][r], syn["image"][r], trial, fixed_mask=mask, maps=maps)
            records.append({
                "row": r, "patient": str(ct["patient"][r]), "grid_spacing_mm": float(spacing),
                "grid_spacing_px": float(spacing) / float(settings["pixel_mm"]), "status": info["status"],
                "max_displacement_mm": info["max_displacement_mm"], "folded_fraction": info["folded_fraction"],
                "nmi_before": info["nmi_before"], "nmi_after": info["nmi_after"],
                "outline_dice": float(outline_dice(syn["image"][r], mask, settings["head_threshold"])),
                "outline_dice_after": info["outline_dice_after"], "cpu_s": info["cpu_s"],
            })
    return pd.DataFrame.from_records(records)


# ----------------------------------------------------------------------------------------------
# Summaries and Fig. 6


def summarise_decisions(table: pd.DataFrame) -> dict:
    """Counts of the decisions table: automatic vs manual, kept vs dropped, rejection causes."""
    auto = table["accepted_auto"].astype(bool)
    final = table["accepted_final"].astype(bool)
    manual = table["manual_decision"].fillna("").astype(str)
    status = table["registration_status"].fillna("").astype(str)
    reason = table["reason"].fillna("").astype(str)
    rejected_auto = ~auto
    return {
        "slices": len(table),
        "accepted_auto": int(auto.sum()),
        "rejected_auto": int(rejected_auto.sum()),
        "rejected_outline": int((rejected_auto & reason.str.startswith("outline Dice ")).sum()),
        "rejected_registration": int((rejected_auto & status.isin(
            [STATUS_ERROR, STATUS_NAN, STATUS_DIVERGED, STATUS_FOLDED, STATUS_WORSE])).sum()),
        "rejected_outline_after": int((rejected_auto & reason.str.startswith("outline Dice after")).sum()),
        "manual_accept": int((manual == "accept").sum()),
        "manual_reject": int((manual == "reject").sum()),
        "overridden": int(((manual != "") & ((manual == "accept") != auto)).sum()),
        "accepted_final": int(final.sum()),
        "rejected_final": int((~final).sum()),
        "kept_unregistered": int((final & (table["image_source"].fillna("") == "unregistered")).sum()),
    }


def counts_by_patient(table: pd.DataFrame) -> pd.DataFrame:
    """Kept and dropped slices per patient (final decisions), with the automatic and manual counts."""
    t = table.assign(
        kept=table["accepted_final"].astype(bool), auto=table["accepted_auto"].astype(bool),
        manual=table["manual_decision"].fillna("").astype(str) != "",
    )
    out = t.groupby("patient", sort=True).agg(
        slices=("kept", "size"), kept=("kept", "sum"), accepted_auto=("auto", "sum"),
        manual=("manual", "sum"), median_outline_dice=("outline_dice", "median"),
    )
    out["dropped"] = out["slices"] - out["kept"]
    out["kept_fraction"] = out["kept"] / out["slices"]
    return out[["slices", "kept", "dropped", "kept_fraction", "accepted_auto", "manual", "median_outline_dice"]]


# Why a slice was dropped, in one word: the order is that of the checks.
DROP_KINDS = ("outline", "error", "nan", "diverged", "folded", "worse", "outline after", "by hand")


def drop_kind(table: pd.DataFrame) -> pd.Series:
    """Why each slice of a decisions table was dropped (:data:`DROP_KINDS`); "" for kept slices.

    "outline": the outline QC before registration; "error", "nan", "diverged", "folded", "worse":
    the registration's status; "outline after": the outline Dice after registration; "by hand": a
    manual rejection (whatever the automatic decision was).
    """
    if "drop_kind" in table:  # written by clean() as it decided
        return table["drop_kind"].fillna("").astype(str).rename("drop_kind")
    # a decisions table from before the column existed: derive it from the other columns
    final = table["accepted_final"].astype(bool).to_numpy()
    manual = table["manual_decision"].fillna("").astype(str).to_numpy() if "manual_decision" in table else None
    status = table["registration_status"].fillna("").astype(str).to_numpy()
    reason = table["reason"].fillna("").astype(str).to_numpy()
    kinds = []
    for i in range(len(table)):
        if final[i]:
            kinds.append("")
        elif manual is not None and manual[i] == "reject":
            kinds.append("by hand")
        elif reason[i].startswith("outline Dice after"):
            kinds.append("outline after")
        elif reason[i].startswith("outline Dice"):
            kinds.append("outline")
        elif status[i] in DROP_KINDS:
            kinds.append(status[i])
        else:  # not reached by clean(); a table edited by hand
            kinds.append("error")
    return pd.Series(kinds, index=table.index, name="drop_kind", dtype=object)


def _position_labels(edges: np.ndarray, by: str) -> list[str]:
    labels = []
    for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
        if by == "position":
            text = f"{lo:.0%}–{hi:.0%}"
            if k == 0:
                text += " (inferior end)"
            elif k == len(edges) - 2:
                text += " (superior end)"
        else:
            text = f"{lo:+.0f} to {hi:+.0f} mm"
        labels.append(text)
    return labels


def counts_by_position(table: pd.DataFrame, by: str = "position", bins=5) -> pd.DataFrame:
    """Kept and dropped slices by cranio-caudal position (the paper saw failures at the ends).

    ``by="position"``: each slice's place within its own patient's slice range, 0 % (the most
    inferior slice) to 100 % (the most superior), in ``bins`` equal bins, so that patients of
    different length line up; ``by="z_rel_mm"``: z relative to the patient's parotid centre in mm,
    ``bins`` a number of equal-width bins or a sequence of edges. Rows are labelled "0%–20%
    (inferior end)" ... or "-20 to +0 mm"; the columns give the slices, kept, dropped, the kept
    fraction, the dropped ones by :func:`drop_kind` (outline QC / registration checks / by hand),
    the automatic acceptances and the median outline Dice.
    """
    if by not in ("position", "z_rel_mm"):
        raise CrossmodError(f"counts_by_position: by={by!r}, expected 'position' or 'z_rel_mm'")
    values = table[by].astype(float)
    if np.ndim(bins) == 0:
        if int(bins) < 1:
            raise CrossmodError(f"counts_by_position: bins={bins!r}, expected at least 1")
        lo, hi = (0.0, 1.0) if by == "position" else (float(values.min()), float(values.max()))
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=float)
        if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
            raise CrossmodError(f"counts_by_position: bin edges {list(bins)!r} must increase")
    labels = _position_labels(edges, by)
    category = pd.cut(values, edges, include_lowest=True, labels=labels)
    kind = drop_kind(table)
    registration = ("error", "nan", "diverged", "folded", "worse", "outline after")
    t = table.assign(bin=category, kept=table["accepted_final"].astype(bool),
                     auto=table["accepted_auto"].astype(bool), by_outline=kind == "outline",
                     by_registration=kind.isin(registration), by_hand=kind == "by hand")
    out = t.groupby("bin", observed=False).agg(
        slices=("kept", "size"), kept=("kept", "sum"), dropped_outline=("by_outline", "sum"),
        dropped_registration=("by_registration", "sum"), dropped_by_hand=("by_hand", "sum"),
        accepted_auto=("auto", "sum"), median_outline_dice=("outline_dice", "median"),
    )
    out["dropped"] = out["slices"] - out["kept"]
    out["kept_fraction"] = out["kept"] / out["slices"].where(out["slices"] > 0)
    out.index = pd.Index([str(label) for label in out.index],
                         name="position in the patient's slice range" if by == "position" else "z - parotid centre")
    return out[["slices", "kept", "dropped", "kept_fraction", "dropped_outline", "dropped_registration",
                "dropped_by_hand", "accepted_auto", "median_outline_dice"]]


def _spread_pick(group: pd.DataFrame, n: int, chosen: list, seen: set) -> None:
    """Add up to ``n`` rows of ``group`` (sorted by outline Dice) at evenly spaced ranks to
    ``chosen``, at each rank the nearest slice of a patient not in ``seen`` (else any new slice)."""
    order = [r for r in group.itertuples(index=False) if int(r.row) not in chosen]
    if n <= 0 or not order:
        return
    ranks = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
    for r in ranks:
        hit = None
        for offset in range(len(order)):
            for j in (r + offset, r - offset):
                if 0 <= j < len(order) and int(order[j].row) not in chosen and order[j].patient not in seen:
                    hit = j
                    break
            if hit is not None:
                break
        if hit is None:
            hit = next((j for j in range(len(order)) if int(order[j].row) not in chosen), None)
        if hit is not None:
            chosen.append(int(order[hit].row))
            seen.add(order[hit].patient)


def pick_examples(table: pd.DataFrame, n: int = 3) -> tuple[list[int], list[int]]:
    """Rows of ``n`` selected (kept) and rejected example slices, as in Fig. 6.

    Selected: sorted by outline Dice and sampled at evenly spaced ranks (so they span the range),
    preferring different patients. Rejected: first one slice of every :func:`drop_kind` present
    (the slice of median outline Dice of that kind), so each reason is shown even when there are
    more kinds than ``n``; then evenly spaced ranks up to ``n``. Rejected rows are ordered by kind
    (:data:`DROP_KINDS`) then Dice, selected ones by Dice. Deterministic.
    """
    final = table["accepted_final"].astype(bool).to_numpy()
    by_dice = ["outline_dice", "row"]
    dice_of = dict(zip(table["row"].astype(int), table["outline_dice"].astype(float)))
    selected: list[int] = []
    if n > 0:
        _spread_pick(table[final].sort_values(by_dice, kind="mergesort"), n, selected, set())
    selected.sort(key=lambda row: (dice_of[row], row))

    rejected: list[int] = []
    dropped = table[~final].assign(drop_kind=drop_kind(table)[~final])
    if n > 0 and len(dropped):
        seen: set = set()
        present = [k for k in DROP_KINDS if (dropped["drop_kind"] == k).any()]
        present.sort(key=lambda k: -int((dropped["drop_kind"] == k).sum()))  # the commonest first
        for kind in present:
            group = dropped[dropped["drop_kind"] == kind].sort_values(by_dice, kind="mergesort")
            middle = group.iloc[[len(group) // 2]]
            _spread_pick(middle, 1, rejected, seen)
        _spread_pick(dropped.sort_values(by_dice, kind="mergesort"), n - len(rejected), rejected, seen)
        kind_of = dict(zip(dropped["row"].astype(int), dropped["drop_kind"]))
        rejected.sort(key=lambda row: (DROP_KINDS.index(kind_of[row]), dice_of[row], row))
    return selected, rejected


def _example_arrays(table, rows, ct, syn, registered) -> dict:
    rows = np.array(rows, dtype=np.int64)
    h, w = ct["image"].shape[1:] if len(ct["image"]) else (0, 0)
    reg = np.zeros((len(rows), h, w), np.uint8)
    has = np.zeros(len(rows), bool)
    for j, i in enumerate(rows):
        entry = registered.get(int(i))
        if entry is not None and entry[0] is not None:
            reg[j], has[j] = entry[0], True
    t = table.set_index("row").loc[rows] if len(rows) else table.iloc[:0]
    kinds = drop_kind(table).set_axis(table["row"].to_numpy()).reindex(rows) if len(rows) else []
    return {
        "row": rows, "patient": ct["patient"][rows].astype(str), "slice_index": ct["slice_index"][rows],
        "z_mm": ct["z_mm"][rows], "ct": ct["image"][rows], "labels": ct["labels"][rows],
        "head_mask": ct["head_mask"][rows].astype(bool), "synthetic": syn["image"][rows],
        "registered": reg, "has_registered": has,
        "position": t["position"].to_numpy(float),
        "outline_dice": t["outline_dice"].to_numpy(float),
        "outline_dice_after": t["outline_dice_after"].to_numpy(float),
        "max_displacement_mm": t["max_displacement_mm"].to_numpy(float),
        "folded_fraction": t["folded_fraction"].to_numpy(float),
        "accepted_final": t["accepted_final"].to_numpy(bool),
        "reason": np.array([str(r) for r in t["reason"]], dtype=str),
        "drop_kind": np.array([str(k) for k in kinds], dtype=str),
        "decided_by": np.array([str(d) for d in t["decided_by"]], dtype=str),
    }


def load_examples(run_or_dir) -> dict:
    """The example slices kept by :func:`clean` (``cleaned/examples.npz``) as arrays."""
    path = _cleaned_dir(run_or_dir) / RunFolder.cleaning_examples.in_folder
    return _load_npz(path, "cleaning examples", ("ct", "synthetic", "row"))


def figure6_examples(run_or_dir, n: int | None = None) -> dict[str, list[dict]]:
    """Fig. 6 data: ``{"selected": [...], "rejected": [...]}`` example pairs for plotting.

    Each item: ``ct``, ``synthetic`` (unregistered), ``registered`` (or None), ``labels``,
    ``head_mask``, ``dice`` (outline Dice before registration), ``dice_after``, ``patient``,
    ``slice_index``, ``z_mm``, ``position`` (0 inferior to 1 superior in its patient), ``reason``,
    ``kind`` (:func:`drop_kind`, "" when kept), ``decided_by``, ``max_displacement_mm``,
    ``folded_fraction`` and ``caption`` (:func:`example_caption`). ``n`` limits each group
    (default: all kept).
    """
    ex = load_examples(run_or_dir)
    count = len(ex["row"])

    def column(key, default):
        return ex[key] if key in ex else np.full(count, default)

    out = {"selected": [], "rejected": []}
    for j in range(count):
        item = {
            "row": int(ex["row"][j]), "patient": str(ex["patient"][j]),
            "slice_index": int(ex["slice_index"][j]), "z_mm": float(ex["z_mm"][j]),
            "position": float(column("position", math.nan)[j]),
            "ct": ex["ct"][j], "synthetic": ex["synthetic"][j],
            "registered": ex["registered"][j] if ex["has_registered"][j] else None,
            "labels": ex["labels"][j], "head_mask": ex["head_mask"][j],
            "dice": float(ex["outline_dice"][j]), "dice_after": float(ex["outline_dice_after"][j]),
            "max_displacement_mm": float(column("max_displacement_mm", math.nan)[j]),
            "folded_fraction": float(column("folded_fraction", math.nan)[j]),
            "reason": str(ex["reason"][j]), "kind": str(column("drop_kind", "")[j]),
            "decided_by": str(column("decided_by", "auto")[j]),
            "accepted": bool(ex["accepted_final"][j]),
        }
        item["caption"] = example_caption(item)
        out["selected" if item["accepted"] else "rejected"].append(item)
    if n is not None:
        out = {k: v[:n] for k, v in out.items()}
    return out


def example_caption(item: dict, width: int = 30) -> str:
    """A Fig. 6 panel title: kept or why rejected, and the outline Dice before -> after registration.

    ``item``: one of :func:`figure6_examples`. The reason is the decisions table's own, without its
    "registration " prefix, wrapped to ``width`` characters.
    """
    import textwrap

    dice = f"outline Dice {item['dice']:.3f}"
    if math.isfinite(item.get("dice_after", math.nan)):
        dice += f" → {item['dice_after']:.3f}"
    where = f"{item['patient']} · {item['position']:.0%} up" if math.isfinite(item.get("position", math.nan)) \
        else item["patient"]
    if item.get("accepted", not item.get("kind")):
        head = "kept" + (" (by hand)" if item.get("decided_by") == "manual" else "")
        return f"{head}\n{where}\n{dice}"
    reason = item.get("reason", "") or ""
    reason = reason.removeprefix("registration ")
    if item.get("kind") == "by hand":
        text = "rejected by hand" + (f" (auto: {reason})" if reason and reason != "ok" else "")
    else:
        text = f"rejected: {reason}" if reason else "rejected"
    lines = textwrap.wrap(text, width)
    if item.get("kind") == "outline":  # the reason is the outline Dice; no registration ran
        return "\n".join(lines + [where])
    return "\n".join(lines + [where, dice])


# ----------------------------------------------------------------------------------------------
# Export


def export_nnunet(run_or_paths, dest, dataset_name: str = "Dataset501_CrossmodSyntheticMR") -> Path:
    """The cleaned, registered synthetic MR with CT labels as an nnU-Net v2 raw dataset (2D slices).

    ``run_or_paths``: a :class:`~crossmod_lib.runs.RunFolder`, a ``cleaned/`` folder or a
    ``training_slices.npz``. Writes ``dest/<dataset_name>/`` via
    :func:`crossmod_lib.datasets.write_nnunet_dataset` and returns it.
    """
    from .datasets import write_nnunet_dataset

    if isinstance(run_or_paths, RunFolder):
        path = run_or_paths.inputs("training_slices")
    else:
        path = Path(run_or_paths)
        if path.suffix != ".npz":
            path = path / RunFolder.training_slices.in_folder
    arrays = _load_npz(path, "cleaned training slices", ("image", "labels", "patient", "slice_index"))
    if len(arrays["image"]) == 0:
        raise CrossmodError(f"{path}: no accepted slices to export")
    if "pixel_mm" in arrays:
        pixel = float(arrays["pixel_mm"])
    elif hasattr(run_or_paths, "profile"):
        pixel = float(run_or_paths.profile["preprocessing"]["pixel_mm"])
    else:
        raise CrossmodError(f"{path}: no 'pixel_mm' recorded; cannot set the nnU-Net spacing")
    return write_nnunet_dataset(
        {k: arrays[k] for k in ("image", "labels", "patient", "slice_index")}, dest, dataset_name,
        modality="MR", mode="slices", spacing=(pixel, pixel),
        description="Synthetic MR (CycleGAN from CT), cleaned and registered to the CT, with the CT's "
                    "parotid labels (Kieselmann et al. 2021, section 2.D)",
    )


# ----------------------------------------------------------------------------------------------
# A head-like test slice with a known deformation (benchmark and tests)


def _head_classes(size: int, pixel_mm: float, scale: float = 1.0, parotids: bool = True,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes and labels of a schematic axial head slice (mm geometry, centred)."""
    rng = np.random.default_rng(seed)
    half = size * pixel_mm / 2.0
    coords = (np.arange(size) + 0.5) * pixel_mm - half
    y, x = np.meshgrid(coords, coords, indexing="ij")
    a, b = 0.55 * half * scale * (1 + 0.03 * rng.standard_normal()), 0.68 * half * scale
    phi = np.arctan2(y, x)
    r = np.hypot(x / a, y / b) * (1 + 0.02 * np.sin(3 * phi + rng.uniform(0, 6.3)))
    depth = (1 - r) * min(a, b)  # approx. distance inside the outline, mm
    classes = np.zeros((size, size), np.uint8)  # 0 air
    classes[depth >= 0] = 1        # skin line
    classes[depth >= 1.5] = 2      # fat
    classes[depth >= 5.0] = 3      # muscle / soft tissue
    u, v = x / half, y / half

    def ellipse(cu, cv, ru, rv):
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1

    outer = ellipse(0, -0.22 * scale, 0.36 * scale, 0.33 * scale)
    mandible = outer & ~ellipse(0, -0.22 * scale, 0.31 * scale, 0.28 * scale)
    classes[mandible & (v < -0.25 * scale)] = 4                     # bone
    classes[ellipse(0, 0.3 * scale, 0.1 * scale, 0.1 * scale)] = 4
    classes[ellipse(0, 0.3 * scale, 0.065 * scale, 0.065 * scale)] = 5   # marrow
    classes[ellipse(0, 0.02 * scale, 0.07 * scale, 0.045 * scale)] = 0   # airway
    labels = np.zeros((size, size), np.uint8)
    if parotids:
        for side, label in ((-1, 2), (1, 1)):  # +x is the patient's left (LPS)
            gland = ellipse(side * 0.36 * scale, 0.12 * scale, 0.1 * scale, 0.15 * scale) & (classes == 3)
            classes[gland] = 6
            labels[gland] = label
    return classes, labels


_CT_VALUES = np.array([0, 160, 30, 125, 255, 200, 105], np.float32)   # air skin fat muscle bone marrow parotid
_MR_VALUES = np.array([3, 85, 210, 80, 25, 120, 165], np.float32)     # T2-like; skin not visible


def _render(classes: np.ndarray, values: np.ndarray, noise: float, rng) -> np.ndarray:
    image = ndimage.gaussian_filter(values[classes], 0.7) + rng.normal(0, noise, classes.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def warp_image(image: np.ndarray, pixel_mm: float, rotation_deg: float = 0.0, shift_mm=(0.0, 0.0),
               amplitude_mm: float = 0.0, scale_x: float = 1.0, order: int = 1) -> np.ndarray:
    """Resample ``image`` through a known smooth deformation (about the image centre).

    Output pixel ``p`` (mm, centred) shows the input at ``R(rotation) (p / [1, scale_x]) + shift +
    d(p)`` with ``d`` a smooth sinusoidal field of ``amplitude_mm``: ``scale_x < 1`` narrows the
    head, as the CycleGAN tends to (paper section 4.A).
    """
    image = np.asarray(image)
    h, w = image.shape
    yy, xx = np.meshgrid((np.arange(h) - (h - 1) / 2) * pixel_mm, (np.arange(w) - (w - 1) / 2) * pixel_mm,
                         indexing="ij")
    th = math.radians(rotation_deg)
    px = xx / scale_x
    sy = math.cos(th) * yy + math.sin(th) * px + shift_mm[0]
    sx = -math.sin(th) * yy + math.cos(th) * px + shift_mm[1]
    fov = max(h, w) * pixel_mm
    sy = sy + amplitude_mm * np.sin(2 * np.pi * xx / fov) * np.cos(np.pi * yy / fov)
    sx = sx + amplitude_mm * np.cos(2 * np.pi * yy / fov) * np.cos(np.pi * xx / fov)
    rows = sy / pixel_mm + (h - 1) / 2
    cols = sx / pixel_mm + (w - 1) / 2
    out = ndimage.map_coordinates(np.asarray(image, np.float32), [rows, cols], order=order, mode="constant", cval=0.0)
    return np.clip(np.rint(out), 0, 255).astype(image.dtype) if image.dtype == np.uint8 else out


def synthetic_registration_case(size: int = 256, pixel_mm: float = 1.0, seed: int = 0,
                                rotation_deg: float = 3.0, shift_mm=(2.0, -3.0), amplitude_mm: float = 3.0,
                                scale_x: float = 0.95, scale: float = 1.0, parotids: bool = True) -> dict:
    """A CT-like slice, its MR-like twin (same anatomy), and that twin deformed: a registration test.

    Returns ``ct`` (fixed), ``truth`` (MR contrast on the CT geometry: what a perfect registration
    gives back), ``moving`` (``truth`` rotated, shifted, narrowed and smoothly deformed), ``labels``
    and ``head_mask`` (of the CT, at threshold 20). All uint8 / bool [size, size].
    """
    rng = np.random.default_rng(seed + 1000)
    classes, labels = _head_classes(size, pixel_mm, scale=scale, parotids=parotids, seed=seed)
    ct = _render(classes, _CT_VALUES, 3.0, rng)
    truth = _render(classes, _MR_VALUES, 3.0, rng)
    moving = warp_image(truth, pixel_mm, rotation_deg, shift_mm, amplitude_mm, scale_x)
    return {"ct": ct, "truth": truth, "moving": moving, "labels": labels, "head_mask": head_mask(ct, 20)}


def bench_registration(size: int = 256, pixel_mm: float = 1.0, n: int = 5, profile: dict | str = "full",
                       seed: int = 0) -> dict:
    """Time :func:`register_slice` on ``n`` deformed head-like slices of ``size``^2 (one core).

    The first call (loading elastix, several seconds) is timed separately and left out of the
    per-slice figures; the CPU time per slice (single-threaded) is the per-core cost, the wall
    time also counts waiting for a busy machine. Target: 0.5 s per 256 x 256 slice per core. Also reports the accuracy:
    outline Dice after registration and the mean squared error to the undeformed MR-like slice
    before and after.
    """
    from .config import load_profile

    settings = dict(cleaning_settings(load_profile(profile) if isinstance(profile, str) else profile))
    settings["pixel_mm"] = float(pixel_mm)
    t0 = time.perf_counter()
    _itk()
    load_s = time.perf_counter() - t0
    cases = [synthetic_registration_case(size, pixel_mm, seed=seed + k) for k in range(n + 1)]
    t0 = time.perf_counter()
    register_slice(cases[0]["ct"], cases[0]["moving"], settings, fixed_mask=cases[0]["head_mask"])
    first_s = time.perf_counter() - t0
    times, cpu, dices, before, after, ok = [], [], [], [], [], 0
    for case in cases[1:]:
        t0 = time.perf_counter()
        warped, info = register_slice(case["ct"], case["moving"], settings, fixed_mask=case["head_mask"])
        times.append(time.perf_counter() - t0)
        cpu.append(info["cpu_s"])
        ok += int(info["accepted"])
        dices.append(info["outline_dice_after"])
        head = case["head_mask"]
        before.append(float(np.mean((case["moving"].astype(float) - case["truth"])[head] ** 2)))
        if warped is not None:
            after.append(float(np.mean((warped.astype(float) - case["truth"])[head] ** 2)))
    return {
        "name": "registration",
        "size": f"{size}x{size}",
        "pixel_mm": float(pixel_mm),
        "slices": int(n),
        "load_s": round(load_s, 2),
        "first_call_s": round(first_s, 3),
        "wall_s_per_slice": round(float(np.mean(times)), 3),
        "cpu_s_per_slice": round(float(np.mean(cpu)), 3),
        "cpu_s_per_slice_max": round(float(np.max(cpu)), 3),
        "target_s": 0.5,
        "accepted": int(ok),
        "outline_dice_after_min": round(float(np.nanmin(dices)), 4),
        "mse_in_head_before": round(float(np.mean(before)), 1),
        "mse_in_head_after": round(float(np.mean(after)), 1) if after else math.nan,
    }

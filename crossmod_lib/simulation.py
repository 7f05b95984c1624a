"""T2-weighted MR simulated from real head-and-neck CT: the real-anatomy MR cohort.

Why
    The paper's MR cohort (27 T2-weighted scans with parotid contours) is not public. To test the
    pipeline on real anatomy, the MR cohort can be *simulated* from real CTs (OpenKBP) of patients
    who are **not** in the CT cohort, so that CT and MR stay unpaired, as in the paper.

What it models (per patient, :func:`simulate_mr`)
    1. **Tissue classes** from the CT numbers and the organ masks. The patient is the largest
       connected region above -400 HU (couch and immobilisation devices become air). Outside
       the masks each CT voxel is a mixture of two neighbouring *anchor* tissues on the HU axis
       -- fat (-100 HU), lean soft tissue with muscle relaxation (+40), cancellous bone / marrow
       (+300), cortical bone (+1200) -- with the volume fraction given by linear interpolation
       in HU (CT numbers are linear in the volume fractions of a voxel, and so is the MR signal
       of a voxel: a two-compartment partial-volume model). At air boundaries a voxel is read as
       air plus the tissue of its solid neighbours (:func:`_air_partial_volume`), so a skin or
       airway edge fades out instead of showing a false fat rim. Masks override: the parotids
       (from the manual contours; inside them the signal follows the CT number about the glands'
       median HU with the slope of a fat / gland mixture -- fat lobules brighter, vessels and
       septa darker -- and the gland blends into its surroundings over ~1 mm), the brainstem and spinal cord, a 2.5 mm CSF sheath around
       them, the mandible (bone only: marrow or cortex by HU), and, where a brainstem mask
       places the skull base, the intracranial soft tissue ("brain": soft tissue enclosed by
       bone on an axial slice, connected to the brainstem; found in the posterior fossa, not
       where the skull's wall is open at CT resolution, e.g. the middle cranial fossa beside
       the orbits, which keeps soft-tissue relaxation). Air inside the body (airway, sinuses)
       is labelled ``airway`` in the tissue map; like outside air it has no signal.
    2. **Signal**: the 2D spin-echo equation S = PD (1 - exp(-TR/T1)) exp(-TE/T2)
       (:func:`crossmod_lib.phantom.spin_echo_signal`, 90 degree excitation) with per-tissue
       PD/T1/T2 at 3 T (the paper's Table I field strength; sources below) jittered by +-5 % per
       patient, and TE/TR drawn per patient from the paper's Table I ranges (the phantom's
       ``MR_TE_RANGE`` / ``MR_TR_RANGE``).
    3. **Geometry**: axial slices of ``slice_mm`` (4 mm) thickness, ``slices`` (30) of them
       centred on the parotids (+-5 mm random offset; shifted, or fewer slices, where the CT
       does not reach that far: OpenKBP CTs end in a narrow stub just above the skull base, and
       only slices whose body cross-section is at least half that at the parotids count),
       ``matrix`` x ``matrix`` pixels of ``pixel_mm`` centred on the head at parotid level
       (+-5 mm), axis-aligned (LPS) like the CT.
    4. **Partial volume**: the tissue HU, air fraction and masks are interpolated with cubic
       B-splines onto ``SUBSLICES`` sub-slices per MR slice (the air fraction slightly smoothed
       and its edge steepened to ~1 mm: the body outline is sharp, the CT's 3.9 mm voxels are
       not), classified there, and the signals averaged across the slab (slice profile); then
       an in-plane Gaussian point-spread function of ``psf_mm`` FWHM.
    5. **Scanner**: a smooth multiplicative receive bias field (the phantom's
       :func:`~crossmod_lib.phantom.bias_field`, amplitude drawn from ``bias``), Rician noise
       (complex Gaussian noise of SD = fat signal / SNR, SNR drawn from ``snr``, then the
       magnitude: so air has the Rician noise floor, mean sigma sqrt(pi/2)) and an arbitrary
       per-patient gain, stored as uint16 like a scanner's magnitude image.
    6. **Contours**: the CT's manual parotid masks, interpolated onto the same sub-slices and
       kept where the gland fills most of the 4 mm slab (majority vote: an observer contours what
       the thick slice shows), so the simulated MR has "manual" labels on its own grid; their
       volume stays within a few per cent of the CT masks'.

What it does not model
    Finer anatomy than the CT holds (OpenKBP CTs have ~3.9 mm pixels: the simulated MR is
    smooth at the 4 mm scale, however fine its pixels, and thin cortex looks dotted), soft-tissue contrast that CT does not
    show (muscle, tongue, mucosa, lymph nodes and vessels all get lean-soft-tissue relaxation,
    so no flow voids and no bright mucosa; grey and white matter are one "brain" tissue), gland
    texture finer than the CT's, tumours, motion, flow, chemical shift, susceptibility, fold-over,
    dental-filling artefacts, or the exact echo-train physics (fat's J-coupling brightening in
    turbo spin echo is an effective T2). A contrast-enhanced CT's bright vessels become
    soft-tissue/marrow mixtures. Nothing measured on this MR says how a method does on real MR;
    it gives real head-and-neck *shapes* with MR-like contrast.

Tissue values (3 T; PD relative to CSF; T1, T2 in ms), sources:
    muscle, spinal cord, white / grey matter: Stanisz GJ et al., "T1, T2 relaxation and
    magnetization transfer in tissue at 3T", Magn Reson Med 54:507-512 (2005);
    subcutaneous fat and (vertebral) bone marrow: de Bazelaire CMJ et al., "MR imaging
    relaxation times of abdominal and pelvic tissues measured in vivo at 3.0 T", Radiology
    230:652-659 (2004); fat's longer apparent T2 in (turbo) spin-echo trains: Henkelman RM et
    al., "Why fat is bright in RARE and fast spin-echo imaging", J Magn Reson Imaging 2:533-540
    (1992) -- modelled as a factor ``FAT_TSE_T2_FACTOR`` on the single-echo T2;
    parotid gland (healthy controls, 3 T multi-dynamic multi-echo mapping: T1 ~630 ms,
    T2 81 +- 6 ms, PD ~91 %): as tabulated in the review by Vidmar J, Vovk A, "Advanced magnetic
    resonance imaging techniques for structural and functional assessment of salivary glands",
    Radiol Oncol (2026), doi:10.2478/raon-2026-0025 (other 3 T studies report healthy parotid
    T2 of 80-100 ms);
    CSF: T1 ~4200 ms at 3 T (Lu H et al., J Magn Reson Imaging 22:13-22, 2005), T2 of order
    2 s (long; the exact value does not matter at TE ~100 ms); cortical bone: ~20 % water by
    volume with T2* ~0.4-0.5 ms (Techawiboonwong A et al., Radiology 248:824-833, 2008; Reichert
    ILH et al., Magn Reson Imaging 23:611-618, 2005), i.e. no signal at TE ~100 ms.
    Proton densities of soft tissues are rounded water contents (approximate).

Layout written by :func:`write_simulated_cohort` (MICCAI 2015 / PDDCA-like, as the phantom)::

    out_dir/<patient>/img.nrrd, out_dir/<patient>/structures/Parotid_{L,R}.nrrd
    out_dir/simulation.json
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, sparse

from crossmod_lib import __version__
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import PAROTIDS, Case, staged_folder, write_image
from crossmod_lib.parallel import run_tasks
from crossmod_lib.runs import RawFiles
from crossmod_lib.phantom import (
    MR_SUBSLICES,
    MR_TE_RANGE,
    MR_TR_RANGE,
    bias_field,
    spin_echo_signal,
)

SIMULATOR_VERSION = "1.0"
SUBSLICES = MR_SUBSLICES       # sub-slices averaged into one MR slice (slice profile)
FIELD_STRENGTH_T = 3.0         # paper Table I

TISSUES = ("air", "airway", "fat", "muscle", "marrow", "cortical_bone", "parotid", "brain",
           "brainstem", "spinal_cord", "csf")
(AIR, AIRWAY, FAT, MUSCLE, MARROW, CORTICAL, PAROTID, BRAIN, BRAINSTEM, CORD,
 CSF) = range(len(TISSUES))

# (PD, T1 [ms], T2 [ms]) at 3 T; sources in the module docstring.
FAT_TSE_T2_FACTOR = 2.0        # fat's apparent T2 in a turbo spin echo vs its single-echo T2
RELAXATION_3T = {
    AIR: (0.0, 1000.0, 1.0),                   # no protons
    AIRWAY: (0.0, 1000.0, 1.0),
    FAT: (0.9, 382.0, 68.0 * FAT_TSE_T2_FACTOR),  # de Bazelaire 2004 (T2 68 ms single echo)
    MUSCLE: (0.8, 1412.0, 50.0),               # Stanisz 2005, skeletal muscle
    MARROW: (0.9, 586.0, 49.0),                # de Bazelaire 2004, vertebral marrow
    CORTICAL: (0.2, 250.0, 0.5),               # bone water, T2* ~0.5 ms: no signal
    PAROTID: (0.91, 628.0, 81.0),              # healthy parotid, 3 T mapping (Vidmar & Vovk)
    BRAIN: (0.75, 1450.0, 84.0),               # mean of grey and white matter (Stanisz 2005)
    BRAINSTEM: (0.7, 1084.0, 69.0),            # mostly white matter tracts (Stanisz 2005, WM)
    CORD: (0.75, 993.0, 78.0),                 # Stanisz 2005, spinal cord
    CSF: (1.0, 4200.0, 2000.0),                # Lu 2005 (T1); T2 long
}

# Tissues outside the masks: anchors on the HU axis, mixed linearly in between (partial volume).
HU_ANCHORS = ((AIR, -1000.0), (FAT, -100.0), (MUSCLE, 40.0), (MARROW, 300.0), (CORTICAL, 1200.0))
BODY_HU = -400.0               # above: inside the body outline
CORTEX_HU = 700.0              # mandible mask: cortex above, marrow below
SKULL_HU = 150.0               # bone wall enclosing the brain (low: 3.9 mm partial volume)
AIR_EDGE_SHARPEN = 3.0         # air fraction ramp steepened 3x: a ~1.3 mm edge from 3.9 mm voxels
CSF_SHEATH_MM = 2.5            # CSF around the spinal cord and brainstem masks
SKULL_GAP_MM = 16.0            # gaps in the skull's wall closed before looking for its inside
MIN_BRAIN_CM2 = 2.0            # smaller enclosed soft-tissue islands are not brain
EXTRA_STRUCTURES = ("Brainstem", "SpinalCord", "Mandible")  # OpenKBP masks used when present
TISSUE_JITTER = 0.05           # per-patient relative spread of PD and T2
SLAB_OFFSET_MM = 5.0           # random slab centre offset from the parotid centre (+-)
INPLANE_OFFSET_MM = 5.0        # random field-of-view centre offset from the head centre (+-)


@dataclass(frozen=True)
class SimulationSettings:
    """Acquisition geometry and scanner imperfections of the simulated MR (defaults: paper-like)."""

    pixel_mm: float = 0.5          # in-plane pixel (paper Table I: 0.5 mm)
    matrix: int = 512              # in-plane matrix (paper: 512, a 256 mm field of view)
    slices: int = 30               # slices centred on the parotids (paper: 30)
    slice_mm: float = 4.0          # slice thickness = spacing (paper: 4 mm)
    min_slices: int = 12           # fewer slices fit the CT: an error
    psf_mm: float = 1.0            # in-plane point-spread function, FWHM
    snr: tuple = (20.0, 30.0)      # range of the fat signal-to-noise ratio per patient
    bias: tuple = (0.2, 0.3)       # range of the bias-field amplitude per patient
    te_ms: tuple = MR_TE_RANGE     # range of the echo time per patient (paper Table I)
    tr_ms: tuple = MR_TR_RANGE     # range of the repetition time per patient
    contrast: dict = field(default_factory=dict)  # tissue name -> signal factor (e.g. another coil / sequence)

    @classmethod
    def from_dict(cls, values: dict | None, where: str = "simulation settings") -> SimulationSettings:
        values = dict(values or {})
        values.pop("workers", None)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CrossmodError(f"{where}: unknown setting(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        for key in ("snr", "bias", "te_ms", "tr_ms"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        settings = cls(**{k: v for k, v in values.items() if v is not None})
        settings.check(where)
        return settings

    def check(self, where: str = "simulation settings") -> None:
        def number(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        problems = []
        if not (number(self.pixel_mm) and self.pixel_mm > 0):
            problems.append(f"pixel_mm={self.pixel_mm!r} must be > 0")
        if not (number(self.slice_mm) and self.slice_mm > 0):
            problems.append(f"slice_mm={self.slice_mm!r} must be > 0")
        for key in ("matrix", "slices", "min_slices"):
            value = getattr(self, key)
            if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
                problems.append(f"{key}={value!r} must be an integer >= 1")
        if not problems and self.min_slices > self.slices:
            problems.append(f"min_slices={self.min_slices} exceeds slices={self.slices}")
        if not (number(self.psf_mm) and self.psf_mm >= 0):
            problems.append(f"psf_mm={self.psf_mm!r} must be >= 0")
        for key, low in (("snr", 1e-6), ("bias", 0.0)):
            value = getattr(self, key)
            if not (isinstance(value, tuple) and len(value) == 2 and all(number(v) for v in value)
                    and low <= value[0] <= value[1]):
                problems.append(f"{key}={list(value) if isinstance(value, tuple) else value!r} "
                                f"must be [min, max] with {low:g} <= min <= max")
        for key in ("te_ms", "tr_ms"):
            value = getattr(self, key)
            if not (isinstance(value, tuple) and len(value) == 2 and all(number(v) for v in value)
                    and 0 < value[0] <= value[1]):
                problems.append(f"{key}={list(value) if isinstance(value, tuple) else value!r} "
                                "must be [min, max] with 0 < min <= max")
        if not isinstance(self.contrast, dict):
            problems.append(f"contrast={self.contrast!r} must map tissue names to factors")
        else:
            for name, factor in self.contrast.items():
                if name not in TISSUES:
                    problems.append(f"contrast: unknown tissue {name!r} (one of {', '.join(TISSUES)})")
                elif not (number(factor) and factor > 0):
                    problems.append(f"contrast.{name}={factor!r} must be > 0")
        if not problems and self.bias[1] >= 0.5:
            problems.append(f"bias={list(self.bias)}: amplitudes must stay below 0.5")
        if problems:
            raise CrossmodError(f"{where}: {'; '.join(problems)}")


@dataclass
class SimulatedMR:
    """One simulated MR: image (uint16), parotid masks on its grid, tissue map, JSON-able record.

    ``tissue`` (uint8, an index into :data:`TISSUES`) is the tissue class at each slice centre,
    a debug aid to pick voxels by tissue.
    """

    patient_id: str
    image: sitk.Image
    structures: dict[str, sitk.Image]
    tissue: sitk.Image
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Signal model


def tissue_signals(te: float, tr: float, table: dict | None = None) -> np.ndarray:
    """Spin-echo signal of every tissue of :data:`TISSUES` (float32, index = tissue)."""
    table = RELAXATION_3T if table is None else table
    return np.array([spin_echo_signal(*table[t], te, tr) for t in range(len(TISSUES))],
                    dtype=np.float32)


def _patient_rng(seed: int, patient_id: str) -> np.random.Generator:
    """Randomness of one patient: keyed by (seed, patient id), independent of the cohort."""
    return np.random.default_rng([int(seed), zlib.crc32(patient_id.encode("utf-8"))])


def _mask_array(case: Case, name: str) -> np.ndarray | None:
    if name not in case.structures:
        return None
    return sitk.GetArrayFromImage(case.structures[name]) > 0


def _z_positions(image: sitk.Image, where: str) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-3):
        raise CrossmodError(f"{where}: CT grid is not axis-aligned (direction "
                            f"{np.round(direction.ravel(), 3).tolist()}); reorient it first")
    origin = np.array(image.GetOrigin())
    return origin[2] + direction[2, 2] * image.GetSpacing()[2] * np.arange(image.GetSize()[2])


def _brain_mask(hu: np.ndarray, brainstem: np.ndarray | None, spacing,
                upward: bool = True) -> np.ndarray:
    """Intracranial soft tissue on the CT grid: on each axial slice from the brainstem's lowest
    slice up (``upward``: slice index grows superiorly), soft tissue enclosed by bone (gaps up
    to ``SKULL_GAP_MM`` closed: thin bone and foramina at CT resolution), in 3D connected to the
    brainstem. Empty without a brainstem mask (nothing tells where the skull base is)."""
    out = np.zeros(hu.shape, dtype=bool)
    if brainstem is None or not brainstem.any():
        return out
    ks = np.flatnonzero(brainstem.any(axis=(1, 2)))
    above = range(ks.min(), hu.shape[0]) if upward else range(ks.max() + 1)
    soft = (hu > -60.0) & (hu < SKULL_HU)
    min_px = MIN_BRAIN_CM2 * 100.0 / (spacing[0] * spacing[1])
    radius = max(1, round(SKULL_GAP_MM / 2.0 / min(spacing[0], spacing[1])))
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = yy * yy + xx * xx <= radius * radius
    for k in above:
        bone = hu[k] >= SKULL_HU
        if not bone.any():
            continue
        wall = ndimage.binary_closing(np.pad(bone, radius + 1), structure=disk)
        wall = wall[radius + 1:-radius - 1, radius + 1:-radius - 1]
        enclosed = ndimage.binary_fill_holes(wall) & ~bone & soft[k]
        labels, count = ndimage.label(enclosed)
        if count:
            sizes = np.bincount(labels.ravel())
            keep = np.flatnonzero(sizes >= min_px)
            out[k] = np.isin(labels, keep[keep > 0])
    labels, count = ndimage.label(out | brainstem)
    touching = np.unique(labels[brainstem & (labels > 0)])
    return np.isin(labels, touching) & out


def _body(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest 3D component above ``BODY_HU`` (drops couch and immobilisation
    devices), holes (airway, sinuses) filled slice by slice."""
    labels, count = ndimage.label(hu > BODY_HU)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    return np.stack([ndimage.binary_fill_holes(plane) for plane in largest])


def _air_partial_volume(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Air fraction and tissue HU of each CT voxel (two-compartment partial volume at air edges).

    A voxel next to air whose CT number lies below that of its solid neighbours (mean HU of the
    voxels above -250 HU in its 3 x 3 x 3 neighbourhood) is read as a mixture of air (-1000 HU)
    and that neighbouring tissue, so a skin or airway edge becomes a fading muscle or fat
    signal rather than a fat-coloured rim. Elsewhere the air fraction is 0 and the tissue HU is
    the CT number. Everything outside the body (:func:`_body`) is air.
    """
    body = _body(hu)
    hu = np.where(body, hu, -1000.0).astype(np.float32)
    solid = (hu > -250.0).astype(np.float32)
    weight = ndimage.uniform_filter(solid, size=3)
    total = ndimage.uniform_filter(hu * solid, size=3)
    neighbour = np.divide(total, weight, out=np.full_like(hu, 40.0), where=weight > 1e-3)
    near_air = ndimage.binary_dilation(hu < BODY_HU)
    mixed = near_air & (hu < neighbour)
    air = np.zeros_like(hu)
    air[mixed] = np.clip((neighbour[mixed] - hu[mixed]) / (neighbour[mixed] + 1000.0), 0.0, 1.0)
    air[~body] = 1.0
    tissue = np.where(mixed, neighbour, hu)
    tissue[air >= 1.0] = -100.0  # pure air: any tissue value (weight 0); fat keeps edges smooth
    return air, tissue.astype(np.float32)


def _bspline_weights(t: np.ndarray, size: int, pad: int) -> np.ndarray:
    """Dense matrix [len(t), size + 2 pad] of cubic B-spline weights at continuous indices ``t``
    of a coefficient array padded by ``pad`` on both ends."""
    t = np.asarray(t, dtype=float) + pad
    base = np.floor(t).astype(int)
    u = t - base
    taps = np.stack([(1 - u) ** 3, 3 * u**3 - 6 * u**2 + 4, -3 * u**3 + 3 * u**2 + 3 * u + 1,
                     u**3], axis=1) / 6.0
    weights = np.zeros((len(t), size + 2 * pad))
    for j in range(4):
        np.add.at(weights, (np.arange(len(t)), np.clip(base - 1 + j, 0, size + 2 * pad - 1)),
                  taps[:, j])
    return weights


class _SplineField:
    """Cubic B-spline interpolation of a volume [z, y, x] on an axis-aligned grid, sampled on a
    separable (tensor) grid of continuous indices by three small matrix products; points
    outside the volume get ``default``. The B-spline coefficients are computed once."""

    PAD = 3

    def __init__(self, array: np.ndarray, default: float, smooth: bool = False):
        self.shape = array.shape
        self.default = np.float32(default)
        padded = np.pad(array.astype(np.float32), self.PAD, mode="edge")
        # smooth: the voxel values themselves are the coefficients (B-spline approximation, a
        # blur of ~0.6 voxel SD instead of an interpolation through every voxel)
        self.coef = padded if smooth else ndimage.spline_filter(padded, order=3, mode="mirror",
                                                                 output=np.float32)
        occupied = np.flatnonzero((array != default).any(axis=(1, 2)))
        # slices of the volume beyond which the field is its default (no need to sample)
        self.z_span = (occupied.min() - 2, occupied.max() + 2) if occupied.size else None

    def sample(self, iz: np.ndarray, wy: np.ndarray, wx: np.ndarray,
               outside_yx: np.ndarray) -> np.ndarray | None:
        """Values at z indices ``iz`` and the rows / columns whose cubic B-spline weights are
        ``wy`` / ``wx`` (sparse matrices: single-threaded products; a multithreaded BLAS on these
        small products only slows down on a busy machine), float32 [len(iz), rows, columns];
        None when every point lies where the field is its default."""
        if self.z_span is None or iz.max() < self.z_span[0] or iz.min() > self.z_span[1]:
            return None
        nz = self.shape[0]
        wz = _bspline_weights(iz, nz, self.PAD).astype(np.float32)
        rows = np.flatnonzero(wz.any(axis=0))
        block = np.einsum("zr,ryx->zyx", wz[:, rows], self.coef[rows])        # [z', y, x]
        zc, ny, nx = block.shape
        block = (wx @ block.reshape(zc * ny, nx).T).T.reshape(zc, ny, -1)    # [z', y, x']
        values = np.stack([wy @ plane for plane in block]).astype(np.float32)  # [z', y', x']
        values[(iz < -0.5) | (iz > nz - 0.5)] = self.default
        values[:, outside_yx] = self.default
        return values


class _SlabSampler:
    """CT-grid fields (air fraction ``air``, tissue HU ``hu``, masks) sampled with cubic
    B-splines on the MR grid: ``n`` x ``n`` pixels of ``pixel_mm`` from ``origin_xy``, at the
    sub-slice heights ``z_sub`` [slice, sub-slice] (mm). Only the CT voxels the field of view
    covers (plus a margin for the spline) are used; the CT grid must be axis-aligned."""

    MARGIN = 4

    def __init__(self, image: sitk.Image, sources: dict, origin_xy, pixel_mm: float, n: int,
                 z_sub: np.ndarray):
        ct_origin = np.array(image.GetOrigin())
        ct_axis = np.diag(np.array(image.GetDirection()).reshape(3, 3)) * np.array(image.GetSpacing())
        ix = (origin_xy[0] + pixel_mm * np.arange(n) - ct_origin[0]) / ct_axis[0]
        iy = (origin_xy[1] + pixel_mm * np.arange(n) - ct_origin[1]) / ct_axis[1]
        iz = (z_sub - ct_origin[2]) / ct_axis[2]
        size = image.GetSize()[::-1]  # z, y, x
        block = []
        for index, length in zip((iz, iy, ix), size):
            start = int(np.clip(np.floor(index.min()) - self.MARGIN, 0, length - 1))
            stop = int(np.clip(np.ceil(index.max()) + self.MARGIN + 1, start + 1, length))
            block.append(slice(start, stop))
        block = tuple(block)
        self.iz = iz - block[0].start
        ix, iy = ix - block[2].start, iy - block[1].start
        self.fields = {}
        for name, array in sources.items():
            if array is None or not array[block].any():
                continue
            default = 1.0 if name == "air" else (-1000.0 if name == "hu" else 0.0)
            self.fields[name] = _SplineField(array[block], default, smooth=name == "air")
        shape = tuple(b.stop - b.start for b in block)
        self.wx = sparse.csr_matrix(_bspline_weights(ix, shape[2], _SplineField.PAD)
                                    .astype(np.float32))
        self.wy = sparse.csr_matrix(_bspline_weights(iy, shape[1], _SplineField.PAD)
                                    .astype(np.float32))
        self.outside_yx = (((iy < -0.5) | (iy > shape[1] - 0.5))[:, None]
                           | ((ix < -0.5) | (ix > shape[2] - 0.5))[None, :])

    def sample(self, k: int) -> dict[str, np.ndarray]:
        """Every field on the sub-slices of MR slice ``k`` (a field that is its default there
        everywhere is left out)."""
        found = {}
        for name, spline in self.fields.items():
            values = spline.sample(self.iz[k], self.wy, self.wx, self.outside_yx)
            if values is not None:
                found[name] = values
        return found


def _valid_range(hu: np.ndarray, k_centre: int) -> tuple[int, int]:
    """The run of CT slices around ``k_centre`` whose body cross-section is at least half of
    that at ``k_centre`` (OpenKBP CTs end in a narrow stub above the skull base)."""
    area = (hu > BODY_HU).reshape(hu.shape[0], -1).sum(axis=1)
    ok = area >= 0.5 * area[k_centre]
    lo = hi = k_centre
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(ok) - 1 and ok[hi + 1]:
        hi += 1
    return lo, hi


# ----------------------------------------------------------------------------------------------
# One patient


class _TissueModel:
    """Tissue classes and T2w signal of one slab from its interpolated CT fields (one patient).

    ``signal`` holds each tissue's spin-echo signal; ``gland_hu`` is the median CT number of the
    patient's parotids; ``pixel_mm`` sizes the CSF sheath.
    """

    def __init__(self, signal: np.ndarray, gland_hu: float, pixel_mm: float):
        self.signal = signal
        self.anchor_hu = np.array([h for _, h in HU_ANCHORS[1:]], dtype=np.float32)
        self.anchor_signal = np.array([signal[t] for t, _ in HU_ANCHORS[1:]], dtype=np.float32)
        self.anchor_mid = 0.5 * (self.anchor_hu[1:] + self.anchor_hu[:-1])
        self.anchor_class = np.array([t for t, _ in HU_ANCHORS[1:]], dtype=np.uint8)
        # inside the glands the signal follows the CT number about the glands' median HU (their
        # typical composition: it ranges from fatty to contrast-enhanced between patients) with
        # the slope of a fat / gland mixture, on both sides, bounded by fat and muscle
        fat_hu = HU_ANCHORS[1][1]
        gland_hu = float(np.clip(gland_hu, fat_hu + 20.0, 200.0))
        per_hu = (signal[FAT] - signal[PAROTID]) / (gland_hu - fat_hu)
        self.gland_hu = np.array([fat_hu, gland_hu,
                                  gland_hu + (signal[PAROTID] - signal[MUSCLE]) / per_hu],
                                 dtype=np.float32)
        self.gland_signal = np.array([signal[FAT], signal[PAROTID], signal[MUSCLE]],
                                     dtype=np.float32)
        radius = max(1, round(CSF_SHEATH_MM / pixel_mm))
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        self.disk = (yy * yy + xx * xx) <= radius * radius

    def render(self, h: np.ndarray, f_air: np.ndarray,
               fields: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Signal (float32, before the air fraction) and tissue class (uint8) of sub-slices
        [s, y, x] from the tissue HU ``h``, the air fraction ``f_air`` and the interpolated masks
        ``fields`` (0-1 values; a mask covers where it is >= 0.5)."""
        signal = self.signal
        masks = {name: values >= 0.5 for name, values in fields.items()}
        sig = np.interp(h, self.anchor_hu, self.anchor_signal).astype(np.float32)
        cls = self.anchor_class[np.searchsorted(self.anchor_mid, h)]
        is_air = f_air >= 0.5
        for j in range(len(h)):  # air inside the body outline: airway / sinuses
            inside = ndimage.binary_fill_holes(~is_air[j])
            cls[j][is_air[j]] = np.where(inside[is_air[j]], AIRWAY, AIR)
        soft = (h > -60.0) & (h < SKULL_HU) & ~is_air
        if "brain" in masks:
            brain = masks["brain"] & soft
            sig[brain], cls[brain] = signal[BRAIN], BRAIN
        cns = [masks[x] for x in ("Brainstem", "SpinalCord") if x in masks]
        if cns:
            cns = np.logical_or.reduce(cns)
            sheath = np.zeros_like(cns)
            for j in range(len(h)):
                sheath[j] = ndimage.binary_dilation(cns[j], structure=self.disk) & ~cns[j] & soft[j]
            sig[sheath], cls[sheath] = signal[CSF], CSF
        for name, t in (("Brainstem", BRAINSTEM), ("SpinalCord", CORD)):
            if name in masks:
                sig[masks[name]], cls[masks[name]] = signal[t], t
        if "Mandible" in masks:
            bone = masks["Mandible"]
            sig[bone] = np.interp(h[bone], self.anchor_hu[2:], [signal[MARROW], signal[CORTICAL]])
            cls[bone] = np.where(h[bone] >= CORTEX_HU, CORTICAL, MARROW)
        glands = [fields[name] for name in PAROTIDS if name in fields]
        if glands:
            # gland tissue, fattier where the CT is darker than the glands' median (fat lobules)
            # and denser where brighter (vessels, septa), blending into its surroundings at the
            # contour over ~1 mm (the gland's interpolated mask, steepened like the air edge)
            weight = np.clip((np.maximum.reduce(glands) - 0.5) * AIR_EDGE_SHARPEN + 0.5, 0, 1)
            gland = np.interp(h, self.gland_hu, self.gland_signal)
            sig = (weight * gland + (1.0 - weight) * sig).astype(np.float32)
            cls[weight >= 0.5] = PAROTID
        return sig, cls


def _place_slab(hu: np.ndarray, z_ct: np.ndarray, gland: np.ndarray, dz_ct: float,
                settings: SimulationSettings, offset: float, where: str) -> dict:
    """Slice count and centre of the MR slab: ``settings.slices`` centred on the parotids
    (``gland``) plus ``offset`` mm, shifted (or fewer slices) to stay inside the CT's full
    cross-sections (:func:`_valid_range`)."""
    gz = z_ct[np.flatnonzero(gland.any(axis=(1, 2)))]
    centre = 0.5 * (gz.min() + gz.max())
    k_centre = int(np.argmin(np.abs(z_ct - centre)))
    lo_k, hi_k = _valid_range(hu, k_centre)
    z_lo = min(z_ct[lo_k], z_ct[hi_k]) - dz_ct / 2.0
    z_hi = max(z_ct[lo_k], z_ct[hi_k]) + dz_ct / 2.0
    n_slices = min(settings.slices, int(np.floor((z_hi - z_lo) / settings.slice_mm + 1e-6)))
    if n_slices < settings.min_slices:
        raise CrossmodError(f"{where}: the CT covers {z_hi - z_lo:.0f} mm around the parotids; "
                            f"{settings.min_slices} slices of {settings.slice_mm:g} mm do not fit")
    half = n_slices * settings.slice_mm / 2.0
    wanted = centre + offset
    slab_centre = float(np.clip(wanted, z_lo + half, z_hi - half))
    return {"slices": n_slices, "centre": slab_centre, "k_centre": k_centre,
            "parotid_centre_mm": centre, "slab_shift_mm": slab_centre - wanted,
            "ct_valid_z_mm": [z_lo, z_hi]}


def simulate_mr(case: Case, seed: int, settings: SimulationSettings | None = None,
                patient_id: str | None = None) -> SimulatedMR:
    """Simulate a T2-weighted MR (and its parotid contours) from one CT case in HU.

    ``case`` needs ``Parotid_L`` / ``Parotid_R`` masks (at least one with voxels) and may hold
    ``Brainstem``, ``SpinalCord`` and ``Mandible`` masks. The same (case, seed, settings) always
    gives the same MR. Bad input raises a one-line :class:`CrossmodError`.
    """
    settings = settings or SimulationSettings()
    settings.check()
    pid = patient_id or case.patient_id
    where = str(case.source or pid)
    image = case.image
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CrossmodError(f"{where}: CT must be a 3D scalar volume")
    z_ct = _z_positions(image, where)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    if not np.isfinite(hu).all():
        raise CrossmodError(f"{where}: CT holds non-finite values")
    if hu.min() > -500.0 or hu.max() < 0.0:
        raise CrossmodError(f"{where}: CT does not look like Hounsfield units (range "
                            f"{hu.min():.0f} to {hu.max():.0f}; air should be about -1000)")
    masks = {name: _mask_array(case, name) for name in PAROTIDS + EXTRA_STRUCTURES}
    for name, mask in masks.items():
        if mask is not None and mask.shape != hu.shape:
            raise CrossmodError(f"{where}: mask {name} is not on the CT grid")
    glands = [m for n in PAROTIDS if (m := masks[n]) is not None and m.any()]
    if not glands:
        raise CrossmodError(f"{where}: no parotid voxels (Parotid_L / Parotid_R): cannot place "
                            "the MR slab")

    rng = _patient_rng(seed, pid)
    te = float(rng.uniform(*settings.te_ms))
    tr = float(rng.uniform(*settings.tr_ms))
    gain = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
    bias_amp = float(rng.uniform(*settings.bias))
    snr = float(rng.uniform(*settings.snr))
    slab_offset = float(rng.uniform(-SLAB_OFFSET_MM, SLAB_OFFSET_MM))
    inplane_offset = rng.uniform(-INPLANE_OFFSET_MM, INPLANE_OFFSET_MM, size=2)
    table = {t: (pd * rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER), t1,
                 t2 * rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER))
             for t, (pd, t1, t2) in RELAXATION_3T.items()}
    bias = bias_field(rng, bias_amp)
    signal = tissue_signals(te, tr, table)
    for name, factor in settings.contrast.items():
        signal[TISSUES.index(name)] *= np.float32(factor)

    # --- where the slab goes: centred on the parotids, inside the CT's full cross-sections
    slab = _place_slab(hu, z_ct, np.logical_or.reduce(glands), image.GetSpacing()[2], settings,
                       slab_offset, where)
    n_slices, slab_centre, k_centre = slab["slices"], slab["centre"], slab["k_centre"]

    body = hu[k_centre] > BODY_HU
    rows, cols = np.nonzero(ndimage.binary_fill_holes(body))
    point = image.TransformContinuousIndexToPhysicalPoint(
        (float(cols.mean()), float(rows.mean()), float(k_centre)))
    cx, cy = point[0] + inplane_offset[0], point[1] + inplane_offset[1]
    p, n = float(settings.pixel_mm), int(settings.matrix)
    origin = (cx - (n - 1) / 2.0 * p, cy - (n - 1) / 2.0 * p,
              slab_centre - (n_slices - 1) / 2.0 * settings.slice_mm)

    sub = (np.arange(SUBSLICES) - (SUBSLICES - 1) / 2.0) * (settings.slice_mm / SUBSLICES)

    # --- sources on the CT grid: air fraction, tissue HU and masks, interpolated to the slab
    air, tissue_hu = _air_partial_volume(hu)
    brain = _brain_mask(np.where(air < 0.5, tissue_hu, -1000.0), masks["Brainstem"],
                        image.GetSpacing(), upward=image.GetDirection()[8] > 0)
    sources = {"air": air, "hu": tissue_hu}
    sources.update({"brain": brain, "Brainstem": masks["Brainstem"],
                    "SpinalCord": masks["SpinalCord"], "Mandible": masks["Mandible"],
                    **{name: masks[name] for name in PAROTIDS}})
    z_sub = origin[2] + settings.slice_mm * np.arange(n_slices)[:, None] + sub[None, :]
    sampler = _SlabSampler(image, sources, origin[:2], p, n, z_sub)
    model = _TissueModel(signal, float(np.median(tissue_hu[np.logical_or.reduce(glands)])), p)
    bx = (origin[0] + p * np.arange(n) - cx).astype(np.float32)[None, :]
    by = (origin[1] + p * np.arange(n) - cy).astype(np.float32)[:, None]
    sigma_px = settings.psf_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / p

    shape = (n_slices, n, n)
    out = np.empty(shape, dtype=np.uint16)
    tissue = np.empty(shape, dtype=np.uint8)
    labels = {name: np.zeros(shape, dtype=np.uint8) for name in PAROTIDS}
    noise_sd = float(signal[FAT] / snr)
    for k in range(n_slices):
        zk = origin[2] + k * settings.slice_mm
        fine = sampler.sample(k)
        # air boundaries sharpened to a ~1 mm ramp at the 50 % isocontour of the air fraction
        air_fraction = fine.pop("air", np.ones((SUBSLICES, n, n), dtype=np.float32))
        f_air = np.clip((air_fraction - 0.5) * AIR_EDGE_SHARPEN + 0.5, 0.0, 1.0)
        h = fine.pop("hu", np.full((SUBSLICES, n, n), -1000.0, dtype=np.float32))
        sig, cls = model.render(h, f_air, fine)
        for name in PAROTIDS:
            if name in fine:
                # an observer contours what the thick slice shows: the gland in most of the slab
                labels[name][k] = 2 * (fine[name] >= 0.5).sum(axis=0) > SUBSLICES

        sig *= 1.0 - f_air
        mean = sig.mean(axis=0)  # partial volume across the slab
        if sigma_px > 0:
            mean = ndimage.gaussian_filter(mean, sigma_px)
        tissue[k] = cls[SUBSLICES // 2]
        s = mean * bias(bx, by, zk - slab_centre)
        real = s + rng.standard_normal(s.shape, dtype=np.float32) * np.float32(noise_sd)
        imag = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(noise_sd)
        magnitude = np.sqrt(real * real + imag * imag)  # Rician noise of a magnitude image
        out[k] = np.clip(np.rint(magnitude * np.float32(gain)), 0, 65535)

    spacing = (p, p, float(settings.slice_mm))

    def to_image(array):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return img

    mr = to_image(out)
    for key, value in {"Modality": "MR", "MagneticFieldStrength": f"{FIELD_STRENGTH_T:g}",
                       "EchoTime": f"{te:.2f}", "RepetitionTime": f"{tr:.0f}", "FlipAngle": "90",
                       "ScanningSequence": "SE", "SequenceVariant": "SK",
                       "MRAcquisitionType": "2D", "SequenceName": "2D T2w spin echo",
                       "SliceThickness": f"{settings.slice_mm:g}", "PatientID": pid,
                       "Manufacturer": "crossmod MR simulator (from CT)"}.items():
        mr.SetMetaData(key, value)
    structures = {name: to_image(labels[name]) for name in PAROTIDS if masks[name] is not None}
    ct_voxel_cc = float(np.prod(image.GetSpacing())) / 1000.0
    mr_voxel_cc = p * p * settings.slice_mm / 1000.0
    info = {
        "patient_id": pid, "source": str(case.source) if case.source else "", "seed": int(seed),
        "slices": n_slices, "matrix": n, "pixel_mm": p, "slice_mm": float(settings.slice_mm),
        "z_range_mm": [origin[2], origin[2] + (n_slices - 1) * settings.slice_mm],
        "parotid_centre_mm": slab["parotid_centre_mm"], "slab_offset_mm": slab_offset,
        "slab_shift_mm": slab["slab_shift_mm"], "ct_valid_z_mm": slab["ct_valid_z_mm"],
        "acquisition": {"EchoTime": te, "RepetitionTime": tr, "FlipAngle": 90,
                        "MagneticFieldStrength": FIELD_STRENGTH_T, "gain": gain,
                        "bias_amplitude": bias_amp, "snr_fat": snr, "noise_sd": noise_sd * gain,
                        "psf_mm": float(settings.psf_mm),
                        "signal": {name: float(signal[t] * gain) for t, name in enumerate(TISSUES)}},
        "masks_used": sorted(k for k in sampler.fields if k not in PAROTIDS + ("air", "hu")),
        "ct_volumes_cc": {name: float(masks[name].sum()) * ct_voxel_cc
                          for name in PAROTIDS if masks[name] is not None},
        "volumes_cc": {name: float(labels[name].sum()) * mr_voxel_cc for name in PAROTIDS},
    }
    return SimulatedMR(pid, mr, structures, to_image(tissue), _jsonable(info))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    return value


# ----------------------------------------------------------------------------------------------
# A cohort


def read_source_case(dataset: str, folder) -> Case:
    """A source CT with its parotids and, for OpenKBP, the extra masks the simulator uses."""
    from crossmod_lib import datasets

    if datasets.COHORT_LAYOUTS.get(dataset) == "openkbp":
        return datasets.read_openkbp_case(folder,
                                          extra_structures=EXTRA_STRUCTURES)
    return datasets.read_dataset_case(dataset, folder)


def _simulate_one(task: tuple) -> dict:
    """Read one source CT, simulate its MR and write it under ``root`` (pool worker)."""
    dataset, folder, seed, settings, root = task
    case = read_source_case(dataset, folder)
    mr = simulate_mr(case, seed, SimulationSettings(**settings))
    target = Path(root) / mr.patient_id
    write_image(mr.image, target / "img.nrrd")
    for name, mask in mr.structures.items():
        write_image(mask, target / "structures" / f"{name}.nrrd")
    return mr.info


def cohort_arguments(dataset: str, seed: int, settings: SimulationSettings,
                     record: dict | None = None) -> dict:
    """What a simulated cohort depends on, as recorded in (and compared with) ``simulation.json``:
    source dataset, seed, settings, simulator version and the caller's ``record``."""
    arguments = {"dataset": dataset, "seed": int(seed), "version": SIMULATOR_VERSION,
                 "settings": _jsonable(asdict(settings)), **(record or {})}
    return json.loads(json.dumps(arguments))  # as read back from the file (tuples as lists)


def write_simulated_cohort(out_dir, dataset: str, folders, *, seed: int,
                           settings: SimulationSettings | None = None, workers: int = 1,
                           progress: bool = True, record: dict | None = None) -> dict:
    """Simulate one MR per source CT folder into ``out_dir`` (replaced atomically).

    Returns (and writes as ``simulation.json``) the arguments, ``record`` (the caller's
    description of the source, e.g. the cohort spec) and every patient's info.
    """
    settings = settings or SimulationSettings()
    settings.check()
    folders = [Path(f) for f in folders]
    if not folders:
        raise CrossmodError(f"{out_dir}: no source CT folders to simulate MR from")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise CrossmodError(f"simulation workers={workers!r} must be an integer >= 1")
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise CrossmodError(f"{out_dir}: source patient names repeat; each needs its own folder")
    out_dir = Path(out_dir).absolute()
    with staged_folder(out_dir) as tmp:
        tasks = [(dataset, str(f), int(seed), asdict(settings), str(tmp)) for f in folders]
        infos = run_tasks(_simulate_one, tasks, workers, progress, desc="simulate MR", unit="patient")
        summary = {
            "format": "crossmod T2w MR simulated from CT",
            "version": SIMULATOR_VERSION,
            "package_version": __version__,
            "arguments": cohort_arguments(dataset, seed, settings, record),
            "tissues": list(TISSUES),
            "layout": "<patient>/img.nrrd, <patient>/structures/<name>.nrrd",
            "structures": list(PAROTIDS),
            "patients": sorted(infos, key=lambda i: names.index(i["patient_id"])),
        }
        (tmp / RawFiles.SIMULATION).write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------------------------
# The ideal translation: the simulator itself as the CT -> MR translator


def _ideal_one(task: tuple):
    """Simulate one CT patient's MR and prepare its slices as an MR (pool worker)."""
    from crossmod_lib.preparation import prepare_case

    dataset, folder, seed, settings, preprocessing = task
    source = read_source_case(dataset, folder)
    mr = simulate_mr(source, seed, SimulationSettings(**settings))
    return prepare_case(Case(mr.patient_id, mr.image, mr.structures, source=Path(folder)), "MR",
                        preprocessing)


def ideal_translation_slices(cohort_json, ct_folders, preprocessing: dict, *, slice_mm: float | None = None,
                             workers: int = 1, progress: bool = False) -> dict[str, np.ndarray]:
    """The CT patients' slices as a perfect CT -> MR translator would give them: the simulator's
    own MR of each CT patient, drawn with the arguments of the simulated MR cohort
    (``cohort_json``: its ``simulation.json``: source dataset, seed, settings) and prepared as
    that cohort's MR (``preprocessing``), labelled by the patient's own contours carried onto the
    MR's 4 mm slices (:func:`simulate_mr`). Arrays as the cleaning step's training slices
    (image, labels, head_mask, patient, slice_index, z_mm, source_row, pixel_mm).

    A control beyond the paper, possible only where the MR cohort is simulated: a U-Net trained on
    these slices and tested on the MR cohort scores what the method would with a CycleGAN that
    made no error, so its gap to the cross-modality network is what the translator costs.
    ``slice_mm`` (default: the cohort's) draws the MR at another slice thickness, its slab as long
    as the cohort's (e.g. the CT's 2.5 mm: the translation as the CycleGAN sees its input, slice for
    slice, the 4 mm slab's partial volume and the contours' majority over it left out).
    """
    path = Path(cohort_json)
    try:
        arguments = json.loads(path.read_text())["arguments"]
        dataset, seed = arguments["dataset"], int(arguments["seed"])
        settings = SimulationSettings.from_dict(arguments["settings"], f"{path}: settings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CrossmodError(f"{path}: not a simulated MR cohort's record ({exc.__class__.__name__}: {exc})") from None
    if slice_mm is not None:
        if isinstance(slice_mm, bool) or not isinstance(slice_mm, (int, float)) or slice_mm <= 0:
            raise CrossmodError(f"ideal translation: slice_mm={slice_mm!r} must be a number > 0")
        scale = settings.slice_mm / float(slice_mm)  # the same slab length in thinner or thicker slices
        settings = replace(settings, slice_mm=float(slice_mm), slices=int(np.ceil(settings.slices * scale)),
                           min_slices=int(np.ceil(settings.min_slices * scale)))
        settings.check()
    folders = [Path(f) for f in ct_folders]
    if not folders:
        raise CrossmodError(f"{path}: no CT patients to translate")
    for folder in folders:
        if not folder.is_dir():
            raise CrossmodError(f"{folder}: CT patient folder not found")
    tasks = [(dataset, str(f), seed, asdict(settings), dict(preprocessing)) for f in folders]
    from crossmod_lib.preparation import stack_slices

    cases = run_tasks(_ideal_one, tasks, workers, progress, desc="ideal translation", unit="patient")
    arrays = stack_slices(cases)
    arrays.pop("annotated")  # every CT patient is contoured; the training slices have no such array
    return {**arrays, "slice_index": arrays["slice_index"].astype(np.int64),
            "source_row": np.arange(len(arrays["image"]), dtype=np.int64),
            "pixel_mm": np.float64(preprocessing["pixel_mm"])}

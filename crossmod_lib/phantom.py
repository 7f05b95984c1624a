"""Embedded digital head-and-neck phantom: the project's offline default data set.

What it is
    A deterministic generator of two *unpaired* cohorts of *different* synthetic patients, shaped
    like the paper's data (Kieselmann et al. 2021, section 2.A and Table I):

    * CT: Hounsfield units (int16), 0.98 x 0.98 x 2.5 mm voxels, 165-235 slices from the upper
      trunk to the vertex, a visible skin line, Gaussian noise and a slight blur, and parotid
      contours of *clinical* quality: the true gland masks with the defects of the paper's Fig. 9
      (a contour covering only part of a gland, a contour missing on a few slices) injected at
      configurable rates and recorded in the metadata.
    * T2-weighted MR: 0.5 x 0.5 x 4 mm voxels, 30 slices around the parotids, the signal of a
      spin-echo equation with per-patient TE/TR from Table I and tissue PD/T1/T2 at 3 T,
      partial-volume averaging across the 4 mm slice, a smooth bias field, Rician noise and an
      arbitrary per-patient gain; no skin line. Accurate parotid contours plus a second
      observer's contours (a smooth perturbation of the gland surface) for an interobserver
      reference.

    Every patient is a small set of smooth implicit shapes (perturbed split ellipses whose
    parameters vary with height) in a patient frame in mm, with z = 0 at the parotid centre.
    A per-patient pose (scale, translation, in-plane rotation) maps that frame to the scanner's
    LPS frame: x to patient left, y to posterior, z to superior. Each axial slice is rendered to a
    tissue-class map by painting the structures in a priority order (later ones win), evaluating
    each only inside its bounding box; intensities per modality come from the class map.

What it is not
    An anatomical atlas. The anatomy is schematic (no vessels, nerves, ears, thyroid, clavicles
    or arms; the upper trunk is a soft-tissue block with the spine, trachea and lung apices), the
    textures are flat apart from noise, and the MR has no motion, chemical-shift or flow
    artefacts. It exists so that the pipeline, its tests and the book run offline with data whose
    geometry, contrasts, label defects and headers look like those of the paper; numbers computed
    on it say nothing about real patients.

Layout written by :func:`write_phantom` (MICCAI 2015 / PDDCA-like)::

    out_dir/ct/<pid>/img.nrrd, out_dir/ct/<pid>/structures/Parotid_{L,R}.nrrd
    out_dir/mr/<pid>/img.nrrd, out_dir/mr/<pid>/structures/Parotid_{L,R}.nrrd,
    out_dir/mr/<pid>/structures_observer2/Parotid_{L,R}.nrrd
    out_dir/phantom.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from crossmod_lib import __version__
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import staged_folder
from crossmod_lib.parallel import run_tasks
from crossmod_lib.runs import RawFiles

PHANTOM_VERSION = "1.0"

# ----------------------------------------------------------------------------------------------
# Tissue classes and their intensities

TISSUES = ("air", "skin", "fat", "soft_tissue", "muscle", "parotid", "submandibular", "brain",
           "csf", "cortical_bone", "marrow", "lung")
(AIR, SKIN, FAT, SOFT, MUSCLE, PAROTID, SUBMAND, BRAIN, CSF, CORTICAL, MARROW,
 LUNG) = range(len(TISSUES))

# Typical CT numbers (HU). The parotid is fatty glandular tissue, so it sits between fat and
# muscle; the skin is denser than the subcutaneous fat, which gives CT its visible skin line.
CT_HU = {AIR: -1000.0, SKIN: 40.0, FAT: -100.0, SOFT: 20.0, MUSCLE: 50.0, PAROTID: -15.0,
         SUBMAND: 40.0, BRAIN: 35.0, CSF: 8.0, CORTICAL: 1200.0, MARROW: 300.0, LUNG: -820.0}

# Proton density (relative), T1 and T2 (ms) at 3 T, as seen by a T2-weighted (turbo) spin echo:
# fat is bright (J-coupling lengthens its apparent T2), the parotid a bit darker than fat, muscle
# dark, cortical bone black and CSF brightest. The skin gets fat's values: T2w MR shows no
# distinct skin line.
MR_TISSUE = {AIR: (0.0, 1000.0, 1.0), SKIN: (0.9, 380.0, 120.0), FAT: (0.9, 380.0, 120.0),
             SOFT: (0.8, 1200.0, 60.0), MUSCLE: (0.75, 1400.0, 45.0),
             PAROTID: (0.9, 900.0, 105.0), SUBMAND: (0.85, 1100.0, 80.0),
             BRAIN: (0.75, 1100.0, 90.0), CSF: (1.0, 4000.0, 2000.0),
             CORTICAL: (0.05, 300.0, 1.0), MARROW: (0.9, 550.0, 100.0), LUNG: (0.05, 1300.0, 20.0)}

PAROTIDS = ("Parotid_L", "Parotid_R")
CT_SPACING = (0.98, 0.98, 2.5)  # mm, paper Table I
MR_SPACING = (0.5, 0.5, 4.0)
MR_TE_RANGE = (96.72, 107.30)   # ms, paper Table I
MR_TR_RANGE = (3198.0, 4000.0)
MIN_FOV_MM = 200.0              # the head at parotid level, with the pose's margins, must fit
VERTEX_Z = 160.0                # top of the head in the patient frame (mm above the parotids)
BOTTOM_Z = -1000.0              # trunk structures (spine, airway, lungs) run down to here
MR_SUBSLICES = 5                # sub-slices averaged into one 4 mm MR slice (partial volume)


def spin_echo_signal(pd, t1, t2, te: float, tr: float):
    """Spin-echo signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2) (90 degree excitation)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


@dataclass
class PhantomPatient:
    """One synthetic patient: image, parotid masks on the image grid and a JSON-able record.

    ``tissue`` is a debug aid: the tissue-class map (uint8, an index into :data:`TISSUES`) on the
    image grid (for the MR, the class at each slice centre), so callers can pick voxels by tissue.
    """

    patient_id: str
    image: sitk.Image
    structures: dict[str, sitk.Image]
    observer2: dict[str, sitk.Image] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    tissue: sitk.Image | None = None


# ----------------------------------------------------------------------------------------------
# Implicit shapes: split ellipses with radial perturbations, their depth and bounding box


@dataclass(frozen=True)
class Ellipse:
    """An in-plane cross-section: centre, semi-axes (anterior/posterior differ), rotation.

    ``harmonics`` are (k, amplitude, phase): the radius is multiplied by 1 + sum a cos(k t - p),
    a low-frequency shape perturbation of the outline.
    """

    cx: float
    cy: float
    a: float
    b_ant: float
    b_post: float
    angle: float = 0.0
    harmonics: tuple = ()

    def bbox(self, margin: float = 0.0) -> tuple[float, float, float, float]:
        grow = 1.0 + sum(abs(h[1]) for h in self.harmonics)
        if self.angle:
            r = max(self.a, self.b_ant, self.b_post) * grow + margin
            return self.cx - r, self.cx + r, self.cy - r, self.cy + r
        return (self.cx - self.a * grow - margin, self.cx + self.a * grow + margin,
                self.cy - self.b_ant * grow - margin, self.cy + self.b_post * grow + margin)


def ellipse_depth(x: np.ndarray, y: np.ndarray, e: Ellipse) -> np.ndarray:
    """Approximate signed distance (mm) to the outline of ``e``: positive inside.

    With g the normalised radius (1 on the outline) the first-order distance is (1 - g) / |grad g|,
    which is exact on the axes and good near the outline, where the thin layers (skin, cortex)
    need it; 1/|grad g| = g/h is constant along a ray from the centre, so the depth grows
    linearly inwards and never vanishes at the centre.
    """
    dx = x - np.float32(e.cx)
    dy = y - np.float32(e.cy)
    if e.angle:
        c, s = np.float32(math.cos(e.angle)), np.float32(math.sin(e.angle))
        dx, dy = c * dx + s * dy, c * dy - s * dx
    b = np.where(dy < 0, np.float32(e.b_ant), np.float32(e.b_post)) if e.b_ant != e.b_post \
        else np.float32(e.b_ant)
    xa = dx / np.float32(e.a)
    yb = dy / b
    g = np.sqrt(xa * xa + yb * yb)
    h = np.sqrt((xa / np.float32(e.a)) ** 2 + (yb / b) ** 2)
    scale = np.divide(g, h, out=np.full_like(g, min(e.a, e.b_ant, e.b_post)), where=h > 1e-12)
    outline = np.float32(1.0)
    if e.harmonics:
        theta = np.arctan2(yb, xa)
        outline = np.ones_like(g)
        for k, amp, phase in e.harmonics:
            outline += np.float32(amp) * np.cos(np.float32(k) * theta - np.float32(phase))
    return (outline - g) * scale


def end_cap(z: float, z0: float, z1: float, r0: float, r1: float) -> float:
    """In-plane shrink factor of a tube on [z0, z1] with elliptic (rounded) ends of length r0, r1.

    An ellipsoid is the special case r0 = r1 = half its height.
    """
    if z <= z0 or z >= z1:
        return 0.0
    if r0 > 0 and z < z0 + r0:
        t = (z0 + r0 - z) / r0
        return math.sqrt(max(0.0, 1.0 - t * t))
    if r1 > 0 and z > z1 - r1:
        t = (z - (z1 - r1)) / r1
        return math.sqrt(max(0.0, 1.0 - t * t))
    return 1.0


class Keyframes:
    """Shape parameters given at a few heights, interpolated smoothly (smoothstep) in between."""

    def __init__(self, rows: Sequence[Sequence[float]], names: Sequence[str]):
        table = np.asarray(sorted(rows), dtype=float)
        self.z = table[:, 0]
        self.values = table[:, 1:]
        self.names = tuple(names)

    def __call__(self, z: float) -> dict[str, float]:
        if z <= self.z[0]:
            row = self.values[0]
        elif z >= self.z[-1]:
            row = self.values[-1]
        else:
            i = int(np.searchsorted(self.z, z)) - 1
            t = (z - self.z[i]) / (self.z[i + 1] - self.z[i])
            t = t * t * (3.0 - 2.0 * t)  # smoothstep: no kinks in the outline at the keyframes
            row = (1.0 - t) * self.values[i] + t * self.values[i + 1]
        return dict(zip(self.names, row))


Layers = Sequence[tuple[float, int]]


@dataclass
class Structure:
    """A named union of cross-sections, painted as nested layers by depth below its outline.

    ``layers`` are (depth threshold in mm, tissue), painted in order, e.g. a bone is cortex from
    its outline and marrow deeper than 2 mm. ``ring`` > 0 makes it a shell of that half-thickness
    around the outline (the mandible arch); ``y_max`` keeps only the part anterior to it.
    ``pad`` widens the evaluated box (mm) for callers that move the outline outwards (observer 2).
    """

    name: str
    sections: Callable[[float], list[Ellipse]]
    z_range: tuple[float, float]
    layers: Layers | Callable[[float], Layers]
    ring: float = 0.0
    y_max: float | None = None
    pad: float = 0.0

    def layers_at(self, z: float) -> Layers:
        return self.layers(z) if callable(self.layers) else self.layers

    def depth(self, x: np.ndarray, y: np.ndarray, sections: list[Ellipse]) -> np.ndarray:
        d = ellipse_depth(x, y, sections[0])
        for e in sections[1:]:
            d = np.maximum(d, ellipse_depth(x, y, e))  # union of implicit shapes = max depth
        if self.ring:
            d = np.float32(self.ring) - np.abs(d)
        if self.y_max is not None:
            d = np.minimum(d, np.float32(self.y_max) - y)  # intersection with a half-plane
        return d

    def bbox(self, sections: list[Ellipse]) -> tuple[float, float, float, float]:
        boxes = np.array([e.bbox(self.ring + self.pad) for e in sections])
        x0, y0 = boxes[:, 0].min(), boxes[:, 2].min()
        x1, y1 = boxes[:, 1].max(), boxes[:, 3].max()
        if self.y_max is not None:
            y1 = min(y1, self.y_max)
        return x0, x1, y0, y1


def ellipsoid(centre, semi, *, b_post=None, c_low=None, angle=0.0, harmonics=(),
              drift=(0.0, 0.0)) -> tuple[Callable[[float], list[Ellipse]], tuple[float, float]]:
    """Cross-sections of a (split, perturbed, sheared) ellipsoid and its z range.

    ``harmonics`` are (k, amplitude, phase, phase change per mm of z) so the perturbation twists
    slowly with height; ``drift`` moves the centre by that many mm per mm of z (oblique shapes).
    """
    cx, cy, cz = centre
    a, b, c = semi
    b_post = b if b_post is None else b_post
    c_low = c if c_low is None else c_low

    def sections(z: float) -> list[Ellipse]:
        f = end_cap(z, cz - c_low, cz + c, c_low, c)
        if f <= 0:
            return []
        harm = tuple((k, amp, ph + rate * (z - cz)) for k, amp, ph, rate in harmonics)
        return [Ellipse(cx + drift[0] * (z - cz), cy + drift[1] * (z - cz), a * f, b * f,
                        b_post * f, angle, harm)]

    return sections, (cz - c_low, cz + c)


def tube(path: Callable[[float], dict], z0: float, z1: float, r0: float = 0.0,
         r1: float = 0.0, **fixed) -> Callable[[float], list[Ellipse]]:
    """Cross-sections of a tube following ``path(z)`` (cx, cy, a, b_ant, b_post) on [z0, z1]."""

    def sections(z: float) -> list[Ellipse]:
        f = end_cap(z, z0, z1, r0, r1)
        if f <= 0:
            return []
        p = {**path(z), **fixed}
        return [Ellipse(p["cx"], p["cy"], p["a"] * f, p["b_ant"] * f, p["b_post"] * f,
                        p.get("angle", 0.0))]

    return sections


def fixed_path(cx, cy, a, b) -> Callable[[float], dict]:
    """A straight vertical path (a cylinder)."""
    return lambda z: {"cx": cx, "cy": cy, "a": a, "b_ant": b, "b_post": b}


def linear_path(top, bottom, a, b) -> Callable[[float], dict]:
    """A straight oblique path from ``bottom`` (x, y, z) to ``top`` (an oblique muscle)."""

    def path(z: float) -> dict:
        t = (z - bottom[2]) / (top[2] - bottom[2])
        return {"cx": bottom[0] + t * (top[0] - bottom[0]),
                "cy": bottom[1] + t * (top[1] - bottom[1]), "a": a, "b_ant": b, "b_post": b}

    return path


# ----------------------------------------------------------------------------------------------
# The anatomy (patient frame, mm: x to the patient's left, y posterior, z superior,
# z = 0 at the centre of the parotid glands)

BODY = Keyframes([
    # z,     cy,   a,   b_ant, b_post      (a: half-width; b_ant/b_post: half-depths from cy)
    (-450.0, 10.0, 165.0, 100.0, 95.0),    # upper trunk
    (-260.0, 10.0, 165.0, 100.0, 95.0),
    (-200.0, 15.0, 110.0, 75.0, 75.0),     # shoulders narrowing into the neck
    (-150.0, 15.0, 62.0, 58.0, 62.0),      # neck base
    (-90.0, 12.0, 58.0, 60.0, 62.0),       # neck
    (-60.0, 5.0, 63.0, 85.0, 70.0),        # under the chin (submental region)
    (-40.0, 0.0, 67.0, 95.0, 74.0),        # chin and mandible
    (0.0, -5.0, 74.0, 97.0, 84.0),         # face at parotid level
    (30.0, -5.0, 75.0, 100.0, 88.0),       # upper face
    (60.0, 0.0, 75.0, 98.0, 93.0),         # orbits
    (90.0, 5.0, 75.0, 92.0, 97.0),         # cranium; a dome closes it above
], ("cy", "a", "b_ant", "b_post"))

SPINE = Keyframes([
    # z,     body cy, body a, body b, canal a, canal b
    (-450.0, 35.0, 16.0, 12.0, 8.0, 7.0),   # thoracic
    (-250.0, 30.0, 14.0, 11.0, 8.0, 7.0),
    (-150.0, 20.0, 10.0, 8.0, 10.0, 7.0),   # cervical
    (-60.0, 15.0, 9.0, 8.0, 10.0, 7.0),
    (0.0, 12.0, 9.0, 8.0, 10.0, 7.5),
    (30.0, 12.0, 8.0, 7.0, 11.0, 8.0),      # atlas, foramen magnum
    (60.0, 12.0, 8.0, 7.0, 11.0, 8.0),
], ("cy", "a", "b", "ca", "cb"))

AIRWAY = Keyframes([
    # z,     cy,   a,   b       trachea -> larynx -> pharynx -> nasopharynx
    (-450.0, 5.0, 9.0, 9.0),
    (-250.0, -15.0, 9.0, 8.0),
    (-150.0, -28.0, 9.0, 8.0),
    (-100.0, -30.0, 11.0, 9.0),
    (-70.0, -22.0, 13.0, 8.0),
    (-40.0, -10.0, 12.0, 6.0),
    (0.0, -8.0, 13.0, 6.0),
    (20.0, -10.0, 12.0, 8.0),
    (40.0, -10.0, 12.0, 8.0),
], ("cy", "a", "b"))


NOSE = ellipsoid((0.0, -98.0, 32.0), (13.0, 18.0, 22.0), b_post=10.0)[0]


def body_outline(z: float) -> list[Ellipse]:
    """The skin surface at height z: trunk, neck, face and a dome over the cranium, plus the
    nose (a union: the first section is the main outline)."""
    f = end_cap(z, -1e9, VERTEX_Z, 0.0, VERTEX_Z - 90.0)
    if f <= 0:
        return []
    p = BODY(z)
    return [Ellipse(0.0, p["cy"], p["a"] * f, p["b_ant"] * f, p["b_post"] * f)] + NOSE(z)


def fat_thickness(y: np.ndarray, outline: Ellipse, base: float) -> np.ndarray:
    """Subcutaneous fat thickness (4-10 mm): thicker at the back of the neck than at the face."""
    yn = (y - np.float32(outline.cy)) / np.float32(max(outline.b_ant, outline.b_post))
    return np.clip(np.float32(base) * (1.0 + np.float32(0.3) * yn), 4.0, 10.0)


def cranium_shape():
    """The brain case: the cerebrum's ellipsoid united with a lower, posterior one (the posterior
    fossa), so the skull base is high in front (orbits) and low at the back (foramen magnum)."""
    cerebrum, zc = ellipsoid((0.0, 4.0, 92.0), (68.0, 82.0, 64.0), b_post=88.0, c_low=44.0)
    fossa, zf = ellipsoid((0.0, 34.0, 52.0), (50.0, 42.0, 32.0), b_post=44.0)

    def sections(z: float) -> list[Ellipse]:
        return cerebrum(z) + fossa(z)

    return sections, (min(zc[0], zf[0]), max(zc[1], zf[1]))


def parotid_shape(side: int, p: dict) -> tuple[Callable[[float], list[Ellipse]], tuple]:
    """A parotid gland: the union of a superficial lobe lateral and posterior to the mandibular
    ramus and a deep lobe medial to it, each a perturbed ellipsoid (~45 mm cranio-caudal).

    ``side`` is +1 for the left gland (patient left = +x), -1 for the right one.
    """
    sup, sup_z = ellipsoid((side * p["sup_x"], p["sup_y"], p["sup_z"]),
                           (p["sup_a"], p["sup_b"], p["sup_c"]), angle=side * p["sup_angle"],
                           harmonics=p["sup_harmonics"])
    deep, deep_z = ellipsoid((side * p["deep_x"], p["deep_y"], p["deep_z"]),
                             (p["deep_a"], p["deep_b"], p["deep_c"]), angle=-side * 0.3,
                             harmonics=p["deep_harmonics"])

    def sections(z: float) -> list[Ellipse]:
        return sup(z) + deep(z)

    return sections, (min(sup_z[0], deep_z[0]), max(sup_z[1], deep_z[1]))


def submandibular_shape(side: int, p: dict):
    """A submandibular gland: below the parotid, medial to the angle of the mandible."""
    return ellipsoid((side * p["x"], p["y"], p["z"]), (p["a"], p["b"], p["c"]),
                     harmonics=p["harmonics"])


def _pair(name: str, make, layers, **kw) -> list[Structure]:
    """The left (+x) and right (-x) copies of a bilateral structure."""
    out = []
    for side, suffix in ((1, "_L"), (-1, "_R")):
        sections, zr = make(side)
        out.append(Structure(name + suffix, sections, zr, layers, **kw))
    return out


BONE = ((0.0, CORTICAL), (2.0, MARROW))


def _between_vertebrae(z: float, shift: float = 0.0) -> bool:
    """Whether z is in one of the 5 mm gaps between cervical/thoracic vertebrae (below C2)."""
    return z < -8.0 + shift and ((-8.0 + shift - z) % 19.0) < 5.0


def vertebral_body_layers(z: float) -> Layers:
    """Vertebral bodies (cortex and marrow) separated by 5 mm intervertebral discs."""
    if _between_vertebrae(z):
        return ((0.0, SOFT),)
    return ((0.0, CORTICAL), (1.5, MARROW))


def vertebral_arch_layers(z: float) -> Layers:
    """The posterior arches and processes, with gaps (ligaments) between vertebrae; they sit a
    little lower than their bodies."""
    return () if _between_vertebrae(z, -4.0) else BONE


def spine_structures() -> list[Structure]:
    """Cervical and upper thoracic spine: body, posterior arch, spinous and transverse
    processes, spinal canal with CSF around the cord (which reaches into the posterior fossa)."""

    def canal_cy(p):
        return p["cy"] + p["b"] + 8.0

    def body(z):
        p = SPINE(z)
        return [Ellipse(0.0, p["cy"], p["a"], p["b"], p["b"])]

    def arch(z):
        p = SPINE(z)
        return [Ellipse(0.0, canal_cy(p), p["ca"] + 5.0, p["cb"] + 5.0, p["cb"] + 5.0)]

    def spinous(z):
        p = SPINE(z)
        return [Ellipse(0.0, canal_cy(p) + p["cb"] + 12.0, 3.5, 10.0, 10.0)]

    def transverse(z):
        p = SPINE(z)
        return [Ellipse(0.0, p["cy"] + 4.0, p["a"] + 12.0, 3.5, 3.5)]

    def canal(z):
        p = SPINE(z)
        return [Ellipse(0.0, canal_cy(p), p["ca"], p["cb"], p["cb"])]

    def capped(fn, z0, z1, r0=0.0, r1=6.0):
        def sections(z):
            f = end_cap(z, z0, z1, r0, r1)
            if f <= 0:
                return []
            return [Ellipse(e.cx, e.cy, e.a * f, e.b_ant * f, e.b_post * f) for e in fn(z)]
        return sections

    lo, top = BOTTOM_Z, 28.0
    return [
        Structure("transverse_processes", capped(transverse, lo, top - 10), (lo, top),
                  vertebral_arch_layers),
        Structure("vertebral_body", capped(body, lo, top), (lo, top), vertebral_body_layers),
        Structure("vertebral_arch", capped(arch, lo, top + 4), (lo, top + 4),
                  vertebral_arch_layers),
        Structure("spinous_process", capped(spinous, lo, top), (lo, top), vertebral_arch_layers),
        Structure("spinal_canal", capped(canal, lo, 48.0, 0.0, 8.0), (lo, 48.0),
                  ((0.0, CSF), (2.5, BRAIN))),
    ]


def draw_anatomy(rng: np.random.Generator) -> tuple[list[Structure], dict]:
    """One patient's structures (in painting order: later ones win) and their parameters.

    Most of the anatomy is a shared template; the pose (see :func:`draw_pose`) and the glands'
    sizes and shapes carry the per-patient variation.
    """

    def u(lo, hi):
        return float(rng.uniform(lo, hi))

    def harmonics(kmax=4, lo=0.03, hi=0.08):
        # low-frequency radial perturbation, twisting slowly with height
        return tuple((k, u(lo, hi), u(0, 2 * math.pi), u(-0.03, 0.03)) for k in range(2, kmax + 1))

    params: dict = {"fat_mm": u(4.5, 8.0)}
    glands = {}
    for name in PAROTIDS:
        s = u(0.93, 1.07)  # left/right asymmetry on top of the pose's scaling
        glands[name] = {
            "sup_x": 55.0 + u(-1.5, 1.5), "sup_y": 13.0 + u(-2, 2), "sup_z": u(-2, 2),
            "sup_a": 10.5 * s * u(0.95, 1.05), "sup_b": 19.0 * s * u(0.95, 1.05),
            "sup_c": 23.0 * u(0.93, 1.07), "sup_angle": math.radians(u(10, 30)),
            "sup_harmonics": harmonics(),
            "deep_x": 42.0 + u(-1.5, 1.5), "deep_y": 17.0 + u(-2, 2), "deep_z": -3.0 + u(-2, 2),
            "deep_a": 8.5 * s, "deep_b": 9.5 * s, "deep_c": 15.0 * u(0.9, 1.1),
            "deep_harmonics": harmonics(3, 0.03, 0.07),
        }
    submand = {}
    for name in ("Submandibular_L", "Submandibular_R"):
        submand[name] = {"x": 30.0 + u(-2, 2), "y": -18.0 + u(-2, 2), "z": -48.0 + u(-3, 3),
                         "a": 10.0 * u(0.9, 1.1), "b": 13.0 * u(0.9, 1.1), "c": 10.0 * u(0.9, 1.1),
                         "harmonics": harmonics(3)}
    params["parotid"] = glands
    params["submandibular"] = submand

    def spine_path(dy, a, b):
        def path(z):
            p = SPINE(z)
            return {"cx": 0.0, "cy": p["cy"] + p["b"] + 8.0 + dy, "a": a, "b_ant": b, "b_post": b}
        return path

    def airway_path(z):
        p = AIRWAY(z)
        return {"cx": 0.0, "cy": p["cy"], "a": p["a"], "b_ant": p["b"], "b_post": p["b"]}

    def beside(path, dx, dy, a, b):
        def shifted(z):
            p = path(z)
            return {"cx": p["cx"] + dx, "cy": p["cy"] + dy, "a": a, "b_ant": b, "b_post": b}
        return shifted

    def prevertebral(side):
        def path(z):
            p = SPINE(z)
            return {"cx": side * 8.0, "cy": p["cy"] - p["b"] - 3.0, "a": 6.0, "b_ant": 3.5,
                    "b_post": 3.5}
        return tube(path, -250.0, 28.0, 0.0, 6.0), (-250.0, 28.0)

    def ramus(side):
        # the vertical plate of the mandible, leaning back as it rises towards the condyle
        def path(z):
            return {"cx": side * (44.0 - 0.05 * z), "cy": -10.0 + 0.15 * z, "a": 4.5,
                    "b_ant": 14.0, "b_post": 14.0}
        return tube(path, -42.0, 24.0, 4.0, 6.0), (-42.0, 24.0)

    structures: list[Structure] = []
    add = structures.append
    # deep fat and muscles first: glands and bones are painted over them
    structures += _pair("parapharyngeal_fat", lambda s: ellipsoid((s * 25.0, -2.0, 0.0),
                                                                  (6.0, 10.0, 22.0)), ((0, FAT),))
    structures += _pair("orbit_fat", lambda s: ellipsoid((s * 32.0, -64.0, 60.0),
                                                         (17.0, 22.0, 15.0)), ((0, FAT),))
    structures += _pair("paraspinal", lambda s: (
        tube(spine_path(24.0, 19.0, 17.0), BOTTOM_Z, 40.0, 0.0, 12.0, cx=s * 21.0),
        (BOTTOM_Z, 40.0)), ((0, MUSCLE),))
    structures += _pair("prevertebral", prevertebral, ((0, MUSCLE),))
    structures += _pair("sternocleidomastoid", lambda s: (
        tube(linear_path((s * 56.0, 38.0, 22.0), (s * 30.0, -36.0, -175.0), 10.0, 6.0),
             -175.0, 22.0, 10.0, 10.0), (-175.0, 22.0)), ((0, MUSCLE),))
    structures += _pair("strap_muscles", lambda s: (
        tube(beside(airway_path, s * 13.0, -13.0, 9.0, 4.0), -175.0, -62.0, 8.0, 8.0),
        (-175.0, -62.0)), ((0, MUSCLE),))
    add(Structure("floor_of_mouth", *ellipsoid((0.0, -48.0, -46.0), (33.0, 30.0, 8.0)),
                  ((0, MUSCLE),)))
    add(Structure("tongue", *ellipsoid((0.0, -42.0, -14.0), (27.0, 30.0, 22.0)), ((0, MUSCLE),)))
    structures += _pair("masseter", lambda s: ellipsoid(
        (s * 55.0, -12.0, -6.0), (6.5, 15.0, 30.0), drift=(0.0, 0.15)), ((0, MUSCLE),))
    structures += _pair("medial_pterygoid", lambda s: ellipsoid(
        (s * 33.0, -8.0, -8.0), (5.5, 12.0, 24.0), angle=s * 0.35, drift=(-s * 0.1, 0.0)),
        ((0, MUSCLE),))
    # glands
    for side, name in ((1, "Submandibular_L"), (-1, "Submandibular_R")):
        add(Structure(name, *submandibular_shape(side, submand[name]), ((0, SUBMAND),)))
    for side, name in ((1, "Parotid_L"), (-1, "Parotid_R")):
        add(Structure(name, *parotid_shape(side, glands[name]), ((0, PAROTID),), pad=9.0))
    # air spaces
    add(Structure("airway", tube(airway_path, BOTTOM_Z, 40.0, 0.0, 8.0), (BOTTOM_Z, 40.0),
                  ((0, AIR),)))
    add(Structure("nasopharynx", *ellipsoid((0.0, -30.0, 24.0), (10.0, 14.0, 10.0)), ((0, AIR),)))
    add(Structure("nasal_cavity", *ellipsoid((0.0, -62.0, 32.0), (11.0, 26.0, 21.0)),
                  ((0, AIR),)))
    add(Structure("nasal_septum", *ellipsoid((0.0, -64.0, 32.0), (1.2, 22.0, 19.0)),
                  ((0, SOFT),)))
    structures += _pair("maxillary_sinus", lambda s: ellipsoid(
        (s * 27.0, -55.0, 32.0), (13.0, 16.0, 15.0)), ((0, CORTICAL), (1.5, AIR)))
    structures += _pair("eye", lambda s: ellipsoid((s * 32.0, -74.0, 60.0), (12.0, 12.0, 12.0)),
                        ((0, SOFT), (1.2, CSF)))  # sclera, vitreous (water-like)
    # bones; the dental arches and the mandible body are shells around a U (ring + y_max)
    add(Structure("maxilla", tube(fixed_path(0.0, -35.0, 30.0, 48.0), -6.0, 9.0), (-6.0, 9.0),
                  BONE, ring=5.0, y_max=-28.0))
    add(Structure("hard_palate", *ellipsoid((0.0, -52.0, 8.0), (26.0, 28.0, 2.5)), BONE))
    add(Structure("upper_teeth", tube(fixed_path(0.0, -35.0, 30.0, 48.0), -16.0, -6.0),
                  (-16.0, -6.0), ((0, CORTICAL),), ring=4.0, y_max=-30.0))
    add(Structure("lower_teeth", tube(fixed_path(0.0, -33.0, 29.0, 47.0), -27.0, -17.0),
                  (-27.0, -17.0), ((0, CORTICAL),), ring=4.0, y_max=-30.0))
    # the mandible: a U from angle to angle (below the teeth) and the two rami
    add(Structure("mandible_body", tube(fixed_path(0.0, -18.0, 42.0, 62.0), -54.0, -26.0),
                  (-54.0, -26.0), ((0, CORTICAL), (2.2, MARROW)), ring=5.0, y_max=-10.0))
    structures += _pair("mandible_ramus", ramus, ((0, CORTICAL), (2.0, MARROW)))
    structures += spine_structures()
    structures += _pair("mastoid", lambda s: ellipsoid((s * 50.0, 33.0, 30.0), (9.0, 11.0, 13.0)),
                        BONE)
    add(Structure("cranium", *cranium_shape(),
                  ((0, CORTICAL), (2.0, MARROW), (5.0, CORTICAL), (7.0, CSF), (9.5, BRAIN))))
    structures += _pair("lung", lambda s: (
        tube(fixed_path(s * 68.0, 18.0, 42.0, 50.0), BOTTOM_Z, -215.0, 0.0, 35.0),
        (BOTTOM_Z, -215.0)), ((0, LUNG),))
    return structures, params


# ----------------------------------------------------------------------------------------------
# Pose and grids


@dataclass(frozen=True)
class Pose:
    """Patient frame -> scanner frame: w = t + R(rot) diag(sx, sy) u in-plane, wz = tz + sz uz."""

    sx: float
    sy: float
    sz: float
    tx: float
    ty: float
    tz: float
    rot: float

    def to_patient_z(self, wz: float) -> float:
        return (wz - self.tz) / self.sz


def draw_pose(rng: np.random.Generator) -> Pose:
    """Per-patient size (scale 0.9-1.1 separately LR/AP), position (+-10 mm in-plane, +-3 mm in
    z) and in-plane rotation (+-5 degrees)."""
    return Pose(sx=float(rng.uniform(0.9, 1.1)), sy=float(rng.uniform(0.9, 1.1)),
                sz=float(rng.uniform(0.95, 1.05)), tx=float(rng.uniform(-10, 10)),
                ty=float(rng.uniform(-10, 10)), tz=float(rng.uniform(-3, 3)),
                rot=math.radians(float(rng.uniform(-5, 5))))


class SliceGrid:
    """An axial image grid and the patient-frame coordinates of its pixel centres."""

    def __init__(self, n: int, spacing: float, pose: Pose):
        self.n = n
        self.spacing = spacing
        self.origin = -(n - 1) / 2.0 * spacing  # the image centre is the scanner's x = y = 0
        self.pose = pose
        w = (self.origin + spacing * np.arange(n)).astype(np.float32)
        rx = w[None, :] - np.float32(pose.tx)
        ry = w[:, None] - np.float32(pose.ty)
        c, s = np.float32(math.cos(pose.rot)), np.float32(math.sin(pose.rot))
        # rows are y, columns are x (numpy [y, x], as sitk.GetArrayFromImage gives per slice)
        self.ux = ((c * rx + s * ry) / np.float32(pose.sx)).astype(np.float32)
        self.uy = ((c * ry - s * rx) / np.float32(pose.sy)).astype(np.float32)

    def index_box(self, box) -> tuple[slice, slice] | None:
        """Pixel rows/columns covering a patient-frame box (x0, x1, y0, y1), or None if outside."""
        x0, x1, y0, y1 = box
        p = self.pose
        c, s = math.cos(p.rot), math.sin(p.rot)
        corners = np.array([(x, y) for x in (x0, x1) for y in (y0, y1)])
        wx = p.tx + c * p.sx * corners[:, 0] - s * p.sy * corners[:, 1]
        wy = p.ty + s * p.sx * corners[:, 0] + c * p.sy * corners[:, 1]
        cols = (wx - self.origin) / self.spacing
        rows = (wy - self.origin) / self.spacing
        c0, c1 = max(0, math.floor(cols.min()) - 1), min(self.n, math.ceil(cols.max()) + 2)
        r0, r1 = max(0, math.floor(rows.min()) - 1), min(self.n, math.ceil(rows.max()) + 2)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)


# ----------------------------------------------------------------------------------------------
# Rendering one axial slice to tissue classes


@dataclass
class SliceRender:
    """The tissue classes of one slice and the depth maps of the structures asked for."""

    classes: np.ndarray
    depths: dict[str, tuple[tuple[slice, slice], np.ndarray]]


def render_slice(structures: list[Structure], params: dict, grid: SliceGrid, z: float,
                 keep: Sequence[str] = ()) -> SliceRender:
    """Paint the tissue classes of the axial slice at patient height ``z``.

    Order of painting: body (skin, subcutaneous fat, soft tissue) first, then the structures in
    their priority order; the skin is painted again last so that nothing pokes through it, and
    everything outside the body is air.
    """
    classes = np.zeros((grid.n, grid.n), dtype=np.uint8)
    depths = {}
    body = Structure("body", body_outline, (-math.inf, math.inf), ())
    sections = body_outline(z)
    if not sections:
        return SliceRender(classes, depths)
    body_box = grid.index_box(body.bbox(sections))
    if body_box is None:
        return SliceRender(classes, depths)
    by, bx = grid.uy[body_box], grid.ux[body_box]
    body_d = body.depth(bx, by, sections)
    outline = sections[0]
    skin = np.float32(2.0)
    region = classes[body_box]
    region[body_d > 0] = FAT
    region[body_d > skin + fat_thickness(by, outline, params["fat_mm"])] = SOFT
    for s in structures:
        if not s.z_range[0] < z < s.z_range[1]:
            continue
        sections = s.sections(z)
        if not sections:
            continue
        box = grid.index_box(s.bbox(sections))
        if box is None:
            continue
        d = s.depth(grid.ux[box], grid.uy[box], sections)
        sub = classes[box]
        for threshold, tissue in s.layers_at(z):
            sub[d > threshold] = tissue
        if s.name in keep:
            depths[s.name] = (box, d)
    region[(body_d > 0) & (body_d <= skin)] = SKIN
    region[body_d <= 0] = AIR
    inside = np.zeros_like(classes)  # drop anything a structure painted outside the body
    inside[body_box] = region
    return SliceRender(inside, depths)


def gland_masks(render: SliceRender, grid: SliceGrid, names=PAROTIDS,
                perturbation: dict | None = None, z: float = 0.0) -> dict[str, np.ndarray]:
    """Each gland's mask on the slice: the voxels painted as parotid inside that gland.

    With ``perturbation`` (a :class:`SmoothField` per gland) the outline is moved by the field
    (a second observer) and the mask keeps only tissue an observer could call gland (not bone,
    air or skin).
    """
    out = {}
    for name in names:
        mask = np.zeros((grid.n, grid.n), dtype=bool)
        if name in render.depths:
            box, d = render.depths[name]
            cls = render.classes[box]
            if perturbation is None:
                mask[box] = (d > 0) & (cls == PAROTID)
            else:
                d2 = d + perturbation[name](grid.ux[box], grid.uy[box], z)
                mask[box] = (d2 > 0) & np.isin(cls, (PAROTID, FAT, SOFT, MUSCLE, SUBMAND))
        out[name] = mask
    return out


class SmoothField:
    """A smooth random 3D field (sum of plane waves, wavelengths 15-45 mm) of given RMS (mm)."""

    def __init__(self, rng: np.random.Generator, rms: float, waves: int = 8):
        direction = rng.normal(size=(waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        self.k = direction * (2 * math.pi / rng.uniform(15.0, 45.0, size=(waves, 1)))
        self.phase = rng.uniform(0, 2 * math.pi, size=waves)
        self.amp = rms * math.sqrt(2.0 / waves)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        out = np.zeros_like(x)
        for (kx, ky, kz), ph in zip(self.k, self.phase):
            out += np.sin(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz * z + ph))
        return out * np.float32(self.amp)


# ----------------------------------------------------------------------------------------------
# Patients


def _streams(seed: int, cohort: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent random streams (anatomy, acquisition, labels) of one patient.

    Keyed by (seed, cohort, index), so patient k is the same whatever the cohort sizes and can be
    generated in any process; CT and MR patients come from different streams (different people).
    The label stream is separate so the defect rates change the contours and nothing else.
    """
    code = {"ct": 1, "mr": 2}[cohort]
    children = np.random.SeedSequence([int(seed), code, int(index)]).spawn(3)
    return tuple(np.random.default_rng(c) for c in children)


def _check_common(seed, index) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise CrossmodError(f"phantom seed={seed!r} must be a non-negative integer")
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise CrossmodError(f"phantom patient index={index!r} must be a non-negative integer")


def _check_matrix(name: str, matrix, spacing: float) -> None:
    need = math.ceil(MIN_FOV_MM / spacing)
    if not isinstance(matrix, (int, np.integer)) or isinstance(matrix, bool) or matrix < need:
        raise CrossmodError(
            f"phantom {name}={matrix!r} is too small to hold the head: at {spacing} mm pixels it "
            f"must be an integer >= {need} ({MIN_FOV_MM:g} mm field of view)")


def _check_rate(name: str, value) -> None:
    if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool) \
            or not 0.0 <= float(value) <= 1.0:
        raise CrossmodError(f"phantom {name}={value!r} must be a number in [0, 1]")


def _check_ct_slices(ct_slices) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in ct_slices)
        ok = all(float(v) == int(v) for v in ct_slices) and 1 <= lo <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CrossmodError(
            f"phantom ct_slices={ct_slices!r} must be [min, max] with 1 <= min <= max")
    return lo, hi


def _check_mr_slices(mr_slices) -> None:
    if not isinstance(mr_slices, (int, np.integer)) or isinstance(mr_slices, bool) or mr_slices < 1:
        raise CrossmodError(f"phantom mr_slices={mr_slices!r} must be an integer >= 1")


def _to_image(array: np.ndarray, spacing, origin) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _jsonable(value):
    """Plain-Python copy of numpy scalars/tuples so ``info`` survives json.dumps."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    return value


def _jitter(table: dict, rng: np.random.Generator, spread: dict) -> dict:
    """Per-patient variation of the tissue values (scanner calibration, tissue composition)."""
    return {t: v + rng.uniform(-spread.get(t, 0.0), spread.get(t, 0.0)) for t, v in table.items()}


def _volume_cc(masks: np.ndarray | Sequence[np.ndarray], spacing) -> float:
    return float(np.count_nonzero(masks)) * spacing[0] * spacing[1] * spacing[2] / 1000.0


def _partial_cut(plane: np.ndarray, grid: SliceGrid, part: str, side: float) -> np.ndarray:
    """What a partial contour keeps of one slice's gland mask ``plane`` [y, x]: the ``part``
    (lateral, medial, anterior or posterior) half about the gland's centre on that slice."""
    if part in ("lateral", "medial"):
        coord = side * grid.ux
        centre = coord[plane].mean()
        keep = coord >= centre if part == "lateral" else coord < centre
    else:
        coord = grid.uy
        centre = coord[plane].mean()
        keep = coord >= centre if part == "posterior" else coord < centre
    return plane & keep


def _longest_run(slices: Sequence[int]) -> list[int]:
    """The longest run of consecutive integers in the sorted ``slices`` (the first of equals)."""
    best: list[int] = []
    current: list[int] = []
    for k in slices:
        current = current + [k] if current and k == current[-1] + 1 else [k]
        if len(current) > len(best):
            best = current
    return best


def inject_label_defects(masks: dict[str, np.ndarray], grid: SliceGrid, rng: np.random.Generator,
                         partial_rate: float, missing_rate: float) -> list[dict]:
    """Damage CT gland masks [z, y, x] in place like the clinical contours of the paper's Fig. 9.

    Per gland, with probability ``partial_rate`` a run of 3-8 slices is contoured only in part
    (the lateral, medial, anterior or posterior half about the gland's centre on that slice), and
    with probability ``missing_rate`` the contour is missing on 1-3 consecutive slices. Both are
    placed inside the gland's extent and never on the same slices. Each returned record names the
    structure, side, kind and slices (indices along the arrays' first axis). The rates only decide
    whether a defect is applied: the same random numbers are drawn either way.

    A partial run covers only slices where the cut keeps part of the contour and removes part
    of it: a tip of the gland a pixel or a row wide has no such half, and a "partial" contour
    there would be the whole contour or none. The run is drawn over the gland's extent and, where
    it reaches such a slice, moved (deterministically) into the longest block of consecutive
    slices that can be cut, and shortened to that block if it is longer; a gland with no such
    slice gets no partial defect. So every recorded partial slice keeps some but not all of the
    true contour, and every recorded missing slice had a contour.
    """
    defects = []
    for name, mask in masks.items():
        do_partial = rng.random() < partial_rate
        do_missing = rng.random() < missing_rate
        part = str(rng.choice(["lateral", "lateral", "medial", "anterior", "posterior"]))
        run, start_u = int(rng.integers(3, 9)), rng.random()
        gap, where_u = int(rng.integers(1, 4)), rng.random()
        present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if present.size < 5:
            continue
        partial_slices: list[int] = []
        if do_partial:
            side = 1.0 if name.endswith("_L") else -1.0
            cuts = {}
            for k in present:
                kept = _partial_cut(mask[k], grid, part, side)
                if 0 < np.count_nonzero(kept) < np.count_nonzero(mask[k]):
                    cuts[int(k)] = kept
            block = _longest_run(sorted(cuts))
            if block:
                run = min(run, present.size - 2, len(block))
                first = present[0] + int(start_u * (present.size - run + 1))
                first = min(max(first, block[0]), block[-1] - run + 1)
                partial_slices = list(range(first, first + run))
                for k in partial_slices:
                    mask[k] = cuts[k]
                defects.append({"structure": name, "side": name[-1], "kind": "partial",
                                "part": part, "slices": partial_slices})
        if do_missing:
            # interior slices only (a missing end slice is a different, milder error) and away
            # from the partial run
            free = [int(k) for k in present[1:-1] if k not in partial_slices]
            runs = [free[i:i + gap] for i in range(len(free) - gap + 1)
                    if free[i + gap - 1] - free[i] == gap - 1]
            if runs:
                chosen = runs[int(where_u * len(runs))]
                mask[chosen] = False
                defects.append({"structure": name, "side": name[-1], "kind": "missing",
                                "slices": chosen})
    return defects


def _check_defects(defects: list[dict], truth: dict[str, np.ndarray],
                   labels: dict[str, np.ndarray]) -> None:
    """Every recorded defect really changed the contour as recorded, and nothing else did."""
    touched = {name: set() for name in labels}
    for d in defects:
        for k in d["slices"]:
            before, after = truth[d["structure"]][k], labels[d["structure"]][k]
            if np.count_nonzero(after) >= np.count_nonzero(before) or (
                    d["kind"] == "missing" and after.any()):
                raise RuntimeError(f"phantom defect {d} did not change slice {k}")
            if d["kind"] == "partial" and not after.any():
                raise RuntimeError(f"phantom defect {d} removed all of slice {k}")
            touched[d["structure"]].add(k)
    for name, label in labels.items():
        diff = np.flatnonzero((truth[name] != label).reshape(label.shape[0], -1).any(axis=1))
        if {int(k) for k in diff} - touched[name]:
            raise RuntimeError(f"phantom {name}: unrecorded contour changes")


def ct_patient(seed: int, index: int, *, ct_matrix: int = 512, ct_slices=(165, 235),
               partial_rate: float = 0.1, missing_rate: float = 0.1) -> PhantomPatient:
    """CT patient ``index`` of the cohort drawn from ``seed`` (HU, int16, clinical contours)."""
    _check_common(seed, index)
    _check_matrix("ct_matrix", ct_matrix, CT_SPACING[0])
    lo, hi = _check_ct_slices(ct_slices)
    _check_rate("partial_rate", partial_rate)
    _check_rate("missing_rate", missing_rate)
    anatomy_rng, scan_rng, label_rng = _streams(seed, "ct", index)
    pose = draw_pose(anatomy_rng)
    structures, params = draw_anatomy(anatomy_rng)
    n_slices = int(scan_rng.integers(lo, hi + 1))
    dz = CT_SPACING[2]
    # from just above the vertex downwards; short stacks are kept around the parotids
    top = min(VERTEX_Z + scan_rng.uniform(5.0, 20.0), 0.45 * n_slices * dz)
    origin_z = pose.tz + pose.sz * top - (n_slices - 1) * dz
    hu_table = _jitter(CT_HU, scan_rng, {FAT: 8, PAROTID: 10, MUSCLE: 5, SOFT: 5, SUBMAND: 5,
                                         BRAIN: 3, CORTICAL: 100, MARROW: 40, SKIN: 5})
    lut = np.array([hu_table[t] for t in range(len(TISSUES))], dtype=np.float32)
    noise_sd = float(scan_rng.uniform(10.0, 15.0))
    blur_px = float(scan_rng.uniform(0.55, 0.75))
    white_sd = noise_sd * 2.0 * blur_px * math.sqrt(math.pi)

    grid = SliceGrid(ct_matrix, CT_SPACING[0], pose)
    hu = np.empty((n_slices, ct_matrix, ct_matrix), dtype=np.int16)
    tissue = np.empty((n_slices, ct_matrix, ct_matrix), dtype=np.uint8)
    gland_planes: dict[str, dict[int, np.ndarray]] = {name: {} for name in PAROTIDS}
    for k in range(n_slices):
        z = pose.to_patient_z(origin_z + k * dz)
        render = render_slice(structures, params, grid, z, keep=PAROTIDS)
        tissue[k] = render.classes
        for name, mask in gland_masks(render, grid).items():
            if mask.any():
                gland_planes[name][k] = mask
        # quantum noise, then the reconstruction kernel's slight blur, which also gives the noise
        # its fine-grained CT texture (white noise blurred by a Gaussian of sigma s pixels keeps
        # 1 / (2 s sqrt(pi)) of its standard deviation)
        plane = lut[render.classes]
        plane += scan_rng.standard_normal(plane.shape, dtype=np.float32) * np.float32(white_sd)
        plane = ndimage.gaussian_filter(plane, blur_px, truncate=3.0)
        hu[k] = np.clip(np.rint(plane), -1024, 3071)

    # the masks only within the slab of slices holding a gland (memory), defects on those
    present = sorted(set().union(*gland_planes.values()))
    k0, k1 = (present[0], present[-1] + 1) if present else (0, 0)
    truth = {name: np.zeros((k1 - k0, ct_matrix, ct_matrix), dtype=bool) for name in PAROTIDS}
    for name, planes in gland_planes.items():
        for k, mask in planes.items():
            truth[name][k - k0] = mask
    del gland_planes
    slab = {name: m.copy() for name, m in truth.items()}
    defects = inject_label_defects(slab, grid, label_rng, partial_rate, missing_rate)
    _check_defects(defects, truth, slab)
    pid = f"ct_{index:03d}"
    for d in defects:
        d["patient"] = pid
        d["slices"] = [k + k0 for k in d["slices"]]  # slice indices of the image

    origin = (grid.origin, grid.origin, origin_z)
    image = _to_image(hu, CT_SPACING, origin)
    del hu
    masks = {}
    for name in PAROTIDS:
        full = np.zeros((n_slices, ct_matrix, ct_matrix), dtype=np.uint8)
        full[k0:k1] = slab[name]
        masks[name] = _to_image(full, CT_SPACING, origin)
    for key, value in {"Modality": "CT", "KVP": "120", "PatientID": pid,
                       "SliceThickness": f"{dz:g}", "ConvolutionKernel": "soft tissue",
                       "Manufacturer": "crossmod digital phantom"}.items():
        image.SetMetaData(key, value)
    info = {
        "patient_id": pid, "modality": "CT", "seed": seed, "index": index,
        "slices": n_slices, "z_range_mm": [origin_z, origin_z + (n_slices - 1) * dz],
        "pose": pose.__dict__, "anatomy": params,
        "acquisition": {"KVP": 120, "noise_sd_hu": noise_sd, "blur_px": blur_px,
                        "hu": {TISSUES[t]: v for t, v in hu_table.items()}},
        "volumes_cc": {name: _volume_cc(truth[name], CT_SPACING) for name in PAROTIDS},
        "label_volumes_cc": {name: _volume_cc(slab[name], CT_SPACING) for name in PAROTIDS},
        "defects": defects,
    }
    return PhantomPatient(pid, image, masks, {}, _jsonable(info),
                          _to_image(tissue, CT_SPACING, origin))


def bias_field(rng: np.random.Generator, amplitude: float):
    """A smooth multiplicative receive-coil bias: 1 + amplitude * (a normalised quadratic in x,
    y, z over the head). Returns a function of (world x, world y grids, world z)."""
    coef = rng.normal(size=6)
    # normalise so the field spans +-amplitude over a 100 mm radius sphere around the centre
    pts = rng.uniform(-1.0, 1.0, size=(4000, 3))
    pts = pts[np.linalg.norm(pts, axis=1) <= 1.0]

    def poly(x, y, z):
        return (coef[0] * x + coef[1] * y + coef[2] * z + coef[3] * x * x + coef[4] * y * y
                + coef[5] * x * y)

    peak = np.abs(poly(pts[:, 0], pts[:, 1], pts[:, 2])).max()
    scale = amplitude / peak

    def field_at(wx: np.ndarray, wy: np.ndarray, wz: float) -> np.ndarray:
        f = poly(wx / 100.0, wy / 100.0, np.float32(wz / 100.0)) * np.float32(scale)
        return np.clip(np.float32(1.0) + f.astype(np.float32), 0.5, 1.5)

    return field_at


def mr_patient(seed: int, index: int, *, mr_matrix: int = 512,
               mr_slices: int = 30) -> PhantomPatient:
    """T2-weighted MR patient ``index`` of the cohort drawn from ``seed`` (two observers)."""
    _check_common(seed, index)
    _check_matrix("mr_matrix", mr_matrix, MR_SPACING[0])
    _check_mr_slices(mr_slices)
    anatomy_rng, scan_rng, label_rng = _streams(seed, "mr", index)
    pose = draw_pose(anatomy_rng)
    structures, params = draw_anatomy(anatomy_rng)
    te = float(scan_rng.uniform(*MR_TE_RANGE))
    tr = float(scan_rng.uniform(*MR_TR_RANGE))
    gain = float(np.exp(scan_rng.uniform(math.log(300.0), math.log(3000.0))))
    bias_amp = float(scan_rng.uniform(0.2, 0.3))
    bias = bias_field(scan_rng, bias_amp)
    offset = float(scan_rng.uniform(-5.0, 5.0))  # slab centre relative to the parotids
    tissue_table = {t: (pd * scan_rng.uniform(0.95, 1.05), t1, t2 * scan_rng.uniform(0.95, 1.05))
                    for t, (pd, t1, t2) in MR_TISSUE.items()}
    signal = np.array([spin_echo_signal(*tissue_table[t], te, tr) for t in range(len(TISSUES))],
                      dtype=np.float32)
    snr = float(scan_rng.uniform(20.0, 30.0))  # of fat, the brightest soft tissue
    noise_sd = float(signal[FAT] / snr)
    # ~2 mm RMS boundary disagreement gives the interobserver DSC of about 0.85 reported for
    # the parotids (paper Table II)
    observer2 = {name: SmoothField(label_rng, rms=2.1) for name in PAROTIDS}  # |field| < 9 mm

    dz = MR_SPACING[2]
    centre = pose.tz + pose.sz * offset
    origin_z = centre - (mr_slices - 1) / 2.0 * dz
    grid = SliceGrid(mr_matrix, MR_SPACING[0], pose)
    wxy = (grid.origin + MR_SPACING[0] * np.arange(mr_matrix)).astype(np.float32)
    wx, wy = wxy[None, :], wxy[:, None]
    sub = (np.arange(MR_SUBSLICES) - (MR_SUBSLICES - 1) / 2.0) * (dz / MR_SUBSLICES)
    shape = (mr_slices, mr_matrix, mr_matrix)
    image = np.empty(shape, dtype=np.uint16)
    tissue = np.empty(shape, dtype=np.uint8)
    labels = {name: np.zeros(shape, dtype=np.uint8) for name in PAROTIDS}
    labels2 = {name: np.zeros(shape, dtype=np.uint8) for name in PAROTIDS}
    for k in range(mr_slices):
        wz = origin_z + k * dz
        mean = np.zeros((mr_matrix, mr_matrix), dtype=np.float32)
        votes = {name: np.zeros((mr_matrix, mr_matrix), dtype=np.uint8) for name in PAROTIDS}
        votes2 = {name: np.zeros((mr_matrix, mr_matrix), dtype=np.uint8) for name in PAROTIDS}
        for j, off in enumerate(sub):
            z = pose.to_patient_z(wz + off)
            render = render_slice(structures, params, grid, z, keep=PAROTIDS)
            mean += signal[render.classes]
            if j == MR_SUBSLICES // 2:
                tissue[k] = render.classes
            for name, m in gland_masks(render, grid).items():
                votes[name] += m
            for name, m in gland_masks(render, grid, perturbation=observer2, z=z).items():
                votes2[name] += m
        mean /= np.float32(MR_SUBSLICES)  # partial volume across the 4 mm slice
        # an observer contours what the thick slice shows: the gland in most of the slab
        for name in PAROTIDS:
            labels[name][k] = 2 * votes[name] > MR_SUBSLICES
            labels2[name][k] = 2 * votes2[name] > MR_SUBSLICES
        s = mean * bias(wx, wy, wz)
        real = s + scan_rng.standard_normal(s.shape, dtype=np.float32) * np.float32(noise_sd)
        imag = scan_rng.standard_normal(s.shape, dtype=np.float32) * np.float32(noise_sd)
        magnitude = np.sqrt(real * real + imag * imag)  # Rician noise of a magnitude image
        image[k] = np.clip(np.rint(magnitude * np.float32(gain)), 0, 65535)

    pid = f"mr_{index:03d}"
    origin = (grid.origin, grid.origin, origin_z)
    img = _to_image(image, MR_SPACING, origin)
    for key, value in {"Modality": "MR", "MagneticFieldStrength": "3", "EchoTime": f"{te:.2f}",
                       "RepetitionTime": f"{tr:.0f}", "FlipAngle": "90",
                       "ScanningSequence": "SE", "SequenceVariant": "SK",
                       "MRAcquisitionType": "2D", "SequenceName": "2D T2w spin echo",
                       "SliceThickness": f"{dz:g}", "PatientID": pid,
                       "Manufacturer": "crossmod digital phantom"}.items():
        img.SetMetaData(key, value)
    masks = {name: _to_image(labels[name], MR_SPACING, origin) for name in PAROTIDS}
    masks2 = {name: _to_image(labels2[name], MR_SPACING, origin) for name in PAROTIDS}
    info = {
        "patient_id": pid, "modality": "MR", "seed": seed, "index": index,
        "slices": mr_slices, "z_range_mm": [origin_z, origin_z + (mr_slices - 1) * dz],
        "pose": pose.__dict__, "anatomy": params,
        "acquisition": {"EchoTime": te, "RepetitionTime": tr, "FlipAngle": 90,
                        "MagneticFieldStrength": 3, "gain": gain, "bias_amplitude": bias_amp,
                        "noise_sd": noise_sd * gain, "slab_offset_mm": offset,
                        "signal": {name: float(signal[t] * gain)
                                   for t, name in enumerate(TISSUES)}},
        "volumes_cc": {name: _volume_cc(labels[name], MR_SPACING) for name in PAROTIDS},
        "observer2_volumes_cc": {name: _volume_cc(labels2[name], MR_SPACING) for name in PAROTIDS},
        "defects": [],
    }
    return PhantomPatient(pid, img, masks, masks2, _jsonable(info),
                          _to_image(tissue, MR_SPACING, origin))


# ----------------------------------------------------------------------------------------------
# Writing the cohorts


def _write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # gzip level 1: most of the size reduction of gzip at a fraction of its time
    sitk.WriteImage(image, str(path), True, 1)


def _generate(task: tuple) -> dict:
    """Generate one patient and write its files under ``root``; returns its info (pool worker)."""
    cohort, seed, index, kwargs, root = task
    maker = ct_patient if cohort == "ct" else mr_patient
    patient = maker(seed, index, **kwargs)
    folder = Path(root) / cohort / patient.patient_id
    _write(patient.image, folder / "img.nrrd")
    for name, mask in patient.structures.items():
        _write(mask, folder / "structures" / f"{name}.nrrd")
    for name, mask in patient.observer2.items():
        _write(mask, folder / "structures_observer2" / f"{name}.nrrd")
    return patient.info


def _check_count(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise CrossmodError(f"phantom {name}={value!r} must be an integer >= 1")


def write_phantom(out_dir, *, seed: int = 2021, n_ct: int = 3, n_mr: int = 3,
                  ct_matrix: int = 512, ct_slices=(165, 235), mr_matrix: int = 512,
                  mr_slices: int = 30, partial_rate: float = 0.1, missing_rate: float = 0.1,
                  workers: int = 1, progress: bool = True) -> dict:
    """Generate both cohorts into ``out_dir`` (replaced atomically) and return phantom.json's data.

    Everything is written into a temporary sibling folder that is renamed to ``out_dir`` only
    when complete, so a failure leaves no half-written phantom behind (and an existing one
    untouched).
    """
    _check_common(seed, 0)
    _check_count("n_ct", n_ct)
    _check_count("n_mr", n_mr)
    _check_count("workers", workers)
    _check_matrix("ct_matrix", ct_matrix, CT_SPACING[0])
    _check_matrix("mr_matrix", mr_matrix, MR_SPACING[0])
    lo, hi = _check_ct_slices(ct_slices)
    _check_mr_slices(mr_slices)
    _check_rate("partial_rate", partial_rate)
    _check_rate("missing_rate", missing_rate)

    arguments = {"seed": int(seed), "n_ct": int(n_ct), "n_mr": int(n_mr),
                 "ct_matrix": int(ct_matrix), "ct_slices": [lo, hi],
                 "mr_matrix": int(mr_matrix), "mr_slices": int(mr_slices),
                 "partial_rate": float(partial_rate), "missing_rate": float(missing_rate),
                 "workers": int(workers)}
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise CrossmodError(f"phantom out_dir {out_dir} exists and is not a folder")
    with staged_folder(out_dir) as tmp:
        ct_kw = {"ct_matrix": ct_matrix, "ct_slices": (lo, hi), "partial_rate": partial_rate,
                 "missing_rate": missing_rate}
        mr_kw = {"mr_matrix": mr_matrix, "mr_slices": mr_slices}
        tasks = [("ct", seed, i, ct_kw, str(tmp)) for i in range(n_ct)]
        tasks += [("mr", seed, i, mr_kw, str(tmp)) for i in range(n_mr)]
        infos = run_tasks(_generate, tasks, workers, progress, desc="phantom", unit="patient")
        ct_infos = sorted((i for i in infos if i["modality"] == "CT"), key=lambda i: i["index"])
        mr_infos = sorted((i for i in infos if i["modality"] == "MR"), key=lambda i: i["index"])
        summary = {
            "format": "crossmod digital head-and-neck phantom",
            "version": PHANTOM_VERSION,
            "package_version": __version__,
            "arguments": arguments,
            "tissues": list(TISSUES),
            "layout": {"ct": "ct/<pid>/img.nrrd, ct/<pid>/structures/<name>.nrrd",
                       "mr": "mr/<pid>/img.nrrd, mr/<pid>/structures/<name>.nrrd, "
                             "mr/<pid>/structures_observer2/<name>.nrrd"},
            "structures": list(PAROTIDS),
            "defects": [d for i in ct_infos for d in i["defects"]],
            "ct": ct_infos,
            "mr": mr_infos,
        }
        (tmp / RawFiles.PHANTOM).write_text(json.dumps(summary, indent=1))
    return summary

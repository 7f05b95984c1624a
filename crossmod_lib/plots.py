"""Figures shared by the chapters: orthogonal views with contours, slice galleries.

Conventions of the paper's figures: left parotid red, right parotid green (Fig. 1); automatic
contours red and manual ones blue (Fig. 7); cross-modality learning red and the CT-trained network
green, the interobserver variability a grey band (Fig. 8). Axial slices in radiological convention
(patient left on the image right, anterior at the top); coronal and sagittal views with the head at
the top and physical aspect ratios.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator

from .io import PAROTIDS, Case

STRUCTURE_COLOURS = {"Parotid_L": "#e41a1c", "Parotid_R": "#4daf4a"}
#: Fig. 7 (paper): the automatic contour red, the manual one blue.
CONTOUR_COLOURS = {"automatic": "#e41a1c", "manual": "#377eb8"}
#: Fig. 8 (paper): cross-modality learning red, the CT-trained network green; the rest follow.
METHOD_COLOURS = {"cross_modality": "#d62728", "ct_only": "#2ca02c", "ct_only_paired": "#98df8a",
                  "naive": "#7f7f7f", "domain_random": "#9467bd", "mr_oracle": "#1f77b4"}
_MORE_COLOURS = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _overlay(ax, labels: np.ndarray, extent, origin: str, names=PAROTIDS) -> None:
    for value, name in enumerate(names, start=1):
        mask = labels == value
        if not mask.any():
            continue
        colour = STRUCTURE_COLOURS.get(name, "#377eb8")
        ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([colour]), alpha=0.35,
                  extent=extent, origin=origin, interpolation="nearest")
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0,
                   extent=extent, origin=origin)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """(x, y, z) voxel index of the labels' centroid, or the volume centre when there are none."""
    if labels.any():
        zc, yc, xc = (round(float(v)) for v in np.argwhere(labels > 0).mean(axis=0))
    else:
        zc, yc, xc = (s // 2 for s in labels.shape)
    return xc, yc, zc


def view_planes(shape, spacing, point_index, views=("axial", "coronal", "sagittal")):
    """Index expressions, extents and origins of axial, coronal and sagittal planes.

    ``shape``: the array's [z, y, x] shape; ``spacing``: SimpleITK (x, y, z) spacing;
    ``point_index``: the (x, y, z) voxel the planes pass through. Returns a list of
    ``(name, index, extent, origin)`` for ``views``, to use as ``array[index]`` with
    ``imshow(..., extent=extent, origin=origin)``: axial with anterior at the top and patient left
    on the image right, coronal and sagittal with the head at the top, all in mm.
    """
    xc, yc, zc = point_index
    sx, sy, sz = spacing
    nz, ny, nx = shape
    planes = {
        "axial": ((zc, slice(None), slice(None)), [0, nx * sx, ny * sy, 0], "upper"),
        "coronal": ((slice(None), yc, slice(None)), [0, nx * sx, 0, nz * sz], "lower"),
        "sagittal": ((slice(None), slice(None), xc), [0, ny * sy, 0, nz * sz], "lower"),
    }
    return [(name, *planes[name]) for name in views]


def _gland_point(labels: np.ndarray) -> tuple[tuple[int, int, int], str]:
    """Where Fig. 1's views cross, chosen like Fig. 7's (:func:`contour_views`): the axial plane
    with the largest labelled area, the coronal plane through the centroid of all labels and the
    sagittal plane through the first gland present (the left parotid, else the right one), since
    a sagittal plane through both glands' centroid is the midline and misses them. Returns the
    (x, y, z) voxel index and the structure the sagittal plane cuts ("" when there are no labels:
    then the volume centre)."""
    xc, yc, zc = _centre(labels)
    for value, name in enumerate(PAROTIDS, start=1):
        if (labels == value).any():
            zc = int(np.argmax((labels > 0).sum(axis=(1, 2))))
            return (_centre(labels == value)[0], yc, zc), name
    return (xc, yc, zc), ""


def orthogonal_views(case: Case, axes, window: tuple[float, float], point_index=None,
                     title: str = "") -> None:
    """Axial, coronal and sagittal views of a case on three axes, parotids coloured.

    The views pass through ``point_index`` ((x, y, z) voxel index), by default the axial slice
    with the largest parotid area, the coronal plane through the parotids' centroid and the
    sagittal plane through the left parotid's centroid (the right one's when there is no left);
    the volume centre when there are no labels.
    """
    array = sitk.GetArrayFromImage(case.image).astype(np.float32)  # [z, y, x]
    labels = case.label_array(PAROTIDS)
    if point_index is None:
        point, sagittal_gland = _gland_point(labels)
    else:
        point, sagittal_gland = point_index, ""
    lo, hi = window
    for ax, (name, index, extent, origin) in zip(axes, view_planes(array.shape, case.image.GetSpacing(), point)):
        ax.imshow(array[index], cmap="gray", vmin=lo, vmax=hi, extent=extent, origin=origin,
                  interpolation="bilinear")
        _overlay(ax, labels[index], extent, origin)
        if name == "sagittal" and sagittal_gland:
            name = f"sagittal ({sagittal_gland.replace('_', ' ')})"
        ax.set_title(f"{title} {name}".strip(), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])


def figure_views(cases: list[tuple[str, Case, tuple[float, float]]], figsize_per_row=(10, 3.6)):
    """Paper Fig. 1: one row of orthogonal views per (title, case, display window)."""
    fig, axes = plt.subplots(len(cases), 3, figsize=(figsize_per_row[0],
                                                     figsize_per_row[1] * len(cases)),
                             squeeze=False, constrained_layout=True)
    for row, (title, case, window) in zip(axes, cases):
        orthogonal_views(case, row, window, title=title)
    handles = [plt.Line2D([], [], color=c, lw=4, label=n.replace("_", " "))
               for n, c in STRUCTURE_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    return fig


def slice_gallery(slices: dict[str, np.ndarray], indices, titles=None, ncols: int = 6,
                  show_head: bool = True):
    """Prepared 2D slices (0-255) with the head outline (yellow) and parotid labels."""
    indices = list(indices)
    nrows = int(np.ceil(len(indices) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 1.9 * nrows + 0.3),
                             squeeze=False, constrained_layout=True)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (ax, i) in enumerate(zip(axes.ravel(), indices)):
        size = slices["image"][i].shape
        extent = [0, size[1], size[0], 0]
        ax.imshow(slices["image"][i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if show_head:
            ax.contour(slices["head_mask"][i].astype(float), levels=[0.5], colors=["#ffd92f"],
                       linewidths=0.8)
        _overlay(ax, slices["labels"][i], extent, "upper")
        ax.set_title(titles[k] if titles else str(i), fontsize=7)
    return fig


def metric_boxplots(table, metrics=(("dsc", "DSC"), ("hd", "HD (mm)"), ("msd", "MSD (mm)")),
                    group="structure", title: str = ""):
    """One box plot per metric, one box per group (e.g. left / right gland), points per case."""
    groups = sorted(table[group].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.0),
                             constrained_layout=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        values = [table.loc[table[group] == g, key].to_numpy(dtype=float) for g in groups]
        values = [v[np.isfinite(v)] for v in values]
        ax.boxplot(values, positions=range(len(groups)), widths=0.5, showfliers=False)
        for k, v in enumerate(values):
            jitter = np.random.default_rng(k).uniform(-0.12, 0.12, len(v))
            ax.plot(k + jitter, v, "o", ms=3, alpha=0.5, color=STRUCTURE_COLOURS.get(groups[k], "k"))
        ax.set_xticks(range(len(groups)), [str(g).replace("_", " ") for g in groups])
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# Chapter 5: Figs. 7 and 8


def _outline(ax, mask: np.ndarray, colour: str, extent, origin: str, width: float = 1.2) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=width,
                   extent=extent, origin=origin)


def contour_views(image: sitk.Image, manual: np.ndarray, automatic: np.ndarray, axes,
                  window: tuple[float, float] | None = None, point_index=None,
                  views=("axial", "sagittal", "coronal"), margin_mm: float | None = 25.0) -> None:
    """One patient's MR in three planes with the manual (blue) and automatic (red) contours.

    ``manual`` and ``automatic`` are label arrays [z, y, x] on the image's grid (every gland is
    outlined on its own; the manual contour is drawn wider, underneath). By default the axial
    plane is the one with the largest manual parotid area, the coronal plane passes through the
    glands' centroid and the sagittal plane through the left gland's centroid (a sagittal plane
    through the midline would miss both glands); the window is the 1st-99th percentile of the
    image. ``margin_mm``: the in-plane view is zoomed to the glands (both contours) plus this
    margin (None: the whole field of view); the cranio-caudal axis is always shown whole.
    """
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if point_index is None:
        point_index, _ = _gland_point(manual if manual.any() else automatic)
    if window is None:
        window = tuple(float(v) for v in np.percentile(array, (1, 99)))
    values = sorted((set(np.unique(manual)) | set(np.unique(automatic))) - {0})
    sx, sy, _ = image.GetSpacing()
    union = (manual > 0) | (automatic > 0)
    limits = {}
    if margin_mm is not None and union.any():
        ys, xs = np.flatnonzero(union.any(axis=(0, 2))), np.flatnonzero(union.any(axis=(0, 1)))
        limits["x"] = (max(xs[0] * sx - margin_mm, 0), min((xs[-1] + 1) * sx + margin_mm, array.shape[2] * sx))
        limits["y"] = (max(ys[0] * sy - margin_mm, 0), min((ys[-1] + 1) * sy + margin_mm, array.shape[1] * sy))
    for ax, (name, index, extent, origin) in zip(axes, view_planes(array.shape, image.GetSpacing(),
                                                                   point_index, views)):
        ax.imshow(array[index], cmap="gray", vmin=window[0], vmax=window[1], extent=extent,
                  origin=origin, interpolation="bilinear")
        for value in values:
            _outline(ax, manual[index] == value, CONTOUR_COLOURS["manual"], extent, origin, width=2.0)
            _outline(ax, automatic[index] == value, CONTOUR_COLOURS["automatic"], extent, origin,
                     width=1.0)
        if limits:
            if name == "axial":
                ax.set_xlim(*limits["x"])
                ax.set_ylim(limits["y"][1], limits["y"][0])  # anterior at the top
            elif name == "coronal":
                ax.set_xlim(*limits["x"])
            else:  # sagittal: anterior-posterior along the horizontal axis
                ax.set_xlim(*limits["y"])
        ax.set_xticks([])
        ax.set_yticks([])


def figure_contours(examples: list[dict], title: str = "", views=("axial", "sagittal", "coronal"),
                    panel: float = 2.6):
    """Paper Fig. 7: one column per patient, rows axial, sagittal and coronal; automatic red,
    manual blue. ``examples``: dicts with ``patient``, ``image``, ``reference`` and
    ``prediction`` (as :func:`crossmod_lib.evaluation.contour_examples` gives), optionally ``dsc``;
    a ``reference`` of None (an unannotated patient, :func:`~crossmod_lib.evaluation.prediction_gallery`)
    draws the automatic contour alone, the patient titled "no manual contours"."""
    if not examples:
        raise ValueError("figure_contours: no examples")
    fig, axes = plt.subplots(len(views), len(examples), squeeze=False, constrained_layout=True,
                             figsize=(panel * len(examples), panel * len(views) * 0.9))
    any_manual = False
    for column, example in enumerate(examples):
        manual = example.get("reference")
        any_manual |= manual is not None
        if manual is None:
            manual = np.zeros_like(example["prediction"])
        contour_views(example["image"], manual, example["prediction"], axes[:, column], views=views)
        label = example["patient"] + (f" (DSC {example['dsc']:.2f})" if "dsc" in example else "")
        if example.get("reference") is None:
            label += "\n(no manual contours)"
        if not np.any(example["prediction"]):
            label += "\n(nothing contoured)"
        axes[0, column].set_title(label, fontsize=9)
    for row, name in enumerate(views):
        axes[row, 0].set_ylabel(name, fontsize=9)
    handles = [plt.Line2D([], [], color=CONTOUR_COLOURS["automatic"], lw=2, label="automatic")]
    if any_manual:
        handles.append(plt.Line2D([], [], color=CONTOUR_COLOURS["manual"], lw=2, label="manual"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, -0.03))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def method_colours(models) -> dict:
    """A colour per method: :data:`METHOD_COLOURS`, then further colours in turn."""
    extra = iter(_MORE_COLOURS * 4)
    return {m: METHOD_COLOURS.get(m) or next(extra) for m in models}


def method_boxplots(per_patient, interobserver=None, band: str = "sd",
                    metrics=(("dsc", "DSC"), ("hd", "HD (mm)"), ("msd", "MSD (mm)")),
                    order=None, title: str = "", width: float = 9.0, distance_scale: str = "auto"):
    """Paper Fig. 8: box plots per method of metrics averaged over both glands, one panel per
    metric (stacked top to bottom as in the paper), with the patients as points.

    ``per_patient``: :func:`crossmod_lib.evaluation.per_patient`'s table (columns model, title,
    modality and the metrics). ``interobserver``: the same averages between two observers, drawn
    as a grey band: ``band="sd"`` mean ± SD (the paper's Table II form), ``"range"`` min to max.
    Undefined distances (an empty contour) are left out and counted under the method's name.
    ``distance_scale``: y axis of the distance panels (all but DSC): ``"linear"``, ``"log"`` or
    ``"auto"`` (log when one method's median is over 5x another's, as a baseline that misses the
    glands would otherwise squash every other box into a line).
    """
    import seaborn as sns

    if band not in ("sd", "range"):
        raise ValueError(f"band={band!r}: 'sd' or 'range'")
    if distance_scale not in ("linear", "log", "auto"):
        raise ValueError(f"distance_scale={distance_scale!r}: 'linear', 'log' or 'auto'")
    models = list(order) if order is not None else list(dict.fromkeys(per_patient["model"]))
    data = per_patient[per_patient["model"].isin(models)]
    titles = data.drop_duplicates("model").set_index("model")["title"]
    modality = data.drop_duplicates("model").set_index("model")["modality"]
    colours = method_colours(models)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(width, 2.5 * len(metrics) + 0.6),
                             sharex=True, squeeze=False, constrained_layout=True)
    for ax, (key, label) in zip(axes[:, 0], metrics):
        finite = data[np.isfinite(data[key].to_numpy(dtype=float))]
        if interobserver is not None and len(interobserver):
            values = interobserver[key].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if values.size:
                mean = values.mean()
                sd = values.std(ddof=1) if values.size > 1 else 0.0
                lo, hi = (mean - sd, mean + sd) if band == "sd" else (values.min(), values.max())
                ax.axhspan(lo, hi, color="#bbbbbb", alpha=0.5, zorder=0, lw=0)
                ax.axhline(mean, color="#888888", lw=1, ls="--", zorder=0.5)
        sns.boxplot(data=finite, x="model", y=key, order=models, hue="model", hue_order=models,
                    palette=colours, legend=False, ax=ax, width=0.55, showfliers=False,
                    boxprops={"alpha": 0.75})
        sns.stripplot(data=finite, x="model", y=key, order=models, color="black", size=3,
                      alpha=0.6, jitter=0.12, ax=ax)
        if key != "dsc" and _log_axis(finite, key, distance_scale):
            values = finite[key].to_numpy(dtype=float)
            if (values > 0).all():
                ax.set_yscale("log")
            else:  # a distance of 0 (both contours empty): linear below 1 mm
                ax.set_yscale("symlog", linthresh=1.0)
                ax.set_ylim(bottom=0.0)
            label += ", log scale"
        ax.set_ylabel(label)
        ax.set_xlabel("")
        undefined = {m: int((~np.isfinite(data.loc[data["model"] == m, key].to_numpy(dtype=float))).sum())
                     for m in models}
        for k, m in enumerate(models):
            if undefined[m]:
                ax.annotate(f"{undefined[m]} undefined", (k, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7, color="#aa0000")
    labels = [textwrap.fill(f"{titles.get(m, m)} [{modality.get(m, '')}]", 16) for m in models]
    axes[-1, 0].set_xticks(range(len(models)), labels, fontsize=8)
    if interobserver is not None and len(interobserver):
        what = "mean ± SD" if band == "sd" else "min to max"
        handle = plt.Rectangle((0, 0), 1, 1, color="#bbbbbb", alpha=0.5,
                               label=f"interobserver variability ({what} over patients)")
        fig.legend(handles=[handle], loc="outside lower center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _log_axis(finite, key: str, scale: str) -> bool:
    """Whether a distance panel gets a log axis (see :func:`method_boxplots`)."""
    if scale != "auto":
        return scale == "log"
    medians = finite.groupby("model")[key].median()
    medians = medians[medians > 0]
    return len(medians) > 1 and medians.max() > 5.0 * medians.min()


# ----------------------------------------------------------------------------------------------
# Chapter 6: Fig. 9 and area profiles


def figure_contour_defects(examples: list[dict], panel: float = 2.8):
    """Paper Fig. 9: flagged CT contours (top row) above the nearest healthy slice of the same
    gland (bottom row), the clinical contour in yellow. ``examples``: dicts from
    :func:`crossmod_lib.contour_quality.figure9_examples`."""
    if not examples:
        raise ValueError("figure_contour_defects: no examples")
    fig, axes = plt.subplots(2, len(examples), squeeze=False, constrained_layout=True,
                             figsize=(panel * len(examples), panel * 2))
    for column, item in enumerate(examples):
        rows, cols = item["ct"].shape
        dy, dx = item["spacing"]
        extent = [0, cols * dx, rows * dy, 0]
        for row, (image, mask, what) in enumerate((
                (item["ct"], item["mask"], (f"slice {item['slice']}: {item['rule']}, "
                                            f"{item['ratio']:.0%} of expected")),
                (item["neighbour_ct"], item["neighbour_mask"],
                 f"slice {item['neighbour']}: not flagged"))):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.set_axis_off()
                continue
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
            _outline(ax, mask, "#ffd92f", extent, "upper", width=1.5)
            ax.set_title((f"{item['patient']} {item['structure'].replace('_', ' ')}\n" if row == 0
                          else "") + what, fontsize=8)
    return fig


def area_profiles(profiles, glands, ncols: int = 3, panel=(3.2, 2.2)):
    """The area profile of each listed gland (rows of ``glands``: patient, structure), its
    expected area (dashed) and its flagged slices (red), from the tables of
    :func:`crossmod_lib.contour_quality.assess_cohort`."""
    glands = list(glands)
    if not glands:
        raise ValueError("area_profiles: no glands")
    nrows = int(np.ceil(len(glands) / ncols))
    fig, axes = plt.subplots(nrows, min(ncols, len(glands)), squeeze=False, constrained_layout=True,
                             figsize=(panel[0] * min(ncols, len(glands)), panel[1] * nrows))
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, (patient, structure) in zip(axes.ravel(), glands):
        ax.set_visible(True)
        rows = profiles[(profiles["patient"] == patient) & (profiles["structure"] == structure)]
        ax.plot(rows["slice"], rows["area_mm2"], "o-", ms=3, color="#333333", lw=1, label="contoured")
        ax.plot(rows["slice"], rows["expected_mm2"], "--", color="#1f77b4", lw=1, label="expected")
        bad = rows[rows["flagged"]]
        ax.plot(bad["slice"], bad["area_mm2"], "o", ms=6, mfc="none", color="#d62728", label="flagged")
        ax.set_title(f"{patient} {structure.replace('_', ' ')}", fontsize=8)
        ax.set_xlabel("slice", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("area (mm²)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.ravel()[0].legend(fontsize=7, frameon=False)
    return fig


def convergence_curves(points, quality, models=("cross_modality", "domain_random", "ct_only", "naive")):
    """The convergence study (crossmod_lib.convergence): DSC per parotid against the CycleGAN
    budget (each seed a thin line, the seed mean a thick one, the mean patient SD a band), and the
    synthetic MR's quality measures against the budget (parotid/head ratio with the real MR's as a
    dashed line, outline Dice, histogram distance, KID with the real-MR floor)."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    colours = method_colours(models)
    for ax, structure, side in ((axes[0, 0], "Parotid_R", "right"), (axes[0, 1], "Parotid_L", "left")):
        chosen = points[points["structure"] == structure]
        for model in models:
            rows = chosen[chosen["model"] == model]
            if rows.empty:
                continue
            colour = colours[model]
            for _, seed_rows in rows.groupby("seed"):
                seed_rows = seed_rows.sort_values("budget")
                ax.plot(seed_rows["budget"], seed_rows["dsc_mean"], color=colour, alpha=0.35, lw=0.8)
            mean = rows.groupby("budget").agg(dsc=("dsc_mean", "mean"), sd=("dsc_sd", "mean"))
            ax.plot(mean.index, mean["dsc"], color=colour, lw=2.2, marker="o", ms=4,
                    label=rows["title"].iloc[0])
            if model == "cross_modality":
                ax.fill_between(mean.index, mean["dsc"] - mean["sd"], mean["dsc"] + mean["sd"],
                                color=colour, alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title(f"{side} parotid: DSC on real MR", fontsize=10)
        ax.set_xlabel("CycleGAN iterations")
        ax.set_ylabel("DSC (patient mean)")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    measures = (("parotid_ratio", "parotid / head intensity", "real_parotid_ratio"),
                ("outline_dice_median", "outline Dice (median)", None),
                ("histogram_w1", "intensity histogram W1 (0-255)", None),
                ("kid", "KID on texture features", "real_kid"))
    for ax, (key, title, reference) in zip((axes[0, 2], axes[1, 0], axes[1, 1], axes[1, 2]), measures):
        for _, rows in quality.groupby("seed"):
            rows = rows.sort_values("budget")
            ax.plot(rows["budget"], rows[key], color="#d62728", alpha=0.35, lw=0.8)
        mean = quality.groupby("budget")[key].mean()
        ax.plot(mean.index, mean.values, color="#d62728", lw=2.2, marker="o", ms=4, label="synthetic MR")
        if reference is not None:
            ax.axhline(quality[reference].mean(), color="k", ls="--", lw=1,
                       label="real MR" if key == "parotid_ratio" else "real MR vs real MR")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("CycleGAN iterations")
    budgets = sorted(set(points["budget"]) | set(quality["budget"]))
    for ax in axes.ravel():  # the budgets themselves as ticks, not powers of ten
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    return fig


# ----------------------------------------------------------------------------------------------
# The chapters' figures (the notebooks call these and show the result)


def save(fig, run, name: str, dpi: int = 120) -> None:
    """Save a figure as ``<run>/figures/<name>`` (a :class:`crossmod_lib.runs.Figures` name)."""
    fig.savefig(run.figure(name), dpi=dpi, bbox_inches="tight")


def intensity_histograms(named_slices: dict):
    """Chapter 1: per modality, the 0-255 intensities inside the head outline, one line per patient.

    ``named_slices``: title -> prepared slices (``image``, ``head_mask``, ``patient``)."""
    fig, axes = plt.subplots(1, len(named_slices), figsize=(5 * len(named_slices), 3.2),
                             constrained_layout=True, squeeze=False)
    for ax, (name, slices) in zip(axes[0], named_slices.items()):
        for patient in np.unique(slices["patient"]):
            own = slices["patient"] == patient
            values = slices["image"][own][slices["head_mask"][own]]
            ax.hist(values, bins=64, range=(0, 255), histtype="step", density=True, label=patient)
        ax.set_title(f"{name}: intensities inside the head outline, per patient", fontsize=9)
        ax.set_xlabel("intensity (0-255)")
    axes[0, -1].legend(fontsize=6, ncol=2)
    return fig


def loss_curves(losses, terms, window: int | None = None):
    """Chapter 2: the CycleGAN's loss terms (running means), generator terms left, discriminator
    terms (names starting ``D_``) right. ``losses``: the training's losses.csv as a DataFrame."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), constrained_layout=True)
    window = window or max(1, len(losses) // 30)
    for term in terms:
        target = axes[1] if term.startswith("D_") else axes[0]
        target.plot(losses["iteration"], losses[term].rolling(window, min_periods=1).mean(), label=term)
    axes[0].set_title("generator terms (running mean)", fontsize=9)
    axes[1].set_title("discriminator terms (running mean)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    return fig


def image_grid(grid: dict, columns):
    """Chapter 2: rows of 0-255 images, one column per ``(key, title)`` of ``columns`` present
    in ``grid`` (e.g. CT | synthetic MR | reconstructed CT | MR | synthetic CT | reconstructed MR)."""
    columns = [(key, title) for key, title in columns if key in grid]
    rows = len(grid[columns[0][0]]) if columns else 0
    fig, axes = plt.subplots(max(rows, 1), max(len(columns), 1),
                             figsize=(2 * max(len(columns), 1), 2.1 * max(rows, 1)), squeeze=False,
                             constrained_layout=True)
    for r in range(rows):
        for c, (key, title) in enumerate(columns):
            axes[r, c].imshow(grid[key][r], cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    return fig


def outline_dice_histograms(distributions: dict, threshold: float):
    """Chapter 2's ablation: the head-outline Dice of each arm's synthetic MR against the source
    CT, one histogram per arm, with the cleaning threshold dashed."""
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    for name, values in distributions.items():
        ax.hist(values, bins=np.linspace(0, 1, 41), histtype="step", label=name, linewidth=1.5)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("head-outline Dice, synthetic MR vs source CT")
    ax.set_ylabel("slices")
    ax.legend(fontsize=8)
    return fig


KEPT_COLOUR, DROPPED_COLOUR = "#2ca02c", "#d62728"


def cleaning_examples(selected: list[dict], rejected: list[dict]):
    """Fig. 6: source CT (top) over synthetic MR (bottom), framed green when kept, red when
    rejected; items as :func:`crossmod_lib.cleaning.figure6_examples`. None when there are none."""
    pairs = [(item, True) for item in selected] + [(item, False) for item in rejected]
    if not pairs:
        return None
    lines = max(item["caption"].count("\n") + 1 for item, _ in pairs)
    fig, axes = plt.subplots(2, len(pairs), figsize=(2.2 * len(pairs), 4.4 + 0.16 * lines), squeeze=False,
                             constrained_layout=True)
    for k, (item, kept) in enumerate(pairs):
        dice = f"outline Dice {item['dice']:.3f}"
        for r, (image, title) in enumerate(((item["ct"], f"CT\n{item['caption']}"),
                                            (item["synthetic"], f"synthetic MR\n{dice}"))):
            ax = axes[r, k]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(KEPT_COLOUR if kept else DROPPED_COLOUR)
                spine.set_linewidth(3)
            ax.set_title(title, fontsize=6.5, color="#1b5e20" if kept else "#b71c1c")
    return fig


def cleaning_checks(decisions, threshold: float, max_displacement_mm: float):
    """Chapter 3: the outline Dice before (grey) and after (blue) registration with the threshold,
    and the largest displacement inside the head with the divergence limit."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3), constrained_layout=True)
    bins = np.linspace(min(0.5, float(decisions["outline_dice"].min())), 1, 51)
    axes[0].hist(decisions["outline_dice"], bins=bins, color="#777777", label="before registration")
    after = decisions["outline_dice_after"].dropna()
    if len(after):
        axes[0].hist(after, bins=bins, color="#1f77b4", alpha=0.6, label="after registration")
    axes[0].axvline(threshold, color=DROPPED_COLOUR, linestyle="--", label=f"threshold {threshold}")
    axes[0].set_xlabel("head-outline Dice, synthetic MR vs source CT")
    axes[0].set_ylabel("slices")
    axes[0].legend(fontsize=7)
    shift = decisions["max_displacement_mm"].dropna()
    if len(shift):
        top = max(float(shift.max()), max_displacement_mm) * 1.05
        axes[1].hist(shift, bins=np.linspace(0, top, 41), color="#777777")
    axes[1].axvline(max_displacement_mm, color=DROPPED_COLOUR, linestyle="--",
                    label=f"limit {max_displacement_mm:g} mm")
    axes[1].set_xlabel("largest displacement inside the head (mm)")
    axes[1].set_ylabel("slices")
    axes[1].legend(fontsize=7)
    return fig


DROP_COLUMNS = (("dropped_outline", DROPPED_COLOUR, "outline check"),
                ("dropped_registration", "#ff7f0e", "registration checks"),
                ("dropped_by_hand", "#9467bd", "by hand"))


def dropped_by_position(by_position):
    """Chapter 3: the dropped fraction per cranio-caudal position bin, stacked by reason;
    ``by_position`` as :func:`crossmod_lib.cleaning.counts_by_position`."""
    fig, ax = plt.subplots(figsize=(7, 2.8), constrained_layout=True)
    x = np.arange(len(by_position))
    share = by_position[[c for c, _, _ in DROP_COLUMNS]].div(
        by_position["slices"].where(by_position["slices"] > 0), axis=0).fillna(0)
    bottom = np.zeros(len(x))
    for column, colour, label in DROP_COLUMNS:
        ax.bar(x, share[column], bottom=bottom, color=colour, label=label)
        bottom += share[column].to_numpy()
    ax.set_xticks(x, [label.replace(" (", "\n(") for label in by_position.index], fontsize=7)
    ax.set_ylabel("dropped fraction")
    ax.set_ylim(0, max(0.05, float(bottom.max()) * 1.2 if len(bottom) else 0.05))
    ax.set_xlabel("position in the patient's slice range (inferior → superior)")
    ax.legend(fontsize=7)
    return fig


def registration_examples(items: list[dict], head_threshold: float):
    """Chapter 3: registered synthetic MR with its head outline before (yellow) and after (cyan)
    registration and the CT's parotid contours; items as :func:`crossmod_lib.cleaning.figure6_examples`
    with a registered image. None when there are none."""
    from .preparation import head_mask

    if not items:
        return None
    fig, axes = plt.subplots(1, len(items), figsize=(2.6 * len(items), 3.4), squeeze=False,
                             constrained_layout=True)
    for ax, item in zip(axes[0], items):
        ax.imshow(item["registered"], cmap="gray", vmin=0, vmax=255)
        ax.contour(head_mask(item["synthetic"], head_threshold), levels=[0.5], colors=["#ffd92f"],
                   linewidths=0.8)
        ax.contour(head_mask(item["registered"], head_threshold), levels=[0.5], colors=["#17becf"],
                   linewidths=0.8)
        for value, colour in ((1, STRUCTURE_COLOURS["Parotid_L"]), (2, STRUCTURE_COLOURS["Parotid_R"])):
            if (item["labels"] == value).any():
                ax.contour(item["labels"] == value, levels=[0.5], colors=[colour], linewidths=1)
        ax.set_title(f"{item['caption']}\nmoved ≤ {item['max_displacement_mm']:.1f} mm, "
                     f"folded {item['folded_fraction']:.1%}", fontsize=6.5)
        ax.set_axis_off()
    return fig


def unet_training_curves(logs):
    """Chapter 4: training (solid) and validation (dashed) loss, and validation Dice, per model;
    ``logs`` as :func:`crossmod_lib.segmentation.training_logs`."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(data=logs, x="epoch", y="train_loss", hue="model", ax=axes[0], legend=False)
    sns.lineplot(data=logs, x="epoch", y="val_loss", hue="model", ax=axes[0], linestyle="--", legend=False)
    axes[0].set(ylabel="soft Dice loss", title="training (solid) and validation (dashed) loss")
    sns.lineplot(data=logs, x="epoch", y="val_dice", hue="model", ax=axes[1])
    axes[1].set(ylabel="validation Dice", title="validation Dice (2D, own validation patients)", ylim=(0, 1))
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def prediction_panels(example: dict, ncols: int = 4):
    """Chapter 4: one MR slice around the parotids per method, manual contour blue, automatic red;
    ``example`` as :func:`crossmod_lib.segmentation.prediction_examples`."""
    methods = list(example["predictions"])
    ncols = max(1, min(ncols, len(methods)))
    nrows = max(1, int(np.ceil(len(methods) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    rows_mm, cols_mm = example["spacing"]
    image = example["image"]
    y0, y1, x0, x1 = example["box"]  # the parotid region: 6 cm around the contours
    for ax, method in zip(axes.flat, methods):
        ax.imshow(image[y0:y1, x0:x1], cmap="gray", aspect=rows_mm / cols_mm)
        for labels, colour in ((example["reference"], "tab:blue"), (example["predictions"][method], "tab:red")):
            if labels is None:
                continue
            for value in (1, 2):
                mask = (labels[y0:y1, x0:x1] == value).astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(example["titles"][method], fontsize=8)
        ax.axis("off")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"MR patient {example['patient']}, slice {example['slice']}: "
                 + ("manual (blue), automatic (red)" if example["annotated"]
                    else "automatic (red); this patient has no manual contours"), fontsize=10)
    fig.tight_layout()
    return fig


def step_times(measured, title: str):
    """Chapter 7: every measured time on a log axis, whole notebooks grey, steps inside them blue;
    ``measured`` with columns stage, step, seconds. None when nothing took time."""
    plotted = measured[measured["seconds"] > 0]
    if not len(plotted):
        return None
    fig, ax = plt.subplots(figsize=(8, 0.26 * len(plotted) + 1.0), constrained_layout=True)
    labels = [stage.removeprefix("notebook ") + " (whole notebook)" if stage.startswith("notebook")
              else step for stage, step in zip(plotted["stage"], plotted["step"])]
    colours = ["#999999" if s.startswith("notebook") else "#1f77b4" for s in plotted["stage"]]
    ax.barh(range(len(plotted)), plotted["seconds"], color=colours)
    ax.set_yticks(range(len(plotted)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log scale); grey: whole notebooks, blue: steps inside them")
    ax.set_title(title, fontsize=9)
    return fig

"""Figures shared by the chapters: orthogonal views with contours, slice galleries.

Conventions of the paper's figures: left parotid red, right parotid green (Fig. 1); axial slices in
radiological convention (patient left on the image right, anterior at the top); coronal and sagittal
views with the head at the top and physical aspect ratios.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap

from .io import PAROTIDS, Case

STRUCTURE_COLOURS = {"Parotid_L": "#e41a1c", "Parotid_R": "#4daf4a"}


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


def orthogonal_views(case: Case, axes, window: tuple[float, float], point_index=None,
                     title: str = "") -> None:
    """Axial, coronal and sagittal views of a case on three axes, parotids coloured.

    The views pass through ``point_index`` ((x, y, z) voxel index), by default the centroid of the
    parotid labels (or the volume centre when there are none).
    """
    array = sitk.GetArrayFromImage(case.image).astype(np.float32)  # [z, y, x]
    labels = case.label_array(PAROTIDS)
    if point_index is None:
        if labels.any():
            zc, yc, xc = (int(round(v)) for v in np.argwhere(labels > 0).mean(axis=0))
        else:
            zc, yc, xc = (s // 2 for s in array.shape)
    else:
        xc, yc, zc = point_index
    sx, sy, sz = case.image.GetSpacing()
    nz, ny, nx = array.shape
    lo, hi = window
    views = [
        ("axial", array[zc], labels[zc], [0, nx * sx, ny * sy, 0], "upper"),
        ("coronal", array[:, yc, :], labels[:, yc, :], [0, nx * sx, 0, nz * sz], "lower"),
        ("sagittal", array[:, :, xc], labels[:, :, xc], [0, ny * sy, 0, nz * sz], "lower"),
    ]
    for ax, (name, plane, plane_labels, extent, origin) in zip(axes, views):
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, extent=extent, origin=origin,
                  interpolation="bilinear")
        _overlay(ax, plane_labels, extent, origin)
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

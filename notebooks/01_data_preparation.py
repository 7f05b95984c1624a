# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Data acquisition and preparation
#
# ## Overview
# This chapter reproduces **section 2.A** of {cite}`kieselmann2021`: the two cohorts (CT and MR of
# different patients), their acquisition parameters (**Table I**), example views with the parotid
# contours (**Fig. 1**), and the preprocessing that turns both into comparable 2D slices. It also
# measures the **interobserver variability** of the MR contours, the reference the paper sets its
# results against (section 2.G).
#
# | Prerequisite | Importance |
# |---|---|
# | CT Hounsfield units and display windows | helpful |
# | T2-weighted MR contrast | helpful |
# | Dice coefficient and surface distances | helpful |
#
# Everything here is computed by `crossmod_lib.preparation` (section 2.A), `crossmod_lib.metrics`
# and `crossmod_lib.evaluation` (section 2.G); this notebook only calls them and shows the results.

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import SimpleITK as sitk
from IPython.display import Markdown, display

from crossmod_lib import evaluation, paper, plots, preparation, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
settings = run.profile["preprocessing"]
print(f"profile: {run.profile['name']} - {run.profile['description']}")
print(f"run folder: {run.root}")
print(f"pixel {settings['pixel_mm']} mm, crop {settings['crop']} px, "
      f"CT window L{settings['ct_window']['level']}/W{settings['ct_window']['width']}, "
      f"range rule {settings['cc_rule']}")

# %% [markdown]
# ## The cohorts
# The paper used 202 annotated CT (TCIA {cite}`grossberg2017` and the MICCAI 2015 challenge
# {cite}`raudaschl2017`) and 27 T2-weighted MR of other patients. The profile says where this
# run's cohorts come from (`data.ct`, `data.mr`): the embedded digital phantom (see the
# introduction), generated into the run folder on first use, a public dataset of
# `data_manifest.yaml` (e.g. OpenKBP CT {cite}`babier2021`), T2-weighted MR *simulated* from the
# CTs and contours of other patients of such a dataset (`simulated_mr`, the `openkbp` profile's
# real-anatomy tier: real shapes and manual contours, simulated MR contrast; see
# `crossmod_lib.simulation`), or a folder of the user's own DICOM (image series + RTSTRUCT) or
# nnU-Net/NIfTI data.
#
# The whole stage is one library call, `preparation.run(run)`: it opens the cohorts, measures
# Table I and the interobserver variability, and prepares the slices (the cells below show what it
# found and wrote).

# %%
stage = preparation.run(run)
cohorts = stage.cohorts
for modality, source in cohorts.items():
    print(f"{modality}: {len(source.items)} patients from {source.dataset} ({source.root})")

# %% [markdown]
# ### Table I: imaging parameters
# Computed from the image headers of the cohorts in this run (size, spacing and the acquisition
# tags stored with each image), not typed in. The paper's Table I is shown beside it.

# %%
display(stage.table_1.join(paper.TABLE_I))

# %% [markdown]
# ### Fig. 1: example views
# Axial, coronal and sagittal views of one MR (top) and one CT (bottom): the axial slice with the
# largest parotid area, the sagittal plane through the left parotid; left parotid red, right green. The CT is shown in the soft-tissue window (level 40, width 350
# HU {cite}`hoang2010`); the MR from zero to its 99.5th percentile.

# %%
ct_case = cohorts["CT"].read(cohorts["CT"].items[0])
mr_case = cohorts["MR"].read(cohorts["MR"].items[0])
mr_values = sitk.GetArrayViewFromImage(mr_case.image)
fig = plots.figure_views([
    (f"T2w MR {mr_case.patient_id}", mr_case, (0.0, float(np.percentile(mr_values, 99.5)))),
    (f"CT {ct_case.patient_id}", ct_case, (40 - 175, 40 + 175)),
])
plots.save(fig, run, runs.Figures.VIEWS)
plt.show()

# %% [markdown]
# ## Interobserver variability
# Each phantom MR carries two observers' parotid contours. The metrics of section 2.G between
# them, per patient and gland, give this run's interobserver reference. Conventions
# (from `crossmod_lib.metrics`): the surface of a mask is the mask minus its erosion by the
# 6-connected cross; directed distances are Euclidean distances (in mm, with the voxel spacing) from
# one surface's voxels to the nearest voxel of the other surface; HD is the larger of the two
# directed maxima, HD95 the 95th percentile of both directions' distances pooled (MedPy's `hd95`
# {cite}`medpy`), and MSD the mean of the two directed mean distances, each direction weighing
# the same (MedPy 0.4's `assd`; MedPy 0.5 pools the distances instead, reported as `assd`
# by `crossmod metrics --json`, as is `hd95_max`, the larger directed 95th percentile). These
# conventions are tested against MedPy itself on real DeepMind pairs. Both masks empty gives DSC 1 and
# distances 0; exactly one empty gives DSC 0 and infinite distances (left out of means and counted).
#
# The paper's interobserver row comes from three observers on its real MR
# {cite}`kieselmann2018`; the phantom's second observer is a smooth perturbation of the first, so
# the two are comparable in kind only.

# %%
if stage.interobserver is not None:
    summary = evaluation.mean_sd_table(stage.interobserver)
    display(pd.concat({f"this run ({cohorts['MR'].title})": summary.drop(columns="n"),
                       "paper (real MR)": paper.INTEROBSERVER}, axis=0).fillna("n.a."))
else:
    summary = None
    display(Markdown(f"The MR cohort ({cohorts['MR'].dataset}) has no second observer's contours."))

# %% [markdown]
# ## Preprocessing (section 2.A)
# Both modalities are resampled to the profile's in-plane pixel size, mapped to 0-255 (CT through
# the soft-tissue window, MR by a histogram-based standardisation: Otsu's threshold
# {cite}`otsu1979` separates head from background and the 99th percentile of the head maps to
# 255, in the spirit of {cite}`nyul2000`), cropped to a square window centred on the head outline,
# and cut into axial slices. The CT's cranio-caudal range is restricted to the MR's coverage
# centred on the parotids. A noisy MR (its Rician noise floor near the head threshold of 20 on the
# 0-255 scale, as at SNR 10) would make the fixed-threshold head outline swallow the background;
# `preprocessing.mr_background: zero` (not in the paper; off by default) then finds the head by
# Otsu's threshold on the smoothed volume and sets everything outside it to 0 (chapter 10 shows
# where it matters).

# %%
coverage_mm, mr_cases, ct_cases = stage.coverage_mm, stage.cases["MR"], stage.cases["CT"]
print(f"MR coverage (median over the MR cohort): {coverage_mm:.0f} mm")
display(pd.concat([mr_cases, ct_cases])[
    ["patient", "modality", "slices_total", "slices_kept", "z_min_mm", "z_max_mm", "crop_row", "crop_col"]
].set_index("patient").round(1))

# %% [markdown]
# ### Prepared slices
# Slices at the level of the parotids from each cohort, as the networks will see them: head outline
# (yellow; the same mask the CycleGAN's geometric loss and the cleaning step use) and parotid labels.

# %%
ct_slices = preparation.load_slices(run.ct_slices)
mr_slices = preparation.load_slices(run.mr_slices)

for name, slices in (("CT", ct_slices), ("MR", mr_slices)):
    chosen = preparation.parotid_level_slices(slices, count=6)
    fig = plots.slice_gallery(slices, chosen, titles=[f"{name} {slices['patient'][i]} z={slices['z_mm'][i]:.0f}"
                                                      for i in chosen])
    plots.save(fig, run, runs.Figures.prepared_slices(name))
    plt.show()

# %% [markdown]
# ### Intensities after preprocessing
# The CT window and the MR standardisation put both modalities on 0-255. Within the head, the CT is
# dominated by soft tissue around the middle of the window; MR shows dark muscle and bright fat and
# glands. The MR standardisation removes the per-patient scale (raw MR values differ by up to an
# order of magnitude between patients here).

# %%
fig = plots.intensity_histograms({"CT": ct_slices, "MR": mr_slices})
plots.save(fig, run, runs.Figures.PREPARED_HISTOGRAMS)
plt.show()

# %% [markdown]
# ## Real data
# Two public datasets with real anatomy sit beside the project when a data root is present
# (`$CROSSMOD_DATA`, else `../shared/data`; see `crossmod data list`). They are read by
# `crossmod_lib.datasets` and measured with the same code as above.
#
# ### OpenKBP CT: Table I and Fig. 1 on real anatomy
# OpenKBP {cite}`babier2021` distributes head-and-neck CTs (from TCIA collections) with organ masks
# as sparse CSV on 128 × 128 × 128 grids. The reader works out the axis order, orientation and the
# HU offset (stored values are HU + 1000): the axial view below shows the face at the top, the spine
# at the bottom and the left parotid (red) on the image's right, as in every figure of this book.

# %%
real = stage.real
if real.get("openkbp") is not None:
    openkbp = real["openkbp"]
    display(preparation.acquisition_table({f"OpenKBP CT (first {len(openkbp.items)})": openkbp}))
    openkbp_case = openkbp.read(openkbp.items[0])
    fig = plots.figure_views([(f"OpenKBP CT {openkbp_case.patient_id}", openkbp_case, (40 - 175, 40 + 175))])
    plots.save(fig, run, runs.Figures.OPENKBP_VIEWS)
    plt.show()
else:
    display(Markdown("*OpenKBP is not under the data root on this machine: section skipped.*"))

# %% [markdown]
# ### Interobserver variability of the parotid glands on real CT contours
# The DeepMind TCIA set {cite}`nikolov2018` holds parotid contours of 31 CT scans drawn
# independently by a radiation oncologist and by a radiographer. The metrics of section 2.G between
# the two, per scan and gland, give a real two-observer variability. **These are CT contours by two
# observers of a public dataset, not the paper's MR observers**: they are set beside the paper's
# interobserver row as a reference of the same kind, not as a reproduction of it.

# %%
deepmind_summary = None
if stage.interobserver_deepmind is not None:
    deepmind = stage.interobserver_deepmind
    columns = (("dsc", "DSC"), ("hd", "HD (mm)"), ("hd95", "HD95 (mm)"), ("msd", "MSD (mm)"))
    deepmind_summary = evaluation.mean_sd_table(deepmind, columns=columns)
    display(pd.concat({"DeepMind CT, oncologist vs radiographer": deepmind_summary.drop(columns="n"),
                       "paper, MR observers": paper.INTEROBSERVER}, axis=0).fillna("n.a."))
    fig = plots.metric_boxplots(deepmind, title="DeepMind parotid contours: oncologist vs radiographer, per scan")
    plots.save(fig, run, runs.Figures.INTEROBSERVER_DEEPMIND)
    plt.show()
else:
    display(Markdown("*The DeepMind contours are not under the data root on this machine: section skipped.*"))

# %% [markdown]
# ## Summary
# The run's counts, as computed above:

# %%
n_ct, n_mr = len(ct_cases), len(mr_cases)
display(Markdown(
    f"- **{n_ct} CT** patients gave **{len(ct_slices['image'])}** axial slices after restricting each CT "
    f"to the MR coverage ({coverage_mm:.0f} mm) around its parotids "
    f"(from {int(ct_cases['slices_total'].sum())} slices in total"
    + (f"; {int(ct_cases['slices_without_head'].sum())} slices in that range without a head outline of "
       f"at least {settings['min_head_area_cm2']:g} cm², a volume padded beyond its scan, were dropped"
       if ct_cases['slices_without_head'].sum() else "")
    + ").\n"
    f"- **{n_mr} MR** patients gave **{len(mr_slices['image'])}** slices.\n"
    f"- Slices are {settings['crop']} × {settings['crop']} pixels of {settings['pixel_mm']} mm.\n"
    + (f"- Interobserver DSC on the {cohorts['MR'].dataset} MR: "
       + ", ".join(f"{side} {row['DSC']}" for side, row in summary.iterrows()) + ".\n"
       if summary is not None else "")
    + (f"- Interobserver DSC of the DeepMind CT contours (oncologist vs radiographer, "
       f"{deepmind_summary['n'].iloc[0]} scans): "
       + ", ".join(f"{side} {row['DSC']}" for side, row in deepmind_summary.iterrows()) + "."
       if deepmind_summary is not None else "")
))

# %% [markdown]
# ## What's next
# Chapter 2 trains the CycleGAN on these unpaired CT and MR slices to synthesise an MR for every CT
# slice.
#
# ## Resources and references
# The sources cited in this chapter are listed with full details on the [references](../references.md)
# page.
#
# ## Provenance

# %%
display(Markdown(runs.provenance_markdown(run)))

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
# # 3. Data cleaning and refinement registration
#
# ## Overview
# This chapter reproduces **section 2.D** of {cite}`kieselmann2021` (Fig. 6). Not every synthetic MR
# keeps the anatomy of its CT: the paper drops a synthetic slice when the Dice of its head outline
# against the CT's is below 0.8, and registers the rest onto their CT slice with elastix
# {cite}`klein2010` (rigid, then a B-spline with an 8 mm control-point grid, mutual information,
# gradient descent), so that the **CT contours label the synthetic MR**. What is kept here is the
# training set of the segmentation network (chapter 4). Beyond the paper, the first stage may also
# scale (`cleaning.rigid.transform: similarity`), for synthetic MR drawn systematically smaller
# or larger than its CT (chapter 2, the geometric loss's masks).
#
# | Prerequisite | Importance |
# |---|---|
# | Chapter 2 (synthetic MR) | necessary |
# | Image registration, mutual information | helpful |
#
# Everything is computed by `crossmod_lib.cleaning`; decisions made by hand in the interactive
# review (`notebooks/08_review.py`, `crossmod_lib.review`) are read from `cleaned/review.json` and
# override the automatic ones.

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image, Markdown, display

from crossmod_lib import cleaning, plots, record, review, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
settings = cleaning.cleaning_settings(run.profile)
threshold = settings["outline_dice_threshold"]
grid_mm = cleaning.grid_spacing_mm(settings)
print(f"outline Dice threshold {threshold}; B-spline grid {grid_mm:g} mm "
      f"({grid_mm / settings['pixel_mm']:g} pixels of {settings['pixel_mm']:g} mm; paper: 8 mm on 1 mm pixels); "
      f"{settings['metric']}, {settings['optimizer']}")

# %% [markdown]
# ## Outline check and registration
# For every synthetic slice: the head outline (the same mask definition as chapter 1 and the
# CycleGAN's geometric loss) against the CT's head mask; slices at or above the threshold are
# registered (synthetic MR moving, CT fixed). A registration is rejected, with its reason in the
# decisions table (`cleaned/decisions.csv`), when elastix fails, when it moves a head pixel further
# than `cleaning.max_displacement_mm` (*diverged*), when the transform folds more than
# `cleaning.max_folded_fraction` of the head (Jacobian determinant ≤ 0: the mapping is not
# invertible, so it is not anatomy; *folded*), when the mutual information with the CT falls
# (*worse*), or when the outline Dice afterwards is below the threshold. The elastix parameter maps
# are saved beside the table (`cleaned/elastix/`).

# %%
decisions = cleaning.run(run)  # the stage: outline check, registration, decisions
counts = cleaning.summarise_decisions(decisions)
kinds = cleaning.drop_kind(decisions)
by_kind = ", ".join(f"{int((kinds == k).sum())} {k}" for k in cleaning.DROP_KINDS if (kinds == k).any())
display(Markdown(
    f"**{counts['accepted_final']} of {counts['slices']}** synthetic slices kept "
    f"({counts['accepted_final'] / max(counts['slices'], 1):.0%}): "
    f"{counts['rejected_outline']} dropped by the outline check (before or after registration), "
    f"{counts['rejected_registration']} by the other registration checks; "
    f"manual decisions: {counts['manual_accept']} accepted, {counts['manual_reject']} rejected "
    f"({counts['overridden']} overriding the automatic decision)."
    + (f" Dropped, by reason: {by_kind}." if by_kind else "")
))
timed = decisions[decisions["registration_cpu_s"].fillna(0) > 0]
if len(timed):
    print(f"registration per slice: median {timed['registration_cpu_s'].median():.2f} s CPU, "
          f"{timed['registration_time_s'].median():.2f} s wall ({settings['workers'] or 'all'} workers; "
          f"{len(timed)} slices, {int(timed['cached'].sum())} of them timed in an earlier run and cached)")
registered = decisions[decisions["registration_status"].isin(["ok", "diverged", "folded", "worse"])]
if len(registered):
    print(f"over the head: largest displacement median {registered['max_displacement_mm'].median():.1f} mm "
          f"(max {registered['max_displacement_mm'].max():.1f} mm, limit {settings['max_displacement_mm']:g} mm); "
          f"{int((registered['folded_fraction'] > 0).sum())} of {len(registered)} registrations fold part of the "
          f"head (limit {settings['max_folded_fraction']:.0%} of it)")

# %% [markdown]
# ## Fig. 6: selected and rejected examples
# Source CT (top) and synthetic MR (bottom); green frames were kept for training, red ones
# rejected. Each title gives the decision, why (for a rejected slice), the patient and the slice's
# position in that patient's slice range (0 % the most inferior), and the outline Dice before →
# after registration. The rejected examples include one slice of every reason that occurs.

# %%
examples = cleaning.figure6_examples(run)
fig = plots.cleaning_examples(examples["selected"], examples["rejected"])
if fig is not None:
    plots.save(fig, run, runs.Figures.CLEANING_EXAMPLES)
    plt.show()
if not examples["rejected"]:
    # chapter 2's ablation table: one row per arm, the share at this threshold in its own column
    ablation_csv = run.ablation
    without_geo = ""
    if ablation_csv.is_file():
        share = pd.read_csv(ablation_csv, index_col=0).loc["without geometric loss", f"share ≥ {threshold}"]
        without_geo = (f" Even chapter 2's ablation without the geometric loss kept {share:.0%} of the "
                       "slices above it: on the phantom the CT → MR mapping is close to a change of "
                       "intensity per tissue, which leaves the outline where it was.")
    display(Markdown(
        f"*No slice was rejected in this run (lowest outline Dice {decisions['outline_dice'].min():.3f}, "
        f"threshold {settings['outline_dice_threshold']:g}), so Fig. 6 shows selected examples only."
        f"{without_geo} Real CT anatomy is where slices fail (the `openkbp` profile).*"))
    for rec in record.with_rejected_slices(record.recorded_runs())[:1]:
        made = rec.info["recorded"]
        display(Markdown(
            f"**Recorded, not this run:** Fig. 6 of the recorded run `{rec.root.name}` (profile "
            f"`{rec.name}`, chapter 9; recorded {made.get('date', '?')[:10]} at commit "
            f"{made.get('commit', '?')}): {rec.cleaning_counts()}."))
        display(Image(filename=str(rec.path(runs.Figures.relpath(runs.Figures.CLEANING_EXAMPLES)))))

# %% [markdown]
# ## The checks, slice by slice
# Left: the outline Dice before (grey) and after (blue) registration, with the threshold. Right:
# the largest displacement the registration applies inside the head, with the limit beyond which
# it counts as diverged.

# %%
fig = plots.cleaning_checks(decisions, threshold, settings["max_displacement_mm"])
plots.save(fig, run, runs.Figures.CLEANING_DICE_HISTOGRAM)
plt.show()

# %% [markdown]
# ## Why the control-point grid is coarser than 8 mm on coarse pixels
# The paper's 8 mm grid sits on 1 mm pixels: 8 pixels per control-point interval. On coarser pixels
# the same 8 mm leaves few pixels to each control point, and mutual information then warps the
# synthetic MR freely: it inflates a faint structure to mimic the bright CT bone and folds the image
# (`cleaning.bspline.min_grid_spacing_px` keeps the grid at least 8 pixels wide). Below, a few of
# this run's slices registered with both grids; with 1 mm pixels both are the paper's 8 mm.

# %%
if grid_mm != settings["bspline_grid_spacing_mm"] and counts["slices"]:
    candidates = decisions[decisions["registration_status"] != "not_run"]
    rows = candidates["row"].to_numpy()[np.linspace(0, len(candidates) - 1, min(6, len(candidates))).astype(int)]
    grids = cleaning.compare_grid_spacing(run, rows)
    display(grids.groupby(["grid_spacing_mm", "grid_spacing_px"]).agg(
        slices=("row", "size"), folding=("folded_fraction", lambda v: int((v > 0).sum())),
        folded_fraction_mean=("folded_fraction", "mean"), max_displacement_mm=("max_displacement_mm", "median"),
        outline_dice_after=("outline_dice_after", "median"), rejected=("status", lambda v: int((v != "ok").sum())),
        cpu_s=("cpu_s", "median"),
    ).round(4))
else:
    print(f"the profile's grid is the paper's {grid_mm:g} mm ({grid_mm / settings['pixel_mm']:g} pixels)")

# %% [markdown]
# ## Where the CycleGAN fails
# Kept and dropped slices per patient, and by cranio-caudal position: each slice's place within its
# own patient's slice range (0 % the most inferior slice, 100 % the most superior), in five equal
# bins, so that patients of different length line up. The paper saw most failures at the top and
# bottom slices, where the MR's limited field of view gave the CycleGAN few examples.

# %%
display(cleaning.counts_by_patient(decisions).round(3))
by_position = cleaning.counts_by_position(decisions, by="position", bins=5)
display(by_position.round(3))
fig = plots.dropped_by_position(by_position)
plots.save(fig, run, runs.Figures.CLEANING_BY_POSITION)
plt.show()

# %% [markdown]
# ## Before and after registration
# The registered synthetic MR with its head outline before (yellow) and after (cyan) registration,
# and the CT's parotid contours, which now label it; selected examples first, then rejected ones
# whose registration produced an image (titled with their reason).

# %%
shown = [item for item in examples["selected"] + examples["rejected"] if item["registered"] is not None]
fig = plots.registration_examples(shown, settings["head_threshold"])
if fig is not None:
    plots.save(fig, run, runs.Figures.CLEANING_REGISTRATION)
    plt.show()

# %% [markdown]
# ## The slice review, as a static gallery
# In a live notebook, `review.review(run)` opens the interactive review (browse, sort by Dice,
# accept or reject by hand; see `notebooks/08_review.py`). The headless build shows the same slices
# as a gallery.

# %%
gallery = review.review(run, interactive=False, n=9)
plots.save(gallery, run, runs.Figures.CLEANING_REVIEW_GALLERY, dpi=110)
plt.show()

# %% [markdown]
# ## Summary

# %%
display(Markdown(
    f"- Kept {counts['accepted_final']} of {counts['slices']} synthetic MR slices "
    f"({counts['accepted_final'] / max(counts['slices'], 1):.0%}) as training data for the U-Net; "
    f"the paper kept about 1500.\n"
    f"- The kept slices are the registered synthetic MR on the CT grid with the CT's parotid labels "
    f"(`cleaned/training_slices.npz`); `cleaning.export_nnunet` writes them as an nnU-Net dataset."
))

# %% [markdown]
# ## What's next
# Chapter 4 trains the 2D U-Net on these slices alone and contours the real MR.
#
# ## Resources and references
# The sources cited in this chapter are listed on the [references](../references.md) page.
#
# ## Provenance

# %%
display(Markdown(runs.provenance_markdown(run)))

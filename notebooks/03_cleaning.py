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
# training set of the segmentation network (chapter 4).
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
from IPython.display import Markdown, display

from crossmod_lib import cleaning, plots, review, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
settings = run.profile["cleaning"]
figures = run.stage("figures")
threshold = settings["outline_dice_threshold"]
print(f"outline Dice threshold {threshold}, B-spline grid {settings['bspline']['grid_spacing_mm']} mm, "
      f"{settings['metric']}, {settings['optimizer']}")

# %% [markdown]
# ## Outline check and registration
# For every synthetic slice: the head outline (the same mask definition as chapter 1 and the
# CycleGAN's geometric loss) against the CT's head mask; slices at or above the threshold are
# registered (synthetic MR moving, CT fixed). A registration that fails, diverges or ends with an
# outline Dice below the threshold rejects its slice, with the reason in the decisions table
# (`cleaned/decisions.csv`). The elastix parameter maps are saved beside it (`cleaned/elastix/`).

# %%
decisions = cleaning.clean_run(run, progress=False)
counts = cleaning.summarise_decisions(decisions)
display(Markdown(
    f"**{counts['accepted_final']} of {counts['slices']}** synthetic slices kept "
    f"({counts['accepted_final'] / max(counts['slices'], 1):.0%}): "
    f"{counts['rejected_outline']} dropped by the outline check, "
    f"{counts['rejected_registration'] + counts['rejected_outline_after']} by the registration; "
    f"manual decisions: {counts['manual_accept']} accepted, {counts['manual_reject']} rejected "
    f"({counts['overridden']} overriding the automatic decision)."
))
registered = decisions[decisions["registration_time_s"].fillna(0) > 0]
if len(registered):
    print(f"registration time per slice: median {registered['registration_time_s'].median():.2f} s "
          f"(wall, {settings['workers'] or 'all'} workers)")

# %% [markdown]
# ## Fig. 6: selected and rejected examples
# Source CT and synthetic MR pairs; green frames were kept for training, red ones rejected. In most
# rejected cases the synthetic slice looks like an MR but not like *this* CT.

# %%
examples = cleaning.figure6_examples(run)
pairs = [(item, True) for item in examples["selected"]] + [(item, False) for item in examples["rejected"]]
if pairs:
    fig, axes = plt.subplots(2, len(pairs), figsize=(2.1 * len(pairs), 4.6), squeeze=False,
                             constrained_layout=True)
    for k, (item, kept) in enumerate(pairs):
        for r, (image, title) in enumerate(((item["ct"], "CT"), (item["synthetic"], "synthetic MR"))):
            ax = axes[r, k]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("#2ca02c" if kept else "#d62728")
                spine.set_linewidth(3)
            ax.set_title(f"{title}\n{item['patient']} Dice {item['dice']:.2f}" if r == 0 else title,
                         fontsize=7)
    fig.savefig(figures / "fig6_cleaning_examples.png", dpi=120, bbox_inches="tight")
    plt.show()

# %% [markdown]
# ## Where the CycleGAN fails
# The distribution of the outline Dice with the threshold, and the counts of kept and dropped slices
# per patient and by cranio-caudal position. The paper saw most failures at the top and bottom
# slices, where the MR's limited field of view gave the CycleGAN few examples.

# %%
fig, ax = plt.subplots(figsize=(7, 3), constrained_layout=True)
ax.hist(decisions["outline_dice"], bins=np.linspace(0, 1, 41), color="#777777")
ax.axvline(threshold, color="#d62728", linestyle="--", label=f"threshold {threshold}")
ax.set_xlabel("head-outline Dice, synthetic MR vs source CT")
ax.set_ylabel("slices")
ax.legend(fontsize=8)
fig.savefig(figures / "cleaning_dice_histogram.png", dpi=120, bbox_inches="tight")
plt.show()
display(cleaning.counts_by_patient(decisions).round(3))
display(cleaning.counts_by_position(decisions, by="position", bins=5).round(3))

# %% [markdown]
# ## Before and after registration
# CT (gray) with the synthetic MR's head outline before (yellow) and after (cyan) registration, and
# the CT's parotid contours, which now label the registered synthetic MR.

# %%
kept = [item for item in examples["selected"] if item["registered"] is not None]
if kept:
    fig, axes = plt.subplots(1, len(kept), figsize=(2.8 * len(kept), 3), squeeze=False,
                             constrained_layout=True)
    threshold_px = run.profile["preprocessing"]["head_threshold"]
    from crossmod_lib.preparation import head_mask

    for ax, item in zip(axes[0], kept):
        ax.imshow(item["registered"], cmap="gray", vmin=0, vmax=255)
        ax.contour(head_mask(item["synthetic"], threshold_px), levels=[0.5], colors=["#ffd92f"],
                   linewidths=0.8)
        ax.contour(head_mask(item["registered"], threshold_px), levels=[0.5], colors=["#17becf"],
                   linewidths=0.8)
        for value, colour in ((1, plots.STRUCTURE_COLOURS["Parotid_L"]),
                              (2, plots.STRUCTURE_COLOURS["Parotid_R"])):
            if (item["labels"] == value).any():
                ax.contour(item["labels"] == value, levels=[0.5], colors=[colour], linewidths=1)
        ax.set_title(f"{item['patient']}: Dice {item['dice']:.2f} → {item['dice_after']:.2f}", fontsize=8)
        ax.set_axis_off()
    fig.savefig(figures / "cleaning_registration.png", dpi=120, bbox_inches="tight")
    plt.show()

# %% [markdown]
# ## The slice review, as a static gallery
# In a live notebook, `review.review(run)` opens the interactive review (browse, sort by Dice,
# accept or reject by hand; see `notebooks/08_review.py`). The headless build shows the same slices
# as a gallery.

# %%
gallery = review.review(run, interactive=False, n=9)
gallery.savefig(figures / "cleaning_review_gallery.png", dpi=110, bbox_inches="tight")
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

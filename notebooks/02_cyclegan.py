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
# # 2. Synthetic MR from CT: the CycleGAN
#
# ## Overview
# This chapter reproduces **section 2.C** of {cite}`kieselmann2021` (Figs 3 and 4): a 2D CycleGAN
# {cite}`zhu2017` learns, from *unpaired* CT and MR slices of different patients, to turn every CT
# slice into a synthetic MR slice. Besides the adversarial and cycle-consistency losses, the paper
# adds a **geometric consistency loss** that keeps the head outline of the synthetic image on the
# source's. We train it on this run's prepared slices (chapter 1), show the losses and examples,
# synthesise an MR for every CT slice, and measure what the geometric loss buys (an ablation).
#
# | Prerequisite | Importance |
# |---|---|
# | Chapter 1 (prepared slices) | necessary |
# | Generative adversarial networks, CycleGAN | helpful |
#
# Everything is computed by `crossmod_lib.cyclegan` (torch and numpy only, so the same code trains
# on a bare GPU machine from the `.npz` slices).

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from crossmod_lib import cyclegan, plots, preparation, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
ct_npz, mr_npz = run.inputs("ct_slices", "mr_slices")
settings = cyclegan.settings_from_profile(run.profile)
print(f"profile {run.profile['name']}: ngf {settings['ngf']}, ndf {settings['ndf']}, "
      f"{settings['n_blocks']} residual blocks, batch {settings['batch_size']}, "
      f"{settings['epochs_constant']} + {settings['epochs_decay']} epochs")

# %% [markdown]
# ## The objective
# With $G_{MR}$: CT → MR, $G_{CT}$: MR → CT and discriminators $D_{MR}$, $D_{CT}$, the generators
# minimise
#
# $$\mathcal{L} = \lambda_{adv}\big(\mathcal{L}_{GAN}(G_{MR}, D_{MR}) + \mathcal{L}_{GAN}(G_{CT}, D_{CT})\big)
# + \lambda_{cyc}\big(\|G_{CT}(G_{MR}(x)) - x\|_1 + \|G_{MR}(G_{CT}(y)) - y\|_1\big)
# + \lambda_{cyc}\lambda_{idt}\big(\|G_{MR}(y) - y\|_1 + \|G_{CT}(x) - x\|_1\big)
# + \lambda_{geo}\big(\mathcal{L}_{geo,CT} + \mathcal{L}_{geo,MR}\big)$$
#
# for CT slices $x$ and MR slices $y$, with least-squares adversarial losses ($\lambda_{adv}=1$),
# $\lambda_{cyc}=10$ and $\lambda_{geo}=10$ as in the paper. The **identity** term is not in the
# paper but is on by default in the reference implementation it used ($\lambda_{idt}=0.5$); we keep
# it. The **geometric loss** (eq. 1) is the binary cross-entropy between the head mask of the source
# slice and the head mask of the generated slice, $\mathrm{BCE}\big(M(G_{MR}(x)), M(x)\big)$, and the
# same for MR → CT. (Eq. 1 as printed has the two masks' roles swapped; with a binary source mask
# only this form is finite and differentiable in the generator.)
#
# **A differentiable head mask.** The hard head mask of chapter 1 thresholds the 0–255 image at
# `head_threshold`, keeps the largest component and fills holes (dark airway and cortical bone inside
# the head). For a generated image the loss needs gradients, so `soft_head_mask` replaces the
# threshold by a sigmoid of (intensity − `head_threshold`) / `mask_temperature` and fills the holes
# differentiably: a pixel's filled value is the height of the weakest wall between it and the image
# border, a grayscale reconstruction (on the CPU computed at once by scikit-image's
# `reconstruction` {cite}`vanderwalt2014`, on a GPU by iterated steps), and its gradient goes to that
# wall's weakest pixel. At 0.5 it reproduces the hard mask; the cleaning step (chapter 3) decides on the *same* definition, so
# the loss pushes the generator towards exactly what cleaning will check.
#
# **The same threshold need not find the same edge.** Each mask thresholds its own modality. On the
# windowed CT, 20 of 255 lies near the attenuation of fat, at the inner edge of the subcutaneous
# fat; on a T2-weighted MR fat is bright and the skin edge blurred, so over the same anatomy the MR
# mask reaches further out. Held to the CT's outline, a generator that draws MR-like skin and fat
# draws the anatomy inside it smaller. Beyond the paper, `cyclegan.geo_mask_offset_px: k` holds the
# synthetic MR to the CT mask grown by `k` pixels and the synthetic CT to the MR mask shrunk by `k`
# (`crossmod_lib.cyclegan.geometric_targets`); chapter 10 measures the offset on the tier and
# what it changes.
#
# **A structure loss inside the head (beyond the paper).** The geometric loss holds only the
# outline; the cycle loss asks that the source can be recovered, not that its anatomy stays in
# place in the translation. `cyclegan.lambda_mind` adds
# $\lambda_{MIND}\big(\|\mathrm{MIND}(G_{MR}(x)) - \mathrm{MIND}(x)\|_1 + \|\mathrm{MIND}(G_{CT}(y)) - \mathrm{MIND}(y)\|_1\big)$,
# each averaged over the source's head mask, as in the structure-constrained CycleGAN
# {cite}`yang2018`. The modality independent neighbourhood descriptor {cite}`heinrich2012`
# (`crossmod_lib.cyclegan.mind_descriptor`) says, for every pixel, how alike its small Gaussian
# patch is to each of its 8 neighbours' patches, relative to the local contrast: an inverted or
# rescaled intensity (CT's bright bone is dark on T2 MR) leaves it unchanged, an edge that moved
# does not. 0 (the paper) switches it off; chapter 10 measures it on the tier.
#
# **A task loss (beyond the paper).** The paper trains the translator and then, separately, the
# U-Net on its output. `cyclegan.lambda_seg` joins them for the CT → MR direction, as SynSeg-Net
# does {cite}`huo2019`: a small U-Net (`crossmod_lib.cyclegan.build_segmenter`) learns with the
# generators to find the CT's parotids (either gland, against background) in their synthetic MR,
# and its loss (cross-entropy plus soft Dice, `task_loss`), weighted $\lambda_{seg}$, also reaches
# $G_{MR}$: the generator is asked to draw the glands where the CT's contours put them, and in a
# way the discriminator accepts as MR. The small network is discarded after training; the rest
# of the pipeline (cleaning, the cross-modality U-Net) is the paper's. It is the only part of the
# CycleGAN that reads the CT's contours. 0 (the paper) switches it off; chapter 10 measures it.

# %% [markdown]
# ## The networks (Fig. 4)
# Generator: 7×7 convolution, two stride-2 convolutions, residual blocks, two transposed
# convolutions and a 7×7 convolution with tanh (reflection padding, instance normalisation).
# Beyond the paper, `cyclegan.upsampling: resize` puts a nearest-neighbour enlargement and a 3×3
# convolution in place of each transposed convolution, whose uneven overlap otherwise leaves a
# checkerboard in the synthetic MR {cite}`odena2016` (chapter 10 measures it on the tier).
# Discriminator: the 70×70 PatchGAN. Widths come from the profile; the paper's (`full`) are shown
# beside this run's. FLOPs count multiply-adds × 2 at the profile's slice size.

# %%
from crossmod_lib.config import load_profile

rows = []
for name, prof in ((run.profile["name"], run.profile), ("full (paper)", load_profile("full"))):
    for row in cyclegan.architecture_table(prof):
        rows.append({"profile": name, "network": row["name"], "parameters": f"{row['parameters']:,}",
                     "GFLOPs per slice": round(row["gflops_per_slice"], 3)})
display(pd.DataFrame(rows).set_index(["profile", "network"]))

# %% [markdown]
# ## Training (section 2.C.2)
# Adam (learning rate 2·10⁻⁴, β₁ 0.5), constant for the first half of the epochs, then decaying
# linearly to zero; each epoch visits the CT slices in a shuffled order, each paired with a randomly
# drawn MR slice. A checkpoint is written after every epoch and a stopped run resumes exactly.
#
# The whole stage is one library call, `cyclegan.run(run)`: this training, the synthesis below,
# the parotid contrast and the geometric-loss ablation; the cells below show what it produced.

# %%
stage = cyclegan.run(run)
summary, synthesis = stage["summary"], stage["synthesis"]
print(f"{summary['iteration']} iterations ({summary['epochs_done']} epochs) in "
      f"{summary['seconds_total']:.0f} s on {summary['device']}")
losses = pd.read_csv(run.cyclegan_dir / cyclegan.LOSSES_NAME)
# terms switched off by the profile (identity, MIND structure loss) are logged as zeros: not drawn
terms = [t for t in cyclegan.LOSS_TERMS if t in losses.columns and t != "G_total" and losses[t].any()]
fig = plots.loss_curves(losses, terms)
plots.save(fig, run, runs.Figures.CYCLEGAN_LOSSES)
plt.show()

# %% [markdown]
# ## Synthetic MR for every CT slice
# Each prepared CT slice gets its synthetic MR, saved with the CT slice's index and labels
# (`synthetic/synthetic_mr.npz`). Below, CT → synthetic MR → reconstructed CT (top rows) and
# MR → synthetic CT → reconstructed MR (bottom rows) at the level of the parotids.

# %%
print(f"{synthesis['slices']} synthetic MR slices in {synthesis['seconds']:.1f} s")

# One parotid-level slice from each of the first four patients of each cohort.
ct_slices = preparation.load_slices(ct_npz)
examples = preparation.parotid_level_slices(ct_slices, count=4)
mr_examples = preparation.parotid_level_slices(preparation.load_slices(mr_npz), count=len(examples))
grid = cyclegan.example_grid(run.cyclegan_dir / cyclegan.CHECKPOINT_NAME, ct_npz, mr_npz,
                             examples, mr_examples, settings=settings)
# a one-sided translator (cyclegan.translator: cut) has no way back: image_grid leaves those out
fig = plots.image_grid(grid, (
    ("ct", "CT"), ("synthetic_mr", "synthetic MR"), ("reconstructed_ct", "reconstructed CT"),
    ("mr", "MR"), ("synthetic_ct", "synthetic CT"), ("reconstructed_mr", "reconstructed MR")))
plots.save(fig, run, runs.Figures.CYCLEGAN_EXAMPLES)
plt.show()

# %% [markdown]
# ### Do the parotids get their MR contrast?
# The outline is the easy part. What the segmentation network of chapter 4 needs is the inside:
# on T2-weighted MR the parotid is brighter than the muscles around it, on CT a little darker. If
# the generator has not learned that inversion, a network trained on synthetic MR looks for
# parotids of the wrong brightness on real MR. Mean intensity inside the parotids and in the rest
# of the head:

# %%
contrast = stage["contrast"]
display(contrast.style.format("{:.2f}"))
synthetic_ratio, real_ratio = contrast["parotid / rest of head"]
if np.isnan(real_ratio):  # a real MR cohort without manual contours: nothing to compare with
    display(Markdown(
        f"Parotid-to-head intensity ratio: **{synthetic_ratio:.2f}** in the synthetic MR. This MR "
        "cohort has no manual parotid contours, so the real ratio is unknown (on T2w MR the "
        "parotid is brighter than the rest of the head: a ratio above 1 is what the method needs)."))
else:
    display(Markdown(
        f"Parotid-to-head intensity ratio: **{synthetic_ratio:.2f}** in the synthetic MR against "
        f"**{real_ratio:.2f}** in real MR. "
        + ("The synthetic parotids are as bright, relative to their surroundings, as real ones."
           if abs(synthetic_ratio - real_ratio) < 0.25 * real_ratio else
           "The synthetic parotids do **not** have the real MR's contrast yet: this CycleGAN is "
           "under-trained for the method (it saw "
           f"{summary['iteration'] * settings['batch_size']:,} CT images; the paper's 200 epochs of "
           "~8,000 slices are 1.6 million), and chapter 5 shows what that costs the cross-modality "
           "network.")))

# %% [markdown]
# ## Does the synthetic MR keep the CT's anatomy? The geometric-loss ablation
# The cleaning step (chapter 3) keeps a synthetic slice only if its head outline overlaps the
# source CT's with a Dice of at least the profile's threshold (paper: 0.8). Two runs at the same,
# shorter budget differ only in the geometric loss; the distribution of the outline Dice of their
# synthetic MR against the source CT shows its effect.

# %%
ablation = stage["outline_dice"]
display(stage["ablation"].round(3))
fig = plots.outline_dice_histograms(ablation, run.profile["cleaning"]["outline_dice_threshold"])
plots.save(fig, run, runs.Figures.CYCLEGAN_ABLATION)
plt.show()

# %% [markdown]
# ## Summary

# %%
med = {k: float(np.median(v)) for k, v in ablation.items()}
display(Markdown(
    f"- The CycleGAN trained for {summary['iteration']} iterations "
    f"({summary['seconds_total']:.0f} s on {summary['device']}) and synthesised {synthesis['slices']} MR slices.\n"
    f"- Median head-outline Dice of the synthetic MR against its CT: {med['main run']:.3f} "
    f"(main run); ablation at equal budget: {med['with geometric loss']:.3f} with, "
    f"{med['without geometric loss']:.3f} without the geometric loss.\n"
    "- The paper trained for 72 h on a V100 at 256 × 256; the profile `full` holds its settings."
))

# %% [markdown]
# ## What's next
# Chapter 3 drops the synthetic slices whose outline strays from the CT's and registers the rest onto
# their CT so the CT contours fit them.
#
# ## Resources and references
# The sources cited in this chapter are listed on the [references](../references.md) page.
#
# ## Provenance

# %%
display(Markdown(runs.provenance_markdown(run)))

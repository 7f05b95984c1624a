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
# # 4. Segmentation: a U-Net trained on synthetic MR only
#
# ## Overview
# This chapter reproduces **section 2.E** of {cite}`kieselmann2021` (Fig. 5). The cleaned,
# registered synthetic MR slices of chapter 3 carry the contours of their CT; a 2D U-Net
# {cite}`ronneberger2015` trained on them alone, without a single contoured MR, contours the parotid
# glands on *real* MR. Beside it, the same code trains the baselines the comparison of chapter 5
# needs: the paper's CT-only network, that network applied to MR as it is (*naive*), an *MR oracle*
# trained on real MR labels (possible here because the phantom's MR is contoured), *domain
# randomisation* on CT (the SynthSeg idea {cite}`billot2023`) and *few-shot* fine-tuning with a few
# contoured MR patients (the paper's proposed future work). One option goes beyond the paper and is
# off unless a profile sets it: `segmentation.cross_modality_appearance` varies the synthetic MR's
# appearance (gamma, blur, bias field, noise) in every training batch of the cross-modality network,
# so that it learns less of the texture a briefly trained CycleGAN leaves behind.
#
# | Prerequisite | Importance |
# |---|---|
# | Chapter 3 (the cleaned training set) | necessary |
# | U-Net, Dice loss | helpful |
#
# Everything is computed by `crossmod_lib.segmentation`; the trained models are in the run folder
# (`model/<name>/best.pt`) and contour any MR with
# `crossmod predict --model model/cross_modality/best.pt --input MR --output OUT --output-type nifti rtstruct seg`
# (RTSTRUCT and DICOM SEG for DICOM input).

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import json

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from crossmod_lib import plots, runs, segmentation

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
cfg = segmentation.segmentation_config(run.profile)
crop = run.profile["preprocessing"]["crop"]
print(f"profile {run.profile['name']}: U-Net base {cfg['base_features']} features, {cfg['levels']} levels, "
      f"{cfg['norm']} norm, Adam lr {cfg['learning_rate']:g}, at most {cfg['epochs']} epochs, "
      f"{crop} x {crop} slices")

# %% [markdown]
# ## The network (Fig. 5)
# Five resolution levels, 64 features doubling to 1024 in the bottleneck in the paper (this
# profile's width is printed above), two 3 × 3 convolutions with ReLU per level, max pooling down,
# transposed convolutions up, skip connections concatenated, and a 1 × 1 convolution to three
# classes (background, left parotid, right parotid). The paper does not state a normalisation; we
# use batch normalisation (the reasons are in the module's documentation). Parameters and forward
# GFLOPs per slice, for this profile and at the paper's size:

# %%
table = segmentation.architecture_table(run.profile)
display(table.style.format({"GFLOPs": "{:.3f}", "parameters": "{:,}"}, na_rep="").hide(axis="index"))
paper_size = segmentation.architecture_table({"segmentation": {"base_features": 64, "levels": 5},
                                             "preprocessing": {"crop": 256}}).iloc[-1]
display(Markdown(f"At the paper's size (64 features, 256 × 256): **{int(paper_size['parameters']):,}** "
                 f"parameters, **{paper_size['GFLOPs']:.1f}** GFLOPs per slice."))

# %% [markdown]
# ## The models of the comparison
# Each model is trained by the same function on its own data; what it is tested on is fixed
# before training (patients, never slices, are split).

# %%
recipes = segmentation.model_recipes(run.profile)
trained_on = {name: artefact.relpath for name, artefact in run.artefacts().items()}
display(pd.DataFrame([{"model": r["name"], "method": r["title"],
                       "trained on": trained_on[r["data"]] if r["data"] else "(not trained)",
                       "tested on": r["test"], "what it is": r["description"]} for r in recipes])
        .style.hide(axis="index"))

# %% [markdown]
# ## Training (section 2.E)
# Adam, soft Dice loss, the learning rate reduced on a validation-loss plateau (down to 1e-7),
# early stopping when the validation loss has not improved by more than 1 % for 10 epochs (the
# paper's setting; this profile's values are printed in the run's `profile.yaml`); the best
# checkpoint is kept. Models already
# trained on the same data and settings are reused.
#
# The stage is one library call, `segmentation.run(run)`: it trains every model (this section)
# and contours every test patient with each (the next sections show the results).

# %%
stage = segmentation.run(run, log=print)
trained, index = stage["trained"], stage["index"]
summary = trained[["name", "title", "epochs_run", "best_epoch", "best_val_dice", "seconds", "test"]]
display(summary.rename(columns={"name": "model", "title": "method", "epochs_run": "epochs",
                                "best_epoch": "best epoch", "best_val_dice": "validation Dice",
                                "seconds": "training time (s)", "test": "tested on"})
        .style.format({"validation Dice": "{:.3f}", "training time (s)": "{:.1f}"}, na_rep="–")
        .hide(axis="index"))
display(Markdown(f"All models trained in **{trained['seconds'].sum() / 60:.1f} min** on this machine."))
skipped = trained[trained["skipped"].fillna("") != ""]
if len(skipped):  # the baselines that need manual MR contours, where the cohort has too few
    display(Markdown("**Not trained**: " + "; ".join(f"{r.title} ({r.skipped})"
                                                     for r in skipped.itertuples())))

# %% [markdown]
# The validation Dice above is a 2D, slice-level figure on each model's *own* validation patients
# (synthetic MR for the cross-modality model, CT for CT-only and domain randomisation, the
# fine-tuning patients themselves for few-shot): it says whether a model learned its training
# task, not how well it contours real MR. That is chapter 5's question.

# %%
fig = plots.unet_training_curves(segmentation.training_logs(run))
plots.save(fig, run, runs.Figures.UNET_TRAINING, dpi=110)
plt.show()

# %% [markdown]
# ## The split
# Who trained, validated and tested each model (patients, by identifier):

# %%
split_rows = []
for r in recipes:
    if r["name"] in set(skipped["name"]):
        continue
    s = json.loads((run.model_dir(r["name"]) / runs.TrainingFiles.SUMMARY).read_text())
    test = s.get("test_patients")
    split_rows.append({"model": r["name"], "train": len(s.get("train_patients") or []),
                       "validation": len(s.get("val_patients") or []) if s.get("trained", True) else 0,
                       "validation on": s.get("validation", "–"),
                       "test": f"{len(test)} {r['test']}" if test else f"all {r['test']}",
                       "test patients": ", ".join(test) if test else "every patient of the cohort"})
display(pd.DataFrame(split_rows).style.hide(axis="index"))

# %% [markdown]
# ## Contouring real MR (section 2.G)
# Every test patient's whole MR volume is preprocessed exactly as the training slices, predicted
# slice by slice, reassembled in 3D and resampled onto the native MR grid, once as it is and once
# keeping only the largest 3D connected component per side (`postprocess_lcc`; chapter 5 reports
# both). The predictions and the manual contours are written as label maps under `predictions/`.
# Where the MR cohort is simulated from CT patients, the CT-only network also contours those
# patients' own CT (`ct_only_paired`, the paired control of chapter 5).

# %%
timing = index.groupby(["model", "modality"])["seconds"].agg(["count", "mean", "std"]).reset_index()
display(timing.rename(columns={"count": "patients", "mean": "s per patient", "std": "SD"})
        .style.format({"s per patient": "{:.2f}", "SD": "{:.2f}"}, na_rep="–").hide(axis="index"))
display(Markdown(
    f"Inference, end to end per patient (read, preprocess, predict, post-process, write): "
    f"**{index['seconds'].mean():.2f} ± {index['seconds'].std():.2f} s** over {len(index)} predictions "
    f"on this machine (paper: 0.86 ± 0.02 s on a V100). `crossmod bench inference` times it on a "
    f"Table-I-sized MR."))

# %% [markdown]
# ## Example predictions
# One real (phantom) MR patient, the axial slice with the most parotid: manual contour in blue,
# automatic in red, for each method.

# %%
fig = plots.prediction_panels(segmentation.prediction_examples(run))
plots.save(fig, run, runs.Figures.UNET_EXAMPLES, dpi=110)
plt.show()

# %% [markdown]
# ## Provenance

# %%
display(Markdown(runs.provenance_markdown(run)))

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
# # 10. How much CycleGAN is enough? A convergence study
#
# ## Overview
# The paper trained its CycleGAN for 72 h on a V100 at 256 × 256 pixels ({cite}`kieselmann2021`);
# this book's runs train it for minutes on two CPU cores. Whether the method works then depends on
# whether the synthetic MR is good enough yet, so this chapter measures it: on the real-anatomy
# tier (`openkbp`: real OpenKBP CT {cite}`babier2021`, T2-weighted MR simulated from 12 other
# OpenKBP patients), for **three seeds** and **four CycleGAN budgets spanning an order of
# magnitude**, the whole pipeline from the prepared slices on (CycleGAN, synthesis, cleaning,
# U-Nets, predictions, metrics) is run and recorded. Beside the cross-modality DSC it records the
# baselines that do not need the CycleGAN (CT only, naive, domain randomisation; trained once per
# seed) and measures of the synthetic MR itself.
#
# | Prerequisite | Importance |
# |---|---|
# | Chapters 2–5 (the pipeline) | necessary |
# | Chapter 9 (recorded runs) | helpful |
#
# The study is far longer than a book build (about 40 min per seed on two idle AVX-512 cores, 2 h
# on AVX2), so it is a **recorded run**: `crossmod study convergence --profile
# openkbp-identity-loss --out DIR` runs it (finished
# points are kept, an interrupted study carries on), `crossmod record --run-dir DIR` keeps its
# tables with the commit, date and device of every point. Everything below was computed by that
# recorded study, **not by the run that built this book**. The code is `crossmod_lib.convergence`.
#
# **Budgets.** A budget of B iterations trains k epochs at the constant learning rate and k with
# the linear decay (k = B / (2 × 215); the study's epoch is 215 iterations of batch 4, a random
# half of the 1,720 CT slices). The first k epochs of a budget are those of every longer budget of
# the same seed, so one constant-rate *trunk* is trained per seed and every budget branches off it
# where its decay starts (`cyclegan.branch`; a test checks the branch is bit-identical to a run of
# that budget from scratch).
#
# **Measures of the synthetic MR** (no segmentation involved): the parotid-to-head intensity ratio
# of chapter 2 (real MR: the dashed line); the median head-outline Dice against the CT (chapter 3);
# the 1-Wasserstein distance between the in-head intensity histograms of synthetic and real MR; and
# the kernel inception distance (KID, {cite}`binkowski2018`), the unbiased squared maximum mean
# discrepancy under a cubic polynomial kernel, here on hand-chosen slice features (intensity and
# gradient histograms, checkerboard and speckle energies) since no pretrained Inception network is
# available offline; its floor is the KID between two halves of the real MR patients.

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""
recorded_dir = ""  # default: recorded/ at the top of the repository
study_name = "openkbp-convergence"

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from crossmod_lib import config, convergence, plots, record, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
recorded = record.recorded_runs(recorded_dir or None)  # verified once, read by every section
recorded_studies = [r.root for r in recorded if r.info.get("kind") == "study"]  # the tier and variant tables' input
tier_profile = config.load_profile("openkbp")  # the tier as it stands on this commit
tier = convergence.tier_run(tier_profile, recorded_studies)  # its recorded runs (Table II, CycleGAN settings)
studies = [r for r in recorded if r.info.get("kind") == "study" and r.root.name == study_name]
study = studies[0] if studies else None
if study is None:
    display(Markdown(f"*No recorded study `{study_name}` in this repository: run "
                     "`crossmod study convergence --profile openkbp-identity-loss --out DIR`, then "
                     f"`crossmod record --run-dir DIR --out recorded/{study_name}`.*"))
else:
    points = study.table(runs.RunFolder.convergence)
    quality = study.table(runs.RunFolder.convergence_quality)
    settings = study.json(runs.RunFolder.convergence_runs)["study"]
    display(Markdown(
        f"Recorded study `{study.root.name}` (profile `{study.name}`), recorded on "
        f"{study.info['recorded'].get('date', '?')} at commit {study.info['recorded'].get('commit', '?')}: "
        f"{quality.shape[0]} of {len(settings['seeds']) * len(settings['budgets'])} points "
        f"(seeds {', '.join(map(str, settings['seeds']))}; budgets "
        f"{', '.join(f'{b:,}' for b in settings['budgets'])} CycleGAN iterations). "
        + study.settings_sentence()
        + (f"\n\n*Recorder's note:* {study.info['note']}" if study.info.get("note") else "")))

# %% [markdown]
# ## The curve
# Thin lines: one seed each; thick: the mean over seeds; the band: the cross-modality network's
# mean patient SD (the spread over the 12 MR patients of one run).

# %%
if study is not None and not points.empty:
    fig = plots.convergence_curves(points, quality)
    plots.save(fig, run, runs.Figures.CONVERGENCE)
    plt.show()
    display(Markdown("**When does the method overtake domain randomisation?** " + convergence.verdict(points)
                     + " " + convergence.quality_sentence(quality)))

# %% [markdown]
# ## The numbers
# Per budget, model and parotid: the mean over seeds of the patient-mean DSC (LCC post-processing,
# as Table II), the SD over seeds, the worst seed, and the mean patient SD.

# %%
if study is not None and not points.empty:
    summary = convergence.summary_table(points)
    display(summary.drop(columns=["model"]).set_index(["budget", "title", "structure"]).round(3))
    display(Markdown("Quality of the synthetic MR, per seed and budget:"))
    display(quality.set_index(["seed", "budget"]).round(3))

# %% [markdown]
# ## The tier over seeds: Table II of `openkbp`
# The tier's settings are chosen from this study and the budget and U-Net sections below: the
# CycleGAN of the study above without its identity loss, for 8,600 iterations (20 + 20 epochs)
# in the fast CPU mode, and U-Nets of up to 1,600 steps (40 epochs of at most 40, bf16 autocast
# where the CPU computes bf16 natively) — the settings of `openkbp-8600-unet1600`, which `openkbp`
# now is. Its first settings (2,150 iterations and 400 fp32 U-Net steps, which fit 45 min on
# AVX2-only cores) are kept as `openkbp-2150`, the profile every variant below extends.
# When the `openkbp` profile trains its CycleGAN for k + k epochs of the study's 215 iterations, a
# run of it *is* the study point of that budget for the seed it takes. Below, Table II of the tier
# as it stands on this commit, from every recorded study that ran exactly its settings
# (`convergence.tier_run`; the baselines, which never see the CycleGAN, from a study of the same
# data and U-Net settings at the same seeds): the mean over seeds of each run's patient-mean DSC,
# the seed-to-seed SD beside the mean patient SD, and the tier's criteria per seed and parotid:
# cross-modality ≥ CT only − 0.05 and ≥ domain randomisation, naive ≤ 0.5
# (`convergence.tier_criteria`).
#
# CT only is tested on the seed's held-out CT patients (8 of the 40), the MR methods on the 12 MR
# patients: a gap between them mixes the change of modality with the change of patients, and the
# held-out CT patients change with the seed. Because the MR here is simulated from OpenKBP CT
# patients, the CT-only network can also contour those 12 patients' own CT (never seen in its
# training): the paired control `ct_only_paired` of chapter 5. Its column sits beside the criteria
# (`vs_ct_only_paired`: cross-modality ≥ it − 0.05, the same comparison on the same patients),
# and the verdict's last sentence counts it; the criteria themselves stay as defined above.

# %%
if study is not None:
    if tier["reason"]:
        display(Markdown(f"*No recorded run of `openkbp` as it stands: {tier['reason']}.*"))
    else:
        at_budget = convergence.summary_table(tier["points"])
        minutes = [s / 60 for s in tier["seconds"].values()]
        display(Markdown(
            f"**Table II, `openkbp` at {tier['budget']:,} CycleGAN iterations**, mean over "
            f"{int(at_budget['seeds'].max())} seeds (cross-modality: recorded study "
            f"`{'`, `'.join(tier['cross_modality_from'])}`; baselines: `{'`, `'.join(tier['baselines_from'])}`). "
            f"One run from the prepared slices took at most {min(minutes):.0f}–{max(minutes):.0f} min "
            "(its CycleGAN, synthesis, cleaning and U-Nets, as recorded with each point):"))
        display(at_budget.drop(columns=["budget", "model"]).set_index(["title", "structure"]).round(3))
        criteria = convergence.tier_criteria(tier["points"], tier["budget"])
        display(criteria.set_index(["seed", "structure"]).round(3))
        display(Markdown(convergence.tier_verdict(criteria, tier["budget"])))

# %% [markdown]
# ## Four and eight times the budget, and four times the U-Net steps
# How the tier's settings were found. Its first settings (`openkbp-2150`) train the CycleGAN for
# 2,150 iterations, which fit the 45 min a tier run may take on two AVX2-only cores (~33 min
# a run). With AVX-512 bf16 (the CycleGAN's fast CPU mode, chapter 7) a CycleGAN iteration costs
# ~0.15 s instead of ~0.4, and 45 min afford four times the budget: profile `openkbp-8600`
# (`openkbp-2150` with 20 + 20 epochs of 215 iterations; everything else, and so the baselines of each seed,
# `openkbp-2150`'s). `openkbp-17200` (40 + 40 epochs) is eight times that budget, over the 45 min
# (~55 min a run from the prepared slices): the budget at which the tier's criteria are asked
# again where 8,600 does not meet them for every seed.
#
# The U-Nets were short of training too: at the first settings' 400 steps (20 epochs of 20) the
# cross-modality network of every 8,600 point was still improving at its last epoch.
# `openkbp-8600-unet1600` gives every network of the comparison up to four times the steps (40
# epochs of 40; the paper's plateau rules still stop it early), on the same CycleGANs, synthetic
# MR and cleaned slices as `openkbp-8600` (the study takes them with `--translator-from`), and
# trains the U-Nets under bf16 autocast where the CPU computes bf16 natively
# (`segmentation.cpu_bf16`; 2.1 times the fp32 rate on an Intel Xeon with AVX-512 bf16, chapter 7's
# recorded `crossmod bench unet`): these are the settings of `openkbp`, so its row below is the
# tier's. `openkbp-8600-unet1600-appearance` adds the appearance augmentation to its cross-modality
# network (its baselines are `openkbp-8600-unet1600`'s). `openkbp-8600-unet1600-augment` gives every
# network alike the U-Nets' small affine and intensity jitter (`segmentation.augment`: rotation
# ±7°, scale ±7 %, shift ±4 %, gamma and gain, never a flip; the paper trains without
# augmentation), so its baselines are its own: asked because the cross-modality network's DSC on
# pt_51, the MR patient with the smallest head, swings between 0.0 and 0.4 with the seeds. It lifts
# every network, but CT only on its held-out CT patients most and most steadily (its weak seeds
# are gone), so fewer pairs meet CT only − 0.05 than without it, while against the paired control
# (the same patients' own CT) the cross-modality network stays within 0.05 on most pairs: the
# tier's passing pairs leaned in part on weak CT-only seeds. It is not adopted into `openkbp`.
# Below, the first settings beside all of them, per seed and parotid, with the tier's criteria and
# the synthetic MR's quality; and the same for the second MR appearance of the next section
# (`openkbp-mr2`, `openkbp-mr2-8600`, and both with the MR's noisy background zeroed,
# `openkbp-mr2-background` and `openkbp-mr2-background-8600`, each with its own baselines;
# `openkbp-mr2-background-8600-unet1600` with the tier's U-Net settings).

# %%
if study is not None:
    budgets = {name: config.load_profile(name)
               for name in ("openkbp-2150", "openkbp-8600", "openkbp-17200", "openkbp-8600-unet1600",
                            "openkbp-8600-unet1600-augment", "openkbp-8600-unet1600-appearance", "openkbp-mr2",
                            "openkbp-mr2-8600", "openkbp-mr2-background",
                            "openkbp-mr2-background-8600", "openkbp-mr2-background-8600-unet1600")}
    by_budget, unrecorded = convergence.variant_table(budgets, recorded_studies)
    if not by_budget.empty:
        display(convergence.variant_summary(by_budget).set_index(["profile", "structure"]).round(3))
        display(by_budget.drop(columns=["vs_ct_only", "vs_domain_random", "naive_fails"])
                .set_index(["profile", "seed", "structure"]).round(3))
    longer = {name: convergence.tier_run(budgets[name], recorded_studies)
              for name in ("openkbp-2150", "openkbp-8600", "openkbp-17200", "openkbp-8600-unet1600",
                           "openkbp-8600-unet1600-augment")}
    longer = {name: found for name, found in longer.items() if not found["reason"]}
    same_unets = [name for name in ("openkbp-2150", "openkbp-8600", "openkbp-17200") if name in longer]
    if len(same_unets) > 1:  # the budgets at the first settings' U-Nets (400 fp32 steps)
        display(Markdown("**When does the tier's CycleGAN (no identity loss) overtake domain "
                         "randomisation?** (U-Nets of 400 steps) " + convergence.verdict(pd.concat(
                             [longer[name]["points"] for name in same_unets]))))
    for name, found in longer.items():
        minutes = [s / 60 for s in found["seconds"].values()]
        display(Markdown(
            f"`{name}`: "
            + convergence.tier_verdict(convergence.tier_criteria(found["points"], found["budget"]),
                                       found["budget"])
            + f" A run of `{name}` from the prepared slices took at most "
            + (f"{min(minutes):.0f}–{max(minutes):.0f}" if round(min(minutes)) != round(max(minutes))
               else f"{max(minutes):.0f}")
            + f" min (its CycleGAN, synthesis, cleaning and U-Nets; "
            f"recorded study `{'`, `'.join(found['cross_modality_from'])}`, "
            "whose provenance names each point's device)."))
    # The ceiling for a U-Net on this MR: the MR oracle (real MR labels, patient-level
    # cross-validation on the 12 MR patients) at the same U-Net settings, where recorded
    for rec in recorded:
        if rec.info.get("kind") != "unet-seeds" or "mr_oracle" not in rec.json(runs.RunFolder.unet_seeds_runs)["models"]:
            continue
        oracle = convergence.unet_seed_summary(rec.table(runs.RunFolder.unet_seeds)).set_index("structure")
        seg_settings = config.load_profile(runs.RunFolder.settings_file.at(rec.root))["segmentation"]
        display(Markdown(
            f"The MR oracle at {seg_settings['epochs']} epochs of at most {seg_settings['max_steps_per_epoch']} "
            f"U-Net steps (recorded `{rec.root.name}`, U-Net seeds {int(oracle['unet_seeds'].max())}): "
            + ", ".join(f"{side} {oracle.loc[side, 'dsc']:.2f} (seeds {oracle.loc[side, 'lowest']:.2f}–"
                        f"{oracle.loc[side, 'highest']:.2f})" for side in ("Parotid_R", "Parotid_L"))
            + ": a U-Net trained on the real MR's own labels, against which the criterion CT only − 0.05 "
            "asks the synthetic labels to do as well or better."))
    for name, why in unrecorded.items():
        display(Markdown(f"*`{name}`: {why}* (`crossmod study convergence --profile {name} --out DIR`, "
                         "then `crossmod record`)."))

# %% [markdown]
# ## Is the result tuned to one simulator? A second MR appearance, and the MR read from DICOM
# A user brings real MR, not this book's simulation. Two variants of the tier's first settings
# (`openkbp-2150`) run the same networks, budget and seeds with other MR: `openkbp-mr2` simulates the MR cohort with a second,
# clearly different acquisition (TE 60–70 ms instead of ~100, TR 2,000–2,500 ms, SNR 10–15
# instead of 20–30, a stronger bias field, a 2 mm point-spread function, and parotids 15 % darker
# than the relaxation model gives), and `openkbp-dicom` writes the simulated cohort out as one
# DICOM MR series and one RTSTRUCT per patient and reads it back through the `dicom` reader, the
# path a user's own folder takes; `openkbp-dicom-8600` does the same for the tier as it stands
# (`openkbp`, the last rows, beside it). Each variant's baselines are its own (domain randomisation and
# the naive network are tested on its MR); the criteria are the tier's
# (`convergence.variant_table`). Beside them, how MR-like each variant's synthetic MR came out:
# its parotid/head intensity ratio against its real MR's, and the KID against the real-vs-real
# floor (as in the study above). The same table holds `openkbp-dice-ce`, the tier with other U-Net
# settings (soft Dice + cross-entropy, appearance augmentation): its baselines are retrained
# under them, so it too is compared with its own. Where a variant's runs hold the paired control
# (`ct_only_paired`: its CT-only network on the CT its MR patients were simulated from, the same
# for every appearance of a seed), that column says what the change of modality costs on the same
# patients, whatever the MR looks like.
#
# On the second appearance the CycleGAN fails outright (below, and at four times the budget in the
# section above): its synthetic slices keep the CT's contrast and carry checkerboard grids. Two
# remedies were tried on it. `openkbp-mr2-cycle-noise` assumed the CycleGAN hides the CT in
# low-amplitude patterns which the MR → CT generator decodes to meet the cycle loss
# ({cite}`chu2017`) and added Gaussian noise (SD 0.1 of the [−1, 1] range) to each translation
# before the cycle pass maps it back ({cite}`bashkirova2019`; `cyclegan.cycle_noise_sd`; only the
# cross-modality network trains, the baselines are `openkbp-mr2`'s). The cause lay earlier: at
# SNR 10–15 the MR's Rician noise floor sits near the fixed head threshold (20 of 255), and the
# fixed-threshold head outline of the prepared MR took the whole field of view on most slices, so
# the crops were not centred on the head and the CycleGAN's geometric loss asked the MR → CT
# generator for a head that fills the frame. `openkbp-mr2-background` finds the MR's head by Otsu's
# threshold on the smoothed volume and sets everything outside it to zero
# (`preprocessing.mr_background: zero`, `preparation.zero_mr_background`), for training and for
# every MR a network is tested on; its four networks are trained on that MR. At the tier's
# settings (`openkbp-mr2-background-8600-unet1600`: 8,600 iterations, the tier's U-Nets) the
# verdict below is the tier's own, read from its recorded seeds; the paired control says what this
# appearance costs on the same patients, beside the ~0 the tier's appearance costs. Whether that
# cost is the MR's or the translator's, the ideal translation below answers: a U-Net trained on the
# simulator's own MR of the CT patients, in this appearance, is tested on the same MR.

# %%
if study is not None:
    second = config.load_profile("openkbp-mr2-background-8600-unet1600")
    second_run = convergence.tier_run(second, recorded_studies)
    if not second_run["reason"]:
        display(Markdown(
            "`openkbp-mr2-background-8600-unet1600`: "
            + convergence.tier_verdict(convergence.tier_criteria(second_run["points"], second_run["budget"]),
                                       second_run["budget"])))
    variant_profiles = {name: config.load_profile(name)
                        for name in ("openkbp-2150", "openkbp-mr2", "openkbp-mr2-cycle-noise", "openkbp-mr2-background",
                                     "openkbp-dicom", "openkbp-dice-ce", "openkbp", "openkbp-dicom-8600")}
    variants, unrecorded = convergence.variant_table(
        variant_profiles, recorded_studies)
    if not variants.empty:
        display(convergence.variant_summary(variants).set_index(["profile", "structure"]).round(3))
        display(variants.drop(columns=["vs_ct_only", "vs_domain_random", "naive_fails"])
                .set_index(["profile", "seed", "structure"]).round(3))
    for name, why in unrecorded.items():
        display(Markdown(f"*`{name}`: {why}* (`crossmod study convergence --profile {name} --out DIR`, "
                         "then `crossmod record`)."))

# %% [markdown]
# ## How much of a point is the U-Net's? (U-Net seeds)
# Each point above trains one U-Net per seed on that seed's synthetic MR, so its DSC mixes the
# CycleGAN's result with the U-Net's own training. `crossmod study unet-seeds` trains the
# cross-modality U-Net of one point again, on the same cleaned slices, with other U-Net seeds, as
# the point had it and with changed segmentation settings (e.g. `cross_modality_appearance`:
# random gamma, blur, bias field and noise on the synthetic MR batches). Its spread is the part of
# the seed-to-seed SD above that the U-Net alone contributes; a difference between settings
# smaller than it is not one this study can see.

# %%
unet_studies = [r for r in recorded if r.info.get("kind") == "unet-seeds"  # the ideal translation: below
                and not r.json(runs.RunFolder.unet_seeds_runs).get("training")]
summaries, descriptions = [], []
for rec in unet_studies:
    info = rec.json(runs.RunFolder.unet_seeds_runs)
    parts = Path(info["point"]).parts  # a study point is study/seedS/budgetB; a whole run, its folder
    point = "/".join(parts[-3:]) if len(parts) > 2 and parts[-2].startswith("seed") else parts[-1]
    changes = "; ".join(f"`{name}`: " + (", ".join(f"{k} = {v}" for k, v in change.items()) or "as the point")
                        for name, change in info["variants"].items())
    descriptions.append(f"- `{rec.root.name}`: point `{point}` (profile `{rec.name}`), {len(info['runs'])} U-Nets; "
                        f"variants {changes}." + (f" *Recorder's note:* {rec.info['note']}" if rec.info.get("note") else ""))
    summaries.append(convergence.unet_seed_summary(rec.table(runs.RunFolder.unet_seeds))
                     .assign(point=point, study=rec.root.name))
if summaries:  # one table: the studies of one point side by side
    display(pd.concat(summaries).drop(columns=["title"])
            .set_index(["point", "study", "variant", "model", "structure"]).round(3))
    display(Markdown("The recorded U-Net seed studies:\n\n" + "\n".join(descriptions)))
if not unet_studies:
    display(Markdown("*No recorded U-Net seed study* (`crossmod study unet-seeds --point DIR/seed2021/budget02150 "
                     "--out DIR2 --set cross_modality_appearance=true`, then `crossmod record`)."))

# %% [markdown]
# ## What does the translator cost? The ideal translation (beyond the paper)
# Where the MR cohort is simulated from CT, the simulator is a CT → MR translator that makes no
# error. `crossmod study ideal-translation --point DIR` trains a point's cross-modality U-Net again,
# under U-Net seeds, on the simulator's own MR of the same CT patients (drawn with the MR cohort's
# settings, prepared as its MR, labelled by the patients' own contours carried onto the 4 mm MR
# slices: `simulation.ideal_translation_slices`) in place of the CycleGAN's cleaned synthetic MR,
# and tests it on the same MR cohort. Its gap to the point's CycleGAN network is what the
# translator costs; its gap to CT only on the same patients' CT (the paired control) is what the MR
# itself costs: its thicker slices, noise and weaker contrast. The CycleGAN translates the CT's
# 2.5 mm slices, labelled by the CT contours, while the MR has 4 mm slices whose contours take the
# gland where it fills most of the slab; `--slice-mm 2.5` draws the ideal MR in the CT's slices,
# so that the two ideal rows split the translator's cost into the slices' geometry and the rest.

# %%
ideal = convergence.ideal_translation_table(
    [(rec.root.name, rec.json(runs.RunFolder.unet_seeds_runs), rec.table(runs.RunFolder.unet_seeds))
     for rec in recorded if rec.info.get("kind") == "unet-seeds"])
if not ideal.empty:
    display(ideal.drop(columns=["point"]).set_index(["profile", "study", "slice_mm", "structure"]).round(3))
    display(Markdown(convergence.ideal_translation_sentence(ideal)))
else:
    display(Markdown("*No recorded ideal-translation study* (`crossmod study ideal-translation --point "
                     "STUDY/seed2021/budget08600 --out DIR`, then `crossmod record`)."))

# %% [markdown]
# ## Other translators and CycleGAN settings (beyond the paper)
# CUT {cite}`park2020`, the peer repository's successor to the CycleGAN, translates CT → MR with one
# generator, kept on its input's anatomy by a patch-wise contrastive loss instead of a second
# generator and the cycle (`cyclegan.translator: cut`, `crossmod_lib.cut`; the geometric loss as
# for the CycleGAN; profile `openkbp-cut`), and FastCUT, its lighter variant without the NCE
# identity pass and with a stronger PatchNCE weight (`translator: fastcut`, profile
# `openkbp-fastcut`). The same table holds every recorded study of other CycleGAN settings, among
# them the tier as it stands: the study above ran the CycleGAN with the reference
# implementation's identity loss (profile `openkbp-identity-loss`, λ 0.5), which the paper does
# not name and which pulls the CT → MR generator towards passing intensities through (CT → T2 MR
# needs them re-ordered: bone bright → dark, fat dark → bright); the tier trains without it
# (`openkbp-identity0`: `openkbp-2150`, 2,150 iterations). Each recorded study is set beside the study above at
# the same budgets and seeds, with the baselines of those seeds (they depend on neither
# translator nor CycleGAN settings). Studies of other MR or other U-Net settings train baselines
# of their own and are set beside the tier in the section on variants above
# (`convergence.shares_baselines`).
#
# A second table holds CycleGAN settings tried at the tier's settings as they stand (`openkbp`),
# each beside the tier's own cross-modality network on the same seeds. They were asked because the
# ideal translation (above) puts the translator's cost at ~0.1 DSC on the tier, and the synthetic
# MR is checkerboarded and speckled: resize-convolution upsampling in the generators
# (`cyclegan.upsampling: resize`, {cite}`odena2016`; profile `openkbp-resize`), the reference
# implementation's random crop and mirror of the CycleGAN's slices (`random_crop_scale`,
# `random_flip`; `openkbp-crop-flip`), and differentiable augmentation of what the discriminators
# see, against a discriminator that learns the 353 real MR slices by heart
# (`cyclegan.disc_augment`, {cite}`zhao2020diffaugment`; `openkbp-diffaugment`, all four of
# DiffAugment's policies, and `openkbp-diffaugment-geometric`, its translation and cutout only, which
# leave the intensity levels under the discriminators' check). Neither policy helps: the first lets
# the generator's intensity levels drift, the second gives synthetic MR closer to the real by KID
# that no longer ties the parotid's appearance to the place of the CT contours (its U-Net fails).
#
# The last row asks why the registration of chapter 3 matters on this tier at all: the synthetic MR
# is made from its CT and keeps the CT's head outline, yet the registration moves it by millimetres,
# mostly outwards, and its first stage, allowed a scale (`cleaning.rigid.transform: similarity`),
# finds the synthetic anatomy a few per cent smaller than the CT's. The geometric loss's two head
# masks disagree (chapter 2): over the same anatomy the MR's threshold mask reaches about two pixels
# beyond the windowed CT's, and held to the CT's outline the generator draws the anatomy inside
# smaller. `openkbp-geo-offset` holds the synthetic MR to the CT mask grown by two pixels
# (`cyclegan.geo_mask_offset_px: 2`). Its record ran on another CPU than the tier's (each record's
# provenance names the device): bf16 numerics differ between CPUs, and the tier's own settings
# rerun on that CPU with the same seed, and three U-Net seeds on each CycleGAN, put the offset's
# change within the U-Net seeds' spread (numbers in the profile's comment; not recorded). One pixel
# (`openkbp-geo-offset-1px`, seed 2021, on the CPU of the offset's record) did worse than either.
# `openkbp-ngf32-4300` asks whether the translator lacks capacity: the CycleGAN's widths doubled
# (ngf / ndf 32) for half the iterations, about the tier's CycleGAN time (its reference column is
# empty: the tier has no 4,300-iteration point). `openkbp-mind` asks whether the translator moves
# the anatomy inside the head, where the geometric loss does not look: a structure loss on both
# translations (`cyclegan.lambda_mind: 5`, chapter 2; {cite}`heinrich2012`, {cite}`yang2018`). It
# does what it asks: the synthetic MR then keeps its CT's structure in MIND's sense as closely as
# the simulator's own MR of the same slices (the ideal translation) does. But its cross-modality
# network loses to the tier's, and without the registration it loses far more (numbers in the
# profile's comment): kept structure is not what the U-Net lacks; the parotid's appearance in the
# synthetic MR is. `openkbp-seg` asks for that appearance directly: a task loss on the CT → MR
# generator (`cyclegan.lambda_seg: 1`, chapter 2; SynSeg-Net, {cite}`huo2019`) makes the CT's
# parotids findable in their synthetic MR by a small network trained alongside. The generator
# obliges that network, but its cross-modality U-Net does worse still on the real MR: what the
# task network reads in the synthetic MR is not what the real MR shows.

# %%
if study is not None:
    first_settings = config.load_profile("openkbp-2150")  # the U-Net settings these studies ran
    others = {r.root.name: r for r in recorded
              if r.info.get("kind") == "study" and r.root.name != study_name
              and r.table(runs.RunFolder.convergence) is not None
              and convergence.shares_baselines(first_settings, r.root)}
    if others:
        compared = convergence.translator_table(
            {"CycleGAN with identity loss": points, **{name: r.table(runs.RunFolder.convergence) for name, r in others.items()}})
        display(compared.set_index(["translator", "budget", "structure"]).round(3))
    else:
        display(Markdown("*No recorded study of another translator yet* (`crossmod study convergence "
                         "--profile openkbp-cut --out DIR`, then `crossmod record`)."))
# CycleGAN settings tried at the tier's settings as they stand (openkbp: its U-Nets of 1,600 steps),
# each beside the tier's own cross-modality network on the same seeds
at_tier = {r.root.name: r.table(runs.RunFolder.convergence) for r in recorded
           if r.info.get("kind") == "study" and convergence.shares_baselines(tier_profile, r.root)}
at_tier = {name: points for name, points in at_tier.items() if points is not None}
tier_name = (tier["cross_modality_from"] or [None])[0]
if tier_name in at_tier and len(at_tier) > 1:
    display(Markdown(f"At the tier's settings as they stand (`openkbp`; `reference_dsc`: the tier's own "
                     f"cross-modality network, recorded `{tier_name}`, on the same seeds):"))
    display(convergence.translator_table({tier_name: at_tier.pop(tier_name), **at_tier}, reference=tier_name)
            .set_index(["translator", "budget", "structure"]).round(3))

# %% [markdown]
# ## Provenance of every point
# Commit, date and device of each point, with its wall seconds (the trunk's share, the decay, the
# synthesis, cleaning, U-Nets, predictions and metrics).

# %%
if study is not None:
    display(study.provenance_table().round({"seconds": 0}))

# %% [markdown]
# ## Resources and references
# The sources cited in this chapter are listed on the [references](../references.md) page.
#
# ## Provenance of this chapter

# %%
display(Markdown(runs.provenance_markdown(run)))

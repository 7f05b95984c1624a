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
# # 5. Geometric evaluation
#
# ## Overview
# This chapter reproduces **sections 2.G, 3.C and 3.D** of {cite}`kieselmann2021`: the automatic
# parotid contours of chapter 4 against the manual ones, with the Dice similarity coefficient (DSC)
# {cite}`dice1945`, the Hausdorff distance (HD) {cite}`huttenlocher1993` and the mean surface
# distance (MSD), per gland (**Table II**), per patient with both glands averaged (**Fig. 8**), and
# as pictures of typical patients (**Fig. 7**). The paper's yardstick is the interobserver
# variability of its MR contours {cite}`kieselmann2018`; ours is the phantom's second observer
# (chapter 1). The paper reports means and standard deviations only; we add rank tests of whether
# cross-modality learning differs from each other method.
#
# | Prerequisite | Importance |
# |---|---|
# | Chapter 1 (interobserver reference) | necessary |
# | Chapter 4 (predicted contours, `predictions/index.csv`) | necessary |
# | DSC, Hausdorff and surface distances | helpful |
# | Wilcoxon signed-rank and Mann-Whitney U tests | helpful |
#
# Everything is computed by `crossmod_lib.evaluation` (metrics: `crossmod_lib.metrics`, the
# conventions of which are in its documentation and listed below: 3D DSC, surface distances in
# mm, HD95 the 95th percentile of both directions' distances pooled as MedPy's `hd95`, MSD the
# mean of the two directed means; an empty contour gives undefined distances).

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from crossmod_lib import contour_review, convergence, evaluation, paper, plots, record, runs
from crossmod_lib.metrics import METRIC_CONVENTIONS as metrics_conventions

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
main, other = evaluation.main_postprocess(run.profile)
variant = evaluation.POSTPROCESS_TITLES
print(f"profile {run.profile['name']}: main results with {variant[main]} ({main}); "
      f"the other version ({other}) is reported beside them")

# %% [markdown]
# ## The metrics of every prediction
# Every (method, patient) of chapter 4 is compared with the manual contour of the same patient on
# its native grid, per gland, for both versions of the prediction: the network's output (`raw`)
# and its largest 3D connected component per gland (`lcc`). The table is saved as
# `metrics/segmentation.csv`. Each method is evaluated on its own test patients: the MR methods
# on the MR cohort (few-shot models without the patients they were fine-tuned on), CT only on its
# held-out CT patients. Where the MR cohort is simulated from CT patients (the `openkbp` tiers),
# the CT-only network also contours those patients' own CT: `ct_only_paired`, a control beyond the
# paper on the same patients as the MR methods, so that only the modality differs. Only MR patients with manual contours can be scored: a user's MR cohort
# may have few or none (chapter 4 predicted every patient regardless); the others are shown for
# review at the end of the chapter.
#
# The stage is one library call, `evaluation.run(run)`: the metrics, Table II under both
# post-processings and the rank tests below (`metrics/`); the cells show them.

# %%
stage = evaluation.run(run)
metrics, prediction_index, mr_scored = stage["metrics"], stage["index"], stage["mr_scored"]
mr_annotated, mr_predicted = evaluation.annotation_counts(prediction_index)
display(Markdown(f"**{evaluation.annotation_sentence(prediction_index)}**"))
interobserver = stage["interobserver"]
inter_title = evaluation.INTEROBSERVER_TITLE
counts = (metrics[metrics["postprocess"] == main].groupby(["model", "modality"], sort=False)
          ["patient"].nunique().rename("patients").reset_index())
display(counts)
if interobserver is None:
    display(Markdown("*This MR cohort has no second observer: no interobserver reference.*"))

# %% [markdown]
# ## Table II
# Mean ± SD over patients, per gland, right parotid first as in the paper; `n` is the number of
# patients and `tested on` the cohort. Ours first, then the paper's own numbers (real patients:
# 27 MR, CT test patients of its 202 CT).

# %%
ours = stage["tables"][main]
display(Markdown(f"**This run ({run.profile['name']} profile, {variant[main]})**"))
display(ours)
display(Markdown("What each metric computes (`crossmod_lib.metrics.METRIC_CONVENTIONS`): "
                 + "; ".join(f"**{evaluation.METRIC_TITLES[m]}**: {metrics_conventions[m]}"
                             for m in evaluation.METRIC_TITLES) + "."))
display(Markdown("**The paper's Table II** (Kieselmann et al. 2021, real patients; not computed here)"))
display(paper.TABLE_II)

# %% [markdown]
# The same with the other version of the predictions, to see what the post-processing does:

# %%
alternative = stage["tables"][other]
display(Markdown(f"**This run, {variant[other]} ({other})**"))
display(alternative)
effect = evaluation.postprocessing_effect(metrics)
display(effect.set_index("title").drop(columns="model").round(3))

# %% [markdown]
# ## Both glands together (section 3.D, Fig. 8)
# Section 3.D quotes one value per method for both glands. We average each metric over the two
# glands of a patient (the quantity of Fig. 8) and summarise over patients; the paper's text
# values are shown below ours (how the paper pooled the glands is not stated).

# %%
both = evaluation.both_glands(metrics, interobserver, postprocess=main, interobserver_title=inter_title)
display(both)
display(Markdown("**The paper's section 3.D text**"))
display(paper.RESULTS_TEXT)

# %% [markdown]
# ### Fig. 8: box plots per method
# The paper compares cross-modality learning (red) with the CT-trained network (green); we add
# the other methods of chapter 4. Points are patients; the grey band is the interobserver
# variability as **mean ± SD over patients** (both glands averaged), its mean dashed. Undefined
# distances (an empty predicted gland) are left out and counted at the top of the panel. The
# distance panels switch to a log axis when one method's median is over five times another's (a
# method that misses the glands sits 50-100 mm away and would flatten the other boxes).

# %%
patients = evaluation.per_patient(metrics, postprocess=main)
inter_patients = (evaluation.interobserver_per_patient(interobserver)
                  if interobserver is not None else None)
order = evaluation.method_order(patients["model"])
fig = plots.method_boxplots(patients, inter_patients, band="sd", order=order,
                            title=f"Fig. 8 ({run.profile['name']} profile, {variant[main]})")
plots.save(fig, run, runs.Figures.BOXPLOTS)
plt.show()

# %% [markdown]
# ## Fig. 7: typical cross-modality contours
# Four typical patients: those whose DSC (both glands) is closest to the cross-modality median,
# ordered by DSC. One column per patient; rows axial (the slice with the largest manual parotid
# area), sagittal (through the left gland) and coronal; automatic contour red, manual blue.

# %%
if mr_scored:
    examples = evaluation.contour_examples(run, metrics, model="cross_modality", n=4, postprocess=main)
    fig = plots.figure_contours(examples, title="Fig. 7: cross-modality (red) and manual (blue) contours")
    plots.save(fig, run, runs.Figures.CONTOURS)
    plt.show()
else:
    display(Markdown("*No MR patient has manual contours: no typical patients to pick (see the "
                     "gallery of every patient's predicted contours below).*"))

# %% [markdown]
# ## Is cross-modality learning different from the others?
# Two-sided rank tests per metric on the patients' values averaged over both glands. Methods
# tested on MR are compared **paired**, on the MR patients every MR method was tested on, with
# the Wilcoxon signed-rank test {cite}`wilcoxon1945`. CT only is tested on CT patients, other
# people than the MR ones: it cannot be paired, and the Mann-Whitney U test {cite}`mann1947`
# compares the two groups; it also compares different reference contours (clinical CT ones
# against accurate MR ones), so it is a comparison of two settings rather than of two networks on
# the same task. The paired control (`ct_only_paired`, where the MR is simulated from CT) is
# tested on the MR patients' own CT against its contours (those the simulated MR's come from):
# it is paired with the MR methods on those patients. `p_holm` adjusts for the several comparisons per metric {cite}`holm1979`;
# `smallest_exact_p` is the smallest p the exact test can reach with that many patients.

# %%
if mr_scored:
    tests = stage["tests"]
    display(tests.drop(columns=["reference"]).round(4))
else:
    display(Markdown("*Nothing to test: no MR patient has manual contours.*"))

# %% [markdown]
# ## What the numbers say

# %%
numbers = evaluation.method_summary(metrics, postprocess=main)
lines = []
if not mr_scored:
    lines.append(f"- **None of the {mr_predicted} MR patients has manual contours**, so nothing "
                 "here says how well the method contours this cohort: review the gallery below. "
                 "To measure it, contour a few patients by hand (an RTSTRUCT beside their series) "
                 "and run again: they are then scored, and train the few-shot baseline.")
empty, glands = int(numbers["empty_glands"].sum()), int(numbers["glands"].sum())
if empty:
    worst = numbers["empty_glands"] / numbers["glands"]
    lines.append(f"- **{empty} of {glands} predicted glands are empty** (no voxel contoured; "
                 + ", ".join(f"{m}: {int(numbers.loc[m, 'empty_glands'])}/{int(numbers.loc[m, 'glands'])}"
                             for m in worst.index if worst[m] > 0)
                 + "). Their DSC is 0 and their distances undefined (left out of HD and MSD)."
                 + (" With most glands empty, as here, the networks produced (almost) no contours, "
                    "whatever the cause (the smoke profile trains them for seconds, by design): the "
                    "rest of this list is about the evaluation, not about the methods."
                    if empty > glands / 2 else ""))
if mr_scored:
    cm_dsc, cm_sd, cm_n = numbers.loc["cross_modality", ["dsc_mean", "dsc_sd", "n"]]
    cm_hd = numbers.loc["cross_modality", "hd_mean"]
    hd_text = f"an HD of {cm_hd:.1f} mm" if np.isfinite(cm_hd) else "no defined HD"
    lines.append(f"- Cross-modality learning reached a DSC of {cm_dsc:.2f} ± {cm_sd:.2f} and {hd_text} "
                 f"(both glands, {cm_n:.0f} MR patients); the paper reported 0.77 ± 0.07 and "
                 f"18.32 ± 10.12 mm on 27 real patients.")
    for rec in record.recorded_runs():  # how much of that is one U-Net's draw, where recorded
        if rec.info.get("kind") == "unet-seeds" and rec.name == run.profile["name"]:
            spread = convergence.unet_spread_sentence(rec.root.name, rec.json(runs.RunFolder.unet_seeds_runs),
                                                      rec.table(runs.RunFolder.unet_seeds))
            if spread:
                lines.append(f"- {spread}")
                break
    phantom_mr = run.profile["data"]["mr"]["dataset"] == "phantom"
    if interobserver is not None:
        io_dsc = inter_patients["dsc"].mean()
        lines.append(f"- The interobserver DSC of this run's MR is {io_dsc:.2f}; cross-modality learning is "
                     f"{'below' if cm_dsc < io_dsc else 'at or above'} it ({cm_dsc - io_dsc:+.2f}; paper: "
                     "0.77 against 0.84, -0.07)."
                     + (" The phantom's second observer is a smooth perturbation of the first one's "
                        "contour, not a person: its variability sets the scale of the figure, not a "
                        "ceiling a network must stay under." if phantom_mr else ""))
    def dsc_test(other):  # the rank test of cross-modality against one method, on the DSC
        return tests[(tests["other"] == other) & (tests["metric"] == "dsc")].iloc[0]

    if "ct_only" in numbers.index:
        ct_dsc = numbers.loc["ct_only", "dsc_mean"]
        row = dsc_test("ct_only")
        lines.append(f"- CT only reached {ct_dsc:.2f} on its CT test patients, {ct_dsc - cm_dsc:+.2f} "
                     f"against cross-modality learning (paper: 0.82 against 0.77, +0.05). "
                     f"Mann-Whitney U: p = {row['p']:.3g} "
                     f"(n = {row['n_reference']} and {row['n_other']}). The CT reference is the clinical "
                     "CT contour, defects included (chapter 6), so this is not a like-for-like comparison, "
                     "as the paper says too.")
    if "ct_only_paired" in numbers.index:
        pc_dsc = numbers.loc["ct_only_paired", "dsc_mean"]
        row = dsc_test("ct_only_paired")
        lines.append(f"- On the MR patients' own CT (the paired control), the CT-only network reached "
                     f"{pc_dsc:.2f}: cross-modality learning on their MR is {cm_dsc - pc_dsc:+.2f} from it, "
                     f"what the change of modality costs on the same patients (Wilcoxon p = {row['p']:.3g}, "
                     f"{row['n_reference']} paired patients).")
    if "naive" in numbers.index:
        nv = numbers.loc["naive", "dsc_mean"]
        row = dsc_test("naive")
        lines.append(f"- The CT network applied to MR as it is (naive) reached {nv:.2f}: translating the CT "
                     f"into synthetic MR changed the DSC by {cm_dsc - nv:+.2f} (Wilcoxon p = {row['p']:.3g}, "
                     f"{row['n_reference']} paired patients).")
    significant = int((tests["p_holm"] < 0.05).sum())
    impossible = int((tests["smallest_exact_p"] >= 0.05).sum())
    lines.append(f"- {significant} of {len(tests)} comparisons have a Holm-adjusted p below 0.05"
                 + (f"; {impossible} of them could not reach 0.05 whatever the data (too few patients "
                    "for the exact test), so their lack of significance says nothing." if impossible else "."))
    changed = effect.set_index("model")
    if "cross_modality" in changed.index:
        c = changed.loc["cross_modality"]
        lines.append(f"- Keeping the largest component changed {c['changed']} of {c['glands']} cross-modality "
                     f"glands" + (f": mean DSC {c['dsc_raw']:.3f} → {c['dsc_lcc']:.3f}, mean HD "
                                  f"{c['hd_raw']:.1f} → {c['hd_lcc']:.1f} mm. HD is a maximum: one stray "
                                  "blob sets it, which the DSC barely sees." if c["changed"] else "."))
    if phantom_mr:
        lines.append(f"- All of this is measured on the **{run.profile['name']}** profile's phantom; the "
                     "numbers check that the evaluation works and how the methods compare on the phantom, "
                     "they say nothing about real patients.")
    else:
        lines.append(f"- Measured on the MR cohort `{run.profile['data']['mr']['dataset']}` "
                     f"({cm_n:.0f} patients with cross-modality predictions), not the paper's patients.")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Patients without manual contours: the predictions for review
# Every MR patient without manual contours, with its predicted cross-modality contours (red) in
# three planes: what goes to the planning system, seen before it goes. In a live notebook the
# review widget below lets a person accept each patient's contours or flag them for correction
# (with a note); the decisions are kept in `predictions/contour_review.json`. In the built book
# it lists the decisions made so far.

# %%
if mr_annotated < mr_predicted:
    gallery = evaluation.prediction_gallery(run, model="cross_modality", postprocess=main)
    for start in range(0, len(gallery), 6):
        part = gallery[start:start + 6]
        fig = plots.figure_contours(part, title=f"Predicted contours, MR patients without manual "
                                                f"contours ({start + 1}-{start + len(part)} of {len(gallery)})")
        plots.save(fig, run, runs.Figures.unannotated_contours(start // 6 + 1))
        plt.show()
    display(contour_review.review_contours(run, postprocess=main))
else:
    display(Markdown("*Every MR patient has manual contours: all are scored above.*"))

# %% [markdown]
# ## Summary
# The evaluation of section 2.G runs end to end on the run's predictions: per gland and method
# (Table II), per patient (Fig. 8), as pictures (Fig. 7), with and without the largest-component
# post-processing, and with rank tests the paper did not report. The paper's numbers are shown
# beside ours, labelled as the paper's.
#
# ## What's next
# Chapter 6 looks at the other side of the comparison: the clinical CT contours the networks were
# trained on, and how often they miss part of a gland.
#
# ## Resources and references
# The sources cited in this chapter are listed on the [references](../references.md) page.
#
# ## Provenance

# %%
display(Markdown(runs.provenance_markdown(run)))

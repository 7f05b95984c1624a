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
# # 9. Recorded runs
#
# Chapters 1-8 show the run that built this book. Some runs are too long to repeat at every build:
# the real-anatomy tier (`openkbp` profile: real OpenKBP CT {cite}`babier2021` and T2-weighted MR
# simulated from other OpenKBP patients, ~33 min on 2 idle CPU cores), or a paper-size run on a GPU.
# Their results are kept as **recorded runs**: `crossmod record --run-dir RUN_DIR` copies a
# finished run's metric tables, summaries, timings, profile and main figures into
# `recorded/<profile>/` in the repository, with `record.json` stating the commit, date and device
# each chapter ran on and a sha256 per file. This chapter shows them as recorded; the checksums
# are verified first, so a recorded file that was changed afterwards stops the build.
#
# Everything below was computed by the recorded run, **not by the run that built this book**.

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""
recorded_dir = ""  # default: recorded/ at the top of the repository

# %%
from IPython.display import Image, Markdown, display

from crossmod_lib import record, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
everything = record.recorded_runs(recorded_dir or None)
records = [r for r in everything if r.info.get("kind", "run") == "run"]
studies = [r for r in everything if r.info.get("kind", "run") != "run"]  # shown in chapter 10
display(Markdown((f"{len(records)} recorded run(s): " + ", ".join(f"`{r.root.name}`" for r in records)
                  if records else "*No recorded run in this repository.*")
                 + (" Recorded studies (chapter 10): " + ", ".join(f"`{r.root.name}`" for r in studies) + "."
                    if studies else "")))

# %% tags=["hide-input"]
FIGURES = (
    (runs.Figures.CYCLEGAN_EXAMPLES, ("Chapter 2: CT → synthetic MR → reconstructed CT, and MR → synthetic "
                               "CT → reconstructed MR, at the level of the parotids.")),
    (runs.Figures.CLEANING_EXAMPLES, "Chapter 3, Fig. 6: selected (green) and rejected (red) slices."),
    (runs.Figures.CLEANING_BY_POSITION, "Chapter 3: slices kept and dropped by cranio-caudal position."),
    (runs.Figures.BOXPLOTS, "Chapter 5, Fig. 8: DSC, HD and MSD per method (both glands averaged)."),
    (runs.Figures.CONTOURS, "Chapter 5, Fig. 7: typical cross-modality contours (automatic red, manual blue)."),
    (runs.Figures.COMPUTATION_TIME, "Chapter 7: computation time of each stage."),
)

for rec in records:
    recorded = rec.info["recorded"]
    description = rec.info.get("description", "").strip().rstrip(".")
    display(Markdown(f"## Recorded run `{rec.root.name}` (profile `{rec.name}`)\n\n"
                     + (f"{description}. " if description else "")
                     + f"Recorded on {recorded.get('date', '?')} at commit {recorded.get('commit', '?')}. "
                     + rec.settings_sentence() + " Where and when each chapter of that run ran (wall seconds):"))
    display(rec.provenance_table().round({"seconds": 0}))
    if rec.info.get("note"):
        display(Markdown(f"*Recorder's note:* {rec.info['note']}"))
    training = rec.json(runs.RunFolder.cyclegan_summary)
    if training is not None:
        display(Markdown(
            f"**CycleGAN** (chapter 2): {training['iteration']:,} iterations ({training['epochs_done']} "
            f"epochs, batch {training['batch_size']}, {training['ct_slices']:,} CT and "
            f"{training['mr_slices']:,} MR slices of {training['size'][0]} × {training['size'][1]} "
            f"pixels), {training['seconds_total'] / 60:.0f} min on {training['device']}."))
    contrast = rec.table(runs.RunFolder.parotid_contrast)
    if contrast is not None:
        display(Markdown("**Synthetic MR contrast** (chapter 2): parotid / rest-of-head intensity."))
        display(contrast.round(2).set_index(contrast.columns[0]))
    cleaned = rec.cleaning_counts()
    if cleaned is not None:
        display(Markdown(f"**Cleaning** (chapter 3): {cleaned}."))
    table = rec.table(runs.RunFolder.table_2_lcc)
    if table is not None:
        display(Markdown("**Table II** (chapter 5, largest 3D component per gland; mean ± SD over the "
                         "test patients):"))
        display(table.set_index(["ROI", "Method"]))
    for name, caption in FIGURES:
        path = rec.path(runs.Figures.relpath(name))
        if path is not None:
            display(Markdown(f"*{caption}* (recorded `{rec.name}` run)"))
            display(Image(filename=str(path)))

# %% [markdown]
# ## Provenance of this chapter
# The build that displayed the recorded runs (their own provenance is in the tables above):

# %%
display(Markdown(runs.provenance_markdown(run)))

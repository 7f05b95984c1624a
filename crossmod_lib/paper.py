"""Numbers quoted from the paper (Kieselmann et al. 2021), for display beside ours.

They are the paper's, typed from its tables, and are only ever shown labelled as the paper's;
no result of this project is computed from them.
"""

import pandas as pd

# Table I: imaging parameters of the paper's (non-public) database.
TABLE_I = pd.DataFrame(
    {
        "T2w MR (paper)": ["512×512", "30", "0.5×0.5×4", "[96.72, 107.30]", "[3198, 4000]", "90",
                           "2D T2w spin echo", "3 T", "27"],
        "CT (paper)": ["512×512", "[165, 235]", "0.98×0.98×2.5", "n.a.", "n.a.", "n.a.", "n.a.",
                       "120 keV", "202"],
    },
    index=["FOV [#pixels]", "#slices", "Voxel size [mm³]", "TE [ms]", "TR [ms]", "Flip angle [°]",
           "Sequence type", "Field strength / tube voltage", "#patients"],
)
TABLE_I.index.name = "Parameter"

# Table II, interobserver rows (MR, three observers, from Kieselmann et al. 2018): mean ± SD.
INTEROBSERVER = pd.DataFrame(
    {
        "DSC": ["0.83 ± 0.04", "0.84 ± 0.04"],
        "HD (mm)": ["10.94 ± 3.75", "10.76 ± 4.35"],
        "MSD (mm)": ["1.59 ± 0.63", "1.40 ± 0.45"],
    },
    index=pd.Index(["Parotid_L", "Parotid_R"], name="structure"),
)

# Table II of the paper (Kieselmann et al. 2021, "Table II. Evaluation of the geometric accuracy of
# auto-segmenting the left and right parotid gland ..."), typed from the paper's table: mean ± SD
# over the 27 MR patients (cross-modality learning), the CT test patients (CT only) and the
# interobserver study of Kieselmann et al. 2018 (three observers). Rows in the paper's order.
TABLE_II_VALUES = pd.DataFrame(
    [
        # ROI, method, DSC mean, SD, HD mean, SD (mm), MSD mean, SD (mm)
        ("Right parotid", "Cross-modality learning", 0.76, 0.06, 18.32, 10.12, 2.66, 1.26),
        ("Right parotid", "CT only", 0.81, 0.07, 13.01, 5.61, 1.87, 0.84),
        ("Right parotid", "Interobserver variability", 0.84, 0.04, 10.76, 4.35, 1.40, 0.45),
        ("Left parotid", "Cross-modality learning", 0.77, 0.04, 17.75, 7.49, 2.36, 0.75),
        ("Left parotid", "CT only", 0.82, 0.05, 12.98, 5.15, 1.74, 0.53),
        ("Left parotid", "Interobserver variability", 0.83, 0.04, 10.94, 3.75, 1.59, 0.63),
    ],
    columns=["ROI", "Method", "dsc_mean", "dsc_sd", "hd_mean", "hd_sd", "msd_mean", "msd_sd"],
).set_index(["ROI", "Method"])


def _mean_sd(frame: pd.DataFrame, key: str) -> list[str]:
    return [f"{m:.2f} ± {s:.2f}" for m, s in zip(frame[f"{key}_mean"], frame[f"{key}_sd"])]


# The same as text, in the layout of crossmod_lib.evaluation.table_ii (every value in the paper has
# two decimals, so the strings are the paper's).
TABLE_II = pd.DataFrame(
    {"DSC": _mean_sd(TABLE_II_VALUES, "dsc"), "HD (mm)": _mean_sd(TABLE_II_VALUES, "hd"),
     "MSD (mm)": _mean_sd(TABLE_II_VALUES, "msd")},
    index=TABLE_II_VALUES.index,
)

# Section 3.D quotes, in its text, values for both glands together that are not in Table II:
# cross-modality DSC 0.77 ± 0.07, HD 18.32 ± 10.12 mm, MSD 2.51 ± 1.47 mm; CT-trained 0.82 ± 0.09,
# 13.01 ± 5.61 mm, 1.81 ± 0.99 mm; interobserver 0.84 ± 0.04, 10.76 ± 4.35 mm, 1.40 ± 0.45 mm (the
# last are Table II's right-parotid interobserver values; the HD quoted for both methods also equals
# the right parotid's).
RESULTS_TEXT = pd.DataFrame(
    {"DSC": ["0.77 ± 0.07", "0.82 ± 0.09", "0.84 ± 0.04"],
     "HD (mm)": ["18.32 ± 10.12", "13.01 ± 5.61", "10.76 ± 4.35"],
     "MSD (mm)": ["2.51 ± 1.47", "1.81 ± 0.99", "1.40 ± 0.45"]},
    index=pd.Index(["Cross-modality learning", "CT only", "Interobserver variability"],
                   name="Method (section 3.D text)"),
)

# Section 3.B: inference time per patient, mean ± SD over the 27 MR patients, one Tesla V100.
INFERENCE_SECONDS = (0.86, 0.02)

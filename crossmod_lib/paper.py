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

"""crossmod: cross-modality learning of MR parotid contours from annotated CT only.

A reproducible implementation of Kieselmann et al., Med Phys 2021. One module per paper step:

- ``phantom``        the embedded digital head-and-neck phantom (offline default data)
- ``preprocessing``  paper section 2.A: resampling, head crop, intensity normalisation, slices
- ``metrics``        paper section 2.G: DSC, Hausdorff distance, HD95, mean surface distance
"""

__version__ = "0.1.0"

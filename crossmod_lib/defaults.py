"""The paper's settings, written once: in ``crossmod_lib/profiles/full.yaml``, each with its comment.

Every other profile extends ``full`` and overrides what differs; the modules that need their
defaults outside a profile (a network built with no settings, a JSON config missing a key) read
their section of ``full.yaml`` here instead of keeping a copy in code.

On a bare GPU machine without PyYAML, a network is trained from a JSON config that the CPU side
wrote complete (``cyclegan.settings_from_profile``, ``segmentation.segmentation_config``), so no
defaults are needed there: :func:`section_defaults` then returns None.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

FULL_PROFILE = Path(__file__).parent / "profiles" / "full.yaml"


@lru_cache(maxsize=1)
def _full_profile() -> dict:
    import yaml

    return yaml.safe_load(FULL_PROFILE.read_text())


def section_defaults(section: str) -> dict | None:
    """A copy of ``full.yaml``'s ``section`` block; None where PyYAML is not installed."""
    try:
        profile = _full_profile()
    except ImportError:
        return None
    return copy.deepcopy(profile[section])

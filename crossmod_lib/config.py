"""Profiles: every setting of a run, in one YAML file per profile.

``full.yaml`` holds every setting with the paper's values and a comment saying what it is. Other
profiles start with ``extends: full`` (or another profile) and override only what differs, so a
setting is written once. A profile is named (``smoke``, ``demo``, ``full``, shipped with the
package) or given as a path to a user's own YAML file.

Overrides are checked against the base: an unknown key (a typo) or a value of the wrong type is a
one-line :class:`~crossmod_lib.errors.CrossmodError` naming the file and the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import CrossmodError

PROFILE_DIR = Path(__file__).parent / "profiles"


def available_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name_or_path: str | Path) -> Path:
    """The YAML file of a named profile, or the given path if it is a file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise CrossmodError(f"{candidate}: profile file not found")
        return candidate
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise CrossmodError(
            f"profile '{name_or_path}' not found (available: {', '.join(available_profiles())}, "
            "or give a path to a .yaml file)"
        )
    return shipped


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise CrossmodError(f"{path}: not valid YAML ({first_line})") from None
    if not isinstance(data, dict):
        raise CrossmodError(f"{path}: a profile must be a mapping of settings")
    return data


def _same_kind(base: Any, value: Any) -> bool:
    if isinstance(base, bool) or isinstance(value, bool):
        return isinstance(base, bool) and isinstance(value, bool)
    if isinstance(base, (int, float)) and isinstance(value, (int, float)):
        return True
    if base is None or value is None:
        return True
    if isinstance(base, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(base))


def _merge(base: dict, override: dict, path: Path, prefix: str = "") -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise CrossmodError(f"{path}: unknown setting '{dotted}' (not in the base profile)")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise CrossmodError(f"{path}: setting '{dotted}' must be a mapping")
            merged[key] = _merge(base[key], value, path, prefix=f"{dotted}.")
        elif not _same_kind(base[key], value):
            raise CrossmodError(
                f"{path}: setting '{dotted}' must be {type(base[key]).__name__}, got {value!r}"
            )
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_profile(name_or_path: str | Path, _seen: tuple = ()) -> dict:
    """Load a profile by name or path, resolving ``extends`` chains; returns a plain dict."""
    path = profile_path(name_or_path)
    if path.resolve() in _seen:
        raise CrossmodError(f"{path}: 'extends' forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        profile = data
    else:
        parent_ref = parent
        if str(parent).endswith((".yaml", ".yml")) and not Path(parent).is_absolute():
            parent_ref = path.parent / parent
        try:
            profile_path(parent_ref)
        except CrossmodError as exc:  # name the profile that refers to the missing parent
            raise CrossmodError(f"{path}: extends {parent!r}, which cannot be found ({exc})") from None
        base = load_profile(parent_ref, _seen + (path.resolve(),))
        profile = _merge(base, data, path)
    profile.setdefault("name", path.stem)
    _validate(profile, path)
    return profile


def _validate(profile: dict, path: Path) -> None:
    """Checks of values that a type check cannot catch."""
    pre = profile.get("preprocessing", {})
    phantom = profile.get("phantom", {})
    checks = [
        (pre.get("pixel_mm", 1) > 0, "preprocessing.pixel_mm must be > 0"),
        (pre.get("crop", 1) >= 16, "preprocessing.crop must be at least 16 pixels"),
        (pre.get("ct_window", {}).get("width", 1) > 0, "preprocessing.ct_window.width must be > 0"),
        (0 < pre.get("mr_upper_percentile", 99) <= 100,
         "preprocessing.mr_upper_percentile must be in (0, 100]"),
        (0 <= pre.get("head_threshold", 0) < 255, "preprocessing.head_threshold must be in [0, 255)"),
        (pre.get("mr_background", "keep") in ("keep", "zero"), "preprocessing.mr_background must be keep or zero"),
        (pre.get("min_head_area_cm2", 0) >= 0, "preprocessing.min_head_area_cm2 must be >= 0"),
        (pre.get("cc_rule", "none") in ("parotid_centred", "parotid_extent", "none"),
         "preprocessing.cc_rule must be parotid_centred, parotid_extent or none"),
        (phantom.get("n_ct", 1) >= 1 and phantom.get("n_mr", 1) >= 1,
         "phantom.n_ct and phantom.n_mr must be at least 1"),
        (len(phantom.get("ct_slices", [1, 1])) == 2, "phantom.ct_slices must be [min, max]"),
    ]
    for ok, message in checks:
        if not ok:
            raise CrossmodError(f"{path}: {message}")
    for side in ("ct", "mr"):
        dataset = profile.get("data", {}).get(side, {}).get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise CrossmodError(f"{path}: data.{side}.dataset must be a dataset name")
    # The networks' settings are range-checked by the modules that own them, here at load time,
    # so `crossmod profile` refuses e.g. cyclegan.ngf: -3 at once rather than at training time.
    if "cyclegan" in profile and "preprocessing" in profile:
        from .cyclegan import check_settings

        block = dict(profile["cyclegan"] or {})
        block["head_threshold"] = float(pre.get("head_threshold", 20.0))
        check_settings(block, str(path))
    from .cleaning import cleaning_settings
    from .contour_quality import settings_from as contour_quality_settings
    from .convergence import study_settings
    from .segmentation import segmentation_config

    for block, check in (("segmentation", segmentation_config), ("cleaning", cleaning_settings),
                         ("contour_quality", contour_quality_settings), ("convergence", study_settings)):
        if block in profile and (block != "cleaning" or "preprocessing" in profile):
            try:
                check(profile)
            except CrossmodError as exc:
                raise CrossmodError(f"{path}: {exc}") from None


def save_profile(profile: dict, path: Path) -> None:
    """Write the resolved profile (the run folder keeps the settings it ran with)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(profile, sort_keys=False))
    tmp.replace(path)


def _cohort_block(path: Path, side: str) -> tuple[dict, list[str]]:
    """The ``data.<side>`` block for a user's folder, read to check it, and comment lines saying
    what was found. MR patients without contours are kept (they train the CycleGAN and get
    contours; chapter 5 scores only the annotated ones); a CT cohort must be contoured."""
    from .datasets import detect_layout, inspect_cohort, read_nnunet_dataset
    from .io import image_files

    path = path.expanduser().absolute()
    if not path.exists():
        raise CrossmodError(f"{path}: no such folder")
    if path.is_dir() and image_files(path) and not (path / "dataset.json").is_file():
        if side == "ct":
            raise CrossmodError(f"{path}: image files without contours; the CT cohort must be "
                                "annotated (DICOM series + RTSTRUCT per patient, or nnU-Net labels)")
        files = image_files(path)
        return {"dataset": "images", "root": str(path), "source": None, "patients": None}, [
            f"{path}: {len(files)} image files, one patient each, no contours"]
    layout = detect_layout(path)
    if layout == "nnunet":
        cases = read_nnunet_dataset(path, allow_empty=True, contours="optional" if side == "mr" else "required")
        labelled = sum(bool(c.structures) for c in cases)
        return {"dataset": "nnunet", "root": str(path), "source": None, "patients": None}, [
            f"{path}: an nnU-Net raw dataset, {len(cases)} cases, {labelled} with labels"]
    if layout != "cohort":
        raise CrossmodError(f"{path}: expected a folder of patient folders (a DICOM series, with or "
                            "without an RTSTRUCT, or img.nii.gz, per patient), a folder of image "
                            f"files or an nnU-Net dataset; found a {layout} layout")
    everyone = inspect_cohort(path)
    unreadable = everyone[everyone["problem"] != ""]
    table = everyone[everyone["problem"] == ""].reset_index(drop=True)
    if table.empty:
        first = unreadable.iloc[0]
        raise CrossmodError(f"{path}: none of the {len(everyone)} patient folders can be read "
                            f"(first: {first['problem']}); see crossmod data inspect {path}")
    layouts = sorted(set(table["layout"]))
    if layouts not in (["dicom"], ["pddca"]):
        raise CrossmodError(f"{path}: patient folders in layouts {layouts}; a cohort folder of your "
                            "own must hold DICOM patients (or img.nii.gz + structures/ folders)")
    dataset = "dicom" if layouts == ["dicom"] else "pddca"
    contoured = table[table["Parotid_L"].str.contains(r"cc\)") & table["Parotid_R"].str.contains(r"cc\)")]
    bare = table[(table["Parotid_L"] == "no contours") & (table["Parotid_R"] == "no contours")]
    partial = table[~table.index.isin(contoured.index) & ~table.index.isin(bare.index)]
    modalities = sorted(set(table["modality"]) - {""}) or ["modality not in the headers"]
    notes = [f"{path}: {len(everyone)} {'DICOM' if dataset == 'dicom' else 'image'} patients "
             f"({', '.join(modalities)}), {len(contoured)} with both parotids contoured, "
             f"{len(bare)} without contours"]
    block = {"dataset": dataset, "root": str(path), "source": None, "patients": None}
    if side == "ct" and len(contoured) < len(table):
        raise CrossmodError(f"{path}: {len(table) - len(contoured)} of {len(table)} CT patients "
                            "lack a parotid contour; the CT cohort must be annotated")
    if len(partial) or len(unreadable):
        # the pipeline would stop at these; the others make a cohort (each left out is named)
        block["patients"] = list(table.loc[~table.index.isin(partial.index), "patient"])
    if len(partial):
        notes.append("left out (contours without both parotids; add them or remove the RTSTRUCT): "
                     + ", ".join(partial["patient"]))
    for row in unreadable.itertuples(index=False):
        notes.append(f"left out (cannot be read): {row.patient}: {row.problem}")
    if not len(contoured):
        notes.append("no patient has manual parotid contours: every MR patient is contoured, none "
                     "can be scored (chapter 5 shows them for review)")
    return block, notes


def init_profile(mr: str | Path, ct: str | Path | None = None, extends: str = "openkbp",
                 name: str | None = None) -> str:
    """A ready profile (YAML text) for a user's data: ``extends`` with ``data.mr`` (and
    ``data.ct`` when ``ct`` is a folder rather than a dataset name) pointing at the folders,
    checked by reading every patient, with comments saying what was found. The text is loaded
    back through :func:`load_profile`'s checks before it is returned."""
    import datetime as _dt
    import tempfile

    load_profile(extends)  # an unknown base is an error before any reading
    data: dict = {}
    notes: list[str] = []
    data["mr"], found = _cohort_block(Path(mr), "mr")
    notes += found
    if ct is not None and str(ct) not in available_datasets():
        data["ct"], found = _cohort_block(Path(ct), "ct")
        notes += found
    elif ct is not None:
        data["ct"] = {"dataset": str(ct), "root": None, "patients": None}
    name = name or "mine"
    profile = {"extends": extends, "name": name,
               "description": f"{extends} with the user's data ({Path(mr).name})", "data": data}
    header = [f"# Written by crossmod profile init on {_dt.date.today().isoformat()}; checked by reading the folders:"]
    header += [f"#   {line}" for line in notes]
    header += ["# Every other setting comes from the profile named in 'extends' (see crossmod profile "
               f"{extends}); run it with: crossmod book --profile THIS_FILE.yaml"]
    text = "\n".join(header) + "\n" + yaml.safe_dump(profile, sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:  # the written profile must load as it is
        check = Path(tmp) / f"{name}.yaml"
        check.write_text(text)
        load_profile(check)
    return text


def available_datasets() -> list[str]:
    """Dataset names a profile can name without a folder (the manifest's readers and phantom)."""
    from .datasets import COHORT_LAYOUTS

    return ["phantom", *COHORT_LAYOUTS]

"""The run folder: the on-disk contract between the pipeline's stages.

Data flows one way through it (like nnU-Net's raw -> preprocessed -> results folders)::

    <run>/profile.yaml      the resolved settings the run was made with
    <run>/raw/              cohorts as they come (here: the phantom written to disk)
    <run>/prepared/         section 2.A: 2D slices, labels and head masks (.npz) + case tables
    <run>/synthetic/        section 2.C: synthetic MR per CT slice
    <run>/cleaned/          section 2.D: accepted, registered synthetic MR with CT labels
    <run>/model/            section 2.E: U-Net checkpoints
    <run>/predictions/      predicted MR label maps
    <run>/metrics/          section 2.G: metric tables
    <run>/figures/          figures as files
    <run>/notebooks/        the executed notebooks

Each stage reads the previous stage's folder and writes its own, so a notebook can be re-run alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import CrossmodError  # only the standard library besides: cyclegan imports this on a bare GPU machine

STAGE_FOLDERS = (
    "raw", "prepared", "synthetic", "cleaned", "model", "predictions", "metrics", "figures",
    "notebooks",
)


def project_root() -> Path:
    """The repository root (holds notebooks/, book/, _config.yml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "notebooks").is_dir():
        raise CrossmodError(
            f"{root}: no notebooks/ folder here; run crossmod from a clone of the repository "
            "(pip install -e .)"
        )
    return root


def default_run_dir(profile_name: str) -> Path:
    return Path(os.environ.get("CROSSMOD_RUNS", project_root() / "runs")) / profile_name


@dataclass(frozen=True)
class Artefact:
    """One file (or folder) of the run folder: where it lies, which stage writes it, what it holds.

    On :class:`RunFolder` an artefact is an attribute: ``run.ct_slices`` is its path in that run,
    ``RunFolder.ct_slices`` the artefact itself (``.at(root)`` places it in any folder of the same
    layout, e.g. a recorded run). Every artefact name of the pipeline is written here and nowhere else.
    """

    relpath: str
    writer: str
    what: str

    def at(self, root: str | Path) -> Path:
        return Path(root) / self.relpath

    @property
    def folder(self) -> str:
        """The stage folder holding it ('' for the run folder itself)."""
        return self.relpath.split("/")[0] if "/" in self.relpath else ""

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]

    @property
    def in_folder(self) -> str:
        """Its path inside its stage folder (for code handed that folder, not the run)."""
        return self.relpath.split("/", 1)[-1]

    def __get__(self, run, owner=None):
        return self if run is None else run.root / self.relpath


class TrainingFiles:
    """File names inside one network's training folder (CycleGAN, CUT or U-Net)."""

    CHECKPOINT = "checkpoint.pt"  # the resumable state of a CycleGAN / CUT run
    LAST = "last.pt"              # U-Net: the latest epoch (resume)
    BEST = "best.pt"              # U-Net: the epoch with the best validation Dice
    LOSSES = "losses.csv"         # CycleGAN / CUT: loss terms per logged iteration
    LOG = "log.csv"               # U-Net: losses and validation Dice per epoch
    SUMMARY = "summary.json"      # what the training did (iterations, seconds, device, ...)
    SETTINGS = "settings.json"    # the settings a CycleGAN checkpoint was trained with
    INPUTS = "inputs.json"        # digests of a U-Net's inputs: retrain when they change
    SYNTHETIC = "synthetic_mr.npz"  # an ablation arm's synthetic MR, beside its checkpoint


class RawFiles:
    """Records kept beside a generated raw cohort: what it was made with (regenerate on change)."""

    PHANTOM = "phantom.json"        # the embedded phantom's arguments and planted defects
    SIMULATION = "simulation.json"  # a simulated MR cohort's arguments and sources
    EXPORT = "export.json"          # a cohort written out as DICOM: what was exported


class PredictionFiles:
    """File names of one patient's predicted contours (``predictions/<method>/``, crossmod predict)."""

    @staticmethod
    def labels(patient: str, postprocess: str = "raw") -> str:
        """The label volume (1 left, 2 right parotid); ``postprocess`` 'raw' or e.g. 'lcc'."""
        return f"{patient}_labels{'' if postprocess == 'raw' else '_' + postprocess}.nii.gz"

    @staticmethod
    def rtstruct(patient: str) -> str:
        return f"{patient}_RTSTRUCT.dcm"

    @staticmethod
    def seg(patient: str) -> str:
        return f"{patient}_SEG.dcm"

    RTSTRUCT_IN_SERIES = "RS.dcm"  # the RTSTRUCT written beside a DICOM series (dicom.write_case_dicom)


SUMMARY_NAME = TrainingFiles.SUMMARY  # every stage's summary file has this name


class Figures:
    """The figure files of a run (``<run>/figures/``), by the chapter that draws them."""

    VIEWS = "fig1_views.png"
    OPENKBP_VIEWS = "fig1_openkbp.png"
    INTEROBSERVER_DEEPMIND = "interobserver_deepmind.png"
    PREPARED_HISTOGRAMS = "prepared_histograms.png"
    CYCLEGAN_LOSSES = "cyclegan_losses.png"
    CYCLEGAN_EXAMPLES = "cyclegan_examples.png"
    CYCLEGAN_ABLATION = "cyclegan_ablation.png"
    CLEANING_EXAMPLES = "fig6_cleaning_examples.png"
    CLEANING_BY_POSITION = "cleaning_by_position.png"
    CLEANING_DICE_HISTOGRAM = "cleaning_dice_histogram.png"
    CLEANING_REGISTRATION = "cleaning_registration.png"
    CLEANING_REVIEW_GALLERY = "cleaning_review_gallery.png"
    UNET_TRAINING = "fig_unet_training.png"
    UNET_EXAMPLES = "fig_unet_examples.png"
    CONTOURS = "fig7_contours.png"
    BOXPLOTS = "fig8_boxplots.png"
    CONTOUR_DEFECTS = "fig9_contour_defects.png"
    CONTOUR_QUALITY_PROFILES = "contour_quality_profiles.png"
    COMPUTATION_TIME = "computation_time.png"
    CONVERGENCE = "convergence.png"

    @staticmethod
    def prepared_slices(modality: str) -> str:
        return f"prepared_{modality.lower()}_slices.png"

    @staticmethod
    def relpath(name: str) -> str:
        """A figure's path inside a run (or recorded) folder."""
        return f"figures/{name}"

    @staticmethod
    def unannotated_contours(page: int) -> str:
        return f"unannotated_contours_{page}.png"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run; ``RunFolder.open(profile, run_dir)`` also loads and snapshots the profile.

    Each artefact below names its file once, with the stage that writes it; a stage reads only
    earlier stages' artefacts (:meth:`inputs` checks they exist) and writes only its own.
    """

    root: Path
    profile: dict

    # the run itself
    settings_file = Artefact("profile.yaml", "runs", "the resolved profile the run was made with")
    # section 2.A: preparation
    raw_phantom = Artefact("raw/phantom", "preparation", "the embedded phantom cohort, generated")
    phantom_record = Artefact(f"raw/phantom/{RawFiles.PHANTOM}", "preparation",
                              "how the embedded phantom cohort was generated")
    raw_simulated_mr = Artefact("raw/simulated_mr", "preparation",
                                "MR simulated from other patients' CT (simulated_mr cohorts)")
    raw_simulated_mr_dicom = Artefact("raw/simulated_mr_dicom", "preparation",
                                      "the simulated MR cohort written as DICOM (format: dicom)")
    ct_slices = Artefact("prepared/ct_slices.npz", "preparation", "prepared CT slices, labels, head masks")
    mr_slices = Artefact("prepared/mr_slices.npz", "preparation", "prepared MR slices, labels, head masks")
    ct_cases = Artefact("prepared/ct_cases.csv", "preparation", "one row per CT patient: slices, range, crop")
    mr_cases = Artefact("prepared/mr_cases.csv", "preparation", "one row per MR patient: slices, crop, annotated")
    table_1 = Artefact("metrics/table_1.csv", "preparation", "Table I: imaging parameters per cohort")
    interobserver_mr = Artefact("metrics/interobserver_mr.csv", "preparation",
                                "MR interobserver metrics per patient and gland")
    interobserver_deepmind = Artefact("metrics/interobserver_deepmind.csv", "preparation",
                                      "DeepMind CT interobserver metrics per scan and gland")
    # section 2.C: CycleGAN
    cyclegan_dir = Artefact("synthetic/cyclegan", "cyclegan", "the main translator's training folder")
    cyclegan_summary = Artefact(f"synthetic/cyclegan/{TrainingFiles.SUMMARY}", "cyclegan",
                                "the main translator's training: iterations, seconds, device")
    synthetic_mr = Artefact("synthetic/synthetic_mr.npz", "cyclegan", "synthetic MR for every CT slice")
    synthesis = Artefact("synthetic/synthesis.json", "cyclegan", "how long the synthesis took")
    ablation_geo_dir = Artefact("synthetic/ablation_geo", "cyclegan", "ablation arm with the geometric loss")
    ablation_nogeo_dir = Artefact("synthetic/ablation_nogeo", "cyclegan",
                                  "ablation arm without the geometric loss")
    parotid_contrast = Artefact("metrics/cyclegan_parotid_contrast.csv", "cyclegan",
                                "parotid / head intensity, synthetic and real MR")
    ablation = Artefact("metrics/cyclegan_ablation.csv", "cyclegan", "outline Dice with and without the geometric loss")
    # section 2.D: cleaning (review.json is the reviewer's input to it, written by the review widget)
    decisions = Artefact("cleaned/decisions.csv", "cleaning", "one row per synthetic slice: kept or dropped, why")
    training_slices = Artefact("cleaned/training_slices.npz", "cleaning",
                               "registered synthetic MR with the CT labels: the U-Net's training data")
    cleaning_examples = Artefact("cleaned/examples.npz", "cleaning", "before/after registration examples")
    cleaning_summary = Artefact("cleaned/summary.json", "cleaning", "counts, thresholds and timings")
    registration_cache = Artefact("cleaned/registration_cache.npz", "cleaning",
                                  "registrations already done, by input digest")
    elastix_rigid = Artefact("cleaned/elastix/rigid.txt", "cleaning", "the rigid elastix parameter map used")
    elastix_bspline = Artefact("cleaned/elastix/bspline.txt", "cleaning", "the B-spline elastix parameter map used")
    review = Artefact("cleaned/review.json", "review", "the reviewer's manual keep/drop decisions")
    # section 2.E: segmentation
    model_root = Artefact("model", "segmentation", "one training folder per U-Net recipe")
    predictions_root = Artefact("predictions", "segmentation", "predicted label maps per method")
    prediction_references = Artefact("predictions/reference", "segmentation",
                                     "the manual contours as label volumes, per modality")
    prediction_index = Artefact("predictions/index.csv", "segmentation",
                                "one row per patient and method: prediction and reference files")
    prediction_summary = Artefact("predictions/summary.json", "segmentation", "inference times")
    # section 2.G: evaluation, contour quality, timing
    segmentation_metrics = Artefact("metrics/segmentation.csv", "evaluation",
                                    "3D DSC / HD / HD95 / MSD per patient, gland and method")
    table_2_lcc = Artefact("metrics/table_2_lcc.csv", "evaluation",
                           "Table II, predictions cut to their largest component")
    table_2_raw = Artefact("metrics/table_2_raw.csv", "evaluation", "Table II, raw predictions")
    segmentation_tests = Artefact("metrics/segmentation_tests.csv", "evaluation", "paired rank tests")
    computation_steps = Artefact("metrics/computation_steps.csv", "timing",
                                 "every measured step's time (timing.collect)")
    computation_estimates = Artefact("metrics/computation_estimates.csv", "timing",
                                     "paper-scale times extrapolated from measured throughput")
    contour_review = Artefact("predictions/contour_review.json", "contour_review",
                              "accept / flag decisions on predicted contours")
    contour_quality_glands = Artefact("metrics/contour_quality_glands.csv", "contour_quality",
                                      "contour-quality findings per CT gland")
    contour_quality_slices = Artefact("metrics/contour_quality_slices.csv", "contour_quality",
                                      "contour-quality profile per CT slice")
    contour_quality_detection = Artefact("metrics/contour_quality_detection.csv", "contour_quality",
                                         "how many planted phantom defects were found")
    executed_notebooks = Artefact("notebooks", "pipeline", "the executed notebooks, one per chapter")
    timings = Artefact("notebooks/timings.json", "pipeline", "seconds per executed notebook")
    record_file = Artefact("record.json", "record", "a recorded run's provenance and file digests")
    convergence = Artefact("metrics/convergence.csv", "convergence", "a study's DSC per budget and seed")
    convergence_quality = Artefact("metrics/convergence_quality.csv", "convergence",
                                   "a study's synthesis quality per budget and seed")
    convergence_runs = Artefact("metrics/convergence_runs.json", "convergence",
                                "a study's settings and one entry per finished point")
    unet_seeds = Artefact("metrics/unet_seeds.csv", "convergence",
                          "a U-Net seed study's DSC per variant, U-Net seed, model and parotid")
    unet_seeds_runs = Artefact("metrics/unet_seeds_runs.json", "convergence",
                               "a U-Net seed study's point, variants and one entry per finished run")

    @classmethod
    def prepared(cls, modality: str) -> tuple[Artefact, Artefact]:
        """The slices and case-table artefacts of one modality ('CT' or 'MR')."""
        stem = modality.lower()
        return getattr(cls, f"{stem}_slices"), getattr(cls, f"{stem}_cases")

    @classmethod
    def artefacts(cls) -> dict[str, Artefact]:
        """Every named artefact, by attribute name."""
        return {name: value for name, value in vars(cls).items() if isinstance(value, Artefact)}

    @classmethod
    def open(cls, profile: str | Path | dict, run_dir: str | Path | None = None) -> RunFolder:
        from .config import load_profile, save_profile

        settings = profile if isinstance(profile, dict) else load_profile(profile)
        root = Path(run_dir) if run_dir else default_run_dir(settings["name"])
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        save_profile(settings, cls.settings_file.at(root))
        return cls(root=root, profile=settings)

    def stage(self, name: str) -> Path:
        """The folder of one stage, created on first use."""
        if name not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage folder {name!r}; one of {STAGE_FOLDERS}")
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output(self, name: str) -> Path:
        """The path of one of this stage's artefacts, its folder created."""
        path = getattr(self, name) if isinstance(name, str) else name.at(self.root)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, name: str) -> Path:
        """The path of a figure file (a :class:`Figures` name), the figures folder created."""
        return self.stage("figures") / name

    @classmethod
    def table_2(cls, postprocess: str) -> Artefact:
        """Table II under one post-processing ('lcc' or 'raw')."""
        return getattr(cls, f"table_2_{postprocess}")

    @classmethod
    def bench_result(cls, name: str) -> Artefact:
        """The saved result of ``crossmod bench <name> --save``."""
        return Artefact(f"metrics/bench_{name}.json", "bench", f"benchmark {name}: result and provenance")

    def executed_notebook(self, stem: str) -> Path:
        """The executed copy of notebook ``stem`` (e.g. '01_data_preparation')."""
        return self.executed_notebooks / f"{stem}.ipynb"

    def model_dir(self, recipe: str) -> Path:
        """The training folder of one U-Net recipe."""
        return self.model_root / recipe

    def inputs(self, *names: str) -> Path | tuple[Path, ...]:
        """Paths of earlier stages' artefacts, checking that they have been produced."""
        artefacts = self.artefacts()
        paths = []
        for name in names:
            artefact = artefacts[name]
            path = artefact.at(self.root)
            if not path.exists():
                raise CrossmodError(
                    f"{path}: stage output missing ({artefact.what}, written by the {artefact.writer} "
                    f"stage); run the earlier stage first "
                    f"(crossmod run --profile {self.profile['name']} --run-dir {self.root})"
                )
            paths.append(path)
        return paths[0] if len(paths) == 1 else tuple(paths)


def git_commit(root: Path | None = None) -> str:
    """The commit of the code, with '+dirty' when the working tree has changes."""
    where = root or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance(run: RunFolder | None = None) -> dict:
    """What produced a result: commit, date, machine, library versions, profile."""
    import importlib.metadata as md

    versions = {}
    for package in ("numpy", "scipy", "SimpleITK", "itk-elastix", "torch", "pandas", "matplotlib"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    from .timing import cpu_vector_features

    vector = cpu_vector_features()
    device = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
              + (f" ({vector})" if vector else ""))
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info = {
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "versions": versions,
    }
    if run is not None:
        info["profile"] = run.profile["name"]
        info["run_dir"] = str(run.root)
    return info


def write_json(data, path: Path) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def provenance_markdown(run: RunFolder | None = None) -> str:
    """The provenance as a Markdown table, for the end of each chapter."""
    info = provenance(run)
    versions = ", ".join(f"{k} {v}" for k, v in info.pop("versions").items())
    rows = [("commit", info["commit"]), ("date (UTC)", info["date"]),
            ("profile", info.get("profile", "")), ("device", info["device"]),
            ("platform", info["platform"]), ("Python", info["python"]), ("libraries", versions)]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)

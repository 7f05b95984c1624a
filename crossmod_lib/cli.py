"""The ``crossmod`` command-line tool.

    crossmod run --profile NAME [--stage N ...] [--run-dir DIR]   execute the numbered notebooks
    crossmod book --profile NAME [--run-dir DIR] [--no-run]       run them and build the HTML book
    crossmod phantom --profile NAME --out DIR [--n-ct N] ...      write phantom cohorts to disk
    crossmod metrics --reference A --prediction B [--json]       compare two label files
    crossmod data list                                            the datasets of data_manifest.yaml
    crossmod data inspect PATH                                    read a file/folder, summarise it
    crossmod fetch NAME [--dest DIR]                              download and verify a dataset
    crossmod profile NAME                                         print a resolved profile
    crossmod models --profile NAME [--json]                       networks: parameters, FLOPs/slice
    crossmod predict --model M --input X --output OUT [--output-type nifti rtstruct seg]  contour MR
    crossmod bench NAME                                           run a benchmark
    crossmod study convergence --profile NAME --out DIR            CycleGAN budget x seed study
    crossmod study unet-seeds --point DIR --out DIR [--set K=V]   a point's U-Nets over U-Net seeds
    crossmod study ideal-translation --point DIR --out DIR        what the translator costs (simulated MR)

Errors a user can fix are printed as one line (``crossmod: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .bench import BENCHMARKS
from .errors import CrossmodError


def _add_profile(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--profile", default=default, required=default is None,
        help="profile name (smoke, demo, full, ...) or path to a profile .yaml"
        + (f" (default: {default})" if default else ""),
    )


def _add_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run folder (default: runs/<profile name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossmod",
        description="Cross-modality learning of MR parotid contours from annotated CT only "
                    "(Kieselmann et al., Med Phys 2021), as an executable book.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="execute the numbered notebooks with papermill",
                       description="Execute the numbered notebooks (all, or --stage N) headlessly "
                                   "with papermill into the run folder.")
    _add_profile(p)
    _add_run_dir(p)
    p.add_argument("--stage", type=int, action="append", metavar="N",
                   help="run only notebook N (repeatable); default: all, in order")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pipeline", help="run pipeline stages through the library, no notebooks",
                       description="Run the pipeline's stages (all, or --stage NAME) through the "
                                   "library alone, without papermill: preparation, cyclegan, "
                                   "cleaning, segmentation, evaluation, contour_quality, timing. "
                                   "Each reads the earlier stages' files in the run folder.")
    _add_profile(p)
    _add_run_dir(p)
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="run only this stage (repeatable; run in pipeline order); default: all")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("book", help="run the notebooks and build the HTML book",
                       description="Execute every notebook for a profile, then build the book "
                                   "with Jupyter Book into _build/html/.")
    _add_profile(p, default="demo")
    _add_run_dir(p)
    p.add_argument("--no-run", action="store_true",
                   help="build from the run folder's already executed notebooks")
    p.add_argument("--no-pdf", action="store_true",
                   help="HTML only (by default a PDF is also built when LaTeX is installed)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder receiving _build/html/ (default: the repository root)")
    p.set_defaults(func=cmd_book)

    p = sub.add_parser("phantom", help="write the digital phantom's CT and MR cohorts to disk",
                       description="Write the embedded head-and-neck phantom (CT and MR cohorts "
                                   "of different patients) to a folder, with a profile's settings "
                                   "and optional overrides.")
    _add_profile(p, default="smoke")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--n-ct", type=int, help="number of CT patients")
    p.add_argument("--n-mr", type=int, help="number of MR patients")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--workers", type=int, help="processes")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("metrics", help="compare two label files (DSC, HD, HD95, MSD)",
                       description="Compare a prediction with a reference label file (NRRD, "
                                   "NIfTI, MHA) per structure: DSC, Hausdorff distance, 95th "
                                   "percentile HD and mean surface distance in mm.")
    p.add_argument("--reference", type=Path, required=True, help="reference label file")
    p.add_argument("--prediction", type=Path, required=True, help="predicted label file")
    p.add_argument("--labels", default=None,
                   help="label names as VALUE:NAME,... (e.g. 1:Parotid_L,2:Parotid_R); "
                        "default: every label value present")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("data", help="the datasets of data_manifest.yaml",
                       description="Datasets the book can use (data_manifest.yaml) and whether "
                                   "each is present under the data root.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("list", help="list the datasets with licence, citation and source",
                            description="List the datasets of data_manifest.yaml.")
    q.add_argument("--data-root", type=Path, default=None,
                   help="folder holding datasets (default: $CROSSMOD_DATA, else ../shared/data)")
    q.set_defaults(func=cmd_data_list)
    q = data_sub.add_parser("inspect", help="read a file or folder and summarise it",
                            description="Read an image file, a DICOM folder (series + RTSTRUCT), an "
                                        "OpenKBP, PDDCA, DeepMind or nnU-Net folder and print size, "
                                        "spacing and parotid volumes; bad input is a one-line error.")
    q.add_argument("path", type=Path, help="file or folder")
    q.add_argument("--layout", choices=["image", "dicom", "openkbp", "pddca", "nnunet", "deepmind", "cohort"],
                   default=None, help="layout (default: detected)")
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("fetch", help="download a dataset (pooch, sha256-verified, safe extraction)",
                       description="Download a dataset's fixed files with pooch, verify their "
                                   "sha256 and extract archives safely into DEST/NAME.")
    p.add_argument("name", help="dataset name from data_manifest.yaml (see: crossmod data list)")
    p.add_argument("--dest", type=Path, default=None,
                   help="destination folder (default: the data root)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("profile", help="print a profile with every setting resolved; init one for your data",
                       description="Print a profile (its 'extends' chain resolved) as YAML. "
                                   "'crossmod profile init --mr FOLDER [--ct openkbp|FOLDER] > mine.yaml' "
                                   "writes a ready profile for your own data, checked by reading the folders.")
    p.add_argument("name", nargs="?", default=None,
                   help="profile name or path; 'init' to write a new one; omitted: list the shipped profiles")
    p.add_argument("--mr", type=Path, default=None,
                   help="init: your MR cohort, a folder of DICOM patient folders or an nnU-Net dataset")
    p.add_argument("--ct", default=None,
                   help="init: the CT cohort, a dataset name (openkbp, ...) or a folder like --mr "
                        "(default: the base profile's)")
    p.add_argument("--extends", default="openkbp", help="init: the profile to start from (default openkbp)")
    p.add_argument("--as", dest="new_name", default=None, help="init: the new profile's name (default mine)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("models", help="the networks of a profile: parameters and FLOPs per slice",
                       description="Parameter counts and forward GFLOPs per slice (at the "
                                   "profile's crop size) of the CycleGAN's generators and "
                                   "discriminators (Fig. 4) and of the U-Net (Fig. 5).")
    _add_profile(p, default="full")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="contour the parotids of MR images with a trained U-Net",
                       description="Preprocess each MR exactly as the training data, predict slice "
                                   "by slice, and write <patient>_labels.nii.gz (0 background, "
                                   "1 Parotid_L, 2 Parotid_R) on the MR's own grid; with "
                                   "--rtstruct (DICOM input) also <patient>_RTSTRUCT.dcm on the "
                                   "series.")
    p.add_argument("--model", required=True, type=Path,
                   help="trained checkpoint (a run's model/<name>/best.pt)")
    p.add_argument("--input", required=True, type=Path,
                   help="an image file (NIfTI/NRRD/MHA), a DICOM series folder, a dataset layout, "
                        "or a folder of patient folders")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--output-type", dest="output_types", nargs="+", default=["nifti"],
                   choices=["nifti", "rtstruct", "seg"],
                   help="what to write per patient, several at once: nifti (the label volume), "
                        "rtstruct (DICOM RTSTRUCT on the input series), seg (DICOM SEG); the last "
                        "two need DICOM input (default: nifti)")
    p.add_argument("--rtstruct", action="store_true",
                   help="also write a DICOM RTSTRUCT (as --output-type nifti rtstruct)")
    p.add_argument("--profile", default=None,
                   help="profile for the inference options (post-processing, batch); the "
                        "preprocessing always comes from the checkpoint")
    post = p.add_mutually_exclusive_group()
    post.add_argument("--lcc", dest="postprocess", action="store_const", const=True, default=None,
                      help="keep only the largest 3D component per side")
    post.add_argument("--no-lcc", dest="postprocess", action="store_const", const=False,
                      help="no post-processing")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: cpu)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="run a benchmark and print its table",
                       description="Benchmarks of speed targets (never timed in the tests).")
    p.add_argument("name", choices=sorted(BENCHMARKS),
                   help="metrics: DSC/HD/HD95/MSD of a parotid-sized pair on a 512x512x150 grid; "
                        "registration: elastix per 256x256 slice; cyclegan: training throughput, "
                        "reference vs fast mode, beside the peer; unet: U-Net training slices/s, "
                        "fp32 vs bf16 on the CPU; inference: seconds per MR patient")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions (default: the benchmark's own)")
    p.add_argument("--profile", default=None,
                   help="profile whose settings to use (registration: full, cyclegan, unet "
                        "and inference: demo)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save", type=Path, default=None, metavar="RUN_DIR",
                   help="also keep the result, with this machine's provenance, in "
                        "RUN_DIR/metrics/bench_NAME.json (chapter 7 shows it)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("study", help="run a study beside the book (recorded, never part of CI)",
                       description="convergence: the pipeline from the prepared slices for every "
                                   "seed and CycleGAN budget of the profile's convergence block; "
                                   "unet-seeds: the U-Nets of one finished point (--point) again "
                                   "under other U-Net seeds, with and without --set changes; "
                                   "ideal-translation: a point's cross-modality U-Net trained on the "
                                   "simulator's own MR of its CT patients instead of the synthetic MR "
                                   "(what the translator costs; MR cohorts simulated from CT only). "
                                   "Tables in OUT/metrics/ (resumable: finished runs are kept).")
    p.add_argument("name", choices=["convergence", "unet-seeds", "ideal-translation"])
    p.add_argument("--profile", default=None,
                   help="convergence: profile name (smoke, demo, full, ...) or path to a profile .yaml")
    p.add_argument("--point", type=Path, default=None,
                   help="unet-seeds, ideal-translation: a finished study point or run folder (its "
                        "synthetic/ and cleaned/)")
    p.add_argument("--set", dest="changes", nargs="+", default=[], metavar="KEY=VALUE",
                   help="unet-seeds: segmentation settings of the variant run beside the point's "
                        "own (e.g. cross_modality_appearance=true)")
    p.add_argument("--models", nargs="+", default=["cross_modality"],
                   help="unet-seeds: the models trained again (default: cross_modality)")
    p.add_argument("--out", type=Path, required=True, help="study folder (created; resumed if it exists)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="override convergence.seeds (default: the profile's); unet-seeds, ideal-translation: the "
                        "U-Net seeds (default: the profile's convergence.seeds)")
    p.add_argument("--slice-mm", type=float, default=None,
                   help="ideal-translation: draw the ideal MR at this slice thickness (default: the MR "
                        "cohort's; e.g. the CT's 2.5, as the CycleGAN sees its input)")
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help="override convergence.budgets, in CycleGAN iterations")
    p.add_argument("--carry-on", type=Path, default=None, metavar="RECORDED",
                   help="a recorded study of the same profile (e.g. recorded/openkbp-convergence): "
                        "its finished points are kept and only the missing ones run")
    p.add_argument("--translator-from", type=Path, default=None, metavar="STUDY_DIR",
                   help="convergence: a local study folder of the same translator settings "
                        "(only cleaning and U-Net settings differ): its points' CycleGANs and "
                        "synthetic MR are copied, cleaned again and only the U-Nets train")
    p.add_argument("--no-new-points", action="store_true",
                   help="run no point: only bring the finished points' synthesis-quality measures "
                        "up to date (from their stored slices) and rewrite the tables")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("record", help="keep a finished run's results, with provenance, for the book",
                       description="Copy a finished run's metric tables, summaries, timings, profile "
                                   "and main figures, with each chapter's commit, date and device "
                                   "and a sha256 per file, into a small folder the book's "
                                   "'Recorded runs' chapter shows (default: recorded/<profile>/).")
    p.add_argument("--run-dir", type=Path, required=True, help="the finished run folder")
    p.add_argument("--out", type=Path, default=None,
                   help="destination folder (default: recorded/<profile name> in the repository)")
    p.add_argument("--note", default="",
                   help="what the run was, in your words (shown with it in chapter 9)")
    p.set_defaults(func=cmd_record)
    return parser


def cmd_run(args) -> int:
    from .pipeline import run_notebooks
    from .runs import RunFolder

    run = RunFolder.open(args.profile, args.run_dir)
    run_notebooks(run, args.stage)
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_stages, stage_order
    from .runs import RunFolder

    names = stage_order(args.stage)  # an unknown name stops before the run folder is made
    run = RunFolder.open(args.profile, args.run_dir)
    run_stages(run, names)
    return 0


def cmd_book(args) -> int:
    from .pipeline import build_book, run_notebooks
    from .runs import RunFolder

    run = RunFolder.open(args.profile, args.run_dir)
    if not args.no_run:
        run_notebooks(run)
    build_book(run, args.out, pdf=not args.no_pdf)
    return 0


def cmd_phantom(args) -> int:
    from . import phantom
    from .config import load_profile
    from .preparation import phantom_arguments

    arguments = phantom_arguments(load_profile(args.profile))
    overrides = {"n_ct": args.n_ct, "n_mr": args.n_mr, "seed": args.seed, "workers": args.workers}
    arguments.update({k: v for k, v in overrides.items() if v is not None})
    summary = phantom.write_phantom(args.out, **arguments)
    print(f"phantom written to {args.out}: {arguments['n_ct']} CT, {arguments['n_mr']} MR patients")
    if isinstance(summary, dict) and summary.get("defects") is not None:
        print(f"injected CT contour defects: {len(summary['defects'])}")
    return 0


def _parse_labels(text: str | None) -> dict[int, str] | None:
    if not text:
        return None
    labels = {}
    for item in text.split(","):
        value, sep, name = item.partition(":")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise CrossmodError(f"--labels: expected VALUE:NAME pairs like 1:Parotid_L, got {item!r}")
        labels[int(value)] = name.strip()
    return labels


def cmd_metrics(args) -> int:
    from .metrics import METRIC_CONVENTIONS, compare_files

    table = compare_files(args.reference, args.prediction, _parse_labels(args.labels))
    if args.json:
        records = []
        for row in table.to_dict(orient="records"):
            clean = {}
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    clean[key] = None  # JSON has no infinity: an empty mask's distance
                    clean.setdefault("note", "a mask is empty: distances undefined (inf)")
                else:
                    clean[key] = value.item() if hasattr(value, "item") else value
            records.append(clean)
        print(json.dumps({"reference": str(args.reference), "prediction": str(args.prediction),
                          "units": dict.fromkeys(("hd", "hd95", "msd", "hd95_max", "assd"), "mm"),
                          "conventions": METRIC_CONVENTIONS,
                          "structures": records}, indent=2))
    else:
        shown = table[["structure", "label", "dsc", "hd", "hd95", "msd"]].rename(
            columns={"dsc": "DSC", "hd": "HD [mm]", "hd95": "HD95 [mm]", "msd": "MSD [mm]"})
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"HD95: {METRIC_CONVENTIONS['hd95']}; MSD: {METRIC_CONVENTIONS['msd']} "
              "(--json adds hd95_max and assd, the other conventions)")
    return 0


def cmd_data_list(args) -> int:
    from .datasets import format_dataset_list

    print(format_dataset_list(root=args.data_root))
    return 0


def cmd_data_inspect(args) -> int:
    import pandas as pd

    from .datasets import describe_case, detect_layout, read_any

    layout = args.layout or detect_layout(args.path)
    if layout == "cohort":
        from .datasets import inspect_cohort

        table = inspect_cohort(args.path)
        problems = int((table["problem"] != "").sum())
        print(f"{args.path}: a folder of {len(table)} patient folders"
              + (f", {problems} could not be read" if problems else ""))
        if not problems:
            table = table.drop(columns="problem")
        print(table.to_string(index=False))
        return 0
    cases = read_any(args.path, layout)
    print(f"{args.path}: {layout}, {len(cases)} case(s)")
    print(pd.DataFrame([describe_case(c) for c in cases]).to_string(index=False))
    return 0


def cmd_fetch(args) -> int:
    from .datasets import data_root, fetch

    dest = args.dest if args.dest is not None else data_root()
    path = fetch(args.name, dest)
    print(f"{args.name}: {path}")
    return 0


def cmd_profile(args) -> int:
    import yaml

    from .config import available_profiles, load_profile

    if args.name == "init":
        from .config import init_profile

        if args.mr is None:
            raise CrossmodError("profile init: --mr FOLDER is required (your MR patients)")
        print(init_profile(args.mr, args.ct, extends=args.extends, name=args.new_name), end="")
        return 0
    if args.mr is not None or args.ct is not None:
        raise CrossmodError("profile: --mr / --ct are options of 'crossmod profile init'")
    if args.name is None:
        for name in available_profiles():
            print(f"{name:8s} {load_profile(name).get('description', '')}")
        return 0
    print(yaml.safe_dump(load_profile(args.name), sort_keys=False), end="")
    return 0


def cmd_models(args) -> int:
    from . import cyclegan, segmentation
    from .config import load_profile

    profile = load_profile(args.profile)
    size = int(profile["preprocessing"]["crop"])
    rows = [{"network": row["name"], "parameters": int(row["parameters"]),
             "gflops_per_slice": round(float(row["gflops_per_slice"]), 3)}
            for row in cyclegan.architecture_table(profile)]
    unet = segmentation.architecture_table(profile).iloc[-1]
    rows.append({"network": "U-Net (Fig. 5)", "parameters": int(unet["parameters"]),
                 "gflops_per_slice": round(float(unet["GFLOPs"]), 3)})
    if args.json:
        print(json.dumps({"profile": profile["name"], "slice": f"{size}x{size}", "networks": rows},
                         indent=2))
        return 0
    width = max(len(r["network"]) for r in rows)
    print(f"profile {profile['name']}, {size} x {size} slices (GFLOPs: forward, 2 per multiply-add)")
    print(f"{'network':<{width}}  {'parameters':>12}  {'GFLOPs/slice':>12}")
    for r in rows:
        print(f"{r['network']:<{width}}  {r['parameters']:>12,}  {r['gflops_per_slice']:>12.3f}")
    return 0


def cmd_predict(args) -> int:
    from .segmentation import predict_path

    settings = None
    if args.profile:
        from .config import load_profile

        settings = load_profile(args.profile)
    if not args.model.is_file():
        raise CrossmodError(f"{args.model}: model checkpoint not found")
    rows = predict_path(args.model, args.input, args.output, settings, rtstruct=args.rtstruct,
                        postprocess=args.postprocess, device=args.device,
                        outputs=tuple(args.output_types))
    problems = [row for row in rows if row.get("problem")]
    for row in rows:
        if row.get("problem"):
            continue
        written = "  ".join(row[k] for k in ("labels", "rtstruct", "seg") if row.get(k))
        print(f"{row['patient']}: {written}  ({row['seconds']:.2f} s)")
    for row in problems:  # the others were contoured; each problem on one line, exit 2
        print(f"crossmod: error: {row['problem']}", file=sys.stderr)
    if problems:
        print(f"crossmod: {len(problems)} of {len(rows)} patients not contoured", file=sys.stderr)
    return 2 if problems else 0


def cmd_bench(args) -> int:
    from . import bench

    options = {k: v for k, v in (("repeats", args.repeats), ("profile", args.profile)) if v is not None}
    result = bench.BENCHMARKS[args.name](**options)
    result = result if "name" in result else {"name": args.name, **result}
    print(json.dumps(result, indent=2) if args.json else bench.format_table(result))
    if args.save is not None:
        path = bench.save_benchmark(result, args.save, options)
        print(f"saved to {path}")
    return 0


def cmd_study(args) -> int:
    from . import convergence
    from .config import load_profile

    if args.name == "unet-seeds":
        return _study_unet_seeds(args)
    if args.name == "ideal-translation":
        if args.point is None:
            raise CrossmodError("study ideal-translation: give --point, a finished study point or run folder")
        table = convergence.run_ideal_translation_study(args.point, args.out, args.seeds,
                                                        slice_mm=args.slice_mm, log=print)
        if not table.empty:
            print(convergence.unet_seed_summary(table).drop(columns=["title"]).round(3).to_string(index=False))
        return 0
    if args.profile is None:
        raise CrossmodError("study convergence: give --profile")
    profile = load_profile(args.profile)
    block = profile.setdefault("convergence", {})
    if args.seeds:
        block["seeds"] = list(args.seeds)
    if args.budgets:
        block["budgets"] = list(args.budgets)
    convergence.study_settings(profile)  # a bad block stops before any work
    tables = convergence.run_study(profile, args.out, log=print, carry_on=args.carry_on,
                                   new_points=not args.no_new_points,
                                   translator_from=args.translator_from)
    summary = convergence.summary_table(tables["points"])
    print(summary.round(3).to_string(index=False) if not summary.empty else "no points finished")
    return 0


def _study_unet_seeds(args) -> int:
    import yaml

    from . import convergence

    if args.point is None:
        raise CrossmodError("study unet-seeds: give --point, a finished study point or run folder")
    changes = {}
    for pair in args.changes:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CrossmodError(f"--set {pair!r}: expected KEY=VALUE (a segmentation setting)")
        changes[key] = yaml.safe_load(value)
    variants = {"paper": {}}
    if changes:
        variants["+" + ",".join(f"{k}={v}" for k, v in changes.items())] = changes
    table = convergence.run_unet_seed_study(args.point, args.out, args.seeds, variants,
                                            models=tuple(args.models), log=print)
    if not table.empty:
        summary = (table.groupby(["variant", "model", "structure"])["dsc_mean"]
                   .agg(["mean", "std", "min", "count"]).reset_index())
        print(summary.round(3).to_string(index=False))
    return 0


def cmd_record(args) -> int:
    import yaml

    from . import record

    out = args.out
    if out is None:
        from .runs import RunFolder

        profile_file = RunFolder.settings_file.at(args.run_dir)
        if not profile_file.is_file():
            raise CrossmodError(f"{args.run_dir}: no {profile_file.name} (not a run folder)")
        name = (yaml.safe_load(profile_file.read_text()) or {}).get("name") or args.run_dir.name
        out = record.default_folder() / name
    info = record.record_run(args.run_dir, out, note=args.note)
    size = sum(f["bytes"] for f in info["files"].values())
    print(f"recorded {len(info['files'])} files ({size / 1024:.0f} KiB) of {args.run_dir} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CrossmodError as exc:
        print(f"crossmod: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossmod: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paper section 2.G: contouring a whole image volume with a trained U-Net.

Inference (section 2.G)
    A whole MR volume is preprocessed exactly as the training slices
    (:func:`crossmod_lib.preparation.prepare_case`, modality MR), predicted slice by slice in
    batches, stacked in 3D, put back into the resampled grid (undoing the crop) and resampled
    onto the native MR grid with a label interpolator (``interpolation``: ``label_linear``, the
    default, or ``nearest``). Optionally (``postprocess_lcc``) only the largest 3D connected
    component of each side is kept; :func:`predict_label_maps` gives both versions.


SimpleITK and scipy are imported inside the functions.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CrossmodError
from .runs import PredictionFiles
from .unet import (CHECKPOINT_FORMAT, STRUCTURES, UNet, _autocast, _plain, _to_input, build_model, count_parameters, flops_per_slice,
                   load_model, resolve_device, save_checkpoint, segmentation_config)



@torch.no_grad()
def predict_slices(model: UNet, images: np.ndarray, batch_size: int = 32, device=None,
                   probabilities: bool = False, amp: bool = True) -> np.ndarray:
    """Labels (uint8 [N,H,W], argmax) or class probabilities (float32 [N,3,H,W]) of uint8 slices."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    model.eval()
    images = np.asarray(images)
    single = images.ndim == 2
    images = images[None] if single else images
    channels_last = device.type == "cuda"
    amp = amp and device.type == "cuda"  # the CPU predicts in fp32 (cpu_bf16 is for training)
    outputs = []
    for start in range(0, len(images), batch_size):
        x = _to_input(images[start:start + batch_size], device, channels_last)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        if probabilities:
            outputs.append(torch.softmax(logits, 1).cpu().numpy())
        else:
            outputs.append(logits.argmax(1).to(torch.uint8).cpu().numpy())
    out = np.concatenate(outputs) if outputs else np.zeros((0,) + images.shape[1:], np.uint8)
    return out[0] if single else out


def largest_components(labels: np.ndarray, classes=(1, 2)) -> np.ndarray:
    """Keep, per class, only the largest connected component (3D, 26-connectivity)."""
    from scipy import ndimage

    out = np.array(labels, copy=True)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for value in classes:
        mask = labels == value
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def _model_and_preprocessing(model, settings, device):
    if isinstance(model, (str, Path)):
        model = load_model(model, resolve_device(device) if device is not None else "cpu")
    if not isinstance(model, nn.Module):
        raise CrossmodError(f"model: expected a U-Net or a checkpoint path, got {type(model).__name__}")
    given = settings.get("preprocessing") if isinstance(settings, dict) else None
    recorded = getattr(model, "meta", {}).get("preprocessing")
    if recorded is None and given is None:
        raise CrossmodError("preprocessing: the model records no preprocessing settings; give a "
                            "profile with a preprocessing block")
    if recorded is not None and given is not None:
        keys = ("pixel_mm", "crop", "mr_upper_percentile", "ct_window", "head_threshold", "mr_background")
        # a model from before a setting existed was trained with its default
        defaults = {"mr_background": "keep"}
        differ = [k for k in keys if recorded.get(k, defaults.get(k)) != given.get(k, defaults.get(k))]
        if differ:
            warnings.warn(f"the model was trained with other preprocessing ({', '.join(differ)}); "
                          "using the model's", stacklevel=3)
    return model, dict(recorded if recorded is not None else given)


def _uncrop(pred: np.ndarray, info: dict, slice_index: np.ndarray) -> np.ndarray:
    """Put crop-grid predictions back into the resampled volume [z, y, x] (undo crop_slices)."""
    nx, ny, nz = (int(v) for v in info["resampled_size"].split("x"))
    full = np.zeros((nz, ny, nx), dtype=np.uint8)
    y0, x0 = int(info["crop_row"]), int(info["crop_col"])
    crop = pred.shape[-1]
    ys, ye = max(y0, 0), min(y0 + crop, ny)
    xs, xe = max(x0, 0), min(x0 + crop, nx)
    if ys < ye and xs < xe:
        full[slice_index, ys:ye, xs:xe] = pred[:, ys - y0:ye - y0, xs - x0:xe - x0]
    return full


def _to_native(volume: np.ndarray, info: dict, reference, interpolation: str):
    """The resampled-grid label volume on the native grid of ``reference`` (SimpleITK image)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume)
    image.SetOrigin([float(v) for v in info["resampled_origin"].split(";")])
    image.SetSpacing([float(info["pixel_mm"]), float(info["pixel_mm"]), float(info["slice_mm"])])
    image.SetDirection(reference.GetDirection())
    interpolator = sitk.sitkLabelLinear if interpolation == "label_linear" else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0, sitk.sitkUInt8)


def predict_label_maps(model, case, settings=None, *, modality: str = "MR", device=None,
                       timings: dict | None = None) -> dict:
    """One forward pass, both post-processings: ``{"raw": label image, "lcc": label image}`` on
    the native grid of ``case.image`` (0 background, 1 Parotid_L, 2 Parotid_R)."""
    return _predict(model, case, settings, modality=modality, device=device, timings=timings,
                    which=("raw", "lcc"))


def _predict(model, case, settings, *, modality, device, timings, which):
    import SimpleITK as sitk

    from .preparation import prepare_case

    cfg = segmentation_config(settings)
    model, pre = _model_and_preprocessing(model, settings, device)
    if modality == "CT":
        pre["cc_rule"] = "none"
    pre.setdefault("cc_rule", "none")
    pre.setdefault("cc_margin_mm", 0.0)
    pre.setdefault("min_head_area_cm2", 0.0)  # checkpoints trained before the setting existed
    t0 = time.perf_counter()
    prepared = prepare_case(case, modality, pre)
    t1 = time.perf_counter()
    pred = predict_slices(model, prepared.image, int(cfg["inference_batch"]), amp=bool(cfg["amp"]))
    t2 = time.perf_counter()
    out = {}
    for key in which:
        crop_pred = largest_components(pred) if key == "lcc" else pred
        volume = _uncrop(crop_pred, prepared.info, prepared.slice_index)
        image = _to_native(volume, prepared.info, case.image, cfg["interpolation"])
        image.CopyInformation(case.image)
        out[key] = sitk.Cast(image, sitk.sitkUInt8)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update({"preprocess": t1 - t0, "predict": t2 - t1, "postprocess": t3 - t2})
    return out


def predict_labels(model, case, settings=None, *, postprocess: bool | None = None,
                   modality: str = "MR", device=None, timings: dict | None = None):
    """The label image (uint8 0/1/2) of ``case`` on its native grid. ``model``: a U-Net or a
    checkpoint path; ``postprocess``: keep the largest component per side (default: the
    profile's ``postprocess_lcc``)."""
    if postprocess is None:
        postprocess = bool(segmentation_config(settings)["postprocess_lcc"])
    key = "lcc" if postprocess else "raw"
    return _predict(model, case, settings, modality=modality, device=device, timings=timings,
                    which=(key,))[key]


def masks_from_labels(label_image) -> dict:
    """``{"Parotid_L": mask, "Parotid_R": mask}`` (uint8 0/1 images on the label image's grid)."""
    import SimpleITK as sitk

    masks = {}
    for value, name in enumerate(STRUCTURES, start=1):
        mask = sitk.Cast(label_image == value, sitk.sitkUInt8)
        mask.CopyInformation(label_image)
        masks[name] = mask
    return masks


def predict_case(model, case, settings=None, *, postprocess: bool | None = None,
                 modality: str = "MR", device=None) -> dict:
    """Parotid masks of one case on its native grid: ``{"Parotid_L": image, "Parotid_R": image}``
    (uint8 0/1). ``model``: a U-Net or a checkpoint path; ``settings``: the profile (its
    preprocessing is used when the checkpoint records none)."""
    return masks_from_labels(predict_labels(model, case, settings, postprocess=postprocess,
                                            modality=modality, device=device))


def _case_name(case) -> str:
    import re

    from .io import IMAGE_SUFFIXES

    name = str(case.patient_id)
    for suffix in IMAGE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name == "img" and case.source is not None:
        name = Path(case.source).parent.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"
    return name


def _cases_at(path: Path):
    """(case, seconds to read it, problem) for what ``path`` holds: whatever
    :func:`crossmod_lib.datasets.read_any` reads, or else a folder of such folders (one patient
    each, read one at a time). In a folder of patients, one that cannot be read gives
    (None, 0, "<folder>: <why>") and the others are still read; a single patient's error is raised."""
    from .datasets import read_any

    t0 = time.perf_counter()
    try:
        cases = read_any(path)
    except CrossmodError:
        subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if path.is_dir() else []
        if not subfolders:
            raise
        for folder in subfolders:
            t1 = time.perf_counter()
            try:
                found = read_any(folder)
            except CrossmodError as exc:
                yield None, 0.0, (folder.name, " ".join(str(exc).split()))
                continue
            for case in found:
                yield case, (time.perf_counter() - t1) / len(found), None
        return
    for case in cases:
        yield case, (time.perf_counter() - t0) / len(cases), None


#: What ``crossmod predict`` can write per patient (several at once, as TotalSegmentator's
#: output types): the label volume, a DICOM RTSTRUCT and a DICOM SEG (the last two: DICOM input).
OUTPUT_TYPES = ("nifti", "rtstruct", "seg")


def predict_path(model_path, input_path, output_dir, settings: dict | None = None,
                 rtstruct: bool = False, *, postprocess: bool | None = None, device=None,
                 progress: bool = False, outputs=("nifti",)) -> list[dict]:
    """Contour the parotids of the MR(s) at ``input_path`` and write the results.

    ``model_path``: a checkpoint (``best.pt``; its recorded preprocessing is used) or a loaded
    model. ``input_path``: an image file (NIfTI, NRRD, MHA), a DICOM series folder, any layout
    :func:`crossmod_lib.datasets.read_any` reads, or a folder of such folders (one per patient).
    ``settings``: the profile; its ``segmentation`` block gives the inference options
    (``postprocess_lcc``, ``interpolation``, ``inference_batch``) and its ``preprocessing`` is used
    only when the checkpoint records none. ``postprocess`` overrides ``postprocess_lcc``.

    Per case, ``<output_dir>/<patient>_labels.nii.gz`` (0 background, 1 Parotid_L, 2 Parotid_R on
    the source grid) and, with ``rtstruct=True`` or ``"rtstruct"`` in ``outputs`` (DICOM input
    only), ``<output_dir>/<patient>_RTSTRUCT.dcm`` referencing the series; ``"seg"`` in
    ``outputs`` adds ``<patient>_SEG.dcm``, a DICOM Segmentation of the series (highdicom).
    ``outputs`` is any of :data:`OUTPUT_TYPES`. Returns one row per case: patient, labels,
    rtstruct, seg (paths or None), seconds and the seconds of each step (read, preprocess,
    predict, postprocess, write). In a folder of patients, one that cannot be read (or, for DICOM
    outputs, is not a DICOM series) gets a row with ``problem`` (one line) and no files, and the
    others are still contoured.
    """
    import SimpleITK as sitk

    from .io import write_image

    input_path, output_dir = Path(input_path), Path(output_dir)
    outputs = set(outputs) | ({"rtstruct"} if rtstruct else set())
    unknown = sorted(outputs - set(OUTPUT_TYPES))
    if unknown or not outputs:
        raise CrossmodError(f"output types {', '.join(unknown) or '(none)'}: choose from "
                            f"{', '.join(OUTPUT_TYPES)}")
    if not input_path.exists():
        raise CrossmodError(f"{input_path}: no such file or folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise CrossmodError(f"{output_dir}: the output folder is a file")
    dicom_outputs = sorted(outputs & {"rtstruct", "seg"})
    model, _ = _model_and_preprocessing(model_path, settings, device)
    rows = []
    used: set = set()
    iterator = _cases_at(input_path)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="predict", unit="case")
    # Folders this call creates: removed again if it fails before writing anything into them,
    # so a failed run leaves the file system as it was (the files themselves are written atomically).
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
    try:
        for case, t_read, problem in iterator:
            if problem is not None:
                rows.append({"patient": problem[0], "labels": None, "rtstruct": None, "seg": None,
                             "seconds": 0.0, "problem": problem[1]})
                continue
            t0 = time.perf_counter()
            if dicom_outputs and not case.image.HasMetaDataKey("SOPInstanceUIDs"):
                message = (f"{case.source or input_path}: {' and '.join(dicom_outputs)} output "
                           "needs a DICOM image series as input")
                if case.source is None or Path(case.source) == input_path:
                    raise CrossmodError(message)
                rows.append({"patient": _case_name(case), "labels": None, "rtstruct": None,
                             "seg": None, "seconds": 0.0, "problem": message})
                continue
            timings: dict = {"read": t_read}
            labels = predict_labels(model, case, settings, postprocess=postprocess, device=device,
                                    timings=timings)
            t1 = time.perf_counter()
            name = base = _case_name(case)
            copy_number = 1
            while name in used:
                copy_number += 1
                name = f"{base}_{copy_number}"
            used.add(name)
            label_path = rt_path = seg_path = None
            if "nifti" in outputs:
                label_path = output_dir / PredictionFiles.labels(name)
                write_image(sitk.Cast(labels, sitk.sitkUInt8), label_path)
            if "rtstruct" in outputs:
                from .dicom import write_rtstruct

                rt_path = write_rtstruct(masks_from_labels(labels), case.image,
                                         output_dir / PredictionFiles.rtstruct(name))
            if "seg" in outputs:
                from .dicom import write_seg

                seg_path = write_seg(masks_from_labels(labels), case.image, case.source,
                                     output_dir / PredictionFiles.seg(name))
            timings["write"] = time.perf_counter() - t1
            rows.append({"patient": name, "labels": str(label_path) if label_path else None,
                         "rtstruct": str(rt_path) if rt_path else None,
                         "seg": str(seg_path) if seg_path else None,
                         "seconds": t_read + time.perf_counter() - t0, "problem": None, **timings})
    except BaseException:
        for folder in created:  # deepest first; stops at the first one that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return rows


def _bench_volume(n_slices: int, matrix: int, pixel_mm: float, slice_mm: float, seed: int = 0):
    """A T2w-like MR head volume of Table I's size (ellipse head, two bright glands, noise)."""
    rng = np.random.default_rng(seed)
    half = matrix * pixel_mm / 2
    coords = (np.arange(matrix) + 0.5) * pixel_mm - half
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    head = (yy / 95.0) ** 2 + (xx / 75.0) ** 2 < 1
    gland_l = ((yy - 10) / 18.0) ** 2 + ((xx - 45) / 12.0) ** 2 < 1
    gland_r = ((yy - 10) / 18.0) ** 2 + ((xx + 45) / 12.0) ** 2 < 1
    plane = np.where(head, 300.0, 5.0)
    plane[gland_l | gland_r] = 520.0
    volume = np.repeat(plane[None], n_slices, axis=0)
    volume = np.abs(volume + rng.normal(0, 15.0, volume.shape))
    return volume.astype(np.float32), (pixel_mm, pixel_mm, slice_mm), (-half, -half, 0.0)


def bench_inference(settings: dict, model_path=None, *, n_slices: int = 30, matrix: int = 512,
                    pixel_mm: float = 0.5, slice_mm: float = 4.0, repeats: int = 3,
                    device: str = "cpu", workdir: str | Path | None = None,
                    target_s: float = 5.0) -> dict:
    """Seconds per MR patient end to end (read NIfTI -> preprocess -> predict -> write NIfTI), as
    section 2.F times it (paper: 0.86 +- 0.02 s on a V100), on a Table-I-sized synthetic MR
    (``matrix``^2 x ``n_slices``, 0.5 x 0.5 x 4 mm) with the profile's network and preprocessing
    (random weights unless ``model_path``: the time does not depend on them). The first run is a
    warm-up and not counted."""
    import tempfile

    import SimpleITK as sitk

    from .io import write_image

    cfg = segmentation_config(settings)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        if model_path is None:
            torch.manual_seed(0)
            model = build_model(settings)
            model_path = save_checkpoint(
                {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "arch": model.arch,
                 "config": _plain(cfg),
                 "meta": {"kind": "benchmark", "preprocessing": _plain(settings["preprocessing"])}},
                tmp / "bench.pt")
        volume, spacing, origin = _bench_volume(n_slices, matrix, pixel_mm, slice_mm)
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        source = tmp / "bench_mr.nii.gz"
        write_image(image, source)
        runs = []
        for repeat in range(repeats + 1):
            t0 = time.perf_counter()
            rows = predict_path(model_path, source, tmp / "out", settings, device=dev)
            total = time.perf_counter() - t0
            if repeat:
                runs.append({"total": total, **{k: rows[0][k] for k in
                                                ("read", "preprocess", "predict", "postprocess",
                                                 "write")}})
        model = load_model(model_path)
    totals = np.array([r["total"] for r in runs])
    size = int(settings["preprocessing"]["crop"])
    return {
        "profile": settings.get("name"), "device": str(dev), "threads": torch.get_num_threads(),
        "volume": f"{matrix}x{matrix}x{n_slices}", "slice_size": size,
        "base_features": model.arch["base_features"], "levels": model.arch["levels"],
        "parameters": count_parameters(model),
        "gflops_per_patient": flops_per_slice(model, size) * n_slices / 1e9,
        "seconds_mean": float(totals.mean()), "seconds_sd": float(totals.std(ddof=1)) if len(totals) > 1 else 0.0,
        "stages": {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "total"},
        "target_s": target_s, "meets_target": bool(totals.mean() <= target_s),
    }


"""Paper sections 2.E-2.G: the 2D U-Net that contours the parotids, its training and inference.

The network (Fig. 5)
    A 2D U-Net with ``levels`` resolution levels (paper: 5), ``base_features`` features at the
    first level doubling at each level down to the bottleneck (paper: 64 -> 1024). Each level has
    two 3 x 3 convolutions (zero padding 1, so the output has the input's size), each followed by
    a normalisation and a ReLU; 2 x 2 max pooling goes down, a 2 x 2 transposed convolution
    (stride 2) goes up, and the skip connection is concatenated before the level's two convolutions
    on the way up. A 1 x 1 convolution gives three classes: background, Parotid_L, Parotid_R.
    Inputs whose size is not a multiple of 2^(levels-1) are zero-padded inside and cropped back.

    Normalisation (``norm``, the paper does not state it; Ronneberger's original had none):
    ``batch`` by default. Batch normalisation lets the small learning rate of the paper (5e-5)
    train the 31 M-parameter network within its 100 epochs, and keeps the short CPU budgets of
    the demo profile meaningful. Instance normalisation (``instance``) is available but not the
    default: normalising every slice's own intensities removes part of the CT/MR contrast
    difference, which would blur the comparison with the *naive* baseline (the CT network applied
    to MR as it is). ``none`` gives the original U-Net (convolutions then carry a bias).

The loss
    Soft (multi-class) Dice over the two parotid classes only: per class c,
    ``D_c = (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)`` with softmax probabilities p and
    one-hot labels g, the sums running over all pixels *of the whole batch* (most slices hold no
    parotid, so a per-slice Dice would be undefined or noisy); loss = 1 - mean_c D_c, s =
    ``dice_smooth`` (1, as in the Keras implementations of the paper's time). Background is left
    out by default (``dice_background: false``): it covers > 99 % of the pixels and its Dice is
    ~1 almost at once, so it mostly dilutes the gradient (on the demo phantom, including it gave
    a mean Dice of 0.81 where leaving it out gave 0.91 with the same budget).

    Foreground-only soft Dice has one trap, seen on the phantom: a class whose probability is
    spread over the whole image gets a gradient ~ G / P^2 (P: its predicted volume), nearly zero,
    and can stay there (Parotid_L stuck at Dice 0.01 for 20 epochs while Parotid_R reached 0.9).
    The output layer therefore starts at the class prior: its background bias is 4 (p = 0.96
    background everywhere), so each parotid class grows from small predicted volumes.

Training (section 2.E)
    Patients (never slices) are split 80/20 into training and validation with a seeded shuffle.
    Adam, learning rate 5e-5; the validation loss (the same soft Dice loss, accumulated over the
    whole validation set) is monitored by :class:`PlateauStopper`: an epoch *improves* when the
    validation loss is more than ``min_delta`` (1 %, relative) below the best improving value so
    far; after ``lr_patience`` epochs without improvement the learning rate is multiplied by
    ``lr_factor`` (never below ``min_lr`` = 1e-7; the paper gives neither factor nor patience);
    after ``patience`` (10) epochs without improvement training stops; at most ``epochs`` (100).
    The best checkpoint (lowest validation loss so far, any decrease) is kept as ``best.pt``.

    Every epoch the full state (weights, optimiser, stopper, history, torch RNG state as a tensor)
    is written atomically to ``last.pt`` (temporary file + ``os.replace``), and ``log.csv``
    (epoch, train loss, validation loss and Dice, learning rate, seconds) is rewritten. The batch
    order and every random augmentation of epoch e come from a generator seeded with (seed, e),
    so ``resume=True`` continues from ``last.pt`` and gives bit-identical weights on CPU.
    Checkpoints are read with ``torch.load(..., weights_only=True)`` only: they hold tensors and
    plain Python values. On a GPU the forward pass runs under bf16 autocast with channels-last
    tensors; the loss is computed in float32.

    This part of the module imports only numpy and torch, so ``python -m
    crossmod_lib.segmentation train --slices X.npz --out DIR --config cfg.json`` runs on a bare
    GPU machine from ``.npz`` files. Inference on image volumes (SimpleITK, scipy) imports its
    libraries inside the functions.

Augmentation (``augment``, off as in the paper)
    Small intensity jitter (gamma 0.8-1.25, gain 0.9-1.1) and a small affine jitter (rotation
    +-7 deg, scale +-7 %, shift +-4 %). No flips: a left-right flip would turn a left parotid
    into a right one under a "left" label.

Inference (section 2.G)
    A whole MR volume is preprocessed exactly as the training slices
    (:func:`crossmod_lib.preparation.prepare_case`, modality MR), predicted slice by slice in
    batches, stacked in 3D, put back into the resampled grid (undoing the crop) and resampled
    onto the native MR grid with a label interpolator (``interpolation``: ``label_linear``, the
    default, or ``nearest``). Optionally (``postprocess_lcc``) only the largest 3D connected
    component of each side is kept; :func:`predict_label_maps` gives both versions.

Baselines (:func:`model_recipes`, :func:`train_model`), all trained by :func:`train_unet`
    ``cross_modality``: the paper; registered synthetic MR (``cleaned/training_slices.npz``) with
    the CT labels, 80/20 patient split; tested on every real MR patient.
    ``ct_only``: the paper's benchmark; CT with CT labels; ``ct_test_fraction`` of the CT patients
    are held out (seeded, by patient) as its test set, the rest split 80/20.
    ``naive``: no training; the ct_only network applied to real MR as it is (so it saw the same
    CT patients as ct_only, not all of them).
    ``mr_oracle``: real MR with real MR labels (the phantom's MR is annotated), patient-level
    ``oracle_folds``-fold cross-validation: each fold's model is tested on that fold's patients
    and trained (80/20) on the others, so every MR patient gets one out-of-fold prediction.
    ``domain_random``: all CT with CT labels, every training batch through
    :func:`randomise_intensities` (validation slices randomised once, fixed seed); tested on MR.
    ``few_shot``: the cross-modality network fine-tuned (``few_shot_lr``, at most
    ``few_shot_epochs``) on the labels of k real MR patients, the first k of a seeded shuffle (so
    the sets are nested); with so few patients no one is held out for validation: the stopping
    rules watch the loss on the k patients' own slices. Tested on the other MR patients (compare
    the k values on the patients none of them used: all but the largest k's).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io as _io
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CrossmodError
from .slices import annotated_patients, read_slices

if TYPE_CHECKING:  # pandas is imported where it is used: training needs torch + numpy only
    import pandas as pd

CLASSES = ("background", "Parotid_L", "Parotid_R")
STRUCTURES = CLASSES[1:]
CHECKPOINT_FORMAT = "crossmod-unet-1"
KINDS = ("cross_modality", "ct_only", "naive", "mr_oracle", "domain_random", "few_shot")
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_dice_L", "val_dice_R", "lr",
               "seconds", "improved")

#: The paper's settings (full profile); a profile's ``segmentation`` block overrides them.
DEFAULTS: dict = {
    "base_features": 64,
    "levels": 5,
    "norm": "batch",
    "batch_size": 8,
    "learning_rate": 5.0e-5,
    "epochs": 100,
    "min_lr": 1.0e-7,
    "lr_factor": 0.5,
    "lr_patience": 5,
    "patience": 10,
    "min_delta": 0.01,
    "val_fraction": 0.2,
    "dice_background": False,
    "dice_smooth": 1.0,
    "max_steps_per_epoch": None,
    "augment": False,
    "amp": True,
    "device": "auto",
    "cpu_threads": 0,
    "inference_batch": 32,
    "postprocess_lcc": True,
    "interpolation": "label_linear",
    "ct_test_fraction": 0.2,
    "oracle_folds": 5,
    "few_shot_k": [1, 3, 5],
    "few_shot_epochs": 100,
    "few_shot_lr": 5.0e-5,
    "dr_bands": [8, 70, 125, 200],
    "dr_monotone_prob": 0.5,
    "seed": None,
}

_NORMS = ("batch", "instance", "none")


# ----------------------------------------------------------------------------------------------
# Settings


def segmentation_config(settings: dict | None) -> dict:
    """The segmentation settings with defaults: ``settings`` is a profile (its ``segmentation``
    block is used), the block itself, or None (the paper's values). Bad values: one-line error."""
    if not settings:
        block = {}
    elif "segmentation" in settings:
        block = settings["segmentation"] or {}
    elif set(settings) & set(DEFAULTS):
        block = settings
    else:
        block = {}
    if not isinstance(block, dict):
        raise CrossmodError("segmentation: must be a mapping of settings")
    unknown = sorted(k for k in block if k not in DEFAULTS)
    if unknown:
        raise CrossmodError(f"segmentation: unknown setting(s) {', '.join(unknown)}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(block))
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict) -> None:
    def need(ok, message):
        if not ok:
            raise CrossmodError(f"segmentation.{message}")

    need(isinstance(cfg["base_features"], int) and cfg["base_features"] >= 1,
         f"base_features must be a positive integer, got {cfg['base_features']!r}")
    need(isinstance(cfg["levels"], int) and 1 <= cfg["levels"] <= 8,
         f"levels must be an integer in 1..8, got {cfg['levels']!r}")
    need(cfg["norm"] in _NORMS, f"norm must be one of {', '.join(_NORMS)}, got {cfg['norm']!r}")
    need(isinstance(cfg["batch_size"], int) and cfg["batch_size"] >= 1,
         f"batch_size must be a positive integer, got {cfg['batch_size']!r}")
    need(cfg["learning_rate"] > 0, "learning_rate must be > 0")
    need(isinstance(cfg["epochs"], int) and cfg["epochs"] >= 1, "epochs must be an integer >= 1")
    need(0 <= cfg["min_lr"] <= cfg["learning_rate"], "min_lr must be in [0, learning_rate]")
    need(0 < cfg["lr_factor"] < 1, "lr_factor must be in (0, 1)")
    need(cfg["lr_patience"] >= 1 and cfg["patience"] >= 1, "lr_patience and patience must be >= 1")
    need(0 <= cfg["min_delta"] < 1, "min_delta must be in [0, 1) (a relative improvement)")
    need(0 <= cfg["val_fraction"] < 1, "val_fraction must be in [0, 1)")
    need(cfg["max_steps_per_epoch"] is None or cfg["max_steps_per_epoch"] >= 1,
         "max_steps_per_epoch must be null or >= 1")
    need(cfg["interpolation"] in ("label_linear", "nearest"),
         "interpolation must be label_linear or nearest")
    need(0 <= cfg["ct_test_fraction"] < 1, "ct_test_fraction must be in [0, 1)")
    need(isinstance(cfg["oracle_folds"], int) and cfg["oracle_folds"] >= 2,
         "oracle_folds must be an integer >= 2")
    need(all(isinstance(k, int) and k >= 1 for k in cfg["few_shot_k"]),
         "few_shot_k must be a list of positive integers")
    need(isinstance(cfg["few_shot_epochs"], int) and cfg["few_shot_epochs"] >= 1,
         "few_shot_epochs must be an integer >= 1")
    need(cfg["few_shot_lr"] > 0, "few_shot_lr must be > 0")
    bands = list(cfg["dr_bands"])
    need(len(bands) >= 1 and bands == sorted(bands) and all(0 < b < 255 for b in bands),
         "dr_bands must be increasing intensities in (0, 255)")
    need(0 <= cfg["dr_monotone_prob"] <= 1, "dr_monotone_prob must be in [0, 1]")
    need(cfg["seed"] is None or (isinstance(cfg["seed"], int) and not isinstance(cfg["seed"], bool)),
         f"seed must be null (the profile's seed) or an integer, got {cfg['seed']!r}")
    need(isinstance(cfg["cpu_threads"], int) and cfg["cpu_threads"] >= 0,
         "cpu_threads must be an integer >= 0 (0: torch's default)")
    need(cfg["device"] in ("auto", "cpu", "cuda") or str(cfg["device"]).startswith("cuda:"),
         "device must be auto, cpu or cuda[:N]")


def training_seed(settings) -> int:
    """The U-Net's seed (splits, initialisation, batch order): ``segmentation.seed``, or the
    profile's top-level ``seed`` when that is null (the convergence study varies the first only,
    so the data, e.g. a simulated MR cohort keyed on the profile's seed, stays the same)."""
    if not isinstance(settings, dict):
        return 0
    own = segmentation_config(settings)["seed"]
    if own is not None:
        return int(own)
    return int(settings["seed"]) if settings.get("seed") is not None else 0


def resolve_device(device=None) -> torch.device:
    """``auto``/None: the GPU when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CrossmodError(f"segmentation.device: {device!r} asked for, but no CUDA GPU is available")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# The network (Fig. 5)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """Two 3 x 3 convolutions (padding 1), each followed by the normalisation and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """The 2D U-Net of Fig. 5: ``levels`` levels of ``base_features * 2**i`` features."""

    def __init__(self, base_features: int = 64, levels: int = 5, in_channels: int = 1,
                 classes: int = 3, norm: str = "batch", background_bias: float = 4.0):
        super().__init__()
        if norm not in _NORMS:
            raise CrossmodError(f"segmentation.norm must be one of {', '.join(_NORMS)}, got {norm!r}")
        self.arch = {"base_features": int(base_features), "levels": int(levels),
                     "in_channels": int(in_channels), "classes": int(classes), "norm": str(norm)}
        self.features = [base_features * 2**i for i in range(levels)]
        channels = [in_channels] + self.features
        self.encoders = nn.ModuleList(
            DoubleConv(channels[i], channels[i + 1], norm) for i in range(levels)
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(self.features[i + 1], self.features[i], 2, stride=2)
            for i in reversed(range(levels - 1))
        )
        self.decoders = nn.ModuleList(
            DoubleConv(2 * self.features[i], self.features[i], norm)
            for i in reversed(range(levels - 1))
        )
        self.head = nn.Conv2d(self.features[0], classes, 1)
        with torch.no_grad():  # start from the class prior: (almost) everything is background
            self.head.bias.zero_()
            self.head.bias[0] = background_bias
        self.meta: dict = {}

    @property
    def multiple(self) -> int:
        """Input sizes that are a multiple of this need no internal padding."""
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        x = self.head(x)
        return x[..., :h, :w] if (pad_h or pad_w) else x


def build_model(settings=None, **overrides) -> UNet:
    """A U-Net with the profile's width, depth and normalisation (``overrides`` win)."""
    cfg = segmentation_config(settings)
    arch = {"base_features": cfg["base_features"], "levels": cfg["levels"], "norm": cfg["norm"]}
    arch.update(overrides)
    return UNet(**arch)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _layers(base: int, levels: int, size: int, in_channels: int = 1, classes: int = 3,
            norm: str = "batch"):
    """(stage, level, resolution, in, out, params, MACs) of every block, analytically."""
    bias = norm == "none"
    norm_params = 0 if norm == "none" else 2  # weight and bias per channel
    feats = [base * 2**i for i in range(levels)]
    size = int(math.ceil(size / 2 ** (levels - 1)) * 2 ** (levels - 1))

    def double(cin, cout, res):
        params = cin * cout * 9 + cout * cout * 9 + 2 * cout * (int(bias) + norm_params)
        macs = res * res * 9 * (cin * cout + cout * cout)
        return params, macs

    rows = []
    cin = in_channels
    for i, f in enumerate(feats):
        res = size // 2**i
        params, macs = double(cin, f, res)
        stage = "bottleneck" if i == levels - 1 else "encoder"
        rows.append((stage, i + 1, res, cin, f, params, macs))
        cin = f
    for i in reversed(range(levels - 1)):
        res = size // 2**i
        up_params = feats[i + 1] * feats[i] * 4 + feats[i]
        up_macs = res * res * feats[i + 1] * feats[i]  # each output pixel: one 1 x 1 tap of 2 x 2
        rows.append(("up-conv", i + 1, res, feats[i + 1], feats[i], up_params, up_macs))
        params, macs = double(2 * feats[i], feats[i], res)
        rows.append(("decoder", i + 1, res, 2 * feats[i], feats[i], params, macs))
    rows.append(("output 1x1", 1, size, feats[0], classes, feats[0] * classes + classes,
                 size * size * feats[0] * classes))
    return rows


def _arch_from(settings_or_model) -> dict:
    if isinstance(settings_or_model, UNet):
        return dict(settings_or_model.arch)
    cfg = segmentation_config(settings_or_model)
    return {"base_features": cfg["base_features"], "levels": cfg["levels"], "norm": cfg["norm"],
            "in_channels": 1, "classes": len(CLASSES)}


def _size_from(settings, size):
    if size is not None:
        return int(size)
    if isinstance(settings, dict) and "preprocessing" in settings:
        return int(settings["preprocessing"]["crop"])
    raise CrossmodError("size: give the slice size (pixels) or a profile with preprocessing.crop")


def flops_per_slice(settings_or_model, size: int | None = None) -> float:
    """Floating-point operations (2 x multiply-adds of the convolutions) of one forward pass on a
    ``size`` x ``size`` slice; normalisations, ReLUs and pooling are not counted."""
    arch = _arch_from(settings_or_model)
    size = _size_from(settings_or_model if isinstance(settings_or_model, dict) else None, size)
    rows = _layers(arch["base_features"], arch["levels"], size, arch["in_channels"],
                   arch["classes"], arch["norm"])
    return float(2 * sum(r[6] for r in rows))


def architecture_table(settings, size: int | None = None):
    """Fig. 5 as a table (pandas DataFrame): one row per block with its resolution, input and
    output features, parameters and GFLOPs per slice of ``size`` (default: the profile's crop)."""
    import pandas as pd

    arch = _arch_from(settings)
    size = _size_from(settings if isinstance(settings, dict) else None, size)
    rows = _layers(arch["base_features"], arch["levels"], size, arch["in_channels"],
                   arch["classes"], arch["norm"])
    table = pd.DataFrame(
        [{"block": stage, "level": level, "resolution": f"{res}x{res}", "in features": cin,
          "out features": cout, "parameters": params, "GFLOPs": 2 * macs / 1e9}
         for stage, level, res, cin, cout, params, macs in rows]
    )
    total = {"block": "total", "level": None, "resolution": "", "in features": None,
             "out features": None, "parameters": int(table["parameters"].sum()),
             "GFLOPs": float(table["GFLOPs"].sum())}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Loss and metrics


def dice_statistics(probs: torch.Tensor, target: torch.Tensor, classes: int | None = None):
    """Per class: (sum p*g, sum p, sum g) over batch and pixels; ``probs`` [B, C, H, W],
    ``target`` [B, H, W] integer labels."""
    classes = classes or probs.shape[1]
    onehot = F.one_hot(target.long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    return (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)


def dice_from_statistics(intersection, prob_sum, target_sum, smooth: float = 1.0):
    return (2 * intersection + smooth) / (prob_sum + target_sum + smooth)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                   smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) with the one-hot target, the sums
    running over the whole batch; background left out unless ``include_background``."""
    probs = torch.softmax(logits.float(), dim=1)
    dice = dice_from_statistics(*dice_statistics(probs, target), smooth=smooth)
    if not include_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


# ----------------------------------------------------------------------------------------------
# Early stopping and learning-rate plateau


class PlateauStopper:
    """ReduceLROnPlateau and early stopping on the validation loss, in one small state machine.

    ``step(loss)`` after each epoch returns ``{"lr", "improved", "best", "stop"}``: ``improved``
    when the loss is more than ``min_delta`` (relative) below the best improving loss so far
    (this resets both patience counters); ``best`` when it is the lowest loss so far (the best
    checkpoint is saved then); after ``lr_patience`` epochs without improvement the learning rate
    is multiplied by ``factor`` (not below ``min_lr``) and that counter restarts; after
    ``patience`` epochs without improvement ``stop`` is true.
    """

    def __init__(self, lr: float, min_lr: float = 1e-7, factor: float = 0.5, lr_patience: int = 5,
                 patience: int = 10, min_delta: float = 0.01):
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.factor = float(factor)
        self.lr_patience = int(lr_patience)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.reference = math.inf   # loss of the last improving epoch
        self.best = math.inf        # lowest loss seen
        self.wait_lr = 0
        self.wait_stop = 0
        self.stopped = False

    def step(self, loss: float) -> dict:
        loss = float(loss)
        is_best = loss < self.best
        if is_best:
            self.best = loss
        improved = math.isinf(self.reference) or loss < self.reference * (1.0 - self.min_delta)
        if not math.isfinite(loss):
            improved = is_best = False
        if improved:
            self.reference = loss
            self.wait_lr = self.wait_stop = 0
        else:
            self.wait_lr += 1
            self.wait_stop += 1
            if self.wait_lr >= self.lr_patience:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.wait_lr = 0
            if self.wait_stop >= self.patience:
                self.stopped = True
        return {"lr": self.lr, "improved": improved, "best": is_best, "stop": self.stopped}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "lr", "min_lr", "factor", "lr_patience", "patience", "min_delta", "reference", "best",
            "wait_lr", "wait_stop", "stopped")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ----------------------------------------------------------------------------------------------
# Patient-level splits


def _unique(patients) -> list[str]:
    return sorted({str(p) for p in np.asarray(patients).ravel()})


def split_patients(patients, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split patient ids (not slices) into (kept, held out), ``fraction`` of them held out after a
    seeded shuffle: at least one of each when there are two or more patients, none held out when
    there is one (or ``fraction`` is 0). Both lists are sorted."""
    ids = _unique(patients)
    n = len(ids)
    if n < 2 or fraction <= 0:
        return ids, []
    n_held = min(max(round(fraction * n), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    held = sorted(ids[i] for i in order[:n_held])
    return sorted(set(ids) - set(held)), held


def oracle_folds(patients, folds: int, seed: int) -> list[list[str]]:
    """Patient-level cross-validation folds (seeded), as lists of test patients."""
    ids = _unique(patients)
    if folds > len(ids):
        raise CrossmodError(f"segmentation.oracle_folds: {folds} folds for {len(ids)} MR patients")
    order = np.random.default_rng([seed, 2]).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, folds)]


def few_shot_patients(patients, k: int, seed: int) -> list[str]:
    """The k real-MR patients whose labels fine-tune the network: the first k of a seeded shuffle,
    so the sets are nested (the patients of k=1 are among those of k=3, ...)."""
    ids = _unique(patients)
    if k > len(ids):
        raise CrossmodError(f"segmentation.few_shot_k: k={k} but only {len(ids)} MR patients")
    order = np.random.default_rng([seed, 3]).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])


def ct_test_patients(patients, fraction: float, seed: int) -> list[str]:
    """CT patients held out to test the CT-only network (seeded, patient level)."""
    return split_patients(patients, fraction, int(seed) + 1)[1]


# ----------------------------------------------------------------------------------------------
# Intensity transforms


def _gaussian_blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.1:
        return plane
    radius = max(1, math.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = plane
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)],
                        mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for w, t in zip(kernel, range(2 * radius + 1)):
            acc += w * (padded[t:t + n] if axis == 0 else padded[:, t:t + n])
        out = acc
    return out


def randomise_intensities(image: np.ndarray, rng: np.random.Generator, labels: np.ndarray | None = None,
                          *, bands=(8, 70, 125, 200), monotone_prob: float = 0.5,
                          class_sd=(0.0, 12.0), blur_sigma=(0.0, 1.0), noise_sd=(0.0, 8.0),
                          bias_strength: float = 0.3, air_max: float = 30.0,
                          upper_percentile: float = 99.0) -> np.ndarray:
    """Domain randomisation of windowed CT slices (0-255, [H, W] or [N, H, W]), the SynthSeg idea.

    Tissue classes are intensity bands of the windowed CT (``bands``: edges on 0-255; the first
    band is air and stays dark, mean below ``air_max``), plus, when ``labels`` are given, the
    parotids (labels > 0) as a class of their own. Per slice, one of two remappings:

    * monotone (probability ``monotone_prob``): a random piecewise-linear transfer function with
      knots at the band edges, increasing or decreasing (half of the time each), applied to the
      CT intensity itself, so the texture inside a class is kept;
    * non-monotone: each class gets a random mean (uniform on 0-255) and a random spread
      (Gaussian, sd uniform in ``class_sd``), as in SynthSeg's Gaussian mixture.

    Then a Gaussian blur (sigma uniform in ``blur_sigma`` pixels), a smooth multiplicative bias
    field (quadratic, amplitude ``bias_strength``), Gaussian noise (sd uniform in ``noise_sd``),
    and the MR-like standardisation of the preprocessing: the ``upper_percentile`` of non-air
    pixels maps to 255. Returns uint8 of the input's shape; labels and geometry are unchanged.
    """
    image = np.asarray(image)
    single = image.ndim == 2
    stack = image[None] if single else image
    lab = None if labels is None else (np.asarray(labels)[None] if single else np.asarray(labels))
    edges = [0.0] + [float(b) for b in bands] + [256.0]
    out = np.empty(stack.shape, dtype=np.uint8)
    h, w = stack.shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    for k, plane in enumerate(stack.astype(np.float32)):
        cls = np.digitize(plane, edges[1:-1])  # 0 = air, 1.. = tissue bands
        n_bands = len(edges) - 1
        if lab is not None:
            cls = np.where(lab[k] > 0, n_bands, cls)
        air = cls == 0
        result = np.empty_like(plane)
        if rng.random() < monotone_prob:
            knots_x = np.array(edges[1:], dtype=np.float32)
            knots_x[-1] = 255.0
            knots_y = np.sort(rng.uniform(0.0, 255.0, len(knots_x)))
            if rng.random() < 0.5:
                knots_y = knots_y[::-1]
            result = np.interp(plane, knots_x, knots_y).astype(np.float32)
        else:
            n_classes = n_bands + (1 if lab is not None else 0)
            means = rng.uniform(0.0, 255.0, n_classes)
            sds = rng.uniform(class_sd[0], class_sd[1], n_classes)
            result = (means[cls] + sds[cls] * rng.standard_normal(plane.shape)).astype(np.float32)
        air_mean = rng.uniform(0.0, air_max)
        result[air] = air_mean + rng.uniform(0, 3.0) * rng.standard_normal(int(air.sum()))
        result = _gaussian_blur(result, float(rng.uniform(*blur_sigma)))
        if bias_strength > 0:
            c = rng.uniform(-bias_strength, bias_strength, 5)
            result = result * np.exp(c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx**2
                                     + c[4] * yy**2).astype(np.float32)
        sd = float(rng.uniform(*noise_sd))
        if sd > 0:
            result = result + sd * rng.standard_normal(plane.shape).astype(np.float32)
        result = np.clip(result, 0.0, None)
        head = result[~air]
        upper = float(np.percentile(head, upper_percentile)) if head.size else float(result.max())
        scale = 255.0 / upper if upper > 1e-3 else 1.0
        out[k] = np.round(np.clip(result * scale, 0.0, 255.0)).astype(np.uint8)
    return out[0] if single else out


def augment_batch(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                  max_rotation_deg: float = 7.0, max_scale: float = 0.07, max_shift: float = 0.04,
                  gamma=(0.8, 1.25), gain=(0.9, 1.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Small intensity and affine jitter of a batch (x [B,1,H,W] in 0-1, y [B,H,W] labels).

    No flips: left and right parotids have their own labels.
    """
    b = x.shape[0]
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, b))
    scale = rng.uniform(1 - max_scale, 1 + max_scale, b)
    shift = rng.uniform(-max_shift, max_shift, (b, 2)) * 2  # normalised coordinates span 2
    theta = np.zeros((b, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = np.cos(angle) / scale
    theta[:, 0, 1] = -np.sin(angle) / scale
    theta[:, 1, 0] = np.sin(angle) / scale
    theta[:, 1, 1] = np.cos(angle) / scale
    theta[:, :, 2] = shift
    theta_t = torch.from_numpy(theta).to(x.device)
    grid = F.affine_grid(theta_t, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False)[:, 0].round().long()
    g = torch.from_numpy(rng.uniform(*gamma, b).astype(np.float32)).to(x.device).view(b, 1, 1, 1)
    a = torch.from_numpy(rng.uniform(*gain, b).astype(np.float32)).to(x.device).view(b, 1, 1, 1)
    x = (x.clamp(0, 1) ** g * a).clamp(0, 1)
    return x, y


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a reader never
    sees half a checkpoint, an interrupted write leaves the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 (pickle/zip errors of many types)
        # torch's own reasons ("pop from empty list", "Invalid argument") say little: name the
        # likely cause first, keep theirs for the curious
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CrossmodError(f"{path}: cannot read checkpoint: not a PyTorch checkpoint, or a "
                            f"truncated or corrupt one ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CrossmodError(f"{path}: not a crossmod U-Net checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_model(path: str | Path, device="cpu") -> UNet:
    """The U-Net of a checkpoint (``best.pt``/``last.pt``), in eval mode; its training metadata
    (kind, preprocessing, patients) is in ``model.meta``."""
    ckpt = load_checkpoint(path, device)
    arch, weights = ckpt.get("arch"), ckpt.get("model")
    if not isinstance(arch, dict) or not isinstance(weights, dict):
        raise CrossmodError(f"{path}: incomplete checkpoint (no "
                            f"{'architecture' if not isinstance(arch, dict) else 'weights'})")
    try:
        model = UNet(**arch)
    except Exception as exc:  # noqa: BLE001 (unknown keys, impossible sizes: TypeError, ValueError, ...)
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CrossmodError(f"{path}: the recorded architecture cannot be built ({reason})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CrossmodError(f"{path}: weights do not fit the recorded architecture "
                            f"({' '.join(str(exc).split())[:160]})") from None
    model.meta = dict(ckpt.get("meta") or {})
    return model.to(device).eval()


def _plain(value):
    """JSON-like Python values (what weights_only loading and JSON accept)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_log(history: list[dict], path: Path) -> None:
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    _atomic_text(buffer.getvalue(), path)


# ----------------------------------------------------------------------------------------------
# Training


def load_training_slices(path: str | Path) -> dict[str, np.ndarray]:
    """A slices ``.npz`` (image uint8 [N,H,W], labels, patient, ...), numpy only."""
    arrays = read_slices(path, "training slices", ("image", "labels", "patient"))
    _check_arrays(arrays, str(path))
    return arrays


def _check_arrays(arrays: dict, where: str) -> None:
    missing = [k for k in ("image", "labels", "patient") if k not in arrays]
    if missing:
        raise CrossmodError(f"{where}: missing array(s) {', '.join(missing)}")
    image, labels = arrays["image"], arrays["labels"]
    if image.ndim != 3 or labels.shape != image.shape or len(arrays["patient"]) != len(image):
        raise CrossmodError(f"{where}: image [N,H,W], labels of the same shape and one patient per "
                            f"slice expected, got {image.shape}, {labels.shape}, "
                            f"{np.shape(arrays['patient'])}")
    if len(image) == 0:
        raise CrossmodError(f"{where}: no slices")
    if labels.size and labels.max() >= len(CLASSES):
        raise CrossmodError(f"{where}: labels must be 0 (background), 1 (Parotid_L), 2 (Parotid_R)")


def _as_arrays(data) -> tuple[dict, str]:
    if isinstance(data, (str, Path)):
        return load_training_slices(data), str(data)
    if isinstance(data, dict):
        _check_arrays(data, "slices")
        return data, "arrays"
    raise CrossmodError(f"slices: expected a .npz path or a dict of arrays, got {type(data).__name__}")


def _select(arrays: dict, patients) -> np.ndarray:
    wanted = {str(p) for p in patients}
    return np.flatnonzero(np.isin(np.asarray(arrays["patient"]).astype(str), list(wanted)))


def _to_input(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32)
    x = (x / 255.0).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: UNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 32,
             include_background: bool = False, smooth: float = 1.0, device=None,
             amp: bool = True) -> dict:
    """Soft Dice loss and hard Dice per parotid over a whole slice set (sums over all slices)."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    model.eval()
    n_classes = len(CLASSES)
    soft = torch.zeros(3, n_classes, dtype=torch.float64)
    hard = torch.zeros(3, n_classes, dtype=torch.float64)
    channels_last = device.type == "cuda"
    for start in range(0, len(images), batch_size):
        x = _to_input(images[start:start + batch_size], device, channels_last)
        y = torch.from_numpy(labels[start:start + batch_size].astype(np.int64)).to(device)
        with _autocast(device, amp):
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
        soft += torch.stack([s.double().cpu() for s in dice_statistics(probs, y, n_classes)])
        pred = F.one_hot(probs.argmax(1), n_classes).permute(0, 3, 1, 2).float()
        hard += torch.stack([s.double().cpu() for s in dice_statistics(pred, y, n_classes)])
    soft_dice = dice_from_statistics(*soft, smooth=smooth)
    loss = 1.0 - (soft_dice if include_background else soft_dice[1:]).mean()
    inter, psum, tsum = hard
    hard_dice = torch.where(psum + tsum > 0, 2 * inter / (psum + tsum).clamp_min(1e-12),
                            torch.ones_like(inter))
    return {"loss": float(loss), "dice": float(hard_dice[1:].mean()),
            "dice_L": float(hard_dice[1]), "dice_R": float(hard_dice[2])}


def _arch_state(cfg: dict) -> dict:
    return {"base_features": int(cfg["base_features"]), "levels": int(cfg["levels"]),
            "in_channels": 1, "classes": len(CLASSES), "norm": str(cfg["norm"])}


def train_unet(data, out_dir: str | Path, settings=None, *, seed: int | None = None, init=None,
               resume: bool = False, split: dict | None = None, transform: str | None = None,
               learning_rate: float | None = None, epochs: int | None = None,
               meta: dict | None = None, device=None, progress: bool = True,
               stop_after_epochs: int | None = None) -> dict:
    """Train the U-Net on a slice set (section 2.E); returns a summary dict.

    ``data``: a slices ``.npz`` path or a dict of arrays (image uint8 [N,H,W], labels 0/1/2,
    patient). ``settings``: a profile or its ``segmentation`` block (defaults: the paper's).
    ``split``: ``{"train": [...], "val": [...]}`` patient ids; by default a seeded 80/20 patient
    split of every patient in ``data`` (one patient only: validation on the training slices).
    ``init``: a checkpoint whose weights start the training (fine-tuning). ``transform``:
    ``"randomise"`` applies :func:`randomise_intensities` to every training batch (the validation
    slices are randomised once, with a fixed generator). ``resume``: continue from
    ``<out>/last.pt`` when it exists (a finished run is returned as it is).
    ``stop_after_epochs``: return after this many epochs of this call (as if interrupted).

    Writes ``<out>/last.pt`` (every epoch), ``best.pt``, ``log.csv`` and ``summary.json``.
    """
    started = time.perf_counter()
    arrays, source = _as_arrays(data)
    cfg = segmentation_config(settings)
    if seed is None:
        seed = training_seed(settings)
    lr0 = float(learning_rate if learning_rate is not None else cfg["learning_rate"])
    max_epochs = int(epochs if epochs is not None else cfg["epochs"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device if device is not None else cfg["device"])
    use_amp = bool(cfg["amp"]) and device.type == "cuda"
    channels_last = device.type == "cuda"

    if split is None:
        train_ids, val_ids = split_patients(arrays["patient"], cfg["val_fraction"], seed)
    else:
        train_ids, val_ids = _unique(split["train"]), _unique(split.get("val", []))
        overlap = set(train_ids) & set(val_ids)
        if overlap:
            raise CrossmodError(f"split: patients in both training and validation: {sorted(overlap)}")
    val_is_train = not val_ids
    if val_is_train:
        val_ids = list(train_ids)
    train_idx = _select(arrays, train_ids)
    val_idx = _select(arrays, val_ids)
    if len(train_idx) == 0:
        raise CrossmodError(f"{source}: no training slices for patients {train_ids}")
    if not np.any(arrays["labels"][train_idx]):
        raise CrossmodError(f"{source}: the training slices hold no parotid label (an unannotated "
                            "cohort cannot train this model)")

    images = arrays["image"]
    labels = arrays["labels"]  # uint8; each batch is converted to int64 on its own
    val_images = images[val_idx]
    val_labels = labels[val_idx]
    if transform == "randomise":
        val_images = randomise_intensities(val_images, np.random.default_rng([seed, 99]),
                                           labels=val_labels, bands=cfg["dr_bands"],
                                           monotone_prob=cfg["dr_monotone_prob"])
    elif transform is not None:
        raise CrossmodError(f"transform must be None or 'randomise', got {transform!r}")

    arch = _arch_state(cfg)
    torch.manual_seed(seed)
    model = UNet(**arch)
    if init is not None:
        init_ckpt = load_checkpoint(init)
        if init_ckpt["arch"] != arch:
            raise CrossmodError(f"{init}: architecture {init_ckpt['arch']} differs from the "
                                f"settings' {arch}")
        model.load_state_dict(init_ckpt["model"])
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr0)
    stopper = PlateauStopper(lr0, cfg["min_lr"], cfg["lr_factor"], cfg["lr_patience"],
                             cfg["patience"], cfg["min_delta"])
    run_meta = _plain({
        **(meta or {}),
        "data": source,
        "train_patients": train_ids,
        "val_patients": [] if val_is_train else val_ids,
        "validation": "training slices" if val_is_train else "held-out patients",
        "transform": transform,
        "init": str(init) if init is not None else None,
        "seed": seed,
        "slices": {"train": len(train_idx), "val": len(val_idx)},
        "classes": list(CLASSES),
    })
    if isinstance(settings, dict) and "preprocessing" in settings:
        run_meta.setdefault("preprocessing", _plain(settings["preprocessing"]))
    plain_cfg = _plain(cfg)
    history: list[dict] = []
    epoch = 0
    best_epoch, best_val = None, math.inf
    done = False
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        for key, mine in (("arch", arch), ("split", {"train": train_ids, "val": val_ids}),
                          ("seed", seed)):
            if state[key] != mine:
                raise CrossmodError(f"{last_path}: cannot resume: {key} differs from this call's "
                                    f"({state[key]} vs {mine})")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        stopper.load_state_dict(state["stopper"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        epoch = int(state["epoch"])
        best_epoch, best_val = state["best_epoch"], float(state["best_val_loss"])
        done = bool(state["done"])

    def checkpoint_state() -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                "optimizer": optimiser.state_dict(), "stopper": stopper.state_dict(),
                "torch_rng": torch.get_rng_state(), "epoch": epoch, "history": history,
                "best_epoch": best_epoch, "best_val_loss": best_val, "done": done,
                "arch": arch, "config": plain_cfg, "split": {"train": train_ids, "val": val_ids},
                "seed": seed, "meta": run_meta}

    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg["cpu_threads"]:
        torch.set_num_threads(int(cfg["cpu_threads"]))
    try:
        bar = None
        if progress and not done:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=max_epochs, initial=epoch, desc=f"train {run_meta.get('name', 'U-Net')}",
                           unit="epoch", leave=False)
            except ImportError:
                bar = None
        batch_size = int(cfg["batch_size"])
        epochs_this_call = 0
        while not done and epoch < max_epochs:
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                break
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, epoch])
            order = train_idx[rng.permutation(len(train_idx))]
            steps = math.ceil(len(order) / batch_size)
            if cfg["max_steps_per_epoch"]:
                steps = min(steps, int(cfg["max_steps_per_epoch"]))
            for group in optimiser.param_groups:
                group["lr"] = stopper.lr
            model.train()
            losses = []
            for step in range(steps):
                idx = np.sort(order[step * batch_size:(step + 1) * batch_size])
                batch = images[idx]
                if transform == "randomise":
                    batch = randomise_intensities(batch, rng, labels=labels[idx], bands=cfg["dr_bands"],
                                                  monotone_prob=cfg["dr_monotone_prob"])
                x = _to_input(batch, device, channels_last)
                y = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
                if cfg["augment"]:
                    x, y = augment_batch(x, y, rng)
                with _autocast(device, use_amp):
                    logits = model(x)
                loss = soft_dice_loss(logits, y, cfg["dice_background"], cfg["dice_smooth"])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            val = evaluate(model, val_images, val_labels, int(cfg["inference_batch"]),
                           cfg["dice_background"], cfg["dice_smooth"], device, use_amp)
            lr_used = stopper.lr
            decision = stopper.step(val["loss"])
            epoch += 1
            epochs_this_call += 1
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val["loss"],
                   "val_dice": val["dice"], "val_dice_L": val["dice_L"], "val_dice_R": val["dice_R"],
                   "lr": lr_used, "seconds": round(time.perf_counter() - t0, 3),
                   "improved": bool(decision["improved"])}
            history.append(row)
            if decision["best"]:
                best_epoch, best_val = epoch, float(val["loss"])
                save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                                 "arch": arch, "config": plain_cfg,
                                 "meta": {**run_meta, "epoch": epoch, "val_loss": val["loss"],
                                          "val_dice": val["dice"]}}, best_path)
            done = decision["stop"] or epoch >= max_epochs
            save_checkpoint(checkpoint_state(), last_path)
            _write_log(history, out_dir / "log.csv")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{val['loss']:.3f}",
                                dice=f"{val['dice']:.3f}", lr=f"{lr_used:.1e}")
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(threads)
    summary = {
        "out_dir": str(out_dir), "best": str(best_path) if best_path.is_file() else None,
        "last": str(last_path), "epochs_run": epoch, "finished": done,
        "stopped_early": bool(done and epoch < max_epochs), "best_epoch": best_epoch,
        "best_val_loss": best_val,
        "best_val_dice": next((r["val_dice"] for r in history if r["epoch"] == best_epoch), None),
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_training": round(sum(r["seconds"] for r in history), 2),
        "device": str(device), **run_meta,
    }
    _atomic_text(json.dumps(_plain(summary), indent=2), out_dir / "summary.json")
    return summary


# ----------------------------------------------------------------------------------------------
# The six models


def model_recipes(profile: dict) -> list[dict]:
    """What each model of the comparison is trained on, in an order where every ``init_from``
    comes first. Paths are relative to the run folder; ``options`` go to :func:`train_model`.

    ``test``: the cohort a model is evaluated on (``MR`` or ``CT``); the test patients are in
    the training summary (``test_patients``; None: the whole cohort).
    """
    cfg = segmentation_config(profile)
    recipes = [
        {"name": "cross_modality", "kind": "cross_modality", "data": "cleaned/training_slices.npz",
         "init_from": None, "options": {}, "test": "MR",
         "title": "Cross-modality (synthetic MR, CT labels)",
         "description": "the paper: registered synthetic MR from the CycleGAN with the CT labels, "
                        "80/20 patient split; tested on every real MR patient"},
        {"name": "ct_only", "kind": "ct_only", "data": "prepared/ct_slices.npz", "init_from": None,
         "options": {}, "test": "CT", "title": "CT only (CT → CT)",
         "description": f"the paper's benchmark: CT with CT labels, {cfg['ct_test_fraction']:.0%} "
                        "of the CT patients held out for testing, the rest split 80/20"},
        {"name": "naive", "kind": "naive", "data": None, "init_from": "ct_only", "options": {},
         "test": "MR", "title": "Naive (CT network on MR)",
         "description": "the CT-only network applied to real MR as it is (no training)"},
    ]
    for fold in range(cfg["oracle_folds"]):
        recipes.append(
            {"name": f"mr_oracle_fold{fold}", "kind": "mr_oracle", "data": "prepared/mr_slices.npz",
             "init_from": None, "options": {"fold": fold}, "test": "MR",
             "title": f"MR oracle (fold {fold + 1}/{cfg['oracle_folds']})",
             "description": "real MR with real MR labels, patient-level "
                            f"{cfg['oracle_folds']}-fold cross-validation: tested on the fold's "
                            "patients, trained (80/20) on the others"})
    recipes.append(
        {"name": "domain_random", "kind": "domain_random", "data": "prepared/ct_slices.npz",
         "init_from": None, "options": {}, "test": "MR", "title": "Domain randomisation (CT)",
         "description": "CT with CT labels, random monotone and non-monotone intensities per "
                        "tissue class, blur, bias and noise (SynthSeg idea); tested on every real "
                        "MR patient"})
    for k in cfg["few_shot_k"]:
        recipes.append(
            {"name": f"few_shot_k{k}", "kind": "few_shot", "data": "prepared/mr_slices.npz",
             "init_from": "cross_modality", "options": {"k": int(k)}, "test": "MR",
             "title": f"Few-shot (cross-modality + {k} MR patient{'s' if k > 1 else ''})",
             "description": f"the cross-modality network fine-tuned on {k} real MR patients' "
                            "labels; tested on the other MR patients"})
    return recipes


#: The models that train (and test) on manual MR contours.
MR_LABEL_KINDS = ("mr_oracle", "few_shot")


def mr_label_shortfall(recipe: dict, annotated: int, profile: dict) -> str | None:
    """Why ``recipe`` cannot be trained with ``annotated`` MR patients having manual contours
    (None: it can). The MR oracle's cross-validation needs a patient per fold and two to train;
    few-shot with k patients needs one more to test on. The paper's method itself needs none."""
    if recipe["kind"] not in MR_LABEL_KINDS:
        return None
    cfg = segmentation_config(profile)
    if recipe["kind"] == "mr_oracle":
        needed = max(cfg["oracle_folds"], 2)
    else:
        needed = int(recipe["options"]["k"]) + 1
    if annotated >= needed:
        return None
    return (f"{annotated} MR patient{'s' if annotated != 1 else ''} with manual contours; "
            f"{recipe['title']} needs {needed}")


def usable_recipes(run, recipes=None) -> tuple[list[dict], dict[str, str]]:
    """The recipes of a run (:func:`model_recipes`, or ``recipes``) that its MR cohort can train,
    and the others with the reason (:func:`mr_label_shortfall`); counts the annotated MR patients
    of ``prepared/mr_slices.npz`` only when a recipe needs MR labels."""
    recipes = model_recipes(run.profile) if recipes is None else list(recipes)
    if not any(r["kind"] in MR_LABEL_KINDS for r in recipes):
        return recipes, {}
    path = run.root / "prepared" / "mr_slices.npz"
    if not path.is_file():  # nothing prepared yet: the caller's own checks say what is missing
        return recipes, {}
    arrays = read_slices(path, "prepared MR slices", ("image", "patient"))
    annotated = len(annotated_patients(arrays))
    skipped = {}
    for recipe in recipes:
        reason = mr_label_shortfall(recipe, annotated, run.profile)
        if reason:
            skipped[recipe["name"]] = reason
    # a model that starts from a skipped one is skipped too
    for recipe in recipes:
        if recipe["init_from"] in skipped and recipe["name"] not in skipped:
            skipped[recipe["name"]] = f"starts from {recipe['init_from']}, not trained"
    return [r for r in recipes if r["name"] not in skipped], skipped


def train_model(kind: str, data, out_dir: str | Path, settings: dict, init=None, *,
                fold: int | None = None, k: int | None = None, resume: bool = False,
                device=None, progress: bool = True, name: str | None = None,
                stop_after_epochs: int | None = None) -> dict:
    """Train one model of the comparison (see :func:`model_recipes`); returns its summary.

    ``kind``: cross_modality (``data``: the cleaned synthetic-MR slices), ct_only (CT slices;
    tested on held-out CT patients), naive (no training: ``init`` is the ct_only checkpoint,
    copied with kind naive), mr_oracle (MR slices, ``fold`` of the cross-validation), domain_random
    (CT slices, randomised intensities), few_shot (MR slices, ``k`` patients, ``init``: the
    cross-modality checkpoint). ``data``: a ``.npz`` path or a dict of arrays. ``settings``: the
    profile. The summary's ``test_patients`` lists who the model may be tested on (None: the
    whole ``test_modality`` cohort).
    """
    if kind not in KINDS:
        raise CrossmodError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    cfg = segmentation_config(settings)
    seed = training_seed(settings)
    out_dir = Path(out_dir)
    name = name or {"mr_oracle": f"mr_oracle_fold{fold}", "few_shot": f"few_shot_k{k}"}.get(kind, kind)
    meta = {"kind": kind, "name": name, "profile": settings.get("name") if isinstance(settings, dict) else None}

    if kind == "naive":
        if init is None:
            raise CrossmodError("naive: give init, the ct_only checkpoint (naive is not trained)")
        ckpt = load_checkpoint(init)
        ckpt["meta"] = {**ckpt.get("meta", {}), **meta, "model_from": str(init),
                        "test_modality": "MR", "test_patients": None}
        save_checkpoint(ckpt, out_dir / "best.pt")
        summary = {"out_dir": str(out_dir), "best": str(out_dir / "best.pt"), "trained": False,
                   "epochs_run": 0, "seconds": 0.0, **_plain(ckpt["meta"])}
        _atomic_text(json.dumps(_plain(summary), indent=2), out_dir / "summary.json")
        return summary

    arrays, _ = _as_arrays(data)
    ids = _unique(arrays["patient"])
    options = {}
    if kind in ("cross_modality", "domain_random"):
        test_modality, test_patients = "MR", None
        pool = ids
    elif kind == "ct_only":
        held = ct_test_patients(ids, cfg["ct_test_fraction"], seed)
        pool = sorted(set(ids) - set(held))
        test_modality, test_patients = "CT", held
    elif kind == "mr_oracle":
        ids = _unique(annotated_patients(arrays))  # only manual MR contours can train or test it
        folds = oracle_folds(ids, cfg["oracle_folds"], seed)
        if fold is None or not 0 <= fold < len(folds):
            raise CrossmodError(f"mr_oracle: fold must be in 0..{len(folds) - 1}, got {fold!r}")
        test_patients = folds[fold]
        pool = sorted(set(ids) - set(test_patients))
        test_modality = "MR"
    else:  # few_shot
        if k is None:
            raise CrossmodError("few_shot: give k, the number of MR patients to fine-tune with")
        if init is None:
            raise CrossmodError("few_shot: give init, the cross-modality checkpoint to fine-tune")
        every = ids  # unannotated MR patients are not fine-tuned on, but are predicted
        ids = _unique(annotated_patients(arrays))
        pool = few_shot_patients(ids, int(k), seed)
        test_modality, test_patients = "MR", sorted(set(every) - set(pool))
        largest = max([int(k)] + [v for v in cfg["few_shot_k"] if v <= len(ids)])
        meta["common_test_patients"] = sorted(set(every) - set(few_shot_patients(ids, largest, seed)))
        options = {"learning_rate": cfg["few_shot_lr"], "epochs": cfg["few_shot_epochs"]}

    if kind == "few_shot":
        split = {"train": pool, "val": []}  # k patients: all train, validation on their slices
    else:
        train_ids, val_ids = split_patients(pool, cfg["val_fraction"], seed)
        split = {"train": train_ids, "val": val_ids}
    meta.update({"test_modality": test_modality, "test_patients": test_patients,
                 "fold": fold, "k": k})
    return train_unet(arrays, out_dir, settings, seed=seed, init=init, resume=resume, split=split,
                      transform="randomise" if kind == "domain_random" else None, meta=meta,
                      device=device, progress=progress, stop_after_epochs=stop_after_epochs,
                      **options)


def train_recipe(recipe: dict, run_root: str | Path, settings: dict, **kwargs) -> dict:
    """:func:`train_model` for one entry of :func:`model_recipes` inside a run folder
    (``<run>/model/<name>/``; ``init_from`` is ``<run>/model/<init_from>/best.pt``)."""
    run_root = Path(run_root)
    init = run_root / "model" / recipe["init_from"] / "best.pt" if recipe["init_from"] else None
    data = run_root / recipe["data"] if recipe["data"] else None
    return train_model(recipe["kind"], data, run_root / "model" / recipe["name"], settings,
                       init=init, name=recipe["name"], **recipe["options"], **kwargs)


# ----------------------------------------------------------------------------------------------
# Inference (SimpleITK/scipy imported inside the functions)


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
        keys = ("pixel_mm", "crop", "mr_upper_percentile", "ct_window", "head_threshold")
        differ = [k for k in keys if recorded.get(k) != given.get(k)]
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
                label_path = output_dir / f"{name}_labels.nii.gz"
                write_image(sitk.Cast(labels, sitk.sitkUInt8), label_path)
            if "rtstruct" in outputs:
                from .dicom import write_rtstruct

                rt_path = write_rtstruct(masks_from_labels(labels), case.image,
                                         output_dir / f"{name}_RTSTRUCT.dcm")
            if "seg" in outputs:
                from .dicom import write_seg

                seg_path = write_seg(masks_from_labels(labels), case.image, case.source,
                                     output_dir / f"{name}_SEG.dcm")
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


# ----------------------------------------------------------------------------------------------
# A whole run: train every model of the comparison, then contour every test patient


def train_run(run, *, kinds=None, progress: bool = False, resume: bool = True, device=None,
              log=None) -> pd.DataFrame:
    """Train the models of :func:`model_recipes` for a run folder (``<run>/model/<name>/``).

    ``kinds``: only these kinds (and whatever they start from); default all. A model whose
    ``summary.json`` exists and records the same settings is not trained again (``resume``:
    an interrupted one continues from its ``last.pt``). Returns one row per model: name, kind,
    title, epochs run, best epoch, best validation loss and Dice, seconds, test cohort.
    """
    import pandas as pd

    profile = run.profile
    recipes = model_recipes(profile)
    if kinds is not None:
        wanted = {r["name"] for r in recipes if r["kind"] in set(kinds)}
        for recipe in reversed(recipes):  # pull in what a wanted model starts from
            if recipe["name"] in wanted and recipe["init_from"]:
                wanted.add(recipe["init_from"])
        recipes = [r for r in recipes if r["name"] in wanted]
    for recipe in recipes:
        if recipe["data"]:
            run.require(*Path(recipe["data"]).parts[:1], Path(recipe["data"]).name)
    recipes, skipped = usable_recipes(run, recipes)
    settings_text = json.dumps(_plain(segmentation_config(profile)), sort_keys=True)
    rows = []
    for name, reason in skipped.items():
        if log:
            log(f"not training {name}: {reason}")
        shutil.rmtree(run.root / "model" / name, ignore_errors=True)  # a stale model would be predicted
    for recipe in recipes:
        out_dir = run.root / "model" / recipe["name"]
        summary_path, stamp_path = out_dir / "summary.json", out_dir / "inputs.json"
        # What the model is a function of: settings, training data and starting checkpoint. A
        # re-run of an earlier stage changes the data, so the model is trained again from scratch.
        inputs = {"settings": settings_text,
                  "data": _file_digest(run.root / recipe["data"]) if recipe["data"] else None,
                  "init": _file_digest(run.root / "model" / recipe["init_from"] / "best.pt")
                  if recipe["init_from"] else None}
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if stamp != inputs or summary is None or not (out_dir / "best.pt").is_file():
            if log:
                log(f"training {recipe['name']} ...")
            continuing = resume and stamp == inputs  # an interrupted run of the same inputs
            if not continuing:
                for stale in ("last.pt", "best.pt", "summary.json", "log.csv"):
                    (out_dir / stale).unlink(missing_ok=True)
            _atomic_text(json.dumps(inputs), stamp_path)
            summary = train_recipe(recipe, run.root, profile, resume=continuing, device=device,
                                   progress=progress)
        rows.append({"name": recipe["name"], "kind": recipe["kind"], "title": recipe["title"],
                     "trained": summary.get("trained", True),
                     "epochs_run": summary.get("epochs_run"), "best_epoch": summary.get("best_epoch"),
                     "best_val_loss": summary.get("best_val_loss"),
                     "best_val_dice": summary.get("best_val_dice"),
                     "seconds": summary.get("seconds"), "test": recipe["test"],
                     "test_patients": summary.get("test_patients"), "skipped": ""})
    for recipe in model_recipes(profile):
        if recipe["name"] in skipped:
            rows.append({"name": recipe["name"], "kind": recipe["kind"], "title": recipe["title"],
                         "trained": False, "test": recipe["test"], "skipped": skipped[recipe["name"]]})
    return pd.DataFrame(rows)


def _file_digest(path: Path) -> str:
    import hashlib

    if not path.is_file():
        raise CrossmodError(f"{path}: missing; run the earlier notebook first")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _method_name(recipe: dict) -> str:
    """The name a model's predictions go under: the oracle's folds merge into one method."""
    return "mr_oracle" if recipe["kind"] == "mr_oracle" else recipe["name"]


PREDICTION_COLUMNS = ("model", "title", "patient", "modality", "labels", "labels_lcc", "reference",
                      "seconds", "predict_seconds", "device", "common")


def predict_run(run, *, progress: bool = False, device=None, models=None) -> pd.DataFrame:
    """Contour every test patient of every trained model of a run; the stage ``predictions/``.

    For each model of :func:`model_recipes` (its ``model/<name>/best.pt`` and ``summary.json``
    must exist): the patients it may be tested on (``test_patients`` of its summary, or its whole
    test cohort), each read from the run's raw cohort, preprocessed as its training data,
    predicted and written on the native grid, raw and with the largest-component
    post-processing: ``predictions/<method>/<patient>_labels.nii.gz`` and ``..._labels_lcc.nii.gz``
    (0 background, 1 Parotid_L, 2 Parotid_R). ``models``: only these model names (e.g. the
    convergence study's ``cross_modality``, ``domain_random``, ``ct_only``). The manual contours of the same patients go to
    ``predictions/reference/<modality>/<patient>_labels.nii.gz``, on the same grid. The oracle's
    folds are one method, ``mr_oracle`` (each patient predicted by the fold that did not see it).

    Writes ``predictions/index.csv`` (columns :data:`PREDICTION_COLUMNS`; paths relative to the
    run folder; ``seconds``: preprocess + predict + post-process + write of that patient, plus its
    read time; ``predict_seconds``: the network alone; ``device``: where it ran; ``common``: the
    MR patients every MR method was tested on, for paired comparisons)
    and returns it as a DataFrame.
    """
    import pandas as pd
    import SimpleITK as sitk

    from .io import write_image, write_label_map
    from .preparation import cohort_sources
    from .runs import write_json

    profile = run.profile
    recipes = model_recipes(profile)
    if models is not None:
        unknown = sorted(set(models) - {r["name"] for r in recipes})
        if unknown:
            raise CrossmodError(f"predict_run: no model recipe named {', '.join(unknown)}")
        recipes = [r for r in recipes if r["name"] in set(models)]
    recipes, skipped = usable_recipes(run, recipes)  # too few manual MR contours to train them
    missing = [r["name"] for r in recipes if not (run.root / "model" / r["name"] / "best.pt").is_file()]
    if missing:
        raise CrossmodError(f"{run.root / 'model'}: no trained model for {', '.join(missing)}; "
                            "run chapter 4 (train_run) first")
    sources = cohort_sources(run, progress=False)
    items = {modality: dict(zip(source.patient_ids(), source.items))
             for modality, source in sources.items()}
    out_root = run.stage("predictions")
    cache: dict = {}

    def case_of(modality: str, patient: str):
        key = (modality, patient)
        if key not in cache:
            if patient not in items[modality]:
                raise CrossmodError(f"{modality} cohort: test patient {patient!r} not found "
                                    f"(cohort: {sources[modality].root})")
            t0 = time.perf_counter()
            case = sources[modality].read(items[modality][patient])
            read_s = time.perf_counter() - t0
            reference = out_root / "reference" / modality / f"{patient}_labels.nii.gz"
            if case.structures:
                write_label_map(case.structures, case.image, reference)
            else:  # an unannotated patient: predicted, not evaluated
                reference.unlink(missing_ok=True)
                reference = None
            cache.clear()  # one patient in memory at a time (patients are visited model by model)
            cache[key] = (case, read_s, reference)
        return cache[key]

    rows = []
    tasks = []
    for recipe in recipes:
        summary = json.loads((run.root / "model" / recipe["name"] / "summary.json").read_text())
        patients = summary.get("test_patients") or list(items[recipe["test"]])
        tasks += [(recipe, patient) for patient in patients]
    # Visit patients in order so that each is read once and all its models run together.
    tasks.sort(key=lambda t: (t[0]["test"], t[1]))
    iterator = tasks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(tasks, desc="predict", unit="case")
    models: dict = {}
    for recipe, patient in iterator:
        case, read_s, reference = case_of(recipe["test"], patient)
        if recipe["name"] not in models:
            models[recipe["name"]] = load_model(run.root / "model" / recipe["name"] / "best.pt",
                                                resolve_device(device) if device else "cpu")
        method = _method_name(recipe)
        t0 = time.perf_counter()
        steps: dict = {}
        maps = predict_label_maps(models[recipe["name"]], case, profile, modality=recipe["test"],
                                  device=device, timings=steps)
        paths = {}
        for key, suffix in (("raw", ""), ("lcc", "_lcc")):
            path = out_root / method / f"{patient}_labels{suffix}.nii.gz"
            write_image(sitk.Cast(maps[key], sitk.sitkUInt8), path)
            paths[key] = path
        seconds = read_s + time.perf_counter() - t0
        rows.append({"model": method,
                     "title": "MR oracle (cross-validated)" if method == "mr_oracle" else recipe["title"],
                     "patient": patient, "modality": recipe["test"],
                     "labels": str(paths["raw"].relative_to(run.root)),
                     "labels_lcc": str(paths["lcc"].relative_to(run.root)),
                     "reference": str(reference.relative_to(run.root)) if reference else "",
                     "seconds": seconds,
                     "predict_seconds": steps.get("predict"),
                     "device": str(next(models[recipe["name"]].parameters()).device)})
    index = pd.DataFrame(rows, columns=[c for c in PREDICTION_COLUMNS if c != "common"])
    mr = index[index["modality"] == "MR"]
    common = set(mr["patient"])
    for _, group in mr.groupby("model"):
        common &= set(group["patient"])
    index["common"] = (index["modality"] == "MR") & index["patient"].isin(common)
    index = index.sort_values(["modality", "model", "patient"]).reset_index(drop=True)
    tmp = out_root / "index.csv.tmp"
    index.to_csv(tmp, index=False)
    tmp.replace(out_root / "index.csv")
    mr_patients = mr.drop_duplicates("patient")
    write_json({"models": sorted(index["model"].unique()), "common_mr_patients": sorted(common),
                "postprocess_lcc": bool(segmentation_config(profile)["postprocess_lcc"]),
                "mr_patients": int(len(mr_patients)),
                "mr_patients_annotated": int((mr_patients["reference"] != "").sum()),
                "skipped_models": skipped},
               out_root / "summary.json")
    return index


def training_logs(run) -> pd.DataFrame:
    """The per-epoch logs of a run's trained models, stacked (column ``model`` + :data:`LOG_COLUMNS`)."""
    import pandas as pd

    frames = []
    for recipe in model_recipes(run.profile):
        path = run.root / "model" / recipe["name"] / "log.csv"
        if path.is_file() and path.stat().st_size:
            frame = pd.read_csv(path)
            frame.insert(0, "model", recipe["name"])
            frames.append(frame)
    if not frames:
        raise CrossmodError(f"{run.root / 'model'}: no training logs; run train_run first")
    return pd.concat(frames, ignore_index=True)


def prediction_examples(run, patient: str | None = None, models=None) -> dict:
    """One axial MR slice with the manual and predicted contours of each method, for a figure.

    ``patient``: default the first MR patient with manual contours every MR method was tested
    on (else the first with manual contours, else the first). The slice is the one with the
    largest manual parotid area (no manual contours: the largest predicted area of the first
    method). Returns ``{"patient", "slice", "image" (2D float), "spacing" (row, col mm),
    "reference" (2D labels; zeros when unannotated), "annotated", "predictions": {method: 2D
    labels}, "titles": {method: title}, "box": (y0, y1, x0, x1) around every contour}``, all on
    the native MR grid.
    """
    import SimpleITK as sitk

    from .evaluation import read_prediction_index
    from .preparation import cohort_sources

    index_path = run.require("predictions", "index.csv") / "index.csv"
    index = read_prediction_index(index_path)
    mr = index[index["modality"] == "MR"]
    if mr.empty:
        raise CrossmodError(f"{index_path}: no MR predictions")
    if patient is None:
        annotated = mr[mr["reference"] != ""]
        common = annotated[annotated["common"]]
        patient = min((common if len(common) else annotated if len(annotated) else mr)["patient"])
    rows = mr[mr["patient"] == patient]
    if rows.empty:
        raise CrossmodError(f"{index_path}: no MR predictions for patient {patient!r}")
    if models is not None:
        rows = rows[rows["model"].isin(models)]
    order = list(dict.fromkeys(_method_name(r) for r in model_recipes(run.profile)))
    rows = rows.assign(_order=rows["model"].map({m: i for i, m in enumerate(order)})).sort_values("_order")
    source = cohort_sources(run, progress=False)["MR"]
    item = dict(zip(source.patient_ids(), source.items))[patient]
    mr_image = source.read(item).image
    image = sitk.GetArrayFromImage(mr_image).astype(np.float32)
    volumes = {row["model"]: sitk.GetArrayFromImage(sitk.ReadImage(str(run.root / row["labels"])))
               for _, row in rows.iterrows()}
    reference_path = rows.iloc[0]["reference"]
    annotated = bool(reference_path)
    if annotated:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(run.root / reference_path)))
    else:
        reference = np.zeros(image.shape, dtype=np.uint8)
    area_of = reference if annotated else next(iter(volumes.values()))
    z = int(np.argmax((area_of > 0).sum(axis=(1, 2))))
    predictions = {model: volume[z] for model, volume in volumes.items()}
    titles = dict(zip(rows["model"], rows["title"]))
    union = (reference[z] > 0) | np.any([p > 0 for p in predictions.values()], axis=0)
    spacing = mr_image.GetSpacing()
    pad = int(60 / spacing[1])  # the parotid region: 6 cm around the contours
    if union.any():
        ys, xs = np.nonzero(union)
        box = (max(ys.min() - pad, 0), min(ys.max() + pad, image.shape[1]),
               max(xs.min() - pad, 0), min(xs.max() + pad, image.shape[2]))
    else:
        box = (0, image.shape[1], 0, image.shape[2])
    return {"patient": patient, "slice": z, "image": image[z], "spacing": (spacing[1], spacing[0]),
            "reference": reference[z], "annotated": annotated, "predictions": predictions,
            "titles": titles, "box": tuple(int(v) for v in box)}


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


# ----------------------------------------------------------------------------------------------
# Command line: python -m crossmod_lib.segmentation train|predict ...


def _read_config(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise CrossmodError(f"{p}: config file not found")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as exc:  # noqa: BLE001
        raise CrossmodError(f"{p}: cannot read config ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(data, dict):
        raise CrossmodError(f"{p}: the config must be a mapping (a profile or its segmentation block)")
    return data if "segmentation" in data else {"segmentation": data}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossmod_lib.segmentation",
        description="Train the parotid U-Net from .npz slices, or contour MR volumes.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a slices .npz (numpy + torch only)")
    p.add_argument("--slices", required=True, help=".npz with image, labels, patient")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.csv)")
    p.add_argument("--config", help="JSON/YAML: a resolved profile or its segmentation block")
    p.add_argument("--kind", default="cross_modality", choices=[k for k in KINDS if k != "naive"])
    p.add_argument("--init", help="checkpoint to start from (fine-tuning)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--fold", type=int, help="mr_oracle: cross-validation fold")
    p.add_argument("--k", type=int, help="few_shot: number of MR patients")
    p.add_argument("--device", help="auto, cpu or cuda (default: the config's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    q = sub.add_parser("predict", help="contour MR volume(s) with a trained model")
    q.add_argument("--model", required=True)
    q.add_argument("--input", required=True)
    q.add_argument("--output", required=True)
    q.add_argument("--config", help="JSON/YAML profile (preprocessing when the model has none)")
    q.add_argument("--rtstruct", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = _read_config(args.config)
        if args.command == "train":
            summary = train_model(args.kind, args.slices, args.out, settings, init=args.init,
                                  fold=args.fold, k=args.k, resume=args.resume,
                                  device=args.device, progress=not args.quiet)
            print(json.dumps({k: summary.get(k) for k in (
                "best", "epochs_run", "best_epoch", "best_val_loss", "best_val_dice", "seconds")}))
        else:
            rows = predict_path(args.model, args.input, args.output, settings, args.rtstruct)
            for row in rows:
                print(row["labels"] + (f"  {row['rtstruct']}" if row["rtstruct"] else ""))
    except CrossmodError as exc:
        print(f"crossmod: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

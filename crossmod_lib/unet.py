"""Paper section 2.E, Fig. 5: the 2D U-Net, its settings, size (parameters, FLOPs) and checkpoints.

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


This module imports only numpy and torch (the training runs on a bare GPU machine).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .defaults import section_defaults
from .errors import CrossmodError
from .training import read_checkpoint, save_checkpoint  # noqa: F401 (save_checkpoint: part of the U-Net API)

CLASSES = ("background", "Parotid_L", "Parotid_R")
STRUCTURES = CLASSES[1:]
CHECKPOINT_FORMAT = "crossmod-unet-1"

# The paper's settings are the ``segmentation`` block of ``profiles/full.yaml``, the one place they
# are written; ``DEFAULTS`` reads it on first use (None without PyYAML: a bare GPU machine's JSON
# config comes complete), so importing this module needs only torch and numpy.


def __getattr__(name: str):
    if name == "DEFAULTS":
        return section_defaults("segmentation")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_NORMS = ("batch", "instance", "none")

# ----------------------------------------------------------------------------------------------
# Settings


def segmentation_config(settings: dict | None) -> dict:
    """The segmentation settings with defaults: ``settings`` is a profile (its ``segmentation``
    block is used), the block itself, or None (the paper's values). Bad values: one-line error."""
    defaults = section_defaults("segmentation")
    if not settings:
        block = {}
    elif "segmentation" in settings:
        block = settings["segmentation"] or {}
    elif set(settings) & set(defaults if defaults is not None else settings):
        block = settings
    else:
        block = {}
    if not isinstance(block, dict):
        raise CrossmodError("segmentation: must be a mapping of settings")
    defaults = defaults if defaults is not None else block  # no PyYAML: the block comes complete
    unknown = sorted(k for k in block if k not in defaults)
    if unknown:
        raise CrossmodError(f"segmentation: unknown setting(s) {', '.join(unknown)}")
    cfg = copy.deepcopy(defaults)
    cfg.update(copy.deepcopy(block))
    try:
        _check_config(cfg)
    except KeyError as missing:  # only without PyYAML: nothing to fill the gap from
        raise CrossmodError(f"segmentation.{missing.args[0]}: missing, and without PyYAML there is no "
                            "full.yaml default; write the config complete (segmentation_config on a "
                            "machine with PyYAML)") from None
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
    need(cfg["loss"] in ("dice", "dice_ce"), f"loss must be dice or dice_ce, got {cfg['loss']!r}")
    need(cfg["lr_schedule"] in ("plateau", "cosine"),
         f"lr_schedule must be plateau or cosine, got {cfg['lr_schedule']!r}")
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
    need(isinstance(cfg["augment"], bool), f"augment must be true or false, got {cfg['augment']!r}")
    need(isinstance(cfg["cross_modality_appearance"], bool),
         f"cross_modality_appearance must be true or false, got {cfg['cross_modality_appearance']!r}")
    need(cfg["seed"] is None or (isinstance(cfg["seed"], int) and not isinstance(cfg["seed"], bool)),
         f"seed must be null (the profile's seed) or an integer, got {cfg['seed']!r}")
    need(isinstance(cfg["cpu_bf16"], bool),
         f"cpu_bf16 must be true or false, got {cfg['cpu_bf16']!r}")
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
# Checkpoints


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    """Read a U-Net checkpoint (:func:`crossmod_lib.training.read_checkpoint`), checking its format."""
    ckpt = read_checkpoint(path, device)
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



# ----------------------------------------------------------------------------------------------
# Tensors on a device


def _to_input(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32)
    x = (x / 255.0).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (the caller decides: :func:`training_bf16`
    for training, the GPU only for predictions), else fp32."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def training_bf16(cfg: dict, device: torch.device) -> bool:
    """Whether a U-Net trains under bf16 autocast (with channels_last) on ``device``: on a GPU
    with ``amp``; on a CPU with ``cpu_bf16``, and only where the CPU computes bf16 natively
    (emulated bf16 is slower than fp32)."""
    if device.type == "cuda":
        return bool(cfg["amp"])
    if device.type == "cpu" and cfg.get("cpu_bf16"):
        from .cyclegan import cpu_has_native_bf16

        return cpu_has_native_bf16()
    return False


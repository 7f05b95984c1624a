"""What the two trainings share (the CycleGAN of section 2.C, the U-Net of section 2.E): writing
and reading checkpoints, the per-epoch / per-iteration log as CSV, and the progress bar.

torch, numpy and the standard library only: both trainings run on a bare GPU machine.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from .errors import CrossmodError


def save_checkpoint(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary sibling, flushed to disk, then renamed over ``path``: a reader
    sees the old file or the new one, never a partial one; nothing is left behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, device="cpu"):
    """A checkpoint read with ``weights_only=True`` (tensors and plain values only, never code).
    A missing, truncated or foreign file: one-line :class:`CrossmodError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many types
        # torch's own reasons ("pop from empty list", "Invalid argument") say little: name the
        # likely cause first, keep theirs for the curious
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CrossmodError(f"{path}: cannot read checkpoint: not a PyTorch checkpoint, or a "
                            f"truncated or corrupt one ({reason})") from None


def write_log(rows: list[dict], columns, path: str | Path) -> None:
    """The training log as CSV (one row per epoch or logged iteration), rewritten atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def progress_bar(total: int, initial: int = 0, desc: str = "train", unit: str = "it", enabled: bool = True,
                 leave: bool = True):
    """A tqdm bar for a training; None when ``enabled`` is false or tqdm is not installed (a bare
    GPU machine), so callers test ``bar is not None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave)

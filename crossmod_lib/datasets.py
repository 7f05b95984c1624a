"""Public datasets: the manifest, downloading, and readers from each layout to :class:`~crossmod_lib.io.Case`.

Four parts:

- **Manifest** (``data_manifest.yaml`` at the repository root): what each dataset is, its licence,
  citation and landing page, and, where its bytes are fixed, the files ``fetch`` can download and
  verify. :func:`load_manifest`, :func:`list_datasets`, :func:`format_dataset_list`.
- **Fetch**: :func:`fetch` downloads an entry's fixed files with pooch, checks their SHA-256 and
  extracts archives safely (no member may land outside the destination) into a temporary folder
  that is renamed into place only once everything succeeded.
- **Readers** to ``Case`` (image + ``Parotid_L``/``Parotid_R`` uint8 masks on the image grid):
  :func:`read_openkbp_case` (OpenKBP sparse CSV), :func:`read_deepmind_scan` /
  :func:`deepmind_pairs` (DeepMind two-observer NRRDs), :func:`read_pddca_case` (MICCAI 2015),
  :func:`read_nnunet_dataset` / :func:`write_nnunet_dataset` (nnU-Net v2 raw layout, NIfTI).
  A mask on another grid than its image is resampled (nearest neighbour) when both cover the same
  region within half a voxel, refused otherwise (:func:`conform_mask`).
- **Cohorts**: :func:`data_root` (option > ``CROSSMOD_DATA`` > ``../shared/data`` beside the
  repository) and :func:`cohort_cases` / :func:`load_cohort` for a profile's cohort definition.

OpenKBP geometry (checked on the shared copy, 160 patients): the flat index ravels a 128^3 array
in C order whose axes are (a0, a1, a2) = (anterior -> posterior, patient right -> left,
superior -> inferior): the spinal cord spans a2 and the brainstem lies at lower a2 than the cord,
the mandible lies at lower a0 than the cord, the ``LeftParotid`` mask at higher a1 than the right.
The reader returns the LPS array ``[z, y, x] = flat.reshape(128, 128, 128).transpose(2, 0, 1)[::-1]``
with identity direction (x to patient left, y posterior, z superior). Stored CT values are HU + 1000
with absent voxels 0 (air, -1000 HU); on the shared data fat peaks near -100 HU, soft tissue near
+40 HU and bone reaches well over +1000 HU. OpenKBP records no patient position: the origin is 0.

Every user-facing error is a one-line :class:`~crossmod_lib.errors.CrossmodError` naming the file.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml

from .errors import CrossmodError
from .io import PAROTIDS, Case, find_image, grid_differences, list_cases, read_image

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_PATH = REPOSITORY_ROOT / "data_manifest.yaml"
DATA_ROOT_ENV = "CROSSMOD_DATA"

REQUIRED_KEYS = ("description", "modality", "format", "licence", "citation", "landing_page",
                 "source", "expected_files")
ARCHIVE_TYPES = ("zip", "tar", "tar.gz", "tgz")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _one_line(text: object, limit: int = 300) -> str:
    """Any message squeezed onto one line (and shortened)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Manifest


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The datasets of ``data_manifest.yaml`` (``{name: entry}``), each entry checked.

    Each entry must have the keys of :data:`REQUIRED_KEYS` (``landing_page`` may be null, for the
    generated phantom); an optional ``files:`` list holds items ``{url, sha256, archive, name,
    note}``: ``sha256`` is 64 hex digits for a fixed file, or null with a ``note`` saying why not.
    """
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        raise CrossmodError(f"{path}: dataset manifest not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CrossmodError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict) or not data["datasets"]:
        raise CrossmodError(f"{path}: expected a mapping 'datasets:' of dataset entries")
    entries = {}
    for name, entry in data["datasets"].items():
        entries[str(name)] = _check_entry(path, str(name), entry)
    return entries


def _check_entry(path: Path, name: str, entry) -> dict:
    where = f"{path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise CrossmodError(f"{where}: expected a mapping of fields")
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise CrossmodError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("description", "format", "licence", "citation", "source"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise CrossmodError(f"{where}: field {key} must be non-empty text")
    modality = entry["modality"]
    if isinstance(modality, str):
        modality = [modality]
    if not isinstance(modality, list) or not modality or not all(isinstance(m, str) for m in modality):
        raise CrossmodError(f"{where}: field modality must be a name or a list of names")
    landing = entry["landing_page"]
    if landing is not None and not (isinstance(landing, str) and re.match(r"^https?://", landing)):
        raise CrossmodError(f"{where}: field landing_page must be an http(s) address or null")
    expected = entry["expected_files"]
    if not isinstance(expected, list) or not all(isinstance(e, str) for e in expected):
        raise CrossmodError(f"{where}: field expected_files must be a list of path patterns")
    files = entry.get("files") or []
    if not isinstance(files, list):
        raise CrossmodError(f"{where}: field files must be a list")
    checked = []
    for number, item in enumerate(files, start=1):
        at = f"{where}: files item {number}"
        if not isinstance(item, dict):
            raise CrossmodError(f"{at}: expected a mapping with url, sha256, archive")
        for key in ("url", "sha256", "archive"):
            if key not in item:
                raise CrossmodError(f"{at}: missing field {key}")
        if not isinstance(item["url"], str) or not re.match(r"^https?://", item["url"]):
            raise CrossmodError(f"{at}: url must be an http(s) address")
        sha = item["sha256"]
        if sha is None:
            if not item.get("note"):
                raise CrossmodError(f"{at}: sha256 is null, so a note must say why the file is not fixed")
        elif not (isinstance(sha, str) and _SHA256.match(sha.lower())):
            raise CrossmodError(f"{at}: sha256 must be 64 hexadecimal digits or null")
        archive = item["archive"]
        if archive is not None and archive not in ARCHIVE_TYPES:
            raise CrossmodError(f"{at}: archive must be one of {', '.join(ARCHIVE_TYPES)} or null, "
                                f"not {archive!r}")
        name_field = item.get("name")
        if name_field is not None and (not isinstance(name_field, str) or not _is_plain_name(name_field)):
            raise CrossmodError(f"{at}: name must be a plain file name")
        checked.append({**item, "sha256": sha.lower() if isinstance(sha, str) else None})
    return {**entry, "modality": modality, "files": checked}


def _entries(manifest: Mapping | None) -> dict[str, dict]:
    if manifest is None:
        return load_manifest()
    if "datasets" in manifest and isinstance(manifest["datasets"], Mapping):
        return dict(manifest["datasets"])
    return dict(manifest)


def _fixed_files(entry: Mapping) -> list[dict]:
    return [f for f in entry.get("files") or [] if f.get("sha256") and f.get("url")]


def list_datasets(manifest: Mapping | None = None, root: str | os.PathLike | None = None) -> list[dict]:
    """One row per dataset: name, modality, licence, how to get it, whether it is under the data root."""
    entries = _entries(manifest)
    try:
        base = data_root(root)
    except CrossmodError:
        base = None
    rows = []
    for name, entry in entries.items():
        modality = entry.get("modality")
        rows.append({
            "name": name,
            "modality": ", ".join(modality) if isinstance(modality, list) else str(modality),
            "licence": _one_line(entry.get("licence", "")),
            "citation": _one_line(entry.get("citation", "")),
            "landing_page": entry.get("landing_page"),
            "fetchable": bool(_fixed_files(entry)),
            "how": (f"crossmod fetch {name}" if _fixed_files(entry)
                    else _one_line(entry.get("manual_download") or f"by hand, see {entry.get('landing_page')}")),
            "present": bool(base is not None and (base / name).is_dir()),
            "description": _one_line(entry.get("description", "")),
        })
    return rows


def format_dataset_list(manifest: Mapping | None = None, root: str | os.PathLike | None = None) -> str:
    """Text for ``crossmod data list``: each dataset with licence, citation, page and how to get it."""
    rows = list_datasets(manifest, root)
    try:
        base = str(data_root(root))
    except CrossmodError:
        base = "(no data root found)"
    lines = [f"Datasets (data root: {base})", ""]
    for row in rows:
        status = "present" if row["present"] else "absent"
        lines.append(f"{row['name']}  [{row['modality']}]  ({status})")
        lines.append(f"  {row['description']}")
        lines.append(f"  licence:  {row['licence']}")
        lines.append(f"  cite:     {row['citation']}")
        if row["landing_page"]:
            lines.append(f"  page:     {row['landing_page']}")
        lines.append(f"  get:      {row['how']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Fetch: pooch download, SHA-256 check, safe extraction


FETCH_RECORD = ".crossmod-fetch.json"


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _url_name(url: str) -> str:
    tail = url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return tail if _is_plain_name(tail) else "download"


def fetch(name: str, dest: str | os.PathLike, manifest: Mapping | None = None,
          progress: bool = True) -> Path:
    """Download dataset ``name``'s fixed files into ``dest/<name>/`` and return that folder.

    Each file is downloaded with :func:`pooch.retrieve` (cached in ``dest/.downloads/``) and its
    SHA-256 checked; archives (zip, tar, tar.gz) are extracted after checking every member stays
    inside the destination. Everything lands in a temporary folder in ``dest`` first and is renamed
    to ``dest/<name>`` only when all files succeeded, so a failure leaves nothing half-done. A
    folder already fetched with the same hashes is returned as it is. An entry without fixed files
    (a portal such as TCIA) is an error that says where to download it by hand.
    """
    import pooch

    entries = _entries(manifest)
    if name not in entries:
        raise CrossmodError(f"dataset {name!r} is not in the manifest (known: {', '.join(sorted(entries))})")
    entry = entries[name]
    fixed = _fixed_files(entry)
    if not fixed:
        how = entry.get("manual_download") or "download it by hand"
        page = entry.get("landing_page")
        notes = "; ".join(_one_line(f.get("note", "")) for f in entry.get("files") or [] if f.get("note"))
        raise CrossmodError(_one_line(
            f"dataset {name!r} has no fixed files to download"
            + (f" ({notes})" if notes else "") + f": {how}" + (f" (see {page})" if page else ""), 600))

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    record = {"dataset": name, "files": [{"url": f["url"], "sha256": f["sha256"]} for f in fixed]}
    if target.exists():
        existing = target / FETCH_RECORD
        if not existing.is_file():
            raise CrossmodError(f"{target}: already exists and was not written by fetch; "
                                "move it away or choose another destination")
        try:
            if json.loads(existing.read_text()).get("files") == record["files"]:
                return target
        except (OSError, ValueError):
            pass  # unreadable record: fetch again and replace

    downloads = dest / ".downloads"
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=dest))
    logger = pooch.get_logger()
    level = logger.level
    if not progress:
        logger.setLevel(logging.WARNING)
    try:
        for item in fixed:
            file_name = item.get("name") or _url_name(item["url"])
            local = _download(pooch, name, item, file_name, downloads, progress)
            subdir = work / item["subdir"] if item.get("subdir") else work
            if item.get("archive"):
                try:
                    extract_archive(local, subdir, item["archive"])
                except CrossmodError:
                    local.unlink(missing_ok=True)  # verified but unusable: do not keep it
                    raise
            else:
                subdir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, subdir / file_name)
        (work / FETCH_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        old = None
        if target.exists():
            old = dest / f".{name}.old-{os.getpid()}"
            target.rename(old)
        work.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        logger.setLevel(level)
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
    return target


def _download(pooch, dataset: str, item: Mapping, file_name: str, folder: Path, progress: bool) -> Path:
    """One verified download (pooch deletes a file whose hash does not match)."""
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    try:
        local = pooch.retrieve(item["url"], known_hash=f"sha256:{item['sha256']}", fname=file_name,
                               path=folder, progressbar=progress)
    except ValueError as exc:
        message = str(exc)
        if "does not match the known hash" in message:
            got = re.search(r"but got ([0-9a-fA-F]+)", message)
            (folder / file_name).unlink(missing_ok=True)
            raise CrossmodError(
                f"dataset {dataset!r}: {file_name} from {item['url']}: SHA-256 mismatch: expected "
                f"{item['sha256']}, got {got.group(1) if got else 'another hash'}; the download "
                "was deleted") from None
        raise CrossmodError(f"dataset {dataset!r}: {file_name}: {_one_line(message)}") from None
    except requests.exceptions.RequestException as exc:
        raise CrossmodError(f"dataset {dataset!r}: cannot download {item['url']} "
                            f"({type(exc).__name__}: {_one_line(exc, 200)})") from None
    except OSError as exc:
        raise CrossmodError(f"dataset {dataset!r}: cannot write {folder / file_name} ({_one_line(exc)})") from None
    return Path(local)


class _VirtualTree:
    """The archive's paths as they will exist on disk, to resolve members through earlier symlinks."""

    def __init__(self) -> None:
        self.links: dict[tuple[str, ...], str] = {}

    def resolve(self, parts: Iterable[str], follow_last: bool = True) -> tuple[str, ...] | None:
        """Resolved parts inside the root, or None when the path escapes it (or loops)."""
        queue = list(parts)
        out: list[str] = []
        hops = 0
        while queue:
            part = queue.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    return None
                out.pop()
                continue
            out.append(part)
            key = tuple(out)
            if key in self.links and (queue or follow_last):
                hops += 1
                if hops > 40:
                    return None
                target = self.links[key]
                if _is_absolute(target):
                    return None
                out.pop()
                queue = _split(target) + queue
        return tuple(out)


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name))


def _split(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _refuse(archive: Path, member: str, why: str) -> CrossmodError:
    return CrossmodError(f"{archive}: member {member!r} {why}; refusing to extract the archive")


def _check_member(archive: Path, tree: _VirtualTree, name: str, kind: str,
                  link: str | None = None) -> tuple[str, ...]:
    """Refuse a member that would land (or point) outside the destination; return where it lands."""
    if _is_absolute(name):
        raise _refuse(archive, name, "has an absolute path")
    parts = _split(name)
    if not parts:
        return ()
    location = tree.resolve(parts, follow_last=False)
    if not location:
        raise _refuse(archive, name, "resolves outside the destination (.. or a symlink pointing out)")
    if kind == "symlink":
        if not link or _is_absolute(link):
            raise _refuse(archive, name, f"is a symlink to an absolute path ({link!r})")
        if tree.resolve(list(location[:-1]) + _split(link)) is None:
            raise _refuse(archive, name, f"is a symlink pointing outside the destination ({link!r})")
        tree.links[location] = link
        return location
    if kind == "hardlink" and (not link or _is_absolute(link) or not tree.resolve(_split(link))):
        raise _refuse(archive, name, f"is a hard link to a path outside the destination ({link!r})")
    if tree.resolve(parts) is None:
        raise _refuse(archive, name, "would be written through a symlink pointing outside the destination")
    return location


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, kind: str | None = None) -> None:
    """Extract a zip or tar(.gz) archive into ``dest``, refusing any member that escapes it.

    Refused (one-line error naming the archive and the member): absolute paths, ``..`` leading out,
    symlinks or hard links pointing out (also through other symlinks of the archive), device files.
    The caller extracts into a temporary folder, so a refusal leaves nothing usable behind; this
    function also removes what it wrote when it refuses.
    """
    archive = Path(archive)
    dest = Path(dest)
    kind = kind or ("zip" if archive.suffix == ".zip" else "tar")
    dest.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(dest))
    try:
        if kind == "zip":
            _extract_zip(archive, dest)
        elif kind in ("tar", "tar.gz", "tgz"):
            _extract_tar(archive, dest)
        else:
            raise CrossmodError(f"{archive}: unknown archive type {kind!r} (zip, tar, tar.gz)")
        _check_extracted(archive, dest)
    except BaseException:
        for entry in set(os.listdir(dest)) - before:
            path = dest / entry
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        raise


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            tree = _VirtualTree()
            plan = []
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0xFFFF
                if stat.S_ISLNK(mode):
                    target = zf.read(info).decode("utf-8", "replace")
                    plan.append((info, _check_member(archive, tree, info.filename, "symlink", target), target))
                elif info.is_dir():
                    plan.append((info, _check_member(archive, tree, info.filename, "dir"), None))
                else:
                    plan.append((info, _check_member(archive, tree, info.filename, "file"), None))
            for info, location, target in plan:
                path = dest.joinpath(*location) if location else dest
                if target is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(target, path)
                elif info.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(path, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as exc:
        raise CrossmodError(f"{archive}: cannot extract zip archive ({_one_line(exc)})") from None


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tf:
            tree = _VirtualTree()
            members = []
            for member in tf.getmembers():
                if member.issym():
                    _check_member(archive, tree, member.name, "symlink", member.linkname)
                elif member.islnk():
                    _check_member(archive, tree, member.name, "hardlink", member.linkname)
                elif member.isdir():
                    _check_member(archive, tree, member.name, "dir")
                elif member.isfile():
                    _check_member(archive, tree, member.name, "file")
                else:
                    raise _refuse(archive, member.name, "is a device, FIFO or other special file")
                members.append(member)
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters; members were checked above
                tf.extractall(dest, members=members)
    except CrossmodError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CrossmodError(f"{archive}: cannot extract tar archive ({_one_line(exc)})") from None


def _check_extracted(archive: Path, dest: Path) -> None:
    """After extraction: every path, links followed, is inside ``dest`` (a last line of defence)."""
    root = os.path.realpath(dest)
    for folder, dirs, files in os.walk(dest):
        for entry in dirs + files:
            real = os.path.realpath(os.path.join(folder, entry))
            if real != root and not real.startswith(root + os.sep):
                rel = os.path.relpath(os.path.join(folder, entry), dest)
                raise _refuse(archive, rel, "resolves outside the destination after extraction")


# ----------------------------------------------------------------------------------------------
# Masks on image grids


def _physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (mm) of the image's voxels, voxel edges included."""
    corners = itertools.product(*[(-0.5, s - 0.5) for s in image.GetSize()])
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c) for c in corners])
    return points.min(axis=0), points.max(axis=0)


def _covers_same_region(a: sitk.Image, b: sitk.Image, tolerance: float) -> bool:
    """Whether ``a``'s voxel box, seen in ``b``'s index space, is ``b``'s box within ``tolerance`` voxels."""
    corners = itertools.product(*[(-0.5, s - 0.5) for s in a.GetSize()])
    indices = np.array([b.TransformPhysicalPointToContinuousIndex(a.TransformContinuousIndexToPhysicalPoint(c))
                        for c in corners])
    low, high = indices.min(axis=0), indices.max(axis=0)
    size = np.asarray(b.GetSize(), dtype=float)
    return bool(np.all(np.abs(low + 0.5) <= tolerance) and np.all(np.abs(high - (size - 0.5)) <= tolerance))


def conform_mask(mask: sitk.Image, image: sitk.Image, path: str | os.PathLike | None = None,
                 tolerance: float = 0.5) -> sitk.Image:
    """``mask`` on ``image``'s grid: as it is when the grids agree, else nearest-neighbour resampled.

    Resampling happens only when both grids cover the same physical region within ``tolerance``
    voxels (half a voxel by default, checked in each grid's own voxels); otherwise the mask was
    drawn on another image, or cropped, and this is a one-line error naming ``path``.
    The pixel type is kept (a label map stays a label map).
    """
    where = str(path) if path is not None else "mask"
    if mask.GetDimension() != image.GetDimension():
        raise CrossmodError(f"{where}: mask is {mask.GetDimension()}D but its image is {image.GetDimension()}D")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise CrossmodError(f"{where}: mask has {mask.GetNumberOfComponentsPerPixel()} components per voxel, "
                            "expected a scalar label image")
    differences = grid_differences(mask, image)
    if not differences:
        return mask
    if not (_covers_same_region(mask, image, tolerance) and _covers_same_region(image, mask, tolerance)):
        m_lo, m_hi = _physical_bounds(mask)
        i_lo, i_hi = _physical_bounds(image)
        fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in v) + ")"
        raise CrossmodError(
            f"{where}: mask grid differs from its image ({'; '.join(differences)}) and covers another "
            f"region (mask {fmt(m_lo)}-{fmt(m_hi)} mm, image {fmt(i_lo)}-{fmt(i_hi)} mm, beyond half a "
            "voxel); refusing to resample")
    return sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())


def _binary(mask: sitk.Image) -> sitk.Image:
    """Nonzero voxels as a uint8 0/1 mask, same grid."""
    out = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    out.CopyInformation(mask)
    return out


def _require_voxels(mask: sitk.Image, where: str, name: str, allow_empty: bool) -> None:
    if not allow_empty and not sitk.GetArrayViewFromImage(mask).any():
        raise CrossmodError(f"{where}: structure {name} is empty (no voxels); pass allow_empty=True to accept it")


# ----------------------------------------------------------------------------------------------
# OpenKBP sparse CSV

OPENKBP_SHAPE = (128, 128, 128)
OPENKBP_HU_OFFSET = 1000.0
OPENKBP_STRUCTURES = {"Parotid_L": "LeftParotid", "Parotid_R": "RightParotid"}


def _openkbp_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".csv", ".csv.gz"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _open_text(path: Path):
    with path.open("rb") as fh:
        compressed = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8", newline="") if compressed else \
        path.open("r", encoding="utf-8", newline="")


def read_sparse_csv(path: str | os.PathLike, with_values: bool,
                    size: int = int(np.prod(OPENKBP_SHAPE))) -> tuple[np.ndarray, np.ndarray | None]:
    """An OpenKBP sparse CSV (plain or gzipped): flat indices and, if ``with_values``, the values.

    Header ``,data``; rows ``flat_index,value`` (CT) or ``flat_index,`` (masks).
    """
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: no such file")
    try:
        with _open_text(path) as fh:
            header = fh.readline().lstrip("\ufeff").strip()
            if [h.strip() for h in header.split(",")][-1:] != ["data"] or header.count(",") != 1:
                shown = header[:40] if header else "an empty file"
                raise CrossmodError(f"{path}: not an OpenKBP sparse CSV (header {shown!r}, expected ',data')")
            try:
                table = pd.read_csv(fh, header=None, dtype=str, skip_blank_lines=True, engine="c",
                                    keep_default_na=False, na_values=[""])
            except pd.errors.EmptyDataError:  # header only: an empty structure
                return np.zeros(0, dtype=np.int64), (np.zeros(0) if with_values else None)
            except pd.errors.ParserError as exc:  # pandas counts lines from the first data row
                found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
                if found:
                    raise CrossmodError(f"{path}: line {int(found.group(2)) + 1}: {found.group(3)} fields, "
                                        "expected 'flat_index,value'") from None
                raise
    except CrossmodError:
        raise
    except (EOFError, OSError, zlib.error, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise CrossmodError(f"{path}: cannot read sparse CSV ({_one_line(exc, 160)})") from None
    if table.shape[1] == 1 and not with_values:  # a mask written without the trailing comma
        table[1] = None
    if table.shape[1] != 2:
        raise CrossmodError(f"{path}: line 2: {table.shape[1]} fields, expected 'flat_index,value'")
    table.columns = ["index", "data"]
    raw = table["index"]
    if raw.isna().any():
        row = int(np.flatnonzero(raw.isna().to_numpy())[0]) + 2
        raise CrossmodError(f"{path}: line {row}: missing voxel index")
    try:
        indices = raw.astype("int64").to_numpy()
    except (ValueError, TypeError):
        bad = next(i for i, v in enumerate(raw) if not re.fullmatch(r"\s*[+-]?\d+\s*", str(v)))
        raise CrossmodError(f"{path}: line {bad + 2}: voxel index {str(raw.iloc[bad])[:30]!r} is not an integer") from None
    outside = (indices < 0) | (indices >= size)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise CrossmodError(f"{path}: line {row + 2}: voxel index {indices[row]} outside the "
                            f"{'x'.join(map(str, OPENKBP_SHAPE))} grid (0..{size - 1})")
    values = None
    if with_values:
        data = pd.to_numeric(table["data"], errors="coerce")
        if data.isna().any():
            row = int(np.flatnonzero(data.isna().to_numpy())[0])
            raise CrossmodError(f"{path}: line {row + 2}: missing or non-numeric value "
                                f"{str(table['data'].iloc[row])[:30]!r}")
        values = data.to_numpy(dtype=np.float64)
    return indices, values


def read_voxel_dimensions(path: str | os.PathLike) -> tuple[float, float, float]:
    """``voxel_dimensions.csv``: three positive voxel sizes in mm, in the array's axis order."""
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: no such file (OpenKBP voxel sizes)")
    try:
        numbers = [float(tok) for tok in re.split(r"[\s,]+", path.read_text(encoding="utf-8").strip()) if tok]
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CrossmodError(f"{path}: cannot read voxel sizes ({_one_line(exc, 120)})") from None
    if len(numbers) != 3 or not all(np.isfinite(v) and v > 0 for v in numbers):
        raise CrossmodError(f"{path}: expected three positive voxel sizes in mm, found {numbers[:6]}")
    return tuple(numbers)  # type: ignore[return-value]


def openkbp_to_lps(flat: np.ndarray) -> np.ndarray:
    """OpenKBP's raveled 128^3 volume as an LPS array ``[z, y, x]`` (z superior, y posterior, x left)."""
    volume = np.asarray(flat).reshape(OPENKBP_SHAPE)  # (a0 ant->post, a1 right->left, a2 sup->inf)
    return np.ascontiguousarray(volume.transpose(2, 0, 1)[::-1])


def _openkbp_image(array: np.ndarray, voxel: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    # voxel_dimensions follow OpenKBP's axes (a0 = y, a1 = x, a2 = z); in-plane sizes are equal in
    # every patient of the shared copy, so only the slice thickness (third value) is certain.
    image.SetSpacing((voxel[1], voxel[0], voxel[2]))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def read_openkbp_case(folder: str | os.PathLike, allow_empty: bool = False,
                      extra_structures: Iterable[str] = ()) -> Case:
    """One OpenKBP patient folder (``ct.csv[.gz]``, ``LeftParotid.csv[.gz]``, ``RightParotid.csv[.gz]``,
    ``voxel_dimensions.csv``) as a Case: int16 HU image (air -1000) and parotid masks, LPS.

    A missing or empty parotid file is an error unless ``allow_empty`` (then a missing one is left
    out of ``structures`` and an empty one kept empty). ``extra_structures`` adds other OpenKBP
    masks by their file stem (``SpinalCord``, ``Mandible``, ...), under that name, when present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CrossmodError(f"{folder}: OpenKBP patient folder not found")
    ct_path = _openkbp_file(folder, "ct")
    if ct_path is None:
        raise CrossmodError(f"{folder}: no ct.csv or ct.csv.gz (OpenKBP patient folder expected)")
    voxel = read_voxel_dimensions(folder / "voxel_dimensions.csv")
    size = int(np.prod(OPENKBP_SHAPE))
    indices, values = read_sparse_csv(ct_path, with_values=True, size=size)
    flat = np.zeros(size, dtype=np.float64)
    flat[indices] = values
    hu = openkbp_to_lps(flat) - OPENKBP_HU_OFFSET
    if np.all(hu == np.round(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        hu = hu.astype(np.int16)
    else:
        hu = hu.astype(np.float32)
    image = _openkbp_image(hu, voxel)

    structures: dict[str, sitk.Image] = {}
    wanted = dict(OPENKBP_STRUCTURES)
    wanted.update({stem: stem for stem in extra_structures})
    for name, stem in wanted.items():
        path = _openkbp_file(folder, stem)
        required = name in OPENKBP_STRUCTURES
        if path is None:
            if required and not allow_empty:
                raise CrossmodError(f"{folder / (stem + '.csv')}: no such file (structure {name}); "
                                    "pass allow_empty=True to accept a patient without it")
            continue
        idx, _ = read_sparse_csv(path, with_values=False, size=size)
        mask = np.zeros(size, dtype=np.uint8)
        mask[idx] = 1
        if required:
            _require_voxels_array(mask, path, name, allow_empty)
        structures[name] = _openkbp_image(openkbp_to_lps(mask), voxel)
    return Case(patient_id=folder.name, image=image, structures=structures, source=folder)


def _require_voxels_array(mask: np.ndarray, where, name: str, allow_empty: bool) -> None:
    if not allow_empty and not mask.any():
        raise CrossmodError(f"{where}: structure {name} is empty (no voxels); pass allow_empty=True to accept it")


# ----------------------------------------------------------------------------------------------
# DeepMind TCIA two-observer contours

DEEPMIND_SPLITS = ("test", "validation")
DEEPMIND_OBSERVERS = ("oncologist", "radiographer")
DEEPMIND_STRUCTURES = {"Parotid_L": "Parotid-Lt", "Parotid_R": "Parotid-Rt"}
DEEPMIND_IMAGE = "CT_IMAGE.nrrd"
REFERENCE_GRID_KEY = "crossmod:reference_grid_only"


@dataclass(frozen=True)
class DeepMindScan:
    """One scan of the DeepMind set: its split and its folder for each observer."""

    scan: str
    split: str
    folders: dict

    def folder(self, observer: str) -> Path:
        return self.folders[observer]


def _deepmind_nrrds(root: str | os.PathLike) -> Path:
    root = Path(root)
    for candidate in (root / "nrrds", root):
        if any((candidate / split).is_dir() for split in DEEPMIND_SPLITS):
            return candidate
    raise CrossmodError(f"{root}: no DeepMind layout (expected nrrds/{{test,validation}}/{{oncologist,"
                        "radiographer}/<scan>/segmentations/)")


def deepmind_scans(root: str | os.PathLike) -> list[DeepMindScan]:
    """The scans under a DeepMind dataset folder (or its ``nrrds/``), sorted by split then name."""
    nrrds = _deepmind_nrrds(root)
    scans: dict[str, DeepMindScan] = {}
    for split in DEEPMIND_SPLITS:
        for observer in DEEPMIND_OBSERVERS:
            base = nrrds / split / observer
            if not base.is_dir():
                continue
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                known = scans.get(folder.name)
                if known is not None and known.split != split:
                    raise CrossmodError(f"{folder}: scan {folder.name} appears in both "
                                        f"{known.split}/ and {split}/")
                if known is None:
                    known = scans[folder.name] = DeepMindScan(folder.name, split, {})
                known.folders[observer] = folder
    if not scans:
        raise CrossmodError(f"{nrrds}: no scan folders under {{test,validation}}/{{oncologist,radiographer}}/")
    return sorted(scans.values(), key=lambda s: (DEEPMIND_SPLITS.index(s.split), s.scan))


def read_deepmind_scan(scan_folder: str | os.PathLike, observer: str | None = None,
                       allow_empty: bool = False) -> Case:
    """One DeepMind scan's parotids for one observer, as a Case.

    ``scan_folder`` is a ``nrrds/<split>/<observer>/<scan>`` folder; ``observer`` (``oncologist`` or
    ``radiographer``) picks the same scan under another observer. The image is ``CT_IMAGE.nrrd``
    from that folder or the same scan of the other observer; without one, the Case's image is an
    all-zero uint8 reference grid with the masks' geometry (metadata ``crossmod:reference_grid_only``
    = ``1``), enough for contour comparisons.
    """
    folder = Path(scan_folder)
    if observer is not None:
        if observer not in DEEPMIND_OBSERVERS:
            raise CrossmodError(f"observer {observer!r}: expected one of {', '.join(DEEPMIND_OBSERVERS)}")
        if folder.parent.name != observer:
            if folder.parent.name not in DEEPMIND_OBSERVERS:
                raise CrossmodError(f"{folder}: not inside an observer folder ({'/'.join(DEEPMIND_OBSERVERS)}), "
                                    f"cannot find observer {observer}'s contours")
            folder = folder.parent.parent / observer / folder.name
    if not folder.is_dir():
        raise CrossmodError(f"{folder}: DeepMind scan folder not found")
    seg = folder / "segmentations"
    if not seg.is_dir():
        raise CrossmodError(f"{folder}: no segmentations/ folder (DeepMind scan folder expected)")

    image_path = None
    siblings = [folder]
    if folder.parent.name in DEEPMIND_OBSERVERS:
        siblings += [folder.parent.parent / o / folder.name for o in DEEPMIND_OBSERVERS if o != folder.parent.name]
    for candidate in siblings:
        if (candidate / DEEPMIND_IMAGE).is_file():
            image_path = candidate / DEEPMIND_IMAGE
            break

    masks: dict[str, tuple[Path, sitk.Image]] = {}
    for name, stem in DEEPMIND_STRUCTURES.items():
        path = seg / f"{stem}.nrrd"
        if not path.is_file():
            if allow_empty:
                continue
            raise CrossmodError(f"{path}: no such file (structure {name}); pass allow_empty=True to accept it")
        masks[name] = (path, read_image(path))

    if image_path is not None:
        image = read_image(image_path)
    elif masks:
        first = next(iter(masks.values()))[1]
        image = sitk.Image(first.GetSize(), sitk.sitkUInt8)
        image.CopyInformation(first)
        image.SetMetaData(REFERENCE_GRID_KEY, "1")
    else:
        raise CrossmodError(f"{seg}: neither parotid file nor {DEEPMIND_IMAGE} present")

    structures = {}
    for name, (path, mask) in masks.items():
        mask = _binary(conform_mask(mask, image, path))
        _require_voxels(mask, str(path), name, allow_empty)
        structures[name] = mask
    return Case(patient_id=folder.name, image=image, structures=structures, source=folder)


def deepmind_pairs(root: str | os.PathLike, scans: Iterable[str] | None = None,
                   allow_empty: bool = False) -> list[tuple[str, Case, Case]]:
    """``(scan, oncologist Case, radiographer Case)`` for every scan both observers contoured.

    ``scans`` restricts to those scan names (an unknown name is an error). The radiographer's masks
    are put on the oncologist's grid (:func:`conform_mask`), so the two Cases share one grid.
    """
    available = {s.scan: s for s in deepmind_scans(root)}
    if scans is None:
        chosen = [s for s in available.values() if all(o in s.folders for o in DEEPMIND_OBSERVERS)]
    else:
        chosen = []
        for name in scans:
            if name not in available:
                raise CrossmodError(f"{_deepmind_nrrds(root)}: no scan {name!r}")
            scan = available[name]
            missing = [o for o in DEEPMIND_OBSERVERS if o not in scan.folders]
            if missing:
                raise CrossmodError(f"{_deepmind_nrrds(root)}: scan {name!r} has no {missing[0]} contours")
            chosen.append(scan)
    pairs = []
    for scan in chosen:
        first = read_deepmind_scan(scan.folders["oncologist"], allow_empty=allow_empty)
        second = read_deepmind_scan(scan.folders["radiographer"], allow_empty=allow_empty)
        if grid_differences(second.image, first.image):
            second = Case(second.patient_id, first.image, {
                name: _binary(conform_mask(mask, first.image, scan.folders["radiographer"] / "segmentations"))
                for name, mask in second.structures.items()}, second.source)
        pairs.append((scan.scan, first, second))
    return pairs


# ----------------------------------------------------------------------------------------------
# MICCAI 2015 / PDDCA


def read_pddca_case(folder: str | os.PathLike, allow_empty: bool = False,
                    structures_dir: str = "structures", contours: str = "required") -> Case:
    """A MICCAI 2015 (PDDCA) case: ``img.nrrd`` and ``structures/Parotid_{L,R}.nrrd``.

    Like :func:`crossmod_lib.io.read_case`, but a mask on another grid covering the same region is
    resampled (:func:`conform_mask`), masks are made 0/1, and a missing or empty parotid is an error
    unless ``allow_empty`` (PDDCA part 3 lacks some structures). ``contours="optional"``: a case
    with no parotid file at all (no ``structures/`` folder: a folder of NIfTI images) is an
    unannotated patient, a Case without structures.
    """
    if contours not in ("required", "optional"):
        raise CrossmodError(f"contours={contours!r}: required or optional")
    folder = Path(folder)
    if not folder.is_dir():
        raise CrossmodError(f"{folder}: case folder not found")
    image_path = find_image(folder, "img")
    if image_path is None:
        raise CrossmodError(f"{folder}: no image (expected img.nrrd, img.nii.gz or img.mha)")
    image = read_image(image_path)
    structures = {}
    if contours == "optional" and all(find_image(folder / structures_dir, name) is None
                                      for name in PAROTIDS):
        return Case(patient_id=folder.name, image=image, structures={}, source=folder)
    for name in PAROTIDS:
        path = find_image(folder / structures_dir, name)
        if path is None:
            if allow_empty:
                continue
            raise CrossmodError(f"{folder / structures_dir / (name + '.nrrd')}: no such file (structure {name}); "
                                "pass allow_empty=True to accept a case without it")
        mask = _binary(conform_mask(read_image(path), image, path))
        _require_voxels(mask, str(path), name, allow_empty)
        structures[name] = mask
    return Case(patient_id=folder.name, image=image, structures=structures, source=folder)


# ----------------------------------------------------------------------------------------------
# nnU-Net v2 raw layout (NIfTI)

NNUNET_LABELS = {"background": 0, "Parotid_L": 1, "Parotid_R": 2}
NNUNET_FILE_ENDING = ".nii.gz"
_DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# Normalised (lower case, letters and digits only) names meaning each parotid.
PAROTID_ALIASES = {
    "Parotid_L": {"parotidl", "parotidleft", "leftparotid", "parotidlt", "ltparotid", "lparotid",
                  "parotidglandl", "parotidglandleft", "leftparotidgland", "parotidgllt", "oarparotidl"},
    "Parotid_R": {"parotidr", "parotidright", "rightparotid", "parotidrt", "rtparotid", "rparotid",
                  "parotidglandr", "parotidglandright", "rightparotidgland", "parotidglrt", "oarparotidr"},
}


def parotid_name(label: str) -> str | None:
    """``Parotid_L`` / ``Parotid_R`` for a label name meaning one (case, ``_``, ``-``, space ignored)."""
    key = re.sub(r"[^a-z0-9]", "", str(label).lower())
    for name, aliases in PAROTID_ALIASES.items():
        if key in aliases:
            return name
    return None


def _read_dataset_json(folder: Path) -> tuple[dict, dict[str, int], str]:
    path = folder / "dataset.json"
    if not path.is_file():
        raise CrossmodError(f"{path}: no such file (nnU-Net raw dataset folder expected)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CrossmodError(f"{path}: not valid JSON ({_one_line(exc, 160)})") from None
    if not isinstance(meta, dict):
        raise CrossmodError(f"{path}: expected a JSON object")
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise CrossmodError(f"{path}: missing key(s) {', '.join(missing)} (nnU-Net v2 dataset.json)")
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise CrossmodError(f"{path}: labels must be an object of name: value")
    parotids: dict[str, int] = {}
    for label_name, value in labels.items():
        target = parotid_name(label_name)
        if target is None:
            continue
        if isinstance(value, list):
            raise CrossmodError(f"{path}: label {label_name!r} is region-based ({value}); "
                                "only plain integer labels are supported")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CrossmodError(f"{path}: label {label_name!r} must have a positive integer value, not {value!r}")
        if target in parotids:
            raise CrossmodError(f"{path}: two labels mean {target} ({label_name!r} and another)")
        parotids[target] = value
    if not parotids:
        raise CrossmodError(f"{path}: no label names a parotid (labels: {', '.join(map(str, labels))})")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise CrossmodError(f"{path}: file_ending must be a suffix such as '.nii.gz', not {ending!r}")
    return meta, parotids, ending


def read_nnunet_dataset(folder: str | os.PathLike, allow_empty: bool = False,
                        contours: str = "required") -> list[Case]:
    """The training cases of an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr``, ``labelsTr``).

    Channel 0 (``<case>_0000<file_ending>``) is the image; label values are mapped to ``Parotid_L``
    and ``Parotid_R`` through the label names of ``dataset.json`` (aliases such as ``parotid-left``
    or ``LeftParotid`` accepted). A label map on another grid covering the same region is resampled
    (nearest neighbour). A parotid absent from a case is an error unless ``allow_empty``.
    ``contours="optional"``: an image without a label file is an unannotated case (a Case without
    structures), and the images of ``imagesTs`` (nnU-Net's unlabelled test images) are read too;
    ``labelsTr`` may then be absent.
    """
    if contours not in ("required", "optional"):
        raise CrossmodError(f"contours={contours!r}: required or optional")
    folder = Path(folder)
    if not folder.is_dir():
        raise CrossmodError(f"{folder}: nnU-Net dataset folder not found")
    meta, parotids, ending = _read_dataset_json(folder)
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images_dir.is_dir():
        raise CrossmodError(f"{images_dir}: no such folder (nnU-Net training images)")
    suffix = f"_0000{ending}"
    image_paths = sorted(p for p in images_dir.iterdir() if p.name.endswith(suffix))
    if not image_paths:
        raise CrossmodError(f"{images_dir}: no images named <case>{suffix}")
    expected = meta.get("numTraining")
    if expected is not None and expected != len(image_paths):
        raise CrossmodError(f"{folder / 'dataset.json'}: numTraining is {expected} but {images_dir} holds "
                            f"{len(image_paths)} cases")
    if contours == "optional" and (folder / "imagesTs").is_dir():
        known = {p.name for p in image_paths}
        image_paths += sorted(p for p in (folder / "imagesTs").iterdir()
                              if p.name.endswith(suffix) and p.name not in known)
    cases = []
    for image_path in image_paths:
        case_id = image_path.name[: -len(suffix)]
        label_path = labels_dir / f"{case_id}{ending}"
        if not label_path.is_file() and contours == "optional":
            cases.append(Case(patient_id=case_id, image=read_image(image_path), structures={},
                              source=image_path))
            continue
        if not label_path.is_file():
            raise CrossmodError(f"{label_path}: no such file (labels of case {case_id})")
        image = read_image(image_path)
        labels = conform_mask(read_image(label_path), image, label_path)
        array = sitk.GetArrayViewFromImage(labels)
        if array.dtype.kind == "f" and np.any(array != np.round(array)):
            raise CrossmodError(f"{label_path}: label map holds non-integer values")
        structures = {}
        for name, value in parotids.items():
            mask_array = (array == value).astype(np.uint8)
            if not mask_array.any() and not allow_empty:
                raise CrossmodError(f"{label_path}: structure {name} (label {value}) is empty (no voxels); "
                                    "pass allow_empty=True to accept it")
            mask = sitk.GetImageFromArray(mask_array)
            mask.CopyInformation(image)
            structures[name] = mask
        cases.append(Case(patient_id=case_id, image=image, structures=structures, source=image_path))
    return cases


def _label_volume(case: Case, where: str) -> np.ndarray:
    """The case's parotids as one uint8 label map on its image grid (1 left, 2 right)."""
    shape = sitk.GetArrayViewFromImage(case.image).shape
    labels = np.zeros(shape, dtype=np.uint8)
    for value, name in enumerate(PAROTIDS, start=1):
        if name not in case.structures:
            continue
        mask = _binary(conform_mask(case.structures[name], case.image, f"{where} structure {name}"))
        voxels = sitk.GetArrayViewFromImage(mask) > 0
        if np.any(voxels & (labels > 0)):
            raise CrossmodError(f"{where}: Parotid_L and Parotid_R overlap in {int(np.sum(voxels & (labels > 0)))} voxels")
        labels[voxels] = value
    return labels


def _write_pair(image: sitk.Image, labels: np.ndarray, case_id: str, work: Path) -> None:
    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.CopyInformation(image)
    sitk.WriteImage(image, str(work / "imagesTr" / f"{case_id}_0000{NNUNET_FILE_ENDING}"), True)
    sitk.WriteImage(label_image, str(work / "labelsTr" / f"{case_id}{NNUNET_FILE_ENDING}"), True)


def _slice_image(array2d: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array2d[None]))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


def write_nnunet_dataset(cases, folder: str | os.PathLike, dataset_name: str, modality: str = "MR",
                         mode: str = "volumes", spacing: tuple[float, float] = (1.0, 1.0),
                         description: str | None = None) -> Path:
    """Write a valid nnU-Net v2 raw dataset ``folder/<dataset_name>/`` atomically and return it.

    ``dataset.json`` gets ``channel_names {"0": modality}``, ``labels {background: 0, Parotid_L: 1,
    Parotid_R: 2}``, ``numTraining`` and ``file_ending ".nii.gz"``; images go to
    ``imagesTr/<case>_0000.nii.gz``, label maps to ``labelsTr/<case>.nii.gz``.

    ``mode="volumes"``: ``cases`` is a list of :class:`Case`, one training case each.
    ``mode="slices"``: 2D training cases written as pseudo-3D NIfTIs of 1 x H x W voxels. ``cases``
    is then either a list of Case (each axial slice becomes case ``<patient>_z<k>`` keeping the
    slice's position and spacing) or a mapping of arrays as returned by
    :func:`crossmod_lib.preparation.load_slices`: ``image`` [n, H, W], ``labels`` [n, H, W] (0, 1 left,
    2 right), optionally ``patient`` and ``slice_index`` for the case names; the in-plane
    ``spacing`` (x, y) in mm is given, and the slice axis gets nnU-Net's 999 mm (no 3D neighbours).
    The dataset appears complete or not at all (written to a temporary folder, then renamed); an
    existing dataset of that name is replaced.
    """
    if not isinstance(dataset_name, str) or not _DATASET_NAME.match(dataset_name):
        raise CrossmodError(f"dataset name {dataset_name!r}: nnU-Net expects DatasetXXX_Name (three digits)")
    if mode not in ("volumes", "slices"):
        raise CrossmodError(f"mode {mode!r}: expected 'volumes' or 'slices'")
    if not isinstance(modality, str) or not modality:
        raise CrossmodError(f"modality {modality!r}: expected a channel name such as 'MR' or 'CT'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / dataset_name
    work = Path(tempfile.mkdtemp(prefix=f".{dataset_name}.tmp-", dir=folder))
    try:
        (work / "imagesTr").mkdir()
        (work / "labelsTr").mkdir()
        written: list[str] = []

        def add(case_id: str, where: str) -> str:
            if not _CASE_ID.match(case_id):
                raise CrossmodError(f"{where}: case name {case_id!r} is not usable as an nnU-Net file name")
            if case_id in written:
                raise CrossmodError(f"{where}: case name {case_id!r} appears twice")
            written.append(case_id)
            return case_id

        if isinstance(cases, Mapping):
            if mode != "slices":
                raise CrossmodError("arrays of slices can only be written with mode='slices'")
            _write_slice_arrays(cases, spacing, work, add)
        else:
            cases = list(cases)
            if not cases:
                raise CrossmodError(f"{target}: no cases to write")
            for case in cases:
                if not isinstance(case, Case):
                    raise CrossmodError(f"{target}: expected Case objects, got {type(case).__name__}")
                where = str(case.source or case.patient_id)
                if case.image.GetDimension() != 3 or case.image.GetNumberOfComponentsPerPixel() != 1:
                    raise CrossmodError(f"{where}: expected a 3D scalar image")
                labels = _label_volume(case, where)
                if mode == "volumes":
                    _write_pair(case.image, labels, add(case.patient_id, where), work)
                    continue
                array = sitk.GetArrayFromImage(case.image)
                width = max(3, len(str(array.shape[0] - 1)))
                for k in range(array.shape[0]):
                    origin = case.image.TransformIndexToPhysicalPoint((0, 0, k))
                    image = _slice_image(array[k], case.image.GetSpacing(), origin, case.image.GetDirection())
                    _write_pair(image, labels[k : k + 1], add(f"{case.patient_id}_z{k:0{width}d}", where), work)
        meta = {
            "name": dataset_name,
            "description": description or (f"Parotid glands on {modality} ({mode}), written by crossmod_lib"),
            "channel_names": {"0": modality},
            "labels": dict(NNUNET_LABELS),
            "numTraining": len(written),
            "file_ending": NNUNET_FILE_ENDING,
        }
        (work / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if target.exists():
            old = folder / f".{dataset_name}.old-{os.getpid()}"
            target.rename(old)
        work.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _write_slice_arrays(arrays: Mapping, spacing, work: Path, add) -> None:
    if "image" not in arrays or "labels" not in arrays:
        raise CrossmodError("slices: expected arrays 'image' and 'labels' of shape [n, H, W]")
    images, labels = np.asarray(arrays["image"]), np.asarray(arrays["labels"])
    if images.ndim != 3 or labels.shape != images.shape:
        raise CrossmodError(f"slices: 'image' {images.shape} and 'labels' {labels.shape} must both be [n, H, W]")
    if len(images) == 0:
        raise CrossmodError("slices: no slices to write")
    values = np.unique(labels)
    if not np.all(np.isin(values, list(NNUNET_LABELS.values()))):
        raise CrossmodError(f"slices: labels hold values {values.tolist()}, expected 0, 1 (Parotid_L), 2 (Parotid_R)")
    if len(spacing) != 2 or not all(float(s) > 0 for s in spacing):
        raise CrossmodError(f"slices: spacing {spacing!r} must be two positive in-plane sizes (x, y) in mm")
    patients = arrays.get("patient")
    indices = arrays.get("slice_index")
    width = max(3, len(str(len(images) - 1)))
    for i in range(len(images)):
        if patients is not None:
            k = int(indices[i]) if indices is not None else i
            case_id = f"{patients[i]}_z{k:0{width}d}"
        else:
            case_id = f"slice_{i:0{width}d}"
        image = _slice_image(images[i], (spacing[0], spacing[1], 999.0), (0.0, 0.0, 0.0),
                             (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        _write_pair(image, labels[i : i + 1].astype(np.uint8), add(case_id, f"slices[{i}]"), work)


# ----------------------------------------------------------------------------------------------
# Data root and cohorts


def data_root(option: str | os.PathLike | None = None) -> Path:
    """Where the datasets live: ``option`` > ``$CROSSMOD_DATA`` > ``../shared/data`` beside the repository."""
    if option is not None and str(option) != "":
        path = Path(option).expanduser()
        if not path.is_dir():
            raise CrossmodError(f"{path}: data root not found (given as an option)")
        return path
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CrossmodError(f"{path}: data root not found (from {DATA_ROOT_ENV})")
        return path
    default = REPOSITORY_ROOT.parent / "shared" / "data"
    if default.is_dir():
        return default
    raise CrossmodError(f"no data root: pass --data-root DIR or set {DATA_ROOT_ENV} "
                        f"(the default {default} does not exist)")


# dataset name -> layout read by cohort_cases / load_cohort
COHORT_LAYOUTS = {
    "openkbp": "openkbp",
    "deepmind-tcia-hn": "deepmind",
    "pddca": "pddca",
    "tcia-hn-ct": "pddca",
    "aapm-rt-mac": "pddca",
    "phantom": "pddca",
}
_SPEC_KEYS = {"dataset", "root", "patients", "observer", "split"}


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _openkbp_patients(base: Path, split: str | None) -> list[Path]:
    candidates = ([base / split, base / "provided-data" / split] if split else
                  [base / "train-pats", base / "provided-data" / "train-pats", base])
    for candidate in candidates:
        if candidate.is_dir():
            found = [p for p in candidate.iterdir() if p.is_dir() and _openkbp_file(p, "ct")]
            if found:
                return sorted(found, key=lambda p: _natural_key(p.name))
    raise CrossmodError(f"{base}: no OpenKBP patient folders (expected {split or 'train-pats'}/pt_*/ct.csv[.gz])")


def select_patients(spec_patients, available: dict[str, Path], where: str) -> list[Path]:
    """The patients a cohort's ``patients`` setting chooses among ``available`` (name -> folder,
    sorted): all, a list of ids, {first: N} or {range: [a, b]}; one-line errors name ``where``."""
    names = list(available)
    if spec_patients is None or spec_patients == "all":
        return list(available.values())
    if isinstance(spec_patients, list):
        chosen, seen = [], set()
        for item in spec_patients:
            key = str(item)
            if key not in available and f"pt_{key}" in available:  # OpenKBP: 12 means pt_12
                key = f"pt_{key}"
            if key not in available:
                raise CrossmodError(f"cohort.patients: {item!r} not found in {where}")
            if key in seen:
                raise CrossmodError(f"cohort.patients: {item!r} listed twice")
            seen.add(key)
            chosen.append(available[key])
        return chosen
    if isinstance(spec_patients, dict) and len(spec_patients) == 1:
        (how, value), = spec_patients.items()
        if how == "first":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CrossmodError(f"cohort.patients.first: expected a positive integer, not {value!r}")
            if value > len(names):
                raise CrossmodError(f"cohort.patients.first: {value} patients asked, {where} has {len(names)}")
            return [available[n] for n in names[:value]]
        if how == "range":
            ok = (isinstance(value, list) and len(value) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
            if not ok or not 0 <= value[0] < value[1] <= len(names):
                raise CrossmodError(f"cohort.patients.range: expected [a, b] with 0 <= a < b <= {len(names)} "
                                    f"(positions in the sorted list, b excluded), not {value!r}")
            return [available[n] for n in names[value[0] : value[1]]]
    raise CrossmodError(f"cohort.patients: expected 'all', a list of ids, {{first: N}} or {{range: [a, b]}}, "
                        f"not {spec_patients!r}")


def cohort_cases(spec: Mapping, root: str | os.PathLike | None = None) -> list[Path]:
    """The case folders of a cohort definition, in a fixed (natural) order.

    ``spec`` = ``{dataset: NAME, root: PATH | null, patients: ..., observer: ..., split: ...}``:

    - ``dataset``: ``openkbp``, ``deepmind-tcia-hn``, or a PDDCA-layout dataset (``pddca``,
      ``tcia-hn-ct``, ``aapm-rt-mac``, ``phantom``: ``<case>/img.nrrd`` + ``structures/``);
    - ``root``: the dataset folder; null means ``<data root>/<dataset>`` (``root`` argument, else
      :func:`data_root`);
    - ``patients``: ``all`` (default), a list of ids (folder or scan names; for OpenKBP ``12`` means
      ``pt_12``), ``{first: N}``, or ``{range: [a, b]}`` = positions a..b-1 of the sorted list;
    - ``observer`` (DeepMind, default ``oncologist``) and ``split`` (OpenKBP, default ``train-pats``).
    """
    if not isinstance(spec, Mapping):
        raise CrossmodError(f"cohort: expected a mapping with dataset, root, patients, not {spec!r}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise CrossmodError(f"cohort: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                            f"(known: {', '.join(sorted(_SPEC_KEYS))})")
    dataset = spec.get("dataset")
    if dataset not in COHORT_LAYOUTS:
        raise CrossmodError(f"cohort.dataset: {dataset!r} has no reader (known: {', '.join(COHORT_LAYOUTS)})")
    base = Path(spec["root"]).expanduser() if spec.get("root") else data_root(root) / dataset
    if not base.is_dir():
        raise CrossmodError(f"{base}: dataset folder of cohort {dataset!r} not found")
    layout = COHORT_LAYOUTS[dataset]
    if layout == "openkbp":
        folders = _openkbp_patients(base, spec.get("split"))
    elif layout == "deepmind":
        observer = spec.get("observer") or "oncologist"
        if observer not in DEEPMIND_OBSERVERS:
            raise CrossmodError(f"cohort.observer: {observer!r}, expected one of {', '.join(DEEPMIND_OBSERVERS)}")
        folders = [s.folders[observer] for s in deepmind_scans(base) if observer in s.folders]
    else:
        folders = sorted(list_cases(base), key=lambda p: _natural_key(p.name))
    available = {p.name: p for p in folders}
    return select_patients(spec.get("patients", "all"), available, str(base))


def read_dataset_case(dataset: str, folder: str | os.PathLike, allow_empty: bool = False,
                      observer: str | None = None) -> Case:
    """Read one case folder of ``dataset`` with the reader its layout needs."""
    layout = COHORT_LAYOUTS.get(dataset)
    if layout == "openkbp":
        return read_openkbp_case(folder, allow_empty=allow_empty)
    if layout == "deepmind":
        return read_deepmind_scan(folder, observer=observer, allow_empty=allow_empty)
    if layout == "pddca":
        return read_pddca_case(folder, allow_empty=allow_empty)
    raise CrossmodError(f"dataset {dataset!r}: no reader (known: {', '.join(COHORT_LAYOUTS)})")


def load_cohort(spec: Mapping, root: str | os.PathLike | None = None, allow_empty: bool = False) -> list[Case]:
    """The Cases of a cohort definition (see :func:`cohort_cases`)."""
    return [read_dataset_case(spec["dataset"], folder, allow_empty=allow_empty, observer=spec.get("observer"))
            for folder in cohort_cases(spec, root)]


# ----------------------------------------------------------------------------------------------
# Any path: what layout is it, and read it


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of a file or folder: image, dicom, openkbp, pddca, nnunet, deepmind, or
    cohort (a folder of patient folders, :func:`is_cohort_folder`)."""
    path = Path(path)
    if not path.exists():
        raise CrossmodError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.lower().endswith((".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")):
            return "image"
        return "dicom"
    if (path / "dataset.json").is_file():
        return "nnunet"
    if _openkbp_file(path, "ct") is not None:
        return "openkbp"
    if find_image(path, "img") is not None:
        return "pddca"
    if (path / "segmentations").is_dir():
        return "deepmind"
    if is_cohort_folder(path):
        return "cohort"
    return "dicom"


#: Files that may sit beside the patient folders of a cohort folder without being image data.
_COHORT_SIDE_FILES = (".csv", ".txt", ".md", ".json", ".yaml", ".yml", ".pdf", ".xlsx")


def _first_patient_id(folder: Path) -> str | None:
    """PatientID of the first DICOM file below ``folder`` (None: no readable DICOM file)."""
    import pydicom

    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            try:
                ds = pydicom.dcmread(Path(root) / name, stop_before_pixels=True,
                                     specific_tags=["PatientID"])
            except Exception:  # noqa: BLE001 (not DICOM, or broken: the patient's own read says)
                continue
            return str(ds.get("PatientID", "") or "")
    return None


def is_cohort_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of patient folders: no image files of its own, at least two
    sub-folders, and either some of them in a per-patient layout other than DICOM (OpenKBP,
    PDDCA, ...) or DICOM sub-folders of more than one PatientID (sub-folders of one PatientID are
    one patient's series, read as one DICOM case)."""
    path = Path(path)
    if not path.is_dir() or (path / "dataset.json").is_file():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and not p.name.lower().endswith(_COHORT_SIDE_FILES) for p in entries):
        return False
    folders = sorted(p for p in entries if p.is_dir())
    if len(folders) < 2:
        return False
    layouts = [detect_layout(p) for p in folders]
    if any(layout not in ("dicom", "cohort") for layout in layouts):
        return True
    return len({_first_patient_id(p) for p in folders} - {None}) > 1


def _matched_name(mask: sitk.Image, canonical: str) -> str:
    from .dicom import ROI_NAME_KEY

    return mask.GetMetaData(ROI_NAME_KEY) if mask.HasMetaDataKey(ROI_NAME_KEY) else canonical


def inspect_cohort(path: str | os.PathLike, structures=("Parotid_L", "Parotid_R"),
                   progress: bool = False) -> pd.DataFrame:
    """One row per patient folder of a cohort folder: patient, layout, modality, size,
    spacing_mm, for each of ``structures`` the name it was found under (the RTSTRUCT's ROI name
    that matched, with its volume) or "no contours" / "missing", and ``problem``: the one-line
    reason a patient could not be read (the others are read regardless)."""
    path = Path(path)
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if progress:
        from tqdm.auto import tqdm

        folders = tqdm(folders, desc="patients", unit="patient")
    rows = []
    for folder in folders:
        row = {"patient": folder.name, "layout": "", "modality": "", "size": "", "spacing_mm": "",
               **dict.fromkeys(structures, ""), "problem": ""}
        try:
            row["layout"] = detect_layout(folder)
            cases = read_any(folder, row["layout"])
            if len(cases) != 1:
                raise CrossmodError(f"{folder}: {len(cases)} cases in one patient folder")
            case = cases[0]
            info = describe_case(case)
            row.update({k: info[k] for k in ("modality", "size", "spacing_mm")})
            voxel_cc = float(np.prod(case.image.GetSpacing())) / 1000.0
            for name in structures:
                mask = case.structures.get(name)
                if mask is None:
                    row[name] = "no contours" if not case.structures else "missing"
                    continue
                cc = np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * voxel_cc
                row[name] = f"{_matched_name(mask, name)} ({cc:.1f} cc)"
        except CrossmodError as exc:
            row["problem"] = " ".join(str(exc).split())[:300]
        rows.append(row)
    return pd.DataFrame(rows)


def read_any(path: str | os.PathLike, layout: str | None = None) -> list[Case]:
    """Read whatever ``path`` holds (see :func:`detect_layout`) as Cases; a label or image file
    gives one Case without structures."""
    path = Path(path)
    layout = layout or detect_layout(path)
    if layout == "image":
        return [Case(path.name, read_image(path), {}, path)]
    if layout == "nnunet":
        return read_nnunet_dataset(path, allow_empty=True, contours="optional")
    if layout == "openkbp":
        return [read_openkbp_case(path, allow_empty=True)]
    if layout == "pddca":
        return [read_pddca_case(path, allow_empty=True, contours="optional")]
    if layout == "deepmind":
        return [read_deepmind_scan(path, allow_empty=True)]
    if layout == "cohort":
        raise CrossmodError(f"{path}: a folder of patient folders; read each patient's folder "
                            "(crossmod data inspect lists them)")
    if layout == "dicom":
        from .dicom import read_dicom_case, read_dicom_series

        if path.is_file():
            return [Case(path.parent.name, read_dicom_series(path.parent), {}, path.parent)]
        # an unannotated patient is a Case without structures; a broken RTSTRUCT is an error
        return [read_dicom_case(path, contours="optional")]
    raise CrossmodError(f"{path}: unknown layout {layout!r}")


def describe_case(case: Case) -> dict:
    """Size, spacing, modality and per-structure voxel counts and volumes of a Case."""
    image = case.image
    voxel_cc = float(np.prod(image.GetSpacing())) / 1000.0
    info = {
        "patient": case.patient_id,
        "size": "x".join(str(v) for v in image.GetSize()),
        "spacing_mm": "x".join(f"{v:.3g}" for v in image.GetSpacing()),
        "modality": image.GetMetaData("Modality") if image.HasMetaDataKey("Modality") else "",
    }
    for name, mask in case.structures.items():
        voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
        info[f"{name}_cc"] = round(voxels * voxel_cc, 2)
    return info

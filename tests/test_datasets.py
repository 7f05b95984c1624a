"""crossmod_lib.datasets: manifest, fetch (served from 127.0.0.1), readers, nnU-Net layout, cohorts.

Fixtures are built here (sparse CSVs, NRRD/NIfTI files, archives). Tests on the real data beside the
project (../shared/data: OpenKBP CTs, DeepMind two-observer parotids) skip when it is absent.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from crossmod_lib import datasets as ds
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import Case

N = 128


def one_line_error(excinfo, *needles):
    """The error is one line and mentions every needle (file names, hashes, ...)."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in {message!r}"
    return message


def shared_root() -> Path:
    try:
        return ds.data_root()
    except CrossmodError as exc:
        pytest.skip(f"shared data absent: {exc}")


def shared(name: str) -> Path:
    folder = shared_root() / name
    if not folder.is_dir():
        pytest.skip(f"shared data {folder} absent")
    return folder


# ----------------------------------------------------------------------------------------------
# Manifest


def test_manifest_has_every_dataset_with_required_fields():
    manifest = ds.load_manifest()
    for name in ("phantom", "openkbp", "deepmind-tcia-hn", "pddca", "tcia-hn-ct", "aapm-rt-mac", "han-seg"):
        assert name in manifest
        for key in ds.REQUIRED_KEYS:
            assert key in manifest[name], (name, key)
    assert "10.7937/tcia.2019.bcfjqfqb" in manifest["aapm-rt-mac"]["landing_page"]
    assert "Raudaschl" in manifest["pddca"]["citation"]
    assert "Podobnik" in manifest["han-seg"]["citation"]
    dois = [c["doi"] for c in manifest["tcia-hn-ct"]["collections"]]
    assert "10.7937/K9/TCIA.2017.umz8dv6s" in dois
    # Portals and unverified archives: no fixed file, a note, and a manual route.
    for name in ("tcia-hn-ct", "aapm-rt-mac", "pddca", "han-seg"):
        assert all(f["sha256"] is None and f["note"] for f in manifest[name]["files"])
        assert manifest[name]["manual_download"]


def test_format_dataset_list_mentions_each_dataset():
    manifest = ds.load_manifest()
    text = ds.format_dataset_list(manifest)
    for name, entry in manifest.items():
        assert name in text
        if entry["landing_page"]:
            assert entry["landing_page"] in text
    rows = ds.list_datasets(manifest)
    assert {r["name"] for r in rows} == set(manifest)


def write_manifest(path: Path, datasets: dict) -> Path:
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return path


def entry(**overrides):
    base = {"description": "d", "modality": ["CT"], "format": "f", "licence": "l", "citation": "c",
            "landing_page": "https://example.org", "source": "s", "expected_files": ["x"]}
    base.update(overrides)
    return base


@pytest.mark.parametrize("bad, needle", [
    ({"description": None}, "description"),
    ({"files": [{"url": "https://e.org/a.zip", "sha256": "abc", "archive": "zip"}]}, "sha256"),
    ({"files": [{"url": "https://e.org/a.zip", "sha256": None, "archive": "zip"}]}, "note"),
    ({"files": [{"url": "https://e.org/a.rar", "sha256": "0" * 64, "archive": "rar"}]}, "archive"),
    ({"landing_page": "ftp://x"}, "landing_page"),
])
def test_manifest_errors_name_file_and_field(tmp_path, bad, needle):
    data = entry(**bad)
    data = {k: v for k, v in data.items() if v is not None}
    path = write_manifest(tmp_path / "m.yaml", {"ds": data})
    with pytest.raises(CrossmodError) as excinfo:
        ds.load_manifest(path)
    one_line_error(excinfo, path, "'ds'", needle)


def test_manifest_not_yaml_or_missing(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("datasets: [unclosed\n")
    with pytest.raises(CrossmodError) as excinfo:
        ds.load_manifest(path)
    one_line_error(excinfo, path, "YAML")
    with pytest.raises(CrossmodError) as excinfo:
        ds.load_manifest(tmp_path / "none.yaml")
    one_line_error(excinfo, "none.yaml")


# ----------------------------------------------------------------------------------------------
# Fetch from a local HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    hits: ClassVar[list] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve tmp_path/served on 127.0.0.1 (ephemeral port); yields (folder, base url, hits)."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("Handler", (_QuietHandler,), {"hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}", handler.hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return path


def make_tar(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None,
             mode: str = "w", hardlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, mode) as tf:
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def fixed_manifest(url: str, digest: str, archive: str | None, name: str = "toy") -> dict:
    return {name: entry(files=[{"url": url, "sha256": digest, "archive": archive}])}


def assert_nothing_left(dest: Path, name: str = "toy"):
    assert not (dest / name).exists()
    leftovers = [p for p in dest.rglob("*") if p.is_file() or p.name.startswith(f".{name}.")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_fetch_good_archive_extracts_and_is_idempotent(server, tmp_path, kind):
    folder, base, hits = server
    members = {"toy/pt_1/a.txt": b"hello", "toy/README": b"readme"}
    links = {"toy/latest": "pt_1"}  # a symlink that stays inside is fine
    if kind == "zip":
        archive = make_zip(folder / "toy.zip", members, links)
    else:
        archive = make_tar(folder / f"toy.{kind}", members, links, mode="w:gz" if kind == "tar.gz" else "w")
    manifest = fixed_manifest(f"{base}/{archive.name}", sha256(archive), kind)
    dest = tmp_path / "data"
    out = ds.fetch("toy", dest, manifest=manifest, progress=False)
    assert out == dest / "toy"
    assert (out / "toy" / "pt_1" / "a.txt").read_bytes() == b"hello"
    assert (out / "toy" / "latest" / "a.txt").read_bytes() == b"hello"
    assert (out / ds.FETCH_RECORD).is_file()
    n_hits = len(hits)
    assert ds.fetch("toy", dest, manifest=manifest, progress=False) == out
    assert len(hits) == n_hits  # already fetched: no second download
    assert not [p for p in dest.iterdir() if ".partial-" in p.name]


def test_fetch_plain_file(server, tmp_path):
    folder, base, _ = server
    (folder / "table.csv").write_text("a,b\n1,2\n")
    manifest = fixed_manifest(f"{base}/table.csv", sha256(folder / "table.csv"), None)
    out = ds.fetch("toy", tmp_path / "data", manifest=manifest, progress=False)
    assert (out / "table.csv").read_text() == "a,b\n1,2\n"


def test_fetch_wrong_hash_leaves_nothing(server, tmp_path):
    folder, base, _ = server
    archive = make_zip(folder / "toy.zip", {"a.txt": b"hello"})
    wrong = "0" * 64
    dest = tmp_path / "data"
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("toy", dest, manifest=fixed_manifest(f"{base}/toy.zip", wrong, "zip"), progress=False)
    one_line_error(excinfo, "'toy'", "toy.zip", wrong, sha256(archive))
    assert_nothing_left(dest)


@pytest.mark.parametrize("kind, members, symlinks, needle", [
    ("zip", {"../evil.txt": b"x"}, None, "../evil.txt"),
    ("zip", {"/abs/evil.txt": b"x"}, None, "absolute"),
    ("zip", {"ok.txt": b"x"}, {"link": "../../outside"}, "symlink"),
    ("tar", {"good.txt": b"x", "sub/../../evil.txt": b"x"}, None, "evil.txt"),
    ("tar", {"/abs/evil.txt": b"x"}, None, "absolute"),
    ("tar", {}, {"link": "/etc"}, "absolute"),
    ("tar", {"link/evil.txt": b"x"}, {"link": ".."}, "link"),
    # a link that looks inside by its text but resolves out through another link
    ("tar", {}, {"b": ".", "a": "b/.."}, "'a'"),
])
def test_fetch_refuses_path_traversal(server, tmp_path, kind, members, symlinks, needle):
    folder, base, _ = server
    name = f"evil.{kind}"
    archive = (make_zip if kind == "zip" else make_tar)(folder / name, members, symlinks)
    dest = tmp_path / "data"
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("toy", dest, manifest=fixed_manifest(f"{base}/{name}", sha256(archive), kind), progress=False)
    one_line_error(excinfo, name, needle, "refusing")
    assert_nothing_left(dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "evil.txt").exists()


def test_fetch_refuses_hard_link_out_and_corrupt_archive(server, tmp_path):
    folder, base, _ = server
    archive = make_tar(folder / "hard.tar", {"a.txt": b"x"}, hardlinks={"h": "../../etc/passwd"})
    dest = tmp_path / "data"
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("toy", dest, manifest=fixed_manifest(f"{base}/hard.tar", sha256(archive), "tar"), progress=False)
    one_line_error(excinfo, "hard.tar", "'h'", "hard link")
    assert_nothing_left(dest)
    (folder / "fake.zip").write_bytes(b"this is not a zip archive")
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("toy", dest, manifest=fixed_manifest(f"{base}/fake.zip", sha256(folder / "fake.zip"), "zip"),
                 progress=False)
    one_line_error(excinfo, "fake.zip", "cannot extract")
    assert_nothing_left(dest)


def test_fetch_portal_entry_says_where_to_download():
    manifest = ds.load_manifest()
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("aapm-rt-mac", "/nonexistent-never-created", manifest=manifest, progress=False)
    one_line_error(excinfo, "aapm-rt-mac", "https://doi.org/10.7937/tcia.2019.bcfjqfqb")
    assert not Path("/nonexistent-never-created").exists()
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("nope", "/nonexistent-never-created", manifest=manifest)
    one_line_error(excinfo, "'nope'", "openkbp")


def test_fetch_refuses_foreign_existing_folder(server, tmp_path):
    folder, base, _ = server
    archive = make_zip(folder / "toy.zip", {"a.txt": b"x"})
    dest = tmp_path / "data"
    (dest / "toy").mkdir(parents=True)
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("toy", dest, manifest=fixed_manifest(f"{base}/toy.zip", sha256(archive), "zip"), progress=False)
    one_line_error(excinfo, dest / "toy", "not written by fetch")


def test_fetch_unreachable_server(tmp_path, monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CrossmodError) as excinfo:
        ds.fetch("toy", tmp_path / "d", manifest=fixed_manifest(f"http://127.0.0.1:{port}/a.zip", "0" * 64, "zip"),
                 progress=False)
    one_line_error(excinfo, "'toy'", "cannot download")
    assert_nothing_left(tmp_path / "d")


# ----------------------------------------------------------------------------------------------
# OpenKBP sparse CSV (synthetic)


def flat_index(a0, a1, a2):
    return int(np.ravel_multi_index((a0, a1, a2), (N, N, N)))


def write_sparse(path: Path, rows, values=True, compress=True):
    lines = [",data"] + [f"{i},{v}" if values else f"{i}," for i, v in rows]
    text = "\n".join(lines) + "\n"
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def make_openkbp_patient(folder: Path, compress=True, left=True, right=True):
    """CT: body block at HU 40, a bone voxel at (a0, a1, a2) = (70, 64, 10); parotids by side."""
    folder.mkdir(parents=True)
    rows = [(flat_index(a0, a1, a2), 1040.0) for a0 in range(50, 80, 5) for a1 in range(40, 90, 5)
            for a2 in range(5, 40, 5)]
    rows.append((flat_index(70, 64, 10), 2000.0))
    write_sparse(folder / "ct.csv", rows, compress=compress)
    if left:  # patient left = OpenKBP axis 1 high
        write_sparse(folder / "LeftParotid.csv", [(flat_index(60, 80, 20), None)], values=False, compress=compress)
    if right:
        write_sparse(folder / "RightParotid.csv", [(flat_index(60, 45, 20), None)], values=False, compress=compress)
    (folder / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_openkbp_axes_orientation_and_hu(tmp_path, compress):
    case = ds.read_openkbp_case(make_openkbp_patient(tmp_path / "pt_7", compress=compress))
    assert case.patient_id == "pt_7"
    assert case.image.GetSize() == (N, N, N)
    assert case.image.GetSpacing() == pytest.approx((3.906, 3.906, 2.5))
    hu = sitk.GetArrayFromImage(case.image)
    assert hu.dtype == np.int16
    # OpenKBP (a0, a1, a2) -> LPS array [z, y, x] = [127 - a2, a0, a1]
    assert hu[127 - 10, 70, 64] == 1000
    assert hu[127 - 5, 50, 40] == 40
    assert hu[0, 0, 0] == -1000  # absent voxel: air
    left = np.argwhere(sitk.GetArrayViewFromImage(case.structures["Parotid_L"]))
    right = np.argwhere(sitk.GetArrayViewFromImage(case.structures["Parotid_R"]))
    assert left.tolist() == [[127 - 20, 60, 80]] and right.tolist() == [[127 - 20, 60, 45]]
    for mask in case.structures.values():
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert not ds.grid_differences(mask, case.image)


def test_openkbp_missing_and_empty_parotids(tmp_path):
    folder = make_openkbp_patient(tmp_path / "pt_1", right=False)
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(folder)
    one_line_error(excinfo, "RightParotid.csv", "allow_empty")
    case = ds.read_openkbp_case(folder, allow_empty=True)
    assert set(case.structures) == {"Parotid_L"}
    write_sparse(folder / "RightParotid.csv", [], values=False)  # header only
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(folder)
    one_line_error(excinfo, "RightParotid.csv.gz", "empty")
    assert not sitk.GetArrayViewFromImage(ds.read_openkbp_case(folder, allow_empty=True).structures["Parotid_R"]).any()


@pytest.mark.parametrize("content, needle", [
    ("index,value,extra\n1,2,3\n", "header"),
    ("", "header"),
    (",data\nabc,5\n", "line 2"),
    (",data\n1,5\n2097152,5\n", "line 3"),
    (",data\n-4,5\n", "outside"),
    (",data\n1,5\n2,\n", "line 3"),
    (",data\n1,5\n1,5,7\n", "line 3: 3 fields"),
    (",data\n1,5,7,8\n", "line 2: 4 fields"),
])
def test_openkbp_bad_ct_csv(tmp_path, content, needle):
    folder = make_openkbp_patient(tmp_path / "pt_1", compress=False)
    (folder / "ct.csv").write_text(content)
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(folder)
    one_line_error(excinfo, folder / "ct.csv", needle)


def test_openkbp_truncated_gzip_and_bad_voxel_sizes(tmp_path):
    folder = make_openkbp_patient(tmp_path / "pt_1")
    data = (folder / "ct.csv.gz").read_bytes()
    (folder / "ct.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(folder)
    one_line_error(excinfo, folder / "ct.csv.gz")

    folder = make_openkbp_patient(tmp_path / "pt_2")
    (folder / "voxel_dimensions.csv").write_text("3.9\n-1\n")
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(folder)
    one_line_error(excinfo, folder / "voxel_dimensions.csv", "three positive")
    (folder / "voxel_dimensions.csv").unlink()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(folder)
    one_line_error(excinfo, folder / "voxel_dimensions.csv")

    empty = tmp_path / "pt_3"
    empty.mkdir()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_openkbp_case(empty)
    one_line_error(excinfo, empty, "ct.csv")


# ----------------------------------------------------------------------------------------------
# OpenKBP on the shared data


def test_openkbp_shared_hu_sides_and_spine():
    folder = shared("openkbp") / "train-pats" / "pt_1"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    case = ds.read_openkbp_case(folder, extra_structures=("SpinalCord", "Mandible", "Brainstem"))
    hu = sitk.GetArrayFromImage(case.image).astype(float)
    assert hu.min() >= -1000 and np.mean(hu == -1000) > 0.5  # mostly air outside the patient
    # Tissue HU, pooled over the first 8 patients (inside the body, 2 voxels in from the skin)
    from scipy import ndimage
    pooled = []
    for patient in ds.cohort_cases({"dataset": "openkbp", "patients": {"first": 8}}):
        volume = sitk.GetArrayFromImage(ds.read_openkbp_case(patient).image).astype(float)
        pooled.append(volume[ndimage.binary_erosion(volume > -500, iterations=2)])
    values = np.concatenate(pooled)
    counts, edges = np.histogram(values, bins=np.arange(-400, 401, 10))
    centres = (edges[:-1] + edges[1:]) / 2
    fat, soft = (centres >= -200) & (centres <= -40), (centres >= -20) & (centres <= 120)
    assert -130 <= centres[fat][counts[fat].argmax()] <= -60  # fat about -100 HU (found -95)
    assert 20 <= centres[soft][counts[soft].argmax()] <= 70  # muscle / soft tissue about +40 HU (found 45)
    assert np.percentile(values, 99.5) > 800  # bone (found about 1300)

    def centre(name):  # physical centroid (LPS mm)
        index = np.argwhere(sitk.GetArrayViewFromImage(case.structures[name])).mean(axis=0)[::-1]
        return np.array(case.image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    assert centre("Parotid_L")[0] > centre("Parotid_R")[0] + 40  # left parotid on patient left (+x)
    assert centre("SpinalCord")[1] > centre("Mandible")[1] + 30  # spine posterior (+y) of the mandible
    assert centre("Brainstem")[2] > centre("SpinalCord")[2]  # superior = increasing z
    parotid_hu = hu[sitk.GetArrayViewFromImage(case.structures["Parotid_L"]) > 0]
    assert -100 < np.median(parotid_hu) < 80


def test_openkbp_shared_cohort_selection():
    shared("openkbp")
    everything = ds.cohort_cases({"dataset": "openkbp"})
    assert len(everything) == 160
    assert [p.name for p in everything[:3]] == ["pt_1", "pt_2", "pt_3"]
    assert ds.cohort_cases({"dataset": "openkbp", "patients": {"first": 4}}) == everything[:4]
    assert ds.cohort_cases({"dataset": "openkbp", "patients": {"range": [10, 12]}}) == everything[10:12]


# ----------------------------------------------------------------------------------------------
# DeepMind layout


def write_mask(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.5), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return image


def blob(shape=(6, 20, 24), side=+1, shift=0):
    array = np.zeros(shape, np.uint8)
    x0 = shape[2] // 2 + side * 6
    array[2:4, 8 + shift:12 + shift, x0 - 2:x0 + 2] = 1
    return array


def make_deepmind(root: Path, ct=True) -> Path:
    nrrds = root / "nrrds"
    for split, scans in (("test", ["scanA", "scanB"]), ("validation", ["scanC"])):
        for observer, shift in (("oncologist", 0), ("radiographer", 1)):
            for scan in scans:
                seg = nrrds / split / observer / scan / "segmentations"
                write_mask(seg / "Parotid-Lt.nrrd", blob(side=+1, shift=shift))
                write_mask(seg / "Parotid-Rt.nrrd", blob(side=-1, shift=shift))
                if ct and observer == "oncologist" and scan == "scanA":
                    ct_image = sitk.GetImageFromArray(np.full((6, 20, 24), 40, np.int16))
                    ct_image.SetSpacing((1.0, 1.0, 2.5))
                    sitk.WriteImage(ct_image, str(seg.parent / "CT_IMAGE.nrrd"))
    return root


def test_deepmind_scans_read_and_pairs(tmp_path):
    root = make_deepmind(tmp_path / "deepmind-tcia-hn")
    scans = ds.deepmind_scans(root)
    assert [(s.scan, s.split) for s in scans] == [("scanA", "test"), ("scanB", "test"), ("scanC", "validation")]
    onc = root / "nrrds" / "test" / "oncologist" / "scanA"
    case = ds.read_deepmind_scan(onc, "oncologist")
    assert case.patient_id == "scanA" and set(case.structures) == {"Parotid_L", "Parotid_R"}
    assert case.image.GetPixelID() == sitk.sitkInt16  # CT_IMAGE.nrrd found
    rad = ds.read_deepmind_scan(onc, "radiographer")  # same scan, other observer, CT from the sibling
    assert rad.source == root / "nrrds" / "test" / "radiographer" / "scanA"
    assert rad.image.GetPixelID() == sitk.sitkInt16
    no_ct = ds.read_deepmind_scan(root / "nrrds" / "test" / "oncologist" / "scanB")
    assert no_ct.image.GetMetaData(ds.REFERENCE_GRID_KEY) == "1"
    assert not ds.grid_differences(no_ct.image, no_ct.structures["Parotid_L"])
    pairs = ds.deepmind_pairs(root)
    assert [p[0] for p in pairs] == ["scanA", "scanB", "scanC"]
    _, first, second = pairs[0]
    assert not ds.grid_differences(first.image, second.image)
    a = sitk.GetArrayViewFromImage(first.structures["Parotid_L"]) > 0
    b = sitk.GetArrayViewFromImage(second.structures["Parotid_L"]) > 0
    assert 0 < (a & b).sum() < a.sum()  # shifted by one voxel: overlapping, not identical
    assert ds.deepmind_pairs(root / "nrrds", scans=["scanC"])[0][0] == "scanC"
    with pytest.raises(CrossmodError) as excinfo:
        ds.deepmind_pairs(root, scans=["scanZ"])
    one_line_error(excinfo, "scanZ")
    radiographer = ds.cohort_cases({"dataset": "deepmind-tcia-hn", "root": str(root), "observer": "radiographer",
                                    "patients": ["scanC"]})
    assert radiographer == [root / "nrrds" / "validation" / "radiographer" / "scanC"]


def test_deepmind_errors(tmp_path):
    root = make_deepmind(tmp_path / "dm", ct=False)
    folder = root / "nrrds" / "test" / "oncologist" / "scanA"
    (folder / "segmentations" / "Parotid-Rt.nrrd").unlink()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_deepmind_scan(folder)
    one_line_error(excinfo, "Parotid-Rt.nrrd", "allow_empty")
    assert set(ds.read_deepmind_scan(folder, allow_empty=True).structures) == {"Parotid_L"}
    write_mask(folder / "segmentations" / "Parotid-Rt.nrrd", np.zeros((6, 20, 24)))
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_deepmind_scan(folder)
    one_line_error(excinfo, "Parotid-Rt.nrrd", "empty")
    # a mask on another region than the other one (the reference grid): refused
    write_mask(folder / "segmentations" / "Parotid-Rt.nrrd", blob(), origin=(30.0, 0.0, 0.0))
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_deepmind_scan(folder)
    one_line_error(excinfo, "Parotid-Rt.nrrd", "refusing to resample")
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_deepmind_scan(folder, observer="nurse")
    one_line_error(excinfo, "nurse")
    with pytest.raises(CrossmodError) as excinfo:
        ds.deepmind_scans(tmp_path)
    one_line_error(excinfo, tmp_path, "DeepMind")


def test_deepmind_shared_31_scans_two_observers():
    root = shared("deepmind-tcia-hn")
    scans = ds.deepmind_scans(root)
    assert len(scans) == 31
    assert sum(s.split == "test" for s in scans) == 24 and sum(s.split == "validation" for s in scans) == 7
    assert all(set(s.folders) == set(ds.DEEPMIND_OBSERVERS) for s in scans)
    _, first, second = ds.deepmind_pairs(root, scans=[scans[0].scan])[0]
    for case in (first, second):
        centres = {}
        for name, mask in case.structures.items():
            index = np.argwhere(sitk.GetArrayViewFromImage(mask)).mean(axis=0)[::-1]
            centres[name] = mask.TransformContinuousIndexToPhysicalPoint(index.tolist())
        assert centres["Parotid_L"][0] > centres["Parotid_R"][0]  # LPS: left is +x
    a = sitk.GetArrayViewFromImage(first.structures["Parotid_L"]) > 0
    b = sitk.GetArrayViewFromImage(second.structures["Parotid_L"]) > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.6  # two observers broadly agree


# ----------------------------------------------------------------------------------------------
# PDDCA layout and conform_mask


def make_image(shape=(10, 20, 20), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), value=0, dtype=np.int16):
    image = sitk.GetImageFromArray(np.full(shape, value, dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def make_pddca(folder: Path) -> Path:
    folder.mkdir(parents=True)
    sitk.WriteImage(make_image(value=40), str(folder / "img.nrrd"))
    left = np.zeros((10, 20, 20), np.uint8)
    left[4:6, 8:12, 14:18] = 1
    write_mask(folder / "structures" / "Parotid_L.nrrd", left, spacing=(1.0, 1.0, 2.0))
    write_mask(folder / "structures" / "Parotid_R.nrrd", left[:, :, ::-1], spacing=(1.0, 1.0, 2.0))
    return folder


def test_pddca_reads_and_resamples_same_extent(tmp_path):
    folder = make_pddca(tmp_path / "0522c0001")
    case = ds.read_pddca_case(folder)
    assert set(case.structures) == {"Parotid_L", "Parotid_R"}
    # the right parotid drawn on a coarser grid covering the same region: resampled
    coarse = np.zeros((5, 10, 10), np.uint8)
    coarse[2:3, 4:6, 1:3] = 1
    write_mask(folder / "structures" / "Parotid_R.nrrd", coarse, spacing=(2.0, 2.0, 4.0),
               origin=(0.5, 0.5, 1.0))
    case = ds.read_pddca_case(folder)
    right = sitk.GetArrayViewFromImage(case.structures["Parotid_R"])
    assert right.shape == (10, 20, 20) and right.sum() == 2 * 4 * 4
    assert not ds.grid_differences(case.structures["Parotid_R"], case.image)


def test_pddca_errors(tmp_path):
    folder = make_pddca(tmp_path / "case")
    write_mask(folder / "structures" / "Parotid_R.nrrd", np.ones((10, 20, 20)), spacing=(1.0, 1.0, 2.0),
               origin=(0.0, 0.0, 6.0))  # shifted by 3 slices
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_pddca_case(folder)
    one_line_error(excinfo, "Parotid_R.nrrd", "refusing to resample")
    (folder / "structures" / "Parotid_R.nrrd").unlink()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_pddca_case(folder)
    one_line_error(excinfo, "Parotid_R", "allow_empty")
    assert set(ds.read_pddca_case(folder, allow_empty=True).structures) == {"Parotid_L"}
    write_mask(folder / "structures" / "Parotid_R.nrrd", np.zeros((10, 20, 20)), spacing=(1.0, 1.0, 2.0))
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_pddca_case(folder)
    one_line_error(excinfo, "Parotid_R.nrrd", "empty")
    (folder / "img.nrrd").unlink()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_pddca_case(folder)
    one_line_error(excinfo, folder, "no image")


def test_conform_mask_half_voxel_tolerance():
    image = make_image()
    mask = make_image(dtype=np.uint8)
    assert ds.conform_mask(mask, image) is mask
    mask.SetOrigin((0.4, 0.0, 0.0))  # 0.4 voxel off: same region, resampled
    assert not ds.grid_differences(ds.conform_mask(mask, image, "m.nrrd"), image)
    mask.SetOrigin((0.6, 0.0, 0.0))  # beyond half a voxel: refused
    with pytest.raises(CrossmodError) as excinfo:
        ds.conform_mask(mask, image, "m.nrrd")
    one_line_error(excinfo, "m.nrrd", "origin")
    flipped = make_image(dtype=np.uint8)  # same box, z axis flipped: resampled, not refused
    flipped.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    flipped.SetOrigin((0.0, 0.0, 18.0))
    assert not ds.grid_differences(ds.conform_mask(flipped, image, "f.nrrd"), image)
    with pytest.raises(CrossmodError) as excinfo:
        ds.conform_mask(sitk.Image(4, 4, sitk.sitkUInt8), image, "two_d.nrrd")
    one_line_error(excinfo, "two_d.nrrd", "2D")


# ----------------------------------------------------------------------------------------------
# nnU-Net raw layout


def toy_case(pid: str, nz=4) -> Case:
    image = make_image(shape=(nz, 12, 14), value=100, dtype=np.int16)
    left = np.zeros((nz, 12, 14), np.uint8)
    left[1:3, 4:7, 9:12] = 1
    structures = {}
    for name, array in (("Parotid_L", left), ("Parotid_R", left[:, :, ::-1].copy())):
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(image)
        structures[name] = mask
    return Case(pid, image, structures, None)


def test_nnunet_write_read_volumes(tmp_path):
    cases = [toy_case("mr_001"), toy_case("mr_002")]
    out = ds.write_nnunet_dataset(cases, tmp_path / "nnUNet_raw", "Dataset501_ParotidMR", modality="MR")
    assert out == tmp_path / "nnUNet_raw" / "Dataset501_ParotidMR"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"background": 0, "Parotid_L": 1, "Parotid_R": 2}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["mr_001_0000.nii.gz", "mr_002_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["mr_001.nii.gz", "mr_002.nii.gz"]
    assert [p.name for p in out.parent.iterdir()] == ["Dataset501_ParotidMR"]  # no temporary left
    back = ds.read_nnunet_dataset(out)
    assert [c.patient_id for c in back] == ["mr_001", "mr_002"]
    for original, read in zip(cases, back):
        for name in ("Parotid_L", "Parotid_R"):
            np.testing.assert_array_equal(sitk.GetArrayFromImage(read.structures[name]),
                                          sitk.GetArrayFromImage(original.structures[name]))
        assert read.image.GetSpacing() == pytest.approx(original.image.GetSpacing())


def test_nnunet_slices_from_cases_and_arrays(tmp_path):
    out = ds.write_nnunet_dataset([toy_case("ct_1", nz=3)], tmp_path, "Dataset502_Slices", "CT", mode="slices")
    names = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert names == ["ct_1_z000_0000.nii.gz", "ct_1_z001_0000.nii.gz", "ct_1_z002_0000.nii.gz"]
    image = sitk.ReadImage(str(out / "imagesTr" / "ct_1_z001_0000.nii.gz"))
    assert image.GetSize() == (14, 12, 1)
    assert image.GetOrigin()[2] == pytest.approx(2.0)  # slice 1 keeps its position (2 mm spacing)
    assert len(ds.read_nnunet_dataset(out, allow_empty=True)) == 3

    labels = np.zeros((2, 8, 9), np.uint8)
    labels[0, 2:4, 5:7] = 1
    labels[0, 2:4, 1:3] = 2
    arrays = {"image": np.random.default_rng(0).random((2, 8, 9)).astype(np.float32), "labels": labels,
              "patient": np.array(["p1", "p1"]), "slice_index": np.array([4, 5])}
    out = ds.write_nnunet_dataset(arrays, tmp_path, "Dataset503_Arrays", mode="slices", spacing=(2.0, 2.0))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["p1_z004.nii.gz", "p1_z005.nii.gz"]
    back = ds.read_nnunet_dataset(out, allow_empty=True)
    assert back[0].image.GetSize() == (9, 8, 1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back[0].structures["Parotid_R"])[0], labels[0] == 2)
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)  # second slice has no parotid
    one_line_error(excinfo, "p1_z005.nii.gz", "empty")


def test_nnunet_reads_label_aliases(tmp_path):
    out = ds.write_nnunet_dataset([toy_case("a")], tmp_path, "Dataset504_Alias")
    meta = json.loads((out / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "parotid-left": 1, "RIGHT_PAROTID": 2, "Mandible": 3}
    (out / "dataset.json").write_text(json.dumps(meta))
    case = ds.read_nnunet_dataset(out)[0]
    assert set(case.structures) == {"Parotid_L", "Parotid_R"}
    assert ds.parotid_name("Parotid Gland Left") == "Parotid_L" and ds.parotid_name("Mandible") is None


def test_nnunet_write_is_atomic_and_validates(tmp_path):
    bad = toy_case("b")
    bad.structures["Parotid_R"] = bad.structures["Parotid_L"]  # overlapping glands
    with pytest.raises(CrossmodError) as excinfo:
        ds.write_nnunet_dataset([toy_case("a"), bad], tmp_path, "Dataset505_Bad")
    one_line_error(excinfo, "b", "overlap")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CrossmodError) as excinfo:
        ds.write_nnunet_dataset([toy_case("a")], tmp_path, "MyDataset")
    one_line_error(excinfo, "MyDataset", "DatasetXXX_Name")
    with pytest.raises(CrossmodError) as excinfo:
        ds.write_nnunet_dataset([toy_case("a"), toy_case("a")], tmp_path, "Dataset506_Dup")
    one_line_error(excinfo, "'a'", "twice")
    assert list(tmp_path.iterdir()) == []


def test_nnunet_read_errors(tmp_path):
    out = ds.write_nnunet_dataset([toy_case("a"), toy_case("b")], tmp_path, "Dataset507_Err")
    meta_path = out / "dataset.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "numTraining": 3}))
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)
    one_line_error(excinfo, meta_path, "numTraining")

    meta_path.write_text(json.dumps({**meta, "labels": {"background": 0, "liver": 1}}))
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)
    one_line_error(excinfo, meta_path, "parotid")

    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "file_ending"}))
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)
    one_line_error(excinfo, meta_path, "file_ending")

    meta_path.write_text("{not json")
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)
    one_line_error(excinfo, meta_path, "JSON")

    meta_path.write_text(json.dumps(meta))
    (out / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)
    one_line_error(excinfo, out / "labelsTr" / "b.nii.gz")

    meta_path.unlink()
    with pytest.raises(CrossmodError) as excinfo:
        ds.read_nnunet_dataset(out)
    one_line_error(excinfo, meta_path)


# ----------------------------------------------------------------------------------------------
# Data root and cohorts


def test_data_root_precedence(tmp_path, monkeypatch):
    option, env = tmp_path / "opt", tmp_path / "env"
    option.mkdir()
    env.mkdir()
    monkeypatch.setenv(ds.DATA_ROOT_ENV, str(env))
    assert ds.data_root(option) == option
    assert ds.data_root() == env
    monkeypatch.setenv(ds.DATA_ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(CrossmodError) as excinfo:
        ds.data_root()
    one_line_error(excinfo, tmp_path / "missing", ds.DATA_ROOT_ENV)
    with pytest.raises(CrossmodError) as excinfo:
        ds.data_root(tmp_path / "nope")
    one_line_error(excinfo, tmp_path / "nope")
    monkeypatch.delenv(ds.DATA_ROOT_ENV)
    default = ds.REPOSITORY_ROOT.parent / "shared" / "data"
    if default.is_dir():
        assert ds.data_root() == default
    else:
        with pytest.raises(CrossmodError) as excinfo:
            ds.data_root()
        one_line_error(excinfo, ds.DATA_ROOT_ENV)


def test_cohort_cases_selection_and_errors(tmp_path, monkeypatch):
    base = tmp_path / "root" / "openkbp" / "train-pats"
    for n in (1, 2, 10, 3):
        make_openkbp_patient(base / f"pt_{n}")
    monkeypatch.setenv(ds.DATA_ROOT_ENV, str(tmp_path / "root"))

    def names(spec):
        return [p.name for p in ds.cohort_cases(spec)]

    assert names({"dataset": "openkbp", "root": None, "patients": "all"}) == ["pt_1", "pt_2", "pt_3", "pt_10"]
    assert names({"dataset": "openkbp", "patients": ["pt_10", 2]}) == ["pt_10", "pt_2"]
    assert names({"dataset": "openkbp", "patients": {"first": 2}}) == ["pt_1", "pt_2"]
    assert names({"dataset": "openkbp", "patients": {"range": [1, 3]}}) == ["pt_2", "pt_3"]
    cases = ds.load_cohort({"dataset": "openkbp", "patients": {"first": 1}})
    assert cases[0].patient_id == "pt_1"
    for spec, needle in [
        ({"dataset": "openkbp", "patients": ["pt_99"]}, "pt_99"),
        ({"dataset": "openkbp", "patients": {"first": 9}}, "first"),
        ({"dataset": "openkbp", "patients": {"range": [3, 2]}}, "range"),
        ({"dataset": "openkbp", "patients": "some"}, "patients"),
        ({"dataset": "openkbp", "patients": ["pt_1", "pt_1"]}, "twice"),
        ({"dataset": "mystery"}, "mystery"),
        ({"dataset": "openkbp", "colour": "red"}, "colour"),
        ({"dataset": "pddca"}, "pddca"),
    ]:
        with pytest.raises(CrossmodError) as excinfo:
            ds.cohort_cases(spec)
        one_line_error(excinfo, needle)
    pddca = tmp_path / "pd"
    make_pddca(pddca / "case_2")
    make_pddca(pddca / "case_10")
    assert names({"dataset": "pddca", "root": str(pddca)}) == ["case_2", "case_10"]
    assert [c.patient_id for c in ds.load_cohort({"dataset": "pddca", "root": str(pddca)})] == ["case_2", "case_10"]

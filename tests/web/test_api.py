"""The web API with FastAPI's test client: upload -> box -> 3D mask, refine, edit, undo/redo,
export geometry, SSA review, and the security limits (traversal, uploads, sessions)."""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from slidesam.data.io import read_image
from tests.web.conftest import wait_job


def _upload(client, path, name=None):
    with open(path, "rb") as f:
        return client.post("/api/sessions", files={"file": (name or path.name, f)})


def _mask(client, sid) -> np.ndarray:
    """The session's label map, read back from the NIfTI export."""
    r = client.get(f"/api/sessions/{sid}/export")
    assert r.status_code == 200, r.text
    img = sitk.ReadImage(_tmp_file(r.content))
    return sitk.GetArrayFromImage(img)


def _tmp_file(data: bytes) -> str:
    """``data`` in a NIfTI file of the test run's temporary folder (removed with it)."""
    path = Path(tempfile.mkdtemp(prefix="slidesam-test-")) / "mask.nii.gz"
    path.write_bytes(data)
    return str(path)


def _box_prompt(client, sid, case, **extra):
    body = {"slice": case.slice, "label": 1, "box": list(case.box), **extra}
    r = client.post(f"/api/sessions/{sid}/prompts", json=body)
    assert r.status_code == 200, r.text
    job = wait_job(client, sid)
    assert job["state"] == "done", job
    return job


@pytest.fixture
def opened(make_client, data_dir, case):
    """(client, session id) with the arterial phantom uploaded."""
    client = make_client()
    r = _upload(client, data_dir / "case" / "arterial.nii.gz")
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["shape"] == list(case.images["arterial"].shape)
    assert s["axis"] == 0
    assert s["version"] == 0
    assert not s["can_undo"]
    return client, s["id"]


def test_box_propagates_point_refines_undo_redo_are_exact(opened, case):
    client, sid = opened
    job = _box_prompt(client, sid, case)
    assert job["windows"] >= 3
    assert job["encoder_passes"] >= 1
    after_box = _mask(client, sid)
    x0, y0, x1, y1 = case.box
    z = case.slice
    inside = after_box[z, y0 : y1 + 1, x0 : x1 + 1] == 1
    assert inside.sum() >= 0.5 * case.tumor["arterial"][z].sum()  # the object, on its slice
    assert (after_box[z] == 1).sum() - inside.sum() <= inside.sum()  # mostly within the box
    slices = np.flatnonzero((after_box == 1).any(axis=(1, 2)))
    assert len(slices) >= 5
    assert z in slices
    assert set(np.unique(after_box)) == {0, 1}

    state = client.get(f"/api/sessions/{sid}").json()
    assert state["can_undo"]
    assert state["prompts"][0]["box"] == [float(v) for v in case.box]
    assert state["label_slices"]["1"] == slices.tolist()

    # a negative point on a tumour-free slice edge of the mask: the object is re-run
    zz = int(slices[-1])
    ys, xs = np.nonzero(after_box[zz] == 1)
    r = client.post(
        f"/api/sessions/{sid}/prompts",
        json={"slice": zz, "points": [[int(xs[0]), int(ys[0])]], "point_labels": [0]},
    )
    assert r.status_code == 200, r.text
    assert wait_job(client, sid)["state"] == "done"
    after_point = _mask(client, sid)
    prompts = client.get(f"/api/sessions/{sid}").json()["prompts"]
    assert len(prompts) == 2
    pt = next(p for p in prompts if p["slice"] == zz)
    assert pt["point_labels"] == [0]
    assert pt["box"] is not None
    assert not np.array_equal(after_point, after_box)

    state = client.post(f"/api/sessions/{sid}/undo").json()
    assert np.array_equal(_mask(client, sid), after_box)  # exact
    assert len(state["prompts"]) == 1
    assert state["can_redo"]
    client.post(f"/api/sessions/{sid}/redo")
    assert np.array_equal(_mask(client, sid), after_point)
    client.post(f"/api/sessions/{sid}/undo")
    client.post(f"/api/sessions/{sid}/undo")
    assert not _mask(client, sid).any()
    r = client.post(f"/api/sessions/{sid}/undo")
    assert r.status_code == 400
    assert r.json() == {"error": "nothing to undo"}


def test_embeddings_are_computed_once_per_volume(opened, case):
    client, sid = opened
    first = _box_prompt(client, sid, case)
    mask = _mask(client, sid)
    client.post(f"/api/sessions/{sid}/undo")
    again = _box_prompt(client, sid, case)
    assert first["encoder_passes"] > 0
    assert again["encoder_passes"] == 0  # every window came from the session's cache
    assert np.array_equal(_mask(client, sid), mask)


def test_slice_only_prompt_changes_one_slice(opened, case):
    client, sid = opened
    _box_prompt(client, sid, case, propagate=False)
    mask = _mask(client, sid)
    assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [case.slice]


def test_brush_eraser_and_their_undo(opened):
    client, sid = opened
    r = client.post(
        f"/api/sessions/{sid}/edit",
        json={"slice": 3, "label": 2, "mode": "brush", "radius": 2, "points": [[10, 10], [20, 10]]},
    )
    assert r.status_code == 200, r.text
    m = _mask(client, sid)
    # a 2-px round tip along y = 10 from x = 10 to 20: rows 8..12, columns 8..22
    assert m[3, 10, 10:21].tolist() == [2] * 11
    assert m[3, 8, 15] == 2
    assert m[3, 13, 15] == 0
    assert m[3, 10, 7] == 0
    assert m[3, 10, 23] == 0
    assert set(np.flatnonzero(m.any(axis=(1, 2)))) == {3}
    brushed = m.copy()
    client.post(
        f"/api/sessions/{sid}/edit",
        json={"slice": 3, "mode": "erase", "radius": 1, "points": [[15, 10]]},
    )
    m = _mask(client, sid)
    assert m[3, 10, 15] == 0
    assert m[3, 10, 12] == 2
    client.post(f"/api/sessions/{sid}/undo")
    assert np.array_equal(_mask(client, sid), brushed)
    r = client.post(f"/api/sessions/{sid}/edit", json={"slice": 99, "points": [[1, 1]]})
    assert r.status_code == 400
    assert "out of range" in r.json()["error"]


def _edit(client, sid, **body):
    r = client.post(f"/api/sessions/{sid}/edit", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("prompt", ["negative point", "smaller box"])
def test_hand_edits_survive_new_prompts_and_undo_is_exact(opened, case, prompt):
    client, sid = opened
    _box_prompt(client, sid, case)
    after_box = _mask(client, sid)
    z = case.slice
    x0, y0, x1, y1 = case.box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    # paint a bar of object 1 far from the tumour and erase a hole in its middle, on slice z
    assert not after_box[z, 2:5, 1:12].any()
    assert after_box[z, cy - 1 : cy + 2, cx - 1 : cx + 2].all()
    _edit(client, sid, slice=z, label=1, radius=1, points=[[2, 3], [10, 3]])
    state = _edit(client, sid, slice=z, mode="erase", radius=1, points=[[cx, cy]])
    # radius 1: rows 2 and 4 get x = 2..10, row 3 x = 1..11 (29); the eraser a plus (5)
    assert state["hand_edits"] == {"painted": 29, "erased": 5}
    before = _mask(client, sid)
    assert before[z, 3, 1:12].tolist() == [1] * 11
    assert before[z, 2, 2:11].tolist() == [1] * 9
    assert before[z, cy, cx] == 0

    if prompt == "negative point":  # on the mask's last slice: the object is re-run in 3D
        zz = int(np.flatnonzero((after_box == 1).any(axis=(1, 2)))[-1])
        ys, xs = np.nonzero(after_box[zz] == 1)
        body = {"slice": zz, "points": [[int(xs[0]), int(ys[0])]], "point_labels": [0]}
    else:  # a new box on the edited slice replaces its box
        body = {"slice": z, "box": [x0 + 2, y0 + 2, x1 - 2, y1 - 2]}
    assert client.post(f"/api/sessions/{sid}/prompts", json=body).status_code == 200
    assert wait_job(client, sid)["state"] == "done"
    after = _mask(client, sid)
    assert not np.array_equal(after, before)  # the model's object changed ...
    assert after[z, 2:5, 1:12].tolist() == before[z, 2:5, 1:12].tolist()  # ... the bar did not
    assert not after[z, cy - 1 : cy + 2, cx].any()  # the erased plus stays clear
    assert not after[z, cy, cx - 1 : cx + 2].any()
    state = client.get(f"/api/sessions/{sid}").json()
    assert state["hand_edits"] == {"painted": 29, "erased": 5}
    assert len(state["prompts"]) == (2 if prompt == "negative point" else 1)

    state = client.post(f"/api/sessions/{sid}/undo").json()  # exactly the state before
    assert np.array_equal(_mask(client, sid), before)
    assert state["prompts"][0]["box"] == [float(v) for v in case.box]
    assert len(state["prompts"]) == 1
    assert state["undo"] == f"eraser on slice {z}"
    client.post(f"/api/sessions/{sid}/redo")
    assert np.array_equal(_mask(client, sid), after)

    # restore gives the hole back to the model, which has the tumour there
    state = _edit(client, sid, slice=z, mode="restore", radius=1, points=[[cx, cy]])
    assert state["hand_edits"] == {"painted": 29, "erased": 0}
    restored = _mask(client, sid)
    assert restored[z, cy, cx] == 1
    assert np.array_equal(restored[z, 2:5, 1:12], after[z, 2:5, 1:12])
    for _ in range(4):  # restore, prompt, eraser, brush
        client.post(f"/api/sessions/{sid}/undo")
    assert np.array_equal(_mask(client, sid), after_box)
    assert client.get(f"/api/sessions/{sid}").json()["hand_edits"] == {"painted": 0, "erased": 0}


def test_export_and_save_keep_the_input_geometry(make_client, data_dir, case):
    client = make_client()
    r = client.post("/api/sessions/open", json={"path": "case/arterial.nii.gz"})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    client.post(f"/api/sessions/{sid}/edit", json={"slice": 5, "radius": 3, "points": [[30, 30]]})
    image = sitk.ReadImage(str(data_dir / "case" / "arterial.nii.gz"))
    r = client.get(f"/api/sessions/{sid}/export")
    assert r.headers["content-disposition"] == 'attachment; filename="arterial_mask.nii.gz"'
    exported = sitk.ReadImage(_tmp_file(r.content))
    for got in (exported,):
        assert got.GetSize() == image.GetSize()
        assert got.GetSpacing() == image.GetSpacing()
        assert got.GetOrigin() == image.GetOrigin()
        assert got.GetDirection() == image.GetDirection()
        assert got.GetPixelID() == sitk.sitkUInt8
    r = client.post(f"/api/sessions/{sid}/save")
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "case/arterial_mask.nii.gz", "voxels": 29}  # disc of radius 3
    saved = read_image(data_dir / "case" / "arterial_mask.nii.gz", modality=None)
    assert saved.geometry == read_image(data_dir / "case" / "arterial.nii.gz").geometry
    assert int(saved.array.sum()) == 29
    assert saved.array[5, 30, 30] == 1
    (data_dir / "case" / "arterial_mask.nii.gz").unlink()


def test_slices_as_bytes(opened, case):
    client, sid = opened
    r = client.get(f"/api/sessions/{sid}/image/{case.slice}")
    assert r.headers["x-shape"] == "64,64"
    got = np.frombuffer(r.content, "<f4").reshape(64, 64)
    assert np.array_equal(got, case.images["arterial"].array[case.slice].astype(np.float32))
    r = client.get(f"/api/sessions/{sid}/mask/0")
    assert r.content == bytes(64 * 64)
    assert r.headers["x-version"] == "0"
    r = client.get(f"/api/sessions/{sid}/image/24")
    assert r.status_code == 400
    assert r.json()["error"] == "slice 24 is out of range 0..23"


@pytest.mark.parametrize(
    "path",
    ["../outside.nii.gz", "case/../../outside.nii.gz", "/etc/passwd", "link/outside.nii.gz"],
)
def test_paths_never_leave_the_data_dir(make_client, data_dir, tmp_path, path):
    outside = data_dir.parent / "outside.nii.gz"
    outside.write_bytes((data_dir / "case" / "plain.nii.gz").read_bytes())
    link = data_dir / "link"
    if not link.exists():
        link.symlink_to(data_dir.parent, target_is_directory=True)
    client = make_client()
    r = client.post("/api/sessions/open", json={"path": path})
    assert r.status_code == 403, r.text
    assert r.json() == {"error": f"{path}: paths must stay inside the data folder"}
    r = client.post("/api/sessions/ssa", json={"plain": "case/plain.nii.gz", "arterial": path})
    assert r.status_code == 403
    listed = [f["path"] for f in client.get("/api/files").json()["files"]]
    assert listed == ["case/arterial.nii.gz", "case/plain.nii.gz"]
    assert len(client.app.state.store) == 0


def test_upload_limits_and_types(make_client, data_dir):
    client = make_client(max_upload_mb=0.01)  # 10 KiB
    big = data_dir / "case" / "arterial.nii.gz"
    assert big.stat().st_size > 20 * 1024
    r = _upload(client, big)
    assert r.status_code == 413
    assert r.json() == {"error": "upload too large: at most 0.01 MB"}

    client = make_client()
    cases = {
        "notes.txt": (b"hello", "unsupported file type"),
        "fake.nii.gz": (b"not gzip at all", "not gzip-compressed"),
        "fake.nii": (b"\x00" * 400, "not a NIfTI file"),
        "zipped.nii.gz": (gzip.compress(b"\x00" * 400), "not a NIfTI file"),
        "detached.nrrd": (
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
            b"data file: /etc/shadow\n\n",
            "detached NRRD data files are not accepted",
        ),
        "remote.mha": (b"ObjectType = Image\nNDims = 3\nElementDataFile = /etc/x.raw\n", "LOCAL"),
    }
    for name, (data, message) in cases.items():
        r = client.post("/api/sessions", files={"file": (name, io.BytesIO(data))})
        assert r.status_code == 400, (name, r.text)
        assert message in r.json()["error"], (name, r.json())
    r = client.post("/api/sessions", files={"other": ("a.nii.gz", io.BytesIO(b"x"))})
    assert r.status_code == 400
    assert r.json() == {"error": "missing file field 'file' in the upload"}
    assert len(client.app.state.store) == 0


def test_errors_are_json(opened):
    client, sid = opened
    r = client.get("/api/sessions/nope")
    assert r.status_code == 404
    assert r.json()["error"].startswith("no session 'nope'")
    r = client.post(f"/api/sessions/{sid}/prompts", json={"slice": "x"})
    assert r.status_code == 422
    assert r.json()["error"].startswith("invalid request: slice")
    r = client.post(f"/api/sessions/{sid}/prompts", json={"slice": 2, "box": [50, 50, 10, 10]})
    assert r.status_code == 400
    assert "empty box" in r.json()["error"]
    r = client.post(f"/api/sessions/{sid}/prompts", json={"slice": 2})
    assert r.status_code == 400
    assert "has no box, points or mask" in r.json()["error"]
    r = client.get("/api/files")
    assert r.status_code == 200
    r = client.get("/nothing-here")
    assert r.status_code == 404
    assert r.json() == {"error": "Not Found"}


def test_session_and_memory_limits(make_client, data_dir):
    client = make_client(max_sessions=2)
    ids = []
    for _ in range(2):
        r = client.post("/api/sessions/open", json={"path": "case/plain.nii.gz"})
        assert r.status_code == 200
        ids.append(r.json()["id"])
    r = client.post("/api/sessions/open", json={"path": "case/plain.nii.gz"})
    assert r.status_code == 503
    assert r.json()["error"].startswith("too many open sessions (2)")
    assert client.delete(f"/api/sessions/{ids[0]}").json() == {"closed": ids[0]}
    assert client.get(f"/api/sessions/{ids[0]}").status_code == 404
    assert client.post("/api/sessions/open", json={"path": "case/plain.nii.gz"}).status_code == 200

    # an idle session past its time is closed to make room
    client = make_client(max_sessions=1, idle_seconds=0.0)
    first = client.post("/api/sessions/open", json={"path": "case/plain.nii.gz"}).json()["id"]
    assert client.post("/api/sessions/open", json={"path": "case/plain.nii.gz"}).status_code == 200
    assert client.get(f"/api/sessions/{first}").status_code == 404

    # 24 x 64 x 64 int16 needs ~0.5 MB with its copies
    client = make_client(max_memory_mb=0.1)
    r = client.post("/api/sessions/open", json={"path": "case/plain.nii.gz"})
    assert r.status_code == 503
    assert r.json()["error"].startswith("not enough memory")


def test_ssa_review_accept_and_correct(make_client, case):
    client = make_client()
    r = client.post(
        "/api/sessions/ssa", json={"plain": "case/plain.nii.gz", "arterial": "case/arterial.nii.gz"}
    )
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    job = wait_job(client, sid)
    assert job["state"] == "done", job
    assert job["kind"] == "ssa"
    state = client.get(f"/api/sessions/{sid}").json()
    review = state["review"]
    tumor = case.tumor["plain"]
    mask = _mask(client, sid)
    assert mask.any()
    assert set(np.unique(mask)) == {0, 1}
    dice = 2 * (mask.astype(bool) & tumor).sum() / (mask.astype(bool).sum() + tumor.sum())
    assert dice > 0.3  # the embedded models on a phantom: a tumour, not noise
    assert len(review) >= 3
    assert all(0 <= r["confidence"] <= 1 and r["reviewed"] is False for r in review)
    assert [r["slice"] for r in review] == sorted(r["slice"] for r in review)
    for r in review:
        assert r["accepted"] == (r["confidence"] >= 0.8)
    s = review[0]["slice"]
    state = client.post(f"/api/sessions/{sid}/review", json={"slice": s}).json()
    assert next(r for r in state["review"] if r["slice"] == s)["reviewed"] is True
    assert np.array_equal(_mask(client, sid), mask)  # marking does not change the mask
    state = client.post(f"/api/sessions/{sid}/undo").json()
    assert next(r for r in state["review"] if r["slice"] == s)["reviewed"] is False
    # correct one slice with a box on that slice only
    body = {"slice": case.slice, "box": list(case.box), "propagate": False}
    assert client.post(f"/api/sessions/{sid}/prompts", json=body).status_code == 200
    assert wait_job(client, sid)["state"] == "done"
    corrected = _mask(client, sid)
    changed = np.flatnonzero((corrected != mask).any(axis=(1, 2))).tolist()
    assert set(changed) <= {case.slice}
    # undoing the SSA run removes its mask and its confidence table; redo brings both back
    client.post(f"/api/sessions/{sid}/undo")
    assert np.array_equal(_mask(client, sid), mask)
    state = client.post(f"/api/sessions/{sid}/undo").json()
    assert state["review"] == []
    assert not state["can_undo"]
    assert state["redo"] == "SSA (plain phase)"
    assert not _mask(client, sid).any()
    state = client.post(f"/api/sessions/{sid}/redo").json()
    assert state["review"] == review
    assert np.array_equal(_mask(client, sid), mask)


def test_page_and_module_are_served(make_client):
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200
    assert '<canvas id="view"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/static/app.js")
    assert js.status_code == 200
    assert "javascript" in js.headers["content-type"]
    info = client.get("/api/info").json()
    assert info["data_dir"] is True
    assert info["sessions"] == 0

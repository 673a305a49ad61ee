"""Pseudo-labelling (Slide-SAM Appendix B): filters and NMS on hand-made masks, SLIC prompts,
and end to end with a stub predictor (exact masks) and a tiny seeded model (via the CLI)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import slidesam
from slidesam.cli import pseudo_label as cli
from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import write_image, write_mask
from slidesam.data.preprocess import resize_masks
from slidesam.inference.checkpoint import save_checkpoint
from slidesam.inference.predictor import WindowPrediction
from slidesam.training.pseudo_label import (
    FILTERS,
    PSEUDO_SOURCES,
    PseudoLabelConfig,
    find_volume_cases,
    grid_points,
    intensity_windows,
    mask_iou,
    mask_nms,
    pseudo_label_dataset,
    rejection_reason,
    superpixel_prompts,
)
from slidesam.training.windows import WindowDataset

# --------------------------------------------------------------------------------------------
# filters and NMS on hand-made masks


def _block(r0, r1, c0, c1, shape=(10, 10)):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


A = _block(2, 6, 2, 6)  # 16 px
B = _block(2, 6, 3, 7)  # A shifted one column: 12 shared, 20 in union -> IoU 0.6
C = A.copy()
C[6, 2] = True  # A plus one pixel: IoU 16 / 17 = 0.941
D = _block(7, 9, 7, 9)  # disjoint from A, B, C


def test_mask_iou_hand_computed():
    assert mask_iou(A, B) == pytest.approx(12 / 20)
    assert mask_iou(A, C) == pytest.approx(16 / 17)
    assert mask_iou(A, D) == 0.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0


@pytest.mark.parametrize(
    ("scores", "thresh", "expected"),
    [
        # C beats A (IoU 0.94 > 0.7): A dropped; B vs C: 12 / 21 = 0.571 -> kept
        ((0.90, 0.80, 0.95, 0.50), 0.7, [2, 1, 3]),
        # A first: C dropped (0.94), B kept (0.6 <= 0.7)
        ((0.95, 0.80, 0.90, 0.50), 0.7, [0, 1, 3]),
        # at 0.5 B is dropped by A (0.6 > 0.5) too
        ((0.95, 0.80, 0.90, 0.50), 0.5, [0, 3]),
        # IoU exactly at the threshold is kept (only "exceeds" suppresses)
        ((0.95, 0.80, 0.10, 0.50), 0.6, [0, 1, 3]),
        # ties: the lower index wins
        ((0.9, 0.9, 0.9, 0.9), 0.7, [0, 1, 3]),
    ],
)
def test_mask_nms(scores, thresh, expected):
    assert mask_nms([A, B, C, D], scores, thresh) == expected


def test_mask_nms_needs_one_score_per_mask():
    with pytest.raises(InputError, match="2 masks but 1 scores"):
        mask_nms([A, B], [0.5], 0.7)


CFG = PseudoLabelConfig(
    pred_iou_thresh=0.88, stability_thresh=0.92, min_area_fraction=0.05, max_area_fraction=0.3
)


@pytest.mark.parametrize(
    ("iou", "stab", "area", "reason"),
    [
        (0.95, 0.99, 20, None),
        (0.88, 0.92, 20, None),  # thresholds are inclusive
        (0.87, 0.10, 20, "pred_iou"),  # the first failing filter is reported
        (0.95, 0.91, 20, "stability"),
        (0.95, 0.99, 5, "area_small"),  # 5 of 100 px is not *above* 5 %
        (0.95, 0.99, 6, None),
        (0.95, 0.99, 30, None),  # 30 % is allowed
        (0.95, 0.99, 31, "area_large"),
    ],
)
def test_rejection_reason(iou, stab, area, reason):
    mask = np.zeros((10, 10), bool)
    mask.reshape(-1)[:area] = True
    assert rejection_reason(iou, stab, mask, CFG) == reason


def test_intensity_windows_over_the_body():
    arr = np.array([0, 0, 10, 10, -1000], np.float32).reshape(1, 1, 5)
    windows = intensity_windows(arr, arr > -500, (1.0, 2.0))  # mu 5, sigma 5
    assert windows == [(0.0, 10.0), (-5.0, 15.0)]
    with pytest.raises(InputError, match="no voxel inside the body"):
        intensity_windows(arr, arr > 500, (1.0,))
    with pytest.raises(InputError, match="one intensity"):
        intensity_windows(arr, arr == 0, (1.0,))


def test_grid_points_are_cell_centres():
    pts = grid_points((4, 8), 2)
    np.testing.assert_array_equal(pts, [[1.5, 0.5], [5.5, 0.5], [1.5, 2.5], [5.5, 2.5]])
    mask = np.zeros((4, 8), bool)
    mask[2:, 4:] = True  # only (5.5, 2.5) -> pixel (row 2, col 6) lies inside
    np.testing.assert_array_equal(grid_points((4, 8), 2, mask), [[5.5, 2.5]])


# --------------------------------------------------------------------------------------------
# SLIC prompts


def test_superpixel_prompts_fall_inside_the_bright_squares():
    img = np.zeros((64, 64), np.float32)
    img[8:24, 8:24] = 0.9
    img[36:56, 30:58] = 0.6
    squares = [(8, 24, 8, 24), (36, 56, 30, 58)]  # rows, cols (half-open)
    points, boxes = superpixel_prompts(img, n_segments=30, dark_threshold=0.1)
    assert points.shape[1] == 2
    assert boxes.shape == (len(points), 4)

    def square_of(x, y):
        return [i for i, (r0, r1, c0, c1) in enumerate(squares) if r0 <= y < r1 and c0 <= x < c1]

    hits = [square_of(x, y) for x, y in points]
    assert all(len(h) == 1 for h in hits), f"a point on the dark background: {points}"
    assert {h[0] for h in hits} == {0, 1}  # both squares are prompted
    for (x, y), (x0, y0, x1, y1), h in zip(points, boxes, hits, strict=True):
        r0, r1, c0, c1 = squares[h[0]]
        assert x0 <= x <= x1  # the point lies in its superpixel's box ...
        assert y0 <= y <= y1
        assert c0 <= x0  # ... and the box in its square
        assert x1 < c1
        assert r0 <= y0
        assert y1 < r1
    # with a body mask that excludes the second square, only the first is prompted
    body = np.zeros_like(img, bool)
    body[:32] = True
    points, _ = superpixel_prompts(img, n_segments=30, dark_threshold=0.1, mask=body)
    assert len(points)
    assert all(square_of(x, y) == [0] for x, y in points)


# --------------------------------------------------------------------------------------------
# end to end with a stub predictor whose masks are known exactly

SHAPE = (9, 40, 48)  # z has the fewest voxels: axial windows, centres 1..7, pseudo at 1 and 5
GEOM = Geometry(shape=SHAPE, spacing=(3.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.eye(3))
SQ_A = (slice(8, 16), slice(8, 16))  # 64 px: 3.3 % of the slice
SQ_B = (slice(22, 32), slice(26, 38))  # 120 px


def _volume() -> np.ndarray:
    arr = np.full(SHAPE, -1000, np.int16)  # air
    arr[:, 4:36, 4:44] = 0  # body: 1280 px = 67 % of the slice -> rejected as area_large
    arr[:, SQ_A[0], SQ_A[1]] = 200
    arr[:, SQ_B[0], SQ_B[1]] = 300
    return arr


def _square(sq) -> np.ndarray:
    m = np.zeros(SHAPE[1:], bool)
    m[sq] = True
    return m


class RegionStub:
    """A prompt's mask = the connected region of equal raw intensity holding its point (or its
    box centre), on each slice of the window. Three candidates: predicted IoU 0.95, 0.80, 0.95,
    centre stability 1.0, 1.0, 0.5, so candidate 1 fails pred_iou and 2 stability."""

    def __init__(self, window):
        self.window = window

    def set_volume(self, volume, *, axis):
        self.stack = np.moveaxis(volume.array, axis, 0)

    def predict(self, center, *, boxes=None, points=None, point_labels=None, multimask=True):
        n_slices = self.stack.shape[0]
        idx = [min(max(i, 0), n_slices - 1) for i in (center - 1, center, center + 1)]
        if points is not None:
            xy = np.asarray(points)[:, 0]
        else:
            b = np.asarray(boxes)
            xy = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
        masks = []
        for x, y in xy:
            r, c = int(np.rint(y)), int(np.rint(x))
            per_slice = []
            for i in idx:
                sl = self.stack[i]
                lab, _ = ndimage.label(sl == sl[r, c])
                per_slice.append(lab == lab[r, c])
            masks.append(np.stack(per_slice))
        masks = np.repeat(np.stack(masks)[:, None], 3, axis=1)  # (N, 3, 3, H, W)
        n = masks.shape[0]
        logits = np.where(masks, 5.0, -5.0).astype(np.float32)
        stability = np.ones((n, 3, 3), np.float32)
        stability[:, 2, 1] = 0.5
        return WindowPrediction(
            center=center,
            slices=tuple(idx),
            masks=masks,
            logits=logits,
            low_res_logits=logits,
            iou=np.tile(np.float32([0.95, 0.80, 0.95]), (n, 1)),
            stability=stability,
        )


@pytest.fixture
def volumes(tmp_path):
    """Case ``a`` unlabelled; case ``b`` with square A labelled (1) on slices 4..6 only."""
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    write_image(Volume(_volume(), GEOM), images / "a_0000.nii.gz")
    write_image(Volume(_volume(), GEOM), images / "b_0000.nii.gz")
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:7, SQ_A[0], SQ_A[1]] = 1
    write_mask(lab, GEOM, labels / "b.nii.gz")
    return images, labels


def _run(images, out, config, labels=None, calls=None, **kw):
    def factory(window):
        if calls is not None:
            calls.append(window)
        return RegionStub(window)

    return pseudo_label_dataset(
        images, out, config, make_predictor=factory, labels=labels, progress=False, **kw
    )


def _records(out, case):
    return [json.loads(x) for x in (out / "meta" / f"{case}.jsonl").read_text().splitlines()]


def test_end_to_end_with_stub(volumes, tmp_path):
    images, labels = volumes
    out = tmp_path / "pseudo"
    config = PseudoLabelConfig(size=32, image_format="png", prompts="both", points_per_side=4)
    summary = _run(images, out, config, labels=labels)

    assert summary["cases"] == 2
    assert summary["cases_done"] == 2
    assert summary["cases_failed"] == {}
    # pseudo-labels at centres 1 and 5 of each case; ground truth at centres 4, 5, 6 of case b
    assert summary["slices_pseudo_labelled"] == 4
    assert summary["records_pseudo"] == 4
    assert summary["records_gt"] == 3
    assert summary["windows"] == 2 * 2 + 2  # b's centres 4 and 6 are new windows; 5 is shared
    # every prompt yields one candidate failing pred_iou and one failing stability
    prompts = sum(summary["prompts"].values())
    assert summary["prompts"]["sam_auto"] == 4 * 4 * 16  # 4 slices, 4 windows, 16 grid points
    assert summary["candidates"] == 3 * prompts
    assert summary["rejected"]["pred_iou"] == summary["rejected"]["stability"] == prompts
    assert summary["rejected"]["area_small"] == 0
    # squares A and B survive on each pseudo slice, except A on b's slice 5 (ground truth there)
    assert summary["rejected"]["gt_overlap"] == 1
    kept_pseudo = summary["kept"]["sam_auto"] + summary["kept"]["prompt_from_superpixel"]
    assert kept_pseudo == 4 * 2 - 1
    assert summary["kept"]["gt"] == 3
    assert summary["candidates"] == sum(summary["rejected"].values()) + kept_pseudo
    assert summary["gt_masks_kept"] == {"label_1": 3}
    assert json.loads((out / "summary.json").read_text()) == summary

    settings = json.loads((out / "prepare.json").read_text())
    assert [t["name"] for t in settings["targets"]] == ["label_1", *PSEUDO_SOURCES]

    rec_a = _records(out, "a")
    assert [(r["kind"], r["slice_index"]) for r in rec_a] == [("pseudo", 1), ("pseudo", 5)]
    r = rec_a[0]
    assert r["indicator"] == [0, 1, 0]
    assert r["class_names"] == r["sources"]
    assert set(r["sources"]) <= set(PSEUDO_SOURCES)
    assert r["labels"] == [1 + PSEUDO_SOURCES.index(s) for s in r["sources"]]
    for m in r["mask_meta"]:
        assert m["pred_iou"] == 0.95
        assert m["stability"] == 1.0
        assert m["candidate"] == 0
        assert len(m["intensity_window"]) == 2
        assert m["window_sigma"] in config.sigmas
        assert "point" in m["prompt"]
        assert m["source"] in PSEUDO_SOURCES
    masks = np.load(out / r["mask"])["masks"]
    assert masks.shape == (2, 3, 32, 32)
    expected = {resize_masks(_square(sq), 32).tobytes() for sq in (SQ_A, SQ_B)}
    assert {m[1].tobytes() for m in masks} == expected
    assert not masks[:, [0, 2]].any()  # 2D pseudo-labels: neighbours left empty

    rec_b = _records(out, "b")
    assert [(r["kind"], r["slice_index"]) for r in rec_b] == [
        ("pseudo", 1),
        ("gt", 4),
        ("gt", 5),
        ("pseudo", 5),
        ("gt", 6),
    ]
    gt = {r["slice_index"]: r for r in rec_b if r["kind"] == "gt"}
    # slices 4..6 are annotated: a neighbour outside them is not
    assert [gt[c]["indicator"] for c in (4, 5, 6)] == [[0, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert gt[5]["sources"] == ["gt"]
    assert gt[5]["class_names"] == ["label_1"]
    assert gt[5]["image"] == rec_b[3]["image"]  # one image for both records of the window
    only_b = np.load(out / rec_b[3]["mask"])["masks"]
    assert [m[1].tobytes() for m in only_b] == [resize_masks(_square(SQ_B), 32).tobytes()]

    ds = WindowDataset(out)
    assert len(ds) == kept_pseudo + 3
    for i in range(len(ds)):
        s = ds[i]
        assert tuple(s.image.shape) == (3, 32, 32)
        assert s.mask[1].sum() > 0
        if s.class_name in PSEUDO_SOURCES:
            assert s.indicator.tolist() == [0.0, 1.0, 0.0]
    assert len(WindowDataset(out, classes=["label_1"])) == 3


def test_three_slice_masks_keep_2d_indicator(volumes, tmp_path):
    images, _ = volumes
    out = tmp_path / "pseudo"
    config = PseudoLabelConfig(size=32, image_format="npz", three_slice_masks=True)
    summary = _run(images, out, config)
    assert summary["kept"]["prompt_from_superpixel"] == 4 * 2
    assert summary["kept"]["sam_auto"] == summary["prompts"]["sam_auto"] == 0
    r = _records(out, "a")[0]
    assert r["indicator"] == [0, 1, 0]
    masks = np.load(out / r["mask"])["masks"]
    np.testing.assert_array_equal(masks[:, 0], masks[:, 1])  # the squares span every slice
    np.testing.assert_array_equal(masks[:, 2], masks[:, 1])


def test_resume_skips_finished_cases_and_refuses_other_settings(volumes, tmp_path):
    images, labels = volumes
    out = tmp_path / "pseudo"
    config = PseudoLabelConfig(size=32, image_format="png")
    calls: list = []
    first = _run(images, out, config, labels=labels, calls=calls)
    assert len(calls) == 2 * 4  # one predictor per case and intensity window
    (out / "meta" / "b.done.json").unlink()  # as if b had been interrupted
    calls.clear()
    second = _run(images, out, config, labels=labels, calls=calls)
    assert len(calls) == 4  # only b ran again
    assert second["cases_resumed"] == 1
    assert second["cases_done"] == 1
    for key in ("windows", "candidates", "rejected", "kept", "prompts"):
        assert second[key] == first[key]
    with pytest.raises(InputError, match=r"other settings \(stride\)"):
        _run(images, out, PseudoLabelConfig(size=32, image_format="png", stride=2), labels=labels)


def test_bad_inputs(volumes, tmp_path):
    images, labels = volumes
    with pytest.raises(InputError, match="no such image"):
        _run(tmp_path / "missing.nii.gz", tmp_path / "o", PseudoLabelConfig())
    with pytest.raises(InputError, match="no such label"):
        _run(images, tmp_path / "o", PseudoLabelConfig(), labels=tmp_path / "nolabels")
    # a label map on another grid: that case fails (no done marker), the other goes on
    other = Geometry(shape=SHAPE, spacing=(2.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.eye(3))
    write_mask(np.zeros(SHAPE, np.uint8), other, labels / "a.nii.gz")
    out = tmp_path / "o"
    summary = _run(images, out, PseudoLabelConfig(size=32), labels=labels)
    assert list(summary["cases_failed"]) == ["a"]
    assert "label grid does not match" in summary["cases_failed"]["a"]
    assert not (out / "meta" / "a.done.json").exists()
    assert (out / "meta" / "b.done.json").exists()
    with pytest.raises(InputError, match="stride must be"):
        PseudoLabelConfig(stride=0)
    with pytest.raises(InputError, match="prompts must be one of"):
        PseudoLabelConfig(prompts="random")


def test_find_volume_cases(tmp_path):
    for name in ("c1_0000.nii.gz", "c1_0001.nii.gz", "c2.nrrd"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(b"")
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "c1.nii.gz").write_bytes(b"")
    cases = find_volume_cases(tmp_path / "img", tmp_path / "lab")
    assert [(c.case_id, c.image.name, c.label and c.label.name) for c in cases] == [
        ("c1", "c1_0000.nii.gz", "c1.nii.gz"),  # channel _0001 skipped
        ("c2", "c2.nrrd", None),  # unlabelled: pseudo-labels only
    ]
    with pytest.raises(InputError, match="one label file for 2 images"):
        find_volume_cases(tmp_path / "img", tmp_path / "lab" / "c1.nii.gz")


# --------------------------------------------------------------------------------------------
# the CLI with a tiny seeded model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = slidesam.build_slidesam("tiny_64", lora_rank=2)
    return save_checkpoint(model, model.config, tmp_path_factory.mktemp("ckpt") / "model")


def _cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="slidesam")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["pseudo-label", *map(str, argv)])
    return args.func(args)


def test_cli_with_tiny_model(volumes, tmp_path, checkpoint, capsys):
    images, labels = volumes
    out = tmp_path / "pseudo"
    argv = [
        "--images", images, "--labels", labels, "--checkpoint", checkpoint, "--out", out,
        "--size", 32, "--format", "png", "--stride", 4, "--n-segments", 8,
        "--prompts", "both", "--points-per-side", 2, "--sigmas", 2, 0.5,
        "--pred-iou-thresh", 0, "--stability-thresh", 0, "--max-area", 1.0, "--no-progress",
    ]  # fmt: skip
    assert _cli(argv) == 0
    assert "2 cases (0 already done, 0 failed)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    kept_pseudo = sum(summary["kept"][s] for s in PSEUDO_SOURCES)
    assert summary["candidates"] == sum(summary["rejected"].values()) + kept_pseudo
    assert summary["candidates"] == 3 * sum(summary["prompts"].values()) > 0
    assert summary["rejected"]["stability"] == 0  # thresholds at 0 (an untrained IoU head may
    # predict IoU < 0, so pred_iou can still reject)
    assert set(summary["rejected"]) == set(FILTERS)
    ds = WindowDataset(out)
    assert len(ds) == kept_pseudo + summary["kept"]["gt"]
    for i in range(len(ds)):
        s = ds[i]
        expected = [0.0, 1.0, 0.0] if s.class_name in PSEUDO_SOURCES else None
        assert expected is None or s.indicator.tolist() == expected
    # a second run resumes both cases
    assert _cli(argv) == 0
    assert "2 cases (2 already done, 0 failed)" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, checkpoint):
    with pytest.raises(InputError, match="no such image"):
        _cli(["--images", tmp_path / "nothing.nii.gz", "--out", tmp_path / "o"])

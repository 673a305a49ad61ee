from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import write_image, write_mask
from slidesam.data.prepare import PrepareConfig, prepare_dataset
from slidesam.training.windows import (
    AugmentConfig,
    WeightedMixSampler,
    WindowDataset,
    WindowSample,
    augment_window,
    mixed_indices,
)
from tests.training.toy import toy_dataset

SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(prepared folder, summary) of the toy dataset at 32 px PNG; read-only for the tests."""
    root = tmp_path_factory.mktemp("windows")
    raw = toy_dataset(root)
    summary = prepare_dataset(
        raw, root / "out", PrepareConfig(size=SIZE, image_format="png"), progress=False
    )
    return root / "out" / raw.name, summary


@pytest.fixture
def prepared_copy(prepared, tmp_path):
    """A private copy of the prepared folder, for tests that edit it."""
    dst = tmp_path / prepared[0].name
    shutil.copytree(prepared[0], dst)
    return dst


def _records(folder, case):
    return [json.loads(x) for x in (folder / "meta" / f"{case}.jsonl").read_text().splitlines()]


def test_samples_are_window_target_pairs(prepared):
    folder, summary = prepared
    ds = WindowDataset(folder)
    assert summary["masks_kept"] == {"kidney": 8, "tumor": 4}
    assert len(ds) == sum(summary["masks_kept"].values()) == 12
    assert ds.dataset_sizes == (12,)
    assert ds.size == SIZE
    samples = [ds[i] for i in range(len(ds))]
    assert [s.class_name for s in samples].count("tumor") == 4
    assert {(s.class_name, s.label) for s in samples} == {("kidney", 0), ("tumor", 1)}
    assert sorted((s.case, s.slice_index) for s in samples if s.class_name == "tumor") == [
        ("case_000", 2),
        ("case_000", 3),
        ("case_001", 2),
        ("case_001", 3),
    ]
    for s in samples:
        assert s.image.shape == s.mask.shape == (3, SIZE, SIZE)
        assert s.image.dtype == s.mask.dtype == s.indicator.dtype == torch.float32
        assert 0 <= float(s.image.min())
        assert float(s.image.max()) <= 255
        assert set(torch.unique(s.mask).tolist()) <= {0.0, 1.0}
        assert s.indicator.tolist() == [1.0, 1.0, 1.0]
        assert s.dataset == "Dataset900_Toy"
        assert s.axis == 0

    # the tumor of case_001's window 2 is the second mask of its npz; the image is the PNG
    record = _records(folder, "case_001")[1]
    assert record["slice_index"] == 2
    assert record["class_names"] == ["kidney", "tumor"]
    (tumor,) = [
        s for s in samples if (s.case, s.slice_index, s.class_name) == ("case_001", 2, "tumor")
    ]
    (kidney,) = [
        s for s in samples if (s.case, s.slice_index, s.class_name) == ("case_001", 2, "kidney")
    ]
    npz = np.load(folder / record["mask"])["masks"]
    np.testing.assert_array_equal(tumor.mask.numpy(), npz[1])
    np.testing.assert_array_equal(kidney.mask.numpy(), npz[0])
    assert tumor.mask[0].sum() == 0
    assert tumor.mask[1].sum() > 0
    png = np.asarray(Image.open(folder / record["image"]))
    np.testing.assert_array_equal(tumor.image.numpy(), png.transpose(2, 0, 1).astype(np.float32))
    # body of case_001 at 110 HU -> 132; the tumor region at 300 HU -> 212.5 -> 212
    assert tumor.image[1, 16, 16] == 132
    assert tumor.image[:, 22, 21].tolist() == [212.0, 212.0, 212.0]


def test_class_filter_and_unfinished_cases(prepared, prepared_copy):
    ds = WindowDataset(prepared[0], classes=["tumor"])
    assert len(ds) == 4
    assert {ds[i].class_name for i in range(4)} == {"tumor"}
    (prepared_copy / "meta" / "case_001.done.json").unlink()  # case_001 "still running"
    ds = WindowDataset(prepared_copy)
    assert len(ds) == 6
    assert {ds[i].case for i in range(6)} == {"case_000"}


def test_indicator_is_read_from_the_record(prepared_copy):
    meta = prepared_copy / "meta" / "case_000.jsonl"
    lines = meta.read_text().splitlines()
    record = json.loads(lines[1])  # window 2: kidney and tumor
    record["indicator"] = [0, 1, 0]  # e.g. a 2D pseudo-label of the centre slice
    lines[1] = json.dumps(record)
    meta.write_text("\n".join(lines) + "\n")
    ds = WindowDataset(prepared_copy)
    got = {(s.case, s.slice_index, s.class_name): s.indicator.tolist() for s in ds}
    assert got[("case_000", 2, "kidney")] == [0.0, 1.0, 0.0]
    assert got[("case_000", 2, "tumor")] == [0.0, 1.0, 0.0]
    assert sum(v == [1.0, 1.0, 1.0] for v in got.values()) == 10


def test_dataloader_batches_and_workers_agree(prepared):
    aug = AugmentConfig(crop_p=1.0, affine_p=1.0, intensity_p=1.0, rotation=(-30, 30))
    ds = WindowDataset(prepared[0], augment=aug, seed=5)
    serial = list(DataLoader(ds, batch_size=4, shuffle=False))
    parallel = list(DataLoader(ds, batch_size=4, shuffle=False, num_workers=2))
    batch = serial[0]
    assert isinstance(batch, WindowSample)
    assert batch.image.shape == batch.mask.shape == (4, 3, SIZE, SIZE)
    assert batch.indicator.shape == (4, 3)
    assert batch.slice_index.tolist() == [1, 2, 2, 3]
    assert list(batch.class_name) == ["kidney", "kidney", "tumor", "kidney"]
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
        torch.testing.assert_close(a.mask, b.mask, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# mixing


def test_weighted_mix_fraction_uniformity_and_seed():
    sizes, weights = (10, 30), (3, 1)
    idx = mixed_indices(sizes, weights, 4000, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64
    assert idx.shape == (4000,)
    assert 0 <= int(idx.min())
    assert int(idx.max()) <= 39
    first = (idx < 10).double().mean().item()
    assert abs(first - 0.75) <= 0.03
    counts = torch.bincount(idx, minlength=40)
    assert counts.sum() == 4000
    # uniform within a dataset: ~300 each of the 10 first, ~33 each of the 30 others
    assert counts[:10].min() > 220
    assert counts[:10].max() < 380
    assert counts[10:].min() > 10
    assert counts[10:].max() < 65

    again = mixed_indices(sizes, weights, 4000, generator=torch.Generator().manual_seed(0))
    other = mixed_indices(sizes, weights, 4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx, again)
    assert not torch.equal(idx, other)

    s1 = WeightedMixSampler(
        sizes=sizes, weights=weights, num_samples=50, generator=torch.Generator().manual_seed(3)
    )
    s2 = WeightedMixSampler(
        sizes=sizes, weights=weights, num_samples=50, generator=torch.Generator().manual_seed(3)
    )
    e1, e2 = list(s1), list(s1)
    assert len(s1) == len(e1) == 50
    assert e1 != e2  # the generator advances: each epoch draws anew
    assert [e1, e2] == [list(s2), list(s2)]  # and the same seed repeats the run


@pytest.mark.parametrize(
    ("sizes", "weights", "match"),
    [
        ((10, 30), (1,), "one weight per dataset"),
        ((10, 30), (1, 0), "positive"),
        ((10, 30), (1, -2), "positive"),
        ((10, 30), (1, float("nan")), "positive"),
        ((10, 0), (1, 1), "no samples"),
    ],
)
def test_weighted_mix_validates(sizes, weights, match):
    with pytest.raises(InputError, match=match):
        mixed_indices(sizes, weights, 10)
    with pytest.raises(InputError, match=match):
        WeightedMixSampler(sizes=sizes, weights=weights, num_samples=10)


def test_two_prepared_datasets_mix(tmp_path, prepared):
    raw = toy_dataset(tmp_path, name="Dataset901_Other", n_cases=1)
    prepare_dataset(raw, tmp_path / "out", PrepareConfig(size=SIZE, image_format="npz"))
    ds = WindowDataset([prepared[0], tmp_path / "out" / raw.name])
    assert ds.dataset_sizes == (12, 6)
    assert len(ds) == 18
    assert ds[11].dataset == "Dataset900_Toy"
    assert ds[12].dataset == "Dataset901_Other"
    # npz and png windows of the same volume read the same
    torch.testing.assert_close(ds[12].image, ds[0].image, rtol=0, atol=0)
    torch.testing.assert_close(ds[12].mask, ds[0].mask, rtol=0, atol=0)
    sampler = WeightedMixSampler(
        sizes=ds.dataset_sizes,
        weights=[1, 3],
        num_samples=400,
        generator=torch.Generator().manual_seed(0),
    )
    names = [ds[i].dataset for i in sampler]
    assert abs(names.count("Dataset901_Other") / 400 - 0.75) < 0.06


# --------------------------------------------------------------------------------------------
# augmentation


def test_no_augmentation_leaves_samples_unchanged(prepared):
    plain = WindowDataset(prepared[0])
    none = WindowDataset(prepared[0], augment=AugmentConfig.none(), seed=9)
    assert not AugmentConfig.none().enabled
    assert AugmentConfig().enabled
    for i in range(len(plain)):
        torch.testing.assert_close(none[i].image, plain[i].image, rtol=0, atol=0)
        torch.testing.assert_close(none[i].mask, plain[i].mask, rtol=0, atol=0)
    s = plain[0]
    img, msk = augment_window(s.image, s.mask, AugmentConfig.none(), np.random.default_rng(0))
    assert torch.equal(img, s.image)
    assert torch.equal(msk, s.mask)
    assert img is not s.image
    assert msk is not s.mask


@pytest.mark.parametrize(("degrees", "k"), [(90, 1), (-90, -1), (180, 2)])
def test_rotation_convention_is_counter_clockwise_rot90(prepared, degrees, k):
    """+90 degrees turns the content counter-clockwise as displayed (row 0 on top)."""
    cfg = replace(AugmentConfig.none(), affine_p=1.0, rotation=(degrees, degrees))
    plain = WindowDataset(prepared[0])
    rotated = WindowDataset(prepared[0], augment=cfg)
    for i in (0, 2):  # a kidney and a tumor sample
        want_mask = np.rot90(plain[i].mask.numpy(), k, axes=(1, 2))
        want_image = np.rot90(plain[i].image.numpy(), k, axes=(1, 2))
        np.testing.assert_array_equal(rotated[i].mask.numpy(), want_mask)
        np.testing.assert_allclose(rotated[i].image.numpy(), want_image, atol=1e-3)
    # hand check on a 4 x 4 mask: the top-right pixel goes to the top-left
    mask = torch.zeros(3, 4, 4)
    mask[:, 0, 3] = 1
    _, out = augment_window(mask * 255, mask, cfg, np.random.default_rng(0))
    if k == 1:
        assert out[1].nonzero().tolist() == [[0, 0]]


def test_same_seed_same_augmentation(prepared):
    cfg = AugmentConfig(crop_p=1.0, affine_p=1.0, intensity_p=1.0)
    a = WindowDataset(prepared[0], augment=cfg, seed=1)
    b = WindowDataset(prepared[0], augment=cfg, seed=1)
    c = WindowDataset(prepared[0], augment=cfg, seed=2)
    assert torch.equal(a[3].image, b[3].image)
    assert torch.equal(a[3].mask, b[3].mask)
    assert not torch.equal(a[3].image, c[3].image)
    before = a[3].image
    a.set_epoch(1)
    assert not torch.equal(a[3].image, before)
    r1 = a.get(3, rng=np.random.default_rng(7))
    r2 = c.get(3, rng=np.random.default_rng(7))
    assert torch.equal(r1.image, r2.image)
    assert torch.equal(r1.mask, r2.mask)


def _square(size=32, rows=(4, 12), cols=(18, 26)):
    image = torch.full((3, size, size), 20.0)
    mask = torch.zeros(3, size, size)
    image[:, rows[0] : rows[1], cols[0] : cols[1]] = 250.0
    mask[:, rows[0] : rows[1], cols[0] : cols[1]] = 1.0
    return image, mask


def _centroid(m):
    rows, cols = np.nonzero(m)
    return np.array([rows.mean(), cols.mean()])


def test_image_and_mask_stay_aligned():
    image, mask = _square()
    cfg = AugmentConfig(
        crop_p=1.0,
        crop_fraction=(0.5, 0.9),
        affine_p=1.0,
        rotation=(-45, 45),
        scale=(0.8, 1.25),
        shear=(-10, 10),
        intensity_p=0.0,
    )
    moved = 0
    for seed in range(20):
        img, msk = augment_window(image, mask, cfg, np.random.default_rng(seed))
        assert set(torch.unique(msk).tolist()) <= {0.0, 1.0}
        assert 0 <= float(img.min())
        assert float(img.max()) <= 255
        for c in range(3):
            fg = msk[c].numpy() > 0
            assert fg.any()  # the target never vanishes
            bright = img[c].numpy() > 135
            np.testing.assert_allclose(_centroid(fg), _centroid(bright), atol=1.0)
        moved += np.abs(_centroid(msk[1].numpy()) - _centroid(mask[1].numpy())).max() > 2
    assert moved >= 15  # the transforms did move the square


def test_positive_crop_keeps_the_whole_target_and_zooms():
    image, mask = _square(rows=(4, 10), cols=(18, 24))  # 6 x 6 px
    cfg = replace(AugmentConfig.none(), crop_p=1.0, crop_fraction=(0.5, 0.5), crop_positive=1.0)
    for seed in range(10):
        img, msk = augment_window(image, mask, cfg, np.random.default_rng(seed))
        # a 16 px crop resized to 32: the 6 x 6 square becomes 12 x 12 whole
        assert msk[1].sum() == 144
        rows, cols = np.nonzero(msk[1].numpy())
        assert rows.max() - rows.min() == cols.max() - cols.min() == 11
        # the image moved with it: its bright pixels (bilinear, threshold halfway) are the mask
        np.testing.assert_array_equal(img[1].numpy() > 135, msk[1].numpy() > 0)
    neg = replace(cfg, crop_positive=0.0)
    for seed in range(30):  # random crops: the target may be cut, never emptied
        _, msk = augment_window(image, mask, neg, np.random.default_rng(seed))
        assert msk[1].sum() > 0


def test_intensity_changes_the_image_only():
    image, mask = _square()
    cfg = replace(AugmentConfig.none(), intensity_p=1.0, contrast=(2.0, 2.0))
    img, msk = augment_window(image, mask, cfg, np.random.default_rng(0))
    assert torch.equal(msk, mask)
    mean = image.mean().item()  # 20 + 230 * 64 / 1024 = 34.375
    assert mean == 34.375
    assert img[0, 0, 0].item() == pytest.approx(max(0.0, (20 - mean) * 2 + mean))  # 5.625
    assert img[0, 5, 20].item() == 255.0  # (250 - 34.375) * 2 + 34.375 = 465.6 -> clipped
    cfg = replace(AugmentConfig.none(), intensity_p=1.0, shift=(-30.0, -30.0))
    img, _ = augment_window(image, mask, cfg, np.random.default_rng(0))
    assert img[0, 0, 0].item() == 0.0
    assert img[0, 5, 20].item() == 220.0


def test_resize_on_reading(prepared):
    ds = WindowDataset(prepared[0], size=16)
    s = ds[2]
    assert s.image.shape == s.mask.shape == (3, 16, 16)
    assert set(torch.unique(s.mask).tolist()) <= {0.0, 1.0}
    assert s.mask[1].sum() > 0


# --------------------------------------------------------------------------------------------
# errors


def test_not_a_prepared_folder(tmp_path, prepared):
    raw = toy_dataset(tmp_path, n_cases=1)
    with pytest.raises(InputError, match=r"not a prepared dataset folder \(no prepare.json\)"):
        WindowDataset(raw)
    with pytest.raises(InputError, match="no such prepared dataset folder"):
        WindowDataset(tmp_path / "nope")
    with pytest.raises(InputError, match=r"unknown class name.*liver.*kidney, tumor"):
        WindowDataset(prepared[0], classes=["liver"])


def test_missing_file_is_named(prepared_copy):
    record = _records(prepared_copy, "case_000")[0]
    (prepared_copy / record["image"]).unlink()
    ds = WindowDataset(prepared_copy)  # listing does not touch the files
    with pytest.raises(InputError, match=r"images/case_000/z_0001\.png: missing file"):
        ds[0]
    assert ds[1].slice_index == 2


def test_mask_shape_disagreeing_with_image(prepared_copy):
    record = _records(prepared_copy, "case_000")[0]
    np.savez_compressed(
        prepared_copy / record["mask"],
        masks=np.zeros((1, 3, 16, 16), np.uint8),
        labels=np.array([0], np.int16),
    )
    with pytest.raises(InputError, match=r"z_0001\.npz: masks of shape \(1, 3, 16, 16\) disagree"):
        WindowDataset(prepared_copy)[0]


def test_no_samples(prepared_copy):
    for done in (prepared_copy / "meta").glob("*.done.json"):
        done.unlink()
    with pytest.raises(InputError, match="no samples"):
        WindowDataset(prepared_copy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_p": 1.5}, "crop_p must be a probability"),
        ({"rotation": (10, -10)}, "low <= high"),
        ({"scale": (0, 1)}, "scale must lie within"),
        ({"crop_fraction": (0.5, 1.2)}, "crop_fraction must lie within"),
        ({"shift": 3}, "pair"),
    ],
)
def test_augment_config_validates(kwargs, match):
    with pytest.raises(InputError, match=match):
        AugmentConfig(**kwargs)


def test_zoomed_model_samples_are_crops_around_the_target(prepared):
    plain = WindowDataset(prepared[0], augment=AugmentConfig.none())
    zoomed = WindowDataset(prepared[0], augment=AugmentConfig.none(), roi_context=2.0)
    jittered = WindowDataset(prepared[0], augment=AugmentConfig(), roi_context=2.0)
    tumour = next(i for i in range(len(plain)) if plain[i].class_name == "tumor")
    before, after = plain[tumour], zoomed[tumour]
    rows, cols = np.nonzero(before.mask[1].numpy())
    side_before = max(np.ptp(rows), np.ptp(cols)) + 1
    rows, cols = np.nonzero(after.mask[1].numpy())
    # the target's longer side fills half the crop, centred
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == pytest.approx(SIZE / 2, abs=1)
    assert (rows.min() + rows.max() + 1) / 2 == pytest.approx(SIZE / 2, abs=1)
    assert side_before < SIZE / 2
    assert set(torch.unique(after.mask).tolist()) == {0.0, 1.0}
    assert not torch.equal(jittered[tumour].image, after.image)  # roi_scale / roi_shift
    with pytest.raises(InputError, match="roi_context"):
        WindowDataset(prepared[0], roi_context=0.5)


def _toy_windows(tmp_path, labels: np.ndarray) -> Path:
    """Prepared windows of one 10 x 40 x 50 case with ``labels`` (1 kidney, 2 tumour)."""
    g = Geometry(shape=(10, 40, 50), spacing=(3.0, 1.5, 1.5))
    image = np.full(g.shape, -1000, np.int16)
    image[:, 5:35, 5:45] = 100
    image += np.arange(10, dtype=np.int16)[:, None, None] * 20  # tell the slices apart
    raw = tmp_path / "Dataset901_Toy"
    write_image(Volume(image, g), raw / "imagesTr" / "c_0000.nii.gz")
    write_mask(labels, g, raw / "labelsTr" / "c.nii.gz")
    (raw / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "kidney": 1, "tumor": 2}})
    )
    prepare_dataset(
        raw, tmp_path / "out", PrepareConfig(size=SIZE, image_format="png"), progress=False
    )
    return tmp_path / "out" / raw.name


def test_negative_samples_come_from_slices_without_the_target(tmp_path):
    """Kidney on slices 1..8 of 10, tumour on 2..3: a tumour sample's negatives are the windows
    at 5 or 6 (all three slices tumour-free, within 3 slices); kidney has none."""
    labels = np.zeros((10, 40, 50), np.uint8)
    labels[1:9, 10:16, 20:25] = 1
    labels[2:4, 25:31, 30:36] = 2
    folder = _toy_windows(tmp_path, labels)
    plain = WindowDataset(folder, augment=AugmentConfig.none())
    neg = WindowDataset(folder, augment=replace(AugmentConfig.none(), negative_p=1.0))
    by_slice = {
        s.slice_index: s for s in (plain[i] for i in range(len(plain))) if s.class_name == "kidney"
    }
    for i in range(len(plain)):
        a, b = plain[i], neg[i]
        if a.class_name == "kidney":  # no kidney-free window nearby: stays positive
            assert torch.equal(a.mask, b.mask)
            continue
        assert b.slice_index in (5, 6)
        assert torch.equal(b.image, by_slice[b.slice_index].image)
        assert not b.mask.any()
        assert b.indicator.tolist() == [1.0, 1.0, 1.0]
        assert torch.equal(b.prompt_mask, a.mask[1])  # the prompt still points at the tumour
        assert b.prompt_mask.any()


def test_neighbour_prompts_come_from_an_edge_slice_that_keeps_the_target(tmp_path):
    """A tumour that grows from slice 2 to 6 (side 2 + 2 * (z - 2) px at the window size): with
    neighbour_prompt_p = 1 the prompt is the mask of slice c - 1 or c + 1, whichever keeps the
    tumour; the target stays the window's own three slices."""
    labels = np.zeros((10, 40, 50), np.uint8)
    for z in range(2, 7):
        half = 1 + (z - 2)
        labels[z, 20 - half : 20 + half, 25 - half : 25 + half] = 2
    folder = _toy_windows(tmp_path, labels)
    plain = WindowDataset(folder, augment=AugmentConfig.none())
    edge = WindowDataset(folder, augment=replace(AugmentConfig.none(), neighbour_prompt_p=1.0))
    sources = {}
    for i in range(len(plain)):
        a, b = plain[i], edge[i]
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.image, b.image)
        kept = [k for k in (0, 2) if a.mask[k].any()]
        match = [k for k in range(3) if torch.equal(b.prompt_mask, a.mask[k])]
        sources[a.slice_index] = match
        assert match[0] in kept
    # slice 2 has the tumour only above it, slice 6 only below; 3..5 on both sides
    assert sources[2] == [2]
    assert sources[6] == [0]
    assert all(sources[z] in ([0], [2]) for z in (3, 4, 5))

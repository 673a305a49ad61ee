"""End to end on small seeded phantoms with a random tiny encoder (tiny_64: 64 px input).

Cache round trip and resume, decoder training that beats the untrained decoder, the cascade
folder loaded with one call, label maps on the input's exact grid, and clear errors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from slidesam.cli.main import main
from slidesam.core import InputError
from slidesam.data.io import read_image, read_label
from slidesam.data.phantom import PhantomConfig, generate_case, write_cohort
from slidesam.transfersam.cache import embed_dataset, open_cache, read_case
from slidesam.transfersam.cascade import load_cascade, predict_path
from slidesam.transfersam.config import DecoderTrainConfig, EmbedConfig, EncoderRef
from slidesam.transfersam.decoders import load_decoder, train_decoder
from slidesam.transfersam.encoder import build_encoder

PHANTOM = PhantomConfig(phases=("arterial",), shape=(48, 96, 96), spacing=(3.0, 3.5, 3.5))
REF = EncoderRef(variant="tiny_64", seed=0)
EMBED = EmbedConfig(max_slices=30)
EMBED_C = EmbedConfig(max_slices=12, contrast_copies=2, contrast_factor=(0.6, 1.4))
FAST = DecoderTrainConfig(
    steps=120, batch_size=16, lr=2e-3, warmup_steps=10, validate_every=60, val_fraction=0.25
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    info = write_cohort(out, cases=4, seed=11, config=PHANTOM, progress=False)
    return info["datasets"]["arterial"]


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "cache"
    summary = embed_dataset(dataset, folder, REF, EMBED, batch_size=8, progress=False)
    assert summary["embedded"] == 4
    assert summary["skipped"] == 0
    return folder


@pytest.fixture(scope="module")
def contrast_cache(dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache_c") / "cache"
    summary = embed_dataset(dataset, folder, REF, EMBED_C, batch_size=8, progress=False)
    assert summary["contrast_copies"] == 2 * summary["slices"]
    return folder


@pytest.fixture(scope="module")
def cascade(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade") / "cascade"
    summaries = {n: train_decoder(cache, n, out, FAST, progress=False) for n in ("roi", "tumor")}
    cyst = DecoderTrainConfig(steps=5, batch_size=4, lr=1e-3, warmup_steps=1, val_fraction=0.0)
    try:
        summaries["cyst"] = train_decoder(cache, "cyst", out, cyst, progress=False)
    except InputError:  # no cyst in these 4 cases: reuse the tumor decoder file (plumbing only)
        obj = torch.load(out / "decoder_tumor.pt", weights_only=True)
        obj["name"] = "cyst"
        torch.save(obj, out / "decoder_cyst.pt")
    return out, summaries


def test_cache_round_trip(dataset, cache):
    info = open_cache(cache)
    assert info.cases == ("case_00000", "case_00001", "case_00002", "case_00003")
    assert info.encoder.fingerprint
    assert info.embed == EMBED
    label = read_label(f"{dataset}/labelsTr/case_00001.nii.gz").array
    cc = read_case(cache, "case_00001")
    positive = label.reshape(label.shape[0], -1).any(1)
    n_pos = int(positive.sum())
    # every positive slice (or the cap) plus as many blanks, under the cap of 30
    assert cc.positive.sum() == min(n_pos, 30)
    assert len(cc.indices) == min(30, 2 * n_pos, n_pos + int((~positive).sum()))
    np.testing.assert_array_equal(cc.positive, positive[cc.indices])
    np.testing.assert_array_equal(cc.labels, label[cc.indices])
    assert cc.embeddings.dtype == np.float16
    assert cc.embeddings.shape == (len(cc.indices), 32, 8, 8)
    # the cached embeddings are the encoder's output for those slices
    from slidesam.transfersam.encoder import embed_slices

    sam, _ = build_encoder(info.encoder)
    image = read_image(f"{dataset}/imagesTr/case_00001_0000.nii.gz")
    again = embed_slices(sam, image.array, 0, cc.indices[:3], window=EMBED.window, batch_size=2)
    np.testing.assert_allclose(again, cc.embeddings[:3], atol=2e-3)  # batch-size rounding
    # no pickle inside
    with np.load(cache / "case_00001" / "slices.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["axis", "indices", "labels", "positive"]
    # without contrast copies the cache is exactly the format from before they existed
    assert sorted(p.name for p in (cache / "case_00001").iterdir()) == [
        "embeddings.npy",
        "slices.npz",
    ]
    meta = json.loads((cache / "cache.json").read_text())
    assert sorted(meta["embed"]) == ["blank_ratio", "max_slices", "seed", "window"]
    assert cc.copies is None
    assert cc.jitters is None


def test_embedding_resumes_and_refuses_another_encoder(dataset, cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    before = (copy / "case_00000" / "embeddings.npy").stat().st_mtime_ns
    shutil.rmtree(copy / "case_00002")
    (copy / ".tmp-case_00003").mkdir()  # debris of an interrupted run is ignored
    s = embed_dataset(dataset, copy, REF, EMBED, batch_size=8, progress=False)
    assert (s["embedded"], s["skipped"]) == (1, 3)
    assert (copy / "case_00000" / "embeddings.npy").stat().st_mtime_ns == before
    np.testing.assert_array_equal(
        read_case(copy, "case_00002").embeddings, read_case(cache, "case_00002").embeddings
    )
    with pytest.raises(InputError, match="random tiny_64 encoder"):
        embed_dataset(dataset, copy, EncoderRef(variant="tiny_64", seed=1), EMBED)
    with pytest.raises(InputError, match="other embed settings"):
        embed_dataset(dataset, copy, REF, EmbedConfig(max_slices=10))


def test_training_pairs_follow_the_kidney_split(dataset, cache):
    from slidesam.transfersam.boxes import kidney_boxes
    from slidesam.transfersam.config import BoxConfig
    from slidesam.transfersam.decoders import build_samples

    ids = open_cache(cache).cases
    # count by hand: kidney boxes (split as at inference) whose side holds tumor, or not
    n_pos = n_neg = 0
    for case_id in ids:
        for lab in read_case(cache, case_id).labels:
            kb = kidney_boxes(lab > 0, BoxConfig())
            for cols in kb.regions(lab.shape[1]):
                has = (lab[:, cols] == 2).any()
                n_pos += bool(has)
                n_neg += (not has) and len(kb.boxes) > 0
    seed_pairs = build_samples(cache, ids, "tumor", BoxConfig(), 96)
    assert len(seed_pairs) == n_pos > 0
    assert all(t.any() for t in seed_pairs.targets)
    with_neg = build_samples(cache, ids, "tumor", BoxConfig(), 96, negative_ratio=0.5, seed=1)
    n_extra = min(n_neg, round(0.5 * n_pos))
    assert len(with_neg) == n_pos + n_extra
    assert sum(not t.any() for t in with_neg.targets) == n_extra
    roi = build_samples(cache, ids, "roi", BoxConfig(), 96)
    assert len(roi) == sum(len(read_case(cache, c).indices) for c in ids)


def test_contrast_copies_are_cached_and_reproducible(dataset, contrast_cache):
    from slidesam.transfersam.data import contrast_jitters
    from slidesam.transfersam.encoder import embed_slices

    info = open_cache(contrast_cache)
    assert info.embed == EMBED_C
    cc = read_case(contrast_cache, "case_00001", copies=2)
    n = len(cc.indices)
    assert cc.embeddings.shape == (n, 32, 8, 8)
    assert cc.copies.shape == (2, n, 32, 8, 8)  # (1 + 2) embeddings per kept slice
    assert cc.copies.dtype == np.float16
    assert cc.jitters.shape == (2, n, 2)
    np.testing.assert_array_equal(
        cc.jitters, contrast_jitters(0, "case_00001", cc.indices, 2, (0.6, 1.4), 20.0)
    )
    # the copies differ from the original and from each other, on every slice
    orig = cc.embeddings.astype(np.float32)
    copies = cc.copies.astype(np.float32)
    for k in range(2):
        assert np.abs(copies[k] - orig).max(axis=(1, 2, 3)).min() > 1e-2
    assert np.abs(copies[0] - copies[1]).max(axis=(1, 2, 3)).min() > 1e-2
    # re-encoding the jittered pixels reproduces the stored copies; the originals stay plain
    sam, _ = build_encoder(info.encoder)
    image = read_image(f"{dataset}/imagesTr/case_00001_0000.nii.gz")
    kw = {"window": EMBED_C.window, "batch_size": 2}
    again = embed_slices(sam, image.array, 0, cc.indices[:3], jitters=cc.jitters[1, :3], **kw)
    np.testing.assert_allclose(again, cc.copies[1, :3], atol=2e-3)
    plain = embed_slices(sam, image.array, 0, cc.indices[:3], **kw)
    np.testing.assert_allclose(plain, cc.embeddings[:3], atol=2e-3)
    # stored as .npy/.npz without pickle
    np.load(contrast_cache / "case_00001" / "contrast.npy", allow_pickle=False)
    with np.load(contrast_cache / "case_00001" / "slices.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["axis", "contrast", "indices", "labels", "positive"]
    with pytest.raises(InputError, match="holds 2 contrast copies per slice, the cache's settings"):
        read_case(contrast_cache, "case_00001", copies=3)


def test_cache_with_other_contrast_settings_is_refused(dataset, cache, contrast_cache, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(cache, old)  # a cache in the format from before contrast copies
    with pytest.raises(InputError, match=r"contrast_copies: 0 in the cache, 2 asked"):
        embed_dataset(dataset, old, REF, replace(EMBED, contrast_copies=2), progress=False)
    with pytest.raises(InputError, match=r"contrast_copies: 2 in the cache, 0 asked"):
        embed_dataset(dataset, contrast_cache, REF, replace(EMBED_C, contrast_copies=0))
    with pytest.raises(InputError, match=r"brightness_shift: 20.0 in the cache, 5.0 asked"):
        embed_dataset(dataset, contrast_cache, REF, replace(EMBED_C, brightness_shift=5.0))
    # resuming with the same settings works and embeds the copies of the missing case
    part = tmp_path / "part"
    shutil.copytree(contrast_cache, part)
    shutil.rmtree(part / "case_00003")
    s = embed_dataset(dataset, part, REF, EMBED_C, batch_size=8, progress=False)
    assert (s["embedded"], s["skipped"]) == (1, 3)
    np.testing.assert_array_equal(
        read_case(part, "case_00003").copies, read_case(contrast_cache, "case_00003").copies
    )


def test_training_draws_contrast_copies(contrast_cache, cascade, tmp_path):
    from slidesam.transfersam.config import BoxConfig
    from slidesam.transfersam.decoders import _batch, build_samples

    cfg = DecoderTrainConfig(steps=6, batch_size=8, warmup_steps=1, val_fraction=0.25, seed=3)
    s = train_decoder(contrast_cache, "roi", tmp_path / "c", cfg, progress=False)
    views = s["contrast_views"]  # samples drawn from the original, copy 1, copy 2
    assert len(views) == 3
    assert sum(views) == 6 * 8
    assert min(views) >= 5, views
    # without copies every sample is an original
    assert cascade[1]["roi"]["contrast_views"] == [FAST.steps * FAST.batch_size]
    # a drawn view really feeds that copy's embedding; validation (no views) the original
    samples = build_samples(contrast_cache, ("case_00000",), "roi", BoxConfig(), 32, copies=2)
    still = replace(cfg, augment_prob=0.0)
    cc = read_case(contrast_cache, "case_00000")
    r = int(samples.row[1])
    emb, _, _ = _batch(samples, np.array([1, 1]), "roi", still, 64, None, np.array([2, 0]))
    np.testing.assert_array_equal(emb[0].numpy(), cc.copies[1, r].astype(np.float32))
    np.testing.assert_array_equal(emb[1].numpy(), cc.embeddings[r].astype(np.float32))
    emb, _, _ = _batch(samples, np.array([1]), "roi", still, 64, None)
    np.testing.assert_array_equal(emb[0].numpy(), cc.embeddings[r].astype(np.float32))


def test_cli_contrast_copies(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["transfersam", "embed", dataset, "--cache", str(cache), "--random-encoder", "0"]
    args += ["--variant", "tiny_64", "--max-slices", "2", "--contrast-copies", "1"]
    args += ["--contrast-factor", "0.9", "1.1", "--brightness-shift", "5", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["contrast_copies"] == summary["slices"] == 8
    embed = open_cache(cache).embed
    assert (embed.contrast_copies, embed.contrast_factor, embed.brightness_shift) == (
        1,
        (0.9, 1.1),
        5.0,
    )
    assert read_case(cache, "case_00000").copies.shape[:2] == (1, 2)


def test_fingerprint_mismatch_is_refused():
    _, ref = build_encoder(REF)
    with pytest.raises(InputError, match="fingerprint"):
        build_encoder(EncoderRef(variant="tiny_64", seed=0, fingerprint="0" * 16))
    assert build_encoder(ref)[1].fingerprint == ref.fingerprint  # reproducible from the ref


def test_training_beats_the_untrained_decoder(cascade):
    _, s = cascade
    for name in ("roi", "tumor"):
        assert s[name]["last_train_loss"] < 0.8 * s[name]["first_train_loss"], s[name]
    roi = s["roi"]
    assert roi["best_val_dice"] > roi["untrained_val_dice"] + 0.2, roi
    assert roi["class_weights"][1] > roi["class_weights"][0]


def test_cascade_folder_loads_with_one_call_and_predicts_on_the_input_grid(cascade, tmp_path):
    folder, _ = cascade
    meta = json.loads((folder / "cascade.json").read_text())
    assert meta["encoder"]["variant"] == "tiny_64"
    assert meta["encoder"]["fingerprint"]
    c = load_cascade(folder)
    assert set(c.decoders) == {"roi", "tumor", "cyst"}
    # a fresh case on a flipped, non-identity grid
    case = generate_case(
        7, seed=99, config=PhantomConfig(**{**PHANTOM.to_dict(), "random_flips": True})
    )
    image = case.phases["arterial"]
    from slidesam.data.io import write_image

    path = write_image(image, tmp_path / "fresh_0000.nii.gz")
    records = predict_path(c, path, tmp_path / "out", progress=False)
    written = tmp_path / "out" / "fresh.nii.gz"
    assert records[0]["output"] == str(written)
    ref = read_image(path)
    pred = read_label(written)
    assert pred.geometry == ref.geometry  # bit for bit
    assert set(np.unique(pred.array)) <= {0, 1, 2, 3}
    assert records[0]["roi_slices"] > 0


def test_decoder_checkpoint_checks(cascade, tmp_path):
    folder, _ = cascade
    sam, _ = build_encoder(REF)
    _dec, meta = load_decoder(folder / "decoder_roi.pt", sam, name="roi")
    assert meta["name"] == "roi"
    assert "config" in meta["training"]
    with pytest.raises(InputError, match="holds the 'roi' decoder, expected 'tumor'"):
        load_decoder(folder / "decoder_roi.pt", sam, name="tumor")
    other, _ = build_encoder(EncoderRef(variant="tiny"))
    with pytest.raises(InputError, match="another SAM variant"):
        load_decoder(folder / "decoder_roi.pt", other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        load_decoder(tmp_path / "junk.pt", sam)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a TransferSAM decoder"):
        load_decoder(tmp_path / "other.pt", sam)


def test_clear_errors(cache, tmp_path):
    with pytest.raises(InputError, match="run 'slidesam transfersam embed' first"):
        train_decoder(tmp_path / "missing", "roi", tmp_path / "c", FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no embedding cache"):
        train_decoder(tmp_path / "empty", "roi", tmp_path / "c", FAST)
    with pytest.raises(InputError, match="unknown decoder 'kidney'"):
        train_decoder(cache, "kidney", tmp_path / "c", FAST)
    partial = tmp_path / "partial"
    shutil.copytree(cache, tmp_path / "cache2")
    train_decoder(tmp_path / "cache2", "roi", partial, DecoderTrainConfig(steps=2, batch_size=2))
    with pytest.raises(InputError, match="decoder\\(s\\) tumor, cyst not trained yet"):
        load_cascade(partial)


def test_cli_end_to_end(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["transfersam", "embed", dataset, "--cache", str(cache), "--random-encoder", "0"]
    args += ["--variant", "tiny_64", "--max-slices", "12", "--batch-size", "6", "--no-progress"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 4
    assert main([*args[:5], "--max-slices", "12", "--no-progress"]) == 0  # resume: cache's encoder
    assert json.loads(capsys.readouterr().out)["skipped"] == 4
    out = tmp_path / "cascade"
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("steps: 3\nbatch_size: 4\nval_fraction: 0.0\nlr: 1e-3\n")
    for name in ("roi", "tumor"):
        argv = ["transfersam", "train", "--cache", str(cache), "--decoder", name]
        assert main([*argv, "--out", str(out), "--config", str(cfg), "--no-progress"]) == 0
    assert '"decoder": "tumor"' in capsys.readouterr().out
    argv = ["transfersam", "train", "--cache", str(cache), "--decoder", "lesion", "--out", str(out)]
    assert main(argv) == 2
    assert "unknown decoder 'lesion'" in capsys.readouterr().err
    argv = ["transfersam", "predict", dataset, "--cascade", str(out), "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    assert "cyst not trained yet" in capsys.readouterr().err

"""Clicks come from the error region; the refinement loop feeds back the previous mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidesam.modeling.sam3d import build_sam3d, variant3d_config
from slidesam.msam.clicks import centre_click, sample_clicks
from slidesam.msam.refine import refine, upsample


def _masks():
    gt = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    gt[0, 0, 2:6, 2:6, 2:6] = True
    return gt


@pytest.mark.parametrize("case", ["fn_only", "fp_only", "both"])
def test_click_is_in_error_region_with_the_right_label(case):
    gt = _masks()
    pred = gt.clone()
    if case in ("fn_only", "both"):
        pred[0, 0, 2:6, 2:6, 2] = False  # false negatives: one face of the cube
    if case in ("fp_only", "both"):
        pred[0, 0, 7, 7, :] = True  # false positives: one row outside
    fn, fp = gt & ~pred, pred & ~gt
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        coords, labels = sample_clicks(pred, gt, gen)
        z, y, x = (int(v) for v in coords[0, 0])
        if labels[0, 0] == 1:
            assert fn[0, 0, z, y, x]
        else:
            assert labels[0, 0] == 0
            assert fp[0, 0, z, y, x]
        seen.add(int(labels[0, 0]))
    assert seen == {"fn_only": {1}, "fp_only": {0}, "both": {0, 1}}[case]


def test_no_error_gives_a_padding_click_and_empty_prediction_a_positive_one():
    gt = _masks()
    _, labels = sample_clicks(gt.clone(), gt)
    assert labels.tolist() == [[-1]]
    coords, labels = sample_clicks(torch.zeros_like(gt), gt)
    assert labels.tolist() == [[1]]
    assert gt[0, 0, *coords[0, 0].long()]


def test_centre_click_is_the_innermost_voxel():
    mask = np.zeros((9, 9, 9), bool)
    mask[1:8, 1:8, 1:8] = True
    assert centre_click(mask).tolist() == [4.0, 4.0, 4.0]


def _recording_model():
    torch.manual_seed(0)
    model = build_sam3d(variant3d_config("tiny_32"))
    calls = []
    decode = model.decode

    def spy(emb, *, points=None, mask_prompt=None, **kw):
        out = decode(emb, points=points, mask_prompt=mask_prompt, **kw)
        calls.append({"points": points, "mask": mask_prompt, "out": out[0]})
        return out

    model.decode = spy
    return model, calls


def test_refinement_feeds_the_previous_low_res_logits_back():
    model, calls = _recording_model()
    with torch.no_grad():
        emb = model.encode(torch.randn(1, 1, 32, 32, 32))
        click = (torch.tensor([[[16.0, 16.0, 16.0]]]), torch.tensor([[1]]))
        outs = refine(model, emb, iterations=4, points=click)
    assert len(calls) == 4
    assert len(outs) == 4
    assert torch.equal(calls[0]["mask"], torch.zeros(1, 1, 16, 16, 16))
    for k in range(1, 4):
        assert calls[k]["mask"] is outs[k - 1]  # the previous pass's logits, not a copy
        assert torch.equal(calls[k]["points"][0], click[0])  # user clicks stay fixed
    # and it matters: the passes differ because the mask prompt changed
    assert not torch.allclose(outs[0], outs[1])


def test_training_refinement_adds_one_error_click_per_pass():
    model, calls = _recording_model()
    target = torch.zeros(2, 1, 32, 32, 32, dtype=torch.bool)
    target[:, :, 8:20, 10:22, 6:18] = True
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.encode(torch.randn(2, 1, 32, 32, 32))
        outs = refine(model, emb, iterations=3, target=target, generator=gen)
    assert [c["points"][0].shape[1] for c in calls] == [1, 2, 3]
    for k in range(1, 3):
        prev = upsample(outs[k - 1], 32) > 0
        coords, labels = calls[k]["points"][0][:, -1], calls[k]["points"][1][:, -1]
        for b in range(2):
            z, y, x = coords[b].long().tolist()
            if labels[b] == -1:
                assert torch.equal(prev[b], target[b])
            else:
                assert prev[b, 0, z, y, x] != target[b, 0, z, y, x]  # an error voxel
                assert int(labels[b]) == int(target[b, 0, z, y, x])
    first = calls[0]["points"]
    assert first[1].tolist() == [[1], [1]]  # empty start: the first click is positive

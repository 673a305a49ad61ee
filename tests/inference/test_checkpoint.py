"""Checkpoint layouts (official SAM, released Slide-SAM, ours), strictness, safety, fidelity."""

from __future__ import annotations

import pickle
import re

import pytest
import torch

import slidesam
from slidesam.core import InputError
from slidesam.core.config import variant_config
from slidesam.inference.checkpoint import convert_release, detect_layout, save_checkpoint
from slidesam.modeling import build_model

VARIANT = "tiny_64"


def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random values for every parameter and buffer (zeros would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def official_sam_file(tmp_path, seed=0, variant=VARIANT):
    """A plain SAM with random weights, saved as the official flat state dict."""
    sam = random_weights(build_model(variant_config(variant)), seed).eval()
    path = tmp_path / f"sam_{variant}_{seed}.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def _inputs(size, seed=3):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=g) * 255
    boxes = torch.tensor([[5.0, 8.0, size * 0.6, size * 0.7]])
    return image, boxes


@torch.no_grad()
@pytest.mark.parametrize("multimask", [True, False])
def test_fidelity_slidesam_from_sam_equals_sam_on_every_slice(tmp_path, multimask):
    """The most important test: official weights in, LoRA at zero -> each of the three slice
    outputs is plain SAM's output on the same 3-channel image and prompt."""
    sam, path = official_sam_file(tmp_path)
    slide = slidesam.build_slidesam(checkpoint=path)  # variant from the checkpoint, LoRA rank 8
    assert slide.config.lora_rank == 8
    assert slide.num_slices == 3
    image, boxes = _inputs(sam.image_size)
    ref, ref_iou = sam(image, boxes=boxes, multimask_output=multimask)
    out, iou = slide(image, boxes=boxes, multimask_output=multimask)
    assert ref.shape[2] == 1
    assert out.shape[2] == 3
    for s in range(3):
        torch.testing.assert_close(out[:, :, s], ref[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou, ref_iou, rtol=1e-5, atol=1e-5)
    # a mask prompt repeated on the three slices gives SAM's response to the single mask
    e4 = 4 * sam.config.embedding_size
    mask = torch.randn(1, 1, e4, e4, generator=torch.Generator().manual_seed(5)) * 5
    ref_m, _ = sam(image, boxes=boxes, mask_prompt=mask, multimask_output=multimask)
    out_m, _ = slide(
        image, boxes=boxes, mask_prompt=mask.repeat(1, 3, 1, 1), multimask_output=multimask
    )
    for s in range(3):
        torch.testing.assert_close(out_m[:, :, s], ref_m[:, :, 0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_official_sam_loads_into_build_sam(tmp_path):
    sam, path = official_sam_file(tmp_path, seed=1)
    loaded = slidesam.build_sam(VARIANT, checkpoint=path)
    assert not loaded.training
    image, boxes = _inputs(sam.image_size)
    torch.testing.assert_close(loaded(image, boxes=boxes)[0], sam(image, boxes=boxes)[0])


def _release_layout(model: torch.nn.Module, nested: bool, g: torch.Generator) -> dict:
    """Our LoRA'd Slide-SAM in the authors' key layout; with ``nested`` an extra random rank-1
    adapter wraps the rank-r one (their fine-tuning script)."""
    state = {}
    for k, v in model.state_dict().items():
        m = re.match(r"(image_encoder\.blocks\.\d+\.attn\.qkv)\.(weight|bias|lora_\w+)$", k)
        if m is None:
            state[k] = v.clone()
            continue
        prefix, name = m.groups()
        inner = prefix + (".qkv" if nested else "")
        if name in ("weight", "bias"):
            state[f"{inner}.qkv.{name}"] = v.clone()
        else:
            ab, qv = name.split("_")[1:]
            state[f"{inner}.linear_{ab}_{qv}.weight"] = v.clone()
            if nested:
                shape = (1, v.shape[1]) if ab == "a" else (v.shape[0], 1)
                state[f"{prefix}.linear_{ab}_{qv}.weight"] = torch.randn(shape, generator=g) * 0.1
    return state


@torch.no_grad()
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("merge", [False, True])
def test_released_slidesam_layout_converts(tmp_path, nested, merge):
    g = torch.Generator().manual_seed(11)
    ours = random_weights(build_model(variant_config(VARIANT, num_slices=3, lora_rank=4)), 2)
    state = _release_layout(ours, nested, g)
    assert detect_layout(state) == "slidesam_release"
    torch.save(state, tmp_path / "slide_release.pth")
    loaded = slidesam.build_slidesam(checkpoint=tmp_path / "slide_release.pth", merge_lora=merge)
    # rank read from the shapes: the outer adapter (rank 1 when nested) stays as our LoRA
    assert loaded.config.lora_rank == (1 if nested else 4) or merge
    # reference: the same model with every adapter folded into the base qkv weight
    ref = build_model(variant_config(VARIANT, num_slices=3)).eval()
    ref_state = {}
    for k, v in ours.state_dict().items():
        if ".lora_" not in k:
            ref_state[k] = v.clone()
    for name, mod in ours.named_modules():
        if hasattr(mod, "delta_weight"):
            w = mod.weight + mod.delta_weight()
            if nested:
                dim = w.shape[1]
                outer = name  # adapter at the outer level of the release keys
                w[:dim] += state[f"{outer}.linear_b_q.weight"] @ state[f"{outer}.linear_a_q.weight"]
                w[-dim:] += (
                    state[f"{outer}.linear_b_v.weight"] @ state[f"{outer}.linear_a_v.weight"]
                )
            ref_state[f"{name}.weight"] = w
    ref.load_state_dict(ref_state)
    image, boxes = _inputs(ref.image_size)
    torch.testing.assert_close(
        loaded(image, boxes=boxes)[0], ref(image, boxes=boxes)[0], rtol=1e-4, atol=1e-4
    )


def test_convert_release_rejects_mixed_ranks():
    state = {
        "image_encoder.blocks.0.attn.qkv.qkv.weight": torch.zeros(6, 2),
        "image_encoder.blocks.0.attn.qkv.linear_a_q.weight": torch.zeros(1, 2),
        "image_encoder.blocks.0.attn.qkv.linear_b_q.weight": torch.zeros(2, 1),
        "image_encoder.blocks.0.attn.qkv.linear_a_v.weight": torch.zeros(1, 2),
        "image_encoder.blocks.0.attn.qkv.linear_b_v.weight": torch.zeros(2, 1),
    }
    other = {
        k.replace("blocks.0", "blocks.1"): torch.zeros(
            v.shape[0] * (2 if "_a_" in k else 1), v.shape[1] * (2 if "_b_" in k else 1)
        )
        if "linear" in k
        else v
        for k, v in state.items()
    }
    with pytest.raises(InputError, match="different LoRA ranks"):
        convert_release({**state, **other})


@torch.no_grad()
def test_our_checkpoint_round_trip_with_config(tmp_path):
    model = random_weights(slidesam.build_slidesam(VARIANT, lora_rank=2), 4).eval()
    save_checkpoint(model, model.config, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").is_file()
    loaded = slidesam.load_model(tmp_path / "run")
    assert loaded.config == model.config
    image, boxes = _inputs(model.image_size)
    torch.testing.assert_close(loaded(image, boxes=boxes)[0], model(image, boxes=boxes)[0])
    # saving a merged model stores the unmerged weights (no double counting on reload)
    model.merge_lora()
    save_checkpoint(model, model.config, tmp_path / "merged.pt")
    again = slidesam.build_slidesam(checkpoint=tmp_path / "merged.pt")
    torch.testing.assert_close(
        again(image, boxes=boxes)[0], model(image, boxes=boxes)[0], rtol=1e-5, atol=1e-5
    )


@torch.no_grad()
def test_bare_state_dict_in_our_layout_reads_its_lora_rank(tmp_path):
    model = random_weights(slidesam.build_slidesam(VARIANT, lora_rank=3), 6).eval()
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded = slidesam.build_slidesam(checkpoint=tmp_path / "bare.pth")
    assert loaded.config.lora_rank == 3
    image, boxes = _inputs(model.image_size)
    torch.testing.assert_close(loaded(image, boxes=boxes)[0], model(image, boxes=boxes)[0])


def test_wrong_variant_is_named(tmp_path):
    _, path = official_sam_file(tmp_path, variant="tiny_64")
    with pytest.raises(InputError, match=r"the checkpoint is tiny_64 .* but variant 'tiny' was"):
        slidesam.build_sam("tiny", checkpoint=path)
    model = slidesam.build_slidesam(VARIANT)
    save_checkpoint(model, model.config, tmp_path / "ours.pt")
    with pytest.raises(InputError, match="not an official SAM checkpoint"):
        slidesam.build_sam(checkpoint=tmp_path / "ours.pt")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sam, _ = official_sam_file(tmp_path)
    state = sam.state_dict()
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    state["mask_decoder.mask_tokens.weight"] = torch.zeros(5, 32)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(InputError) as err:
        slidesam.build_sam(checkpoint=tmp_path / "broken.pth")
    msg = str(err.value)
    assert "1 missing: mask_decoder.iou_token.weight" in msg
    assert "1 unexpected: mask_decoder.extra.weight" in msg
    assert "mask_decoder.mask_tokens.weight: checkpoint [5, 32] vs model [4, 32]" in msg


def test_corrupt_and_foreign_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        slidesam.build_slidesam(checkpoint=tmp_path / "junk.pth")
    with pytest.raises(InputError, match="no such checkpoint"):
        slidesam.load_model(tmp_path / "absent.pt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not a SAM-family checkpoint"):
        slidesam.build_slidesam(checkpoint=tmp_path / "other.pth")
    _, sam_path = official_sam_file(tmp_path)
    with pytest.raises(InputError, match="no slidesam config inside"):
        slidesam.load_model(sam_path)


class _Payload:
    def __reduce__(self):  # would create a file if it were ever unpickled
        return (open, ("/tmp/slidesam_pwned_marker", "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_pickle_is_refused_not_executed(tmp_path):
    import os

    marker = "/tmp/slidesam_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"image_encoder.pos_embed": _Payload()}, f)
    torch.save({"state_dict": {"x": _Payload()}}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(InputError, match=r"refused|not a readable"):
            slidesam.build_slidesam(checkpoint=tmp_path / name)
    assert not os.path.exists(marker)

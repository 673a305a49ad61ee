"""SAM-Med3D weights load through one filter, strictly; our checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from slidesam.core.errors import InputError
from slidesam.modeling.sam3d import build_sam3d, variant3d_config
from slidesam.msam.checkpoint import load_msam, load_sam_med3d, sam_med3d_filter, save_msam
from slidesam.msam.config import PreprocessConfig
from tests.modeling.test_sam3d import dims_of, sam_med3d_manifest


def _seeded_sam_med3d(seed: int = 7) -> dict:
    """A SAM-Med3D-style checkpoint at tiny_32 dims: random tensors in its key layout, inside
    ``model_state_dict`` with the bookkeeping its train.py saves next to it."""
    gen = torch.Generator().manual_seed(seed)
    manifest = sam_med3d_manifest(**dims_of("tiny_32"))
    state = {f"module.{k}": torch.randn(shape, generator=gen) for k, shape in manifest.items()}
    return {"epoch": 3, "model_state_dict": state, "losses": [0.5, 0.4], "best_dice": 0.8}


def test_filter_unwraps_strips_and_keeps_the_three_parts():
    state = sam_med3d_filter(_seeded_sam_med3d())
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in state)
    assert "image_encoder.pos_embed" in state
    assert "epoch" not in state


def test_seeded_sam_med3d_state_loads_strictly(tmp_path):
    obj = _seeded_sam_med3d()
    path = tmp_path / "sam_med3d.pth"
    torch.save(obj, path)
    model = build_sam3d(variant3d_config("tiny_32"))
    load_sam_med3d(model, path)
    own = model.state_dict()
    for k, v in obj["model_state_dict"].items():
        assert torch.equal(own[k.removeprefix("module.")], v), k
    # LoRA B stays zero: the loaded encoder computes exactly SAM-Med3D's qkv
    assert all(m.lora_b_q.abs().sum() == 0 for m in model.lora_layers())


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("drop", ["1 missing", "image_encoder.neck.2.weight"]),
        ("extra", ["1 unexpected", "mask_decoder.extra_head.weight"]),
        ("shape", ["1 wrong shape", "image_encoder.pos_embed: checkpoint [1, 5, 5, 5, 32]"]),
    ],
)
def test_wrong_state_fails_with_readable_lists(damage, words):
    obj = _seeded_sam_med3d()
    state = obj["model_state_dict"]
    if damage == "drop":
        del state["module.image_encoder.neck.2.weight"]
    elif damage == "extra":
        state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    else:
        state["module.image_encoder.pos_embed"] = torch.zeros(1, 5, 5, 5, 32)
    model = build_sam3d(variant3d_config("tiny_32"))
    with pytest.raises(InputError) as err:
        load_sam_med3d(model, obj)
    for w in words:
        assert w in str(err.value)


def test_not_a_sam_checkpoint_is_refused():
    with pytest.raises(InputError, match="not a SAM-Med3D checkpoint"):
        sam_med3d_filter({"model_state_dict": {"encoder.w": torch.zeros(1)}})


def test_msam_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_sam3d(variant3d_config("tiny_32")).eval()
    for p in model.parameters():  # make LoRA and MEA non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    pre = PreprocessConfig(spacing=(2.0, 1.5, 1.5), foreground_threshold=-50)
    path = save_msam(model, tmp_path / "m.pt", preprocess=pre, extra={"epoch": 4})
    assert (tmp_path / "m.config.json").is_file()
    loaded, pre2, extra = load_msam(path)
    assert pre2 == pre
    assert extra == {"epoch": 4}
    assert loaded.config == model.config
    x = torch.randn(1, 1, 32, 32, 32)
    pts = (torch.tensor([[[10.0, 12.0, 14.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, points=pts)[0], model(x, points=pts)[0])
    torch.save({"model_state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an M-SAM checkpoint"):
        load_msam(tmp_path / "other.pt")

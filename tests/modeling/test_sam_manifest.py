"""Our vit_b SAM must have exactly the official ``sam_vit_b`` state-dict keys and shapes.

The expected manifest is written out here by hand from the official checkpoint's layout, not
derived from our code, so a renamed module or a changed shape fails this test.
"""

from __future__ import annotations

import pytest
import torch

from slidesam.core.config import VARIANTS, variant_config
from slidesam.modeling import build_model

D, HEADS, DEPTH, GLOBAL, P = 768, 12, 12, (2, 5, 8, 11), 256


def _linear(prefix, out_f, in_f):
    return {f"{prefix}.weight": [out_f, in_f], f"{prefix}.bias": [out_f]}


def _norm(prefix, n):
    return {f"{prefix}.weight": [n], f"{prefix}.bias": [n]}


def official_vit_b_manifest() -> dict[str, list[int]]:
    m: dict[str, list[int]] = {
        "image_encoder.pos_embed": [1, 64, 64, D],
        "image_encoder.patch_embed.proj.weight": [D, 3, 16, 16],
        "image_encoder.patch_embed.proj.bias": [D],
        "image_encoder.neck.0.weight": [P, D, 1, 1],
        "image_encoder.neck.2.weight": [P, P, 3, 3],
        **_norm("image_encoder.neck.1", P),
        **_norm("image_encoder.neck.3", P),
    }
    for i in range(DEPTH):
        b = f"image_encoder.blocks.{i}"
        rel = 127 if i in GLOBAL else 27  # 2 * 64 - 1 global, 2 * 14 - 1 windowed
        m.update(_norm(f"{b}.norm1", D) | _norm(f"{b}.norm2", D))
        m.update(_linear(f"{b}.attn.qkv", 3 * D, D) | _linear(f"{b}.attn.proj", D, D))
        m[f"{b}.attn.rel_pos_h"] = [rel, D // HEADS]
        m[f"{b}.attn.rel_pos_w"] = [rel, D // HEADS]
        m.update(_linear(f"{b}.mlp.lin1", 4 * D, D) | _linear(f"{b}.mlp.lin2", D, 4 * D))
    pe = "prompt_encoder"
    m[f"{pe}.pe_layer.positional_encoding_gaussian_matrix"] = [2, P // 2]
    for i in range(4):
        m[f"{pe}.point_embeddings.{i}.weight"] = [1, P]
    m[f"{pe}.not_a_point_embed.weight"] = [1, P]
    m[f"{pe}.no_mask_embed.weight"] = [1, P]
    m[f"{pe}.mask_downscaling.0.weight"] = [4, 1, 2, 2]
    m[f"{pe}.mask_downscaling.0.bias"] = [4]
    m.update(_norm(f"{pe}.mask_downscaling.1", 4))
    m[f"{pe}.mask_downscaling.3.weight"] = [16, 4, 2, 2]
    m[f"{pe}.mask_downscaling.3.bias"] = [16]
    m.update(_norm(f"{pe}.mask_downscaling.4", 16))
    m[f"{pe}.mask_downscaling.6.weight"] = [P, 16, 1, 1]
    m[f"{pe}.mask_downscaling.6.bias"] = [P]
    md = "mask_decoder"
    t = f"{md}.transformer"

    def attn(prefix, internal):
        out = {}
        for proj in ("q_proj", "k_proj", "v_proj"):
            out |= _linear(f"{prefix}.{proj}", internal, P)
        return out | _linear(f"{prefix}.out_proj", P, internal)

    for layer in range(2):
        lp = f"{t}.layers.{layer}"
        m.update(attn(f"{lp}.self_attn", P))
        m.update(attn(f"{lp}.cross_attn_token_to_image", P // 2))
        m.update(attn(f"{lp}.cross_attn_image_to_token", P // 2))
        for n in range(1, 5):
            m.update(_norm(f"{lp}.norm{n}", P))
        m.update(_linear(f"{lp}.mlp.lin1", 2048, P) | _linear(f"{lp}.mlp.lin2", P, 2048))
    m.update(attn(f"{t}.final_attn_token_to_image", P // 2))
    m.update(_norm(f"{t}.norm_final_attn", P))
    m[f"{md}.iou_token.weight"] = [1, P]
    m[f"{md}.mask_tokens.weight"] = [4, P]
    m[f"{md}.output_upscaling.0.weight"] = [P, P // 4, 2, 2]  # ConvTranspose2d: (in, out, k, k)
    m[f"{md}.output_upscaling.0.bias"] = [P // 4]
    m.update(_norm(f"{md}.output_upscaling.1", P // 4))
    m[f"{md}.output_upscaling.3.weight"] = [P // 4, P // 8, 2, 2]
    m[f"{md}.output_upscaling.3.bias"] = [P // 8]
    for i in range(4):  # 4 hypernetwork MLPs, 3 layers each
        h = f"{md}.output_hypernetworks_mlps.{i}.layers"
        m.update(_linear(f"{h}.0", P, P) | _linear(f"{h}.1", P, P) | _linear(f"{h}.2", P // 8, P))
    ih = f"{md}.iou_prediction_head.layers"
    m.update(_linear(f"{ih}.0", 256, P) | _linear(f"{ih}.1", 256, 256) | _linear(f"{ih}.2", 4, 256))
    return m


def _meta_model(variant, **options):
    with torch.device("meta"):
        return build_model(variant_config(variant, **options))


def test_vit_b_has_the_official_keys_and_shapes():
    ours = {k: list(v.shape) for k, v in _meta_model("vit_b").state_dict().items()}
    expected = official_vit_b_manifest()
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_vit_b_parameter_count_is_sams():
    model = _meta_model("vit_b")
    assert sum(p.numel() for p in model.parameters()) == 93_735_472  # sam_vit_b_01ec64.pth


@pytest.mark.parametrize(
    ("variant", "dim", "depth", "global_blocks"),
    [("vit_l", 1024, 24, (5, 11, 17, 23)), ("vit_h", 1280, 32, (7, 15, 23, 31))],
)
def test_large_variants(variant, dim, depth, global_blocks):
    sd = _meta_model(variant).state_dict()
    assert list(sd["image_encoder.pos_embed"].shape) == [1, 64, 64, dim]
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("image_encoder.blocks.")}
    assert blocks == set(range(depth))
    head_dim = dim // 16
    for i in range(depth):
        rel = 127 if i in global_blocks else 27
        assert list(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape) == [rel, head_dim]


def test_slidesam_layout_adds_branches_mask_channels_and_lora():
    sd = {
        k: list(v.shape)
        for k, v in _meta_model("vit_b", num_slices=3, lora_rank=8).state_dict().items()
    }
    base = official_vit_b_manifest()
    added = sorted(set(sd) - set(base))
    assert sd["prompt_encoder.mask_downscaling.0.weight"] == [4, 3, 2, 2]
    assert sd["mask_decoder.output_upscaling2.0.weight"] == [256, 64, 2, 2]
    assert sd["mask_decoder.output_upscaling3.3.weight"] == [64, 32, 2, 2]
    assert sd["image_encoder.blocks.0.attn.qkv.lora_a_q"] == [8, 768]
    assert sd["image_encoder.blocks.11.attn.qkv.lora_b_v"] == [768, 8]
    assert len([k for k in added if ".lora_" in k]) == 12 * 4
    assert len([k for k in added if "output_upscaling" in k]) == 2 * 6
    assert set(base) - set(sd) == set()  # everything official is still there, same names


def test_registry_has_tiny_variants_for_every_family():
    assert {"vit_b", "vit_l", "vit_h", "tiny", "tiny_64"} <= set(VARIANTS)
    assert VARIANTS["tiny"].image_size == 256

"""The 3D SAM + MEA: SAM-Med3D key layout, shapes, the MEA's mutual residuals, trainable share.

The SAM-Med3D manifest is written out by hand from its released code's module layout
(``segment_anything/modeling/*3D.py``, ``build_sam3D_vit_b_ori``), not derived from ours, so a
renamed module or a changed shape fails these tests. The full-size model is built on the meta
device (no memory, no time).
"""

from __future__ import annotations

import pytest
import torch

from slidesam.modeling.sam3d import (
    VARIANTS3D,
    MaskEnhancedAdapter,
    MutualFeatureEnhancementBlock,
    build_sam3d,
    set_trainable_3d,
    variant3d_config,
)


def _lin(prefix, out_f, in_f):
    return {f"{prefix}.weight": [out_f, in_f], f"{prefix}.bias": [out_f]}


def _norm(prefix, n):
    return {f"{prefix}.weight": [n], f"{prefix}.bias": [n]}


def sam_med3d_manifest(
    *, size, patch, dim, depth, heads, global_idx, window, p, mask_in, mlp, dec_heads, iou_hidden
) -> dict[str, list[int]]:
    """Keys and shapes of a SAM-Med3D ``model_state_dict`` with these dimensions."""
    g = size // patch
    m = {
        "image_encoder.pos_embed": [1, g, g, g, dim],
        "image_encoder.patch_embed.proj.weight": [dim, 1, patch, patch, patch],
        "image_encoder.patch_embed.proj.bias": [dim],
        "image_encoder.neck.0.weight": [p, dim, 1, 1, 1],
        "image_encoder.neck.2.weight": [p, p, 3, 3, 3],
        **_norm("image_encoder.neck.1", p),
        **_norm("image_encoder.neck.3", p),
    }
    for i in range(depth):
        b = f"image_encoder.blocks.{i}"
        rel = 2 * (g if (i in global_idx or window == 0) else window) - 1
        m |= _norm(f"{b}.norm1", dim) | _norm(f"{b}.norm2", dim)
        m |= _lin(f"{b}.attn.qkv", 3 * dim, dim) | _lin(f"{b}.attn.proj", dim, dim)
        for axis in "dhw":
            m[f"{b}.attn.rel_pos_{axis}"] = [rel, dim // heads]
        m |= _lin(f"{b}.mlp.lin1", 4 * dim, dim) | _lin(f"{b}.mlp.lin2", dim, 4 * dim)
    pe = "prompt_encoder"
    m[f"{pe}.pe_layer.positional_encoding_gaussian_matrix"] = [3, p // 3]
    for i in range(2):
        m[f"{pe}.point_embeddings.{i}.weight"] = [1, p]
    m[f"{pe}.not_a_point_embed.weight"] = [1, p]
    m[f"{pe}.no_mask_embed.weight"] = [1, p]
    q = mask_in // 4
    m |= {f"{pe}.mask_downscaling.0.weight": [q, 1, 2, 2, 2], f"{pe}.mask_downscaling.0.bias": [q]}
    m |= _norm(f"{pe}.mask_downscaling.1", q)
    m |= {
        f"{pe}.mask_downscaling.3.weight": [mask_in, q, 2, 2, 2],
        f"{pe}.mask_downscaling.3.bias": [mask_in],
    }
    m |= _norm(f"{pe}.mask_downscaling.4", mask_in)
    m |= {f"{pe}.mask_downscaling.6.weight": [p, mask_in, 1, 1, 1]}
    m |= {f"{pe}.mask_downscaling.6.bias": [p]}
    md, t = "mask_decoder", "mask_decoder.transformer"

    def attn(prefix, internal):
        out = {}
        for proj in ("q_proj", "k_proj", "v_proj"):
            out |= _lin(f"{prefix}.{proj}", internal, p)
        return out | _lin(f"{prefix}.out_proj", p, internal)

    for layer in range(2):
        lp = f"{t}.layers.{layer}"
        m |= attn(f"{lp}.self_attn", p)
        m |= attn(f"{lp}.cross_attn_token_to_image", p // 2)
        m |= attn(f"{lp}.cross_attn_image_to_token", p // 2)
        for n in range(1, 5):
            m |= _norm(f"{lp}.norm{n}", p)
        m |= _lin(f"{lp}.mlp.lin1", mlp, p) | _lin(f"{lp}.mlp.lin2", p, mlp)
    m |= attn(f"{t}.final_attn_token_to_image", p // 2) | _norm(f"{t}.norm_final_attn", p)
    m[f"{md}.iou_token.weight"] = [1, p]
    m[f"{md}.mask_tokens.weight"] = [4, p]
    m[f"{md}.output_upscaling.0.weight"] = [p, p // 4, 2, 2, 2]  # ConvTranspose3d (in, out, k^3)
    m[f"{md}.output_upscaling.0.bias"] = [p // 4]
    m |= _norm(f"{md}.output_upscaling.1", p // 4)
    m[f"{md}.output_upscaling.3.weight"] = [p // 4, p // 8, 2, 2, 2]
    m[f"{md}.output_upscaling.3.bias"] = [p // 8]
    for i in range(4):
        h = f"{md}.output_hypernetworks_mlps.{i}.layers"
        m |= _lin(f"{h}.0", p, p) | _lin(f"{h}.1", p, p) | _lin(f"{h}.2", p // 8, p)
    h = f"{md}.iou_prediction_head.layers"
    m |= _lin(f"{h}.0", iou_hidden, p) | _lin(f"{h}.1", iou_hidden, iou_hidden)
    m |= _lin(f"{h}.2", 4, iou_hidden)
    return m


#: SAM-Med3D vit_b_ori, written from its build_sam3D.py
SAM_MED3D_DIMS = dict(
    size=128, patch=16, dim=768, depth=12, heads=12, global_idx=(2, 5, 8, 11), window=14,
    p=384, mask_in=16, mlp=2048, dec_heads=8, iou_hidden=256,
)  # fmt: skip


def dims_of(variant: str) -> dict:
    c = VARIANTS3D[variant]
    return dict(
        size=c.image_size, patch=c.patch_size, dim=c.encoder_embed_dim, depth=c.encoder_depth,
        heads=c.encoder_num_heads, global_idx=c.encoder_global_attn_indexes, window=c.window_size,
        p=c.prompt_embed_dim, mask_in=c.mask_in_chans, mlp=c.decoder_mlp_dim,
        dec_heads=c.decoder_num_heads, iou_hidden=c.iou_head_hidden_dim,
    )  # fmt: skip


def _sam_part(key: str) -> bool:
    return ".lora_" not in key and not key.startswith("mea.")


def test_full_size_has_exactly_sam_med3d_keys_and_shapes():
    assert dims_of("sam_med3d") == SAM_MED3D_DIMS
    with torch.device("meta"):
        model = build_sam3d(VARIANTS3D["sam_med3d"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if _sam_part(k)}
    expected = sam_med3d_manifest(**SAM_MED3D_DIMS)
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert len(ours) == len(expected)


def test_full_size_trainable_fraction_is_about_20_percent():
    with torch.device("meta"):
        model = build_sam3d(VARIANTS3D["sam_med3d"])
    counts = set_trainable_3d(model, "msam")
    total = counts["trainable"] + counts["frozen"]
    assert 100e6 < total < 120e6  # the seed: 118 M
    assert 0.17 < counts["trainable"] / total < 0.23  # the seed: 21.4 %
    # the frozen part is exactly the ViT without its LoRA and neck
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith("image_encoder.") and ".lora_" not in n for n in frozen)
    assert not any(n.startswith("image_encoder.neck.") for n in frozen)


@pytest.mark.parametrize("variant", ["tiny", "tiny_32"])
def test_variant_forward_backward_shapes(variant):
    torch.manual_seed(0)
    config = VARIANTS3D[variant]
    model = build_sam3d(config)
    s, e, low = config.image_size, config.embedding_size, config.low_res_size
    x = torch.randn(2, 1, s, s, s)
    emb = model.encode(x)
    assert emb.shape == (2, config.prompt_embed_dim, e, e, e)
    pts = (torch.rand(2, 2, 3) * s, torch.tensor([[1, 0], [1, -1]]))
    logits, iou = model.decode(emb, points=pts, mask_prompt=torch.zeros(2, 1, low, low, low))
    assert logits.shape == (2, 1, low, low, low)
    assert iou.shape == (2, 1)
    multi, iou3 = model.decode(emb, points=pts, multimask_output=True)
    assert multi.shape == (2, 3, low, low, low)
    assert iou3.shape == (2, 3)
    logits.square().mean().backward()
    assert model.mea.fusion_attn.qkv.weight.grad.abs().sum() > 0
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_without_mea_is_sam_med3d_sum_and_has_no_mea_keys():
    torch.manual_seed(0)
    model = build_sam3d(variant3d_config("tiny_32", use_mea=False))
    assert model.mea is None
    assert not any(k.startswith("mea.") for k in model.state_dict())
    emb = torch.randn(1, 24, 4, 4, 4)
    pts = (torch.tensor([[[3.0, 4.0, 5.0]]]), torch.tensor([[1]]))
    a, _ = model.decode(emb, points=pts, mask_prompt=torch.zeros(1, 1, 16, 16, 16))
    b, _ = model.decode(emb, points=pts, mask_prompt=torch.ones(1, 1, 16, 16, 16) * 5)
    assert not torch.allclose(a, b)  # the mask prompt reaches the decoder through the sum


def test_mea_keeps_shapes_and_uses_the_mask():
    torch.manual_seed(0)
    mea = MaskEnhancedAdapter(dim=24, depth=2, num_heads=4, mlp_ratio=2.0)
    image, mask = torch.randn(2, 24, 4, 4, 4), torch.randn(2, 24, 4, 4, 4)
    out = mea(image, mask)
    assert out.shape == image.shape
    assert not torch.allclose(out, mea(image, mask + 1.0))
    shared = mea(image[:1], mask)  # one image embedding shared by two masks
    assert shared.shape == (2, 24, 4, 4, 4)
    assert torch.allclose(shared[0], out[0], atol=1e-6)


@pytest.mark.parametrize("perturbed", ["image", "mask"])
def test_mutual_residuals_cross_streams(perturbed):
    """Perturb one stream's input: the *other* stream's output changes, and only because of the
    mutual residual (with ordinary residuals the other stream is untouched, exactly)."""
    torch.manual_seed(0)
    block = MutualFeatureEnhancementBlock(dim=16, num_heads=2, mlp_ratio=2.0)
    image, mask = torch.randn(1, 27, 16), torch.randn(1, 27, 16)
    delta = torch.randn(1, 27, 16)
    bumped = (image + delta, mask) if perturbed == "image" else (image, mask + delta)
    other = 1 if perturbed == "image" else 0  # index of the stream that was not perturbed
    with torch.no_grad():
        base, moved = block(image, mask), block(*bumped)
        assert (moved[other] - base[other]).abs().max() > 1e-2
        block.mutual = False
        base, moved = block(image, mask), block(*bumped)
        assert torch.equal(moved[other], base[other])


def test_windowed_block_matches_sam_med3d_padding():
    """A window larger than the grid (SAM-Med3D: 14 over 8) attends over the zero-padded cube:
    the same as global attention over the grid plus padded tokens, not plain global attention."""
    from slidesam.modeling.sam3d.image_encoder import Block3D

    torch.manual_seed(0)
    windowed = Block3D(dim=8, num_heads=2, mlp_ratio=2.0, window_size=5, grid=4)
    plain = Block3D(dim=8, num_heads=2, mlp_ratio=2.0, window_size=0, grid=5)
    plain.load_state_dict(windowed.state_dict())  # same rel-pos table size (2 * 5 - 1)
    x = torch.randn(1, 4, 4, 4, 8)
    with torch.no_grad():
        # the windowed block equals: normalise, zero-pad to 5^3, global attention, crop
        y = windowed(x)
        xn = windowed.norm1(x)
        padded = torch.nn.functional.pad(xn, (0, 0, 0, 1, 0, 1, 0, 1))
        attn = plain.attn(padded)[:, :4, :4, :4]
        ref = x + attn
        ref = ref + windowed.mlp(windowed.norm2(ref))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)

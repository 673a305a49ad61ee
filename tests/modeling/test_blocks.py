from __future__ import annotations

import pytest
import torch

from slidesam.core.config import variant_config
from slidesam.modeling import build_model, image_encoder, set_trainable
from slidesam.modeling.image_encoder import (
    Attention,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from slidesam.modeling.lora import LoRAQKV
from slidesam.modeling.transformer import Attention as TokenAttention


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# bias built whole; one query row per chunk; chunks of 2, 2 and 1 rows (one reused buffer)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 2 * 2 * 4 * 6 * 5 * 6 * 4])
def test_encoder_attention_equals_sams_explicit_formula(monkeypatch, chunk_bytes):
    # SAM computes softmax((q * scale) @ k^T + rel_h + rel_w) @ v; we use SDPA with the bias.
    if chunk_bytes is not None:
        monkeypatch.setattr(image_encoder, "_BIAS_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, qkv_bias=True, input_size=(5, 6))
    _randomise(attn)
    x = torch.randn(2, 5, 6, 32)
    b, h, w, _ = x.shape
    qkv = (
        attn.qkv(x).reshape(b, h * w, 3, 4, -1).permute(2, 0, 3, 1, 4).reshape(3, b * 4, h * w, -1)
    )
    q, k, v = qkv.unbind(0)
    logits = (q * 8**-0.5) @ k.transpose(-2, -1)
    rh, rw = get_rel_pos(h, h, attn.rel_pos_h), get_rel_pos(w, w, attn.rel_pos_w)
    r_q = q.reshape(b * 4, h, w, 8)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    logits = (logits.view(b * 4, h, w, h, w) + rel_h[..., None] + rel_w[..., None, :]).view(
        b * 4, h * w, h * w
    )
    ref = (logits.softmax(-1) @ v).view(b, 4, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    torch.testing.assert_close(attn(x), attn.proj(ref), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the path that reuses one bias buffer across chunks
        torch.testing.assert_close(attn(x), attn.proj(ref), rtol=1e-5, atol=1e-5)


def test_token_attention_equals_explicit_formula():
    torch.manual_seed(1)
    attn = TokenAttention(embedding_dim=16, num_heads=2, downsample_rate=2)
    q, k, v = torch.randn(3, 5, 16), torch.randn(3, 7, 16), torch.randn(3, 7, 16)

    def heads(t):
        return t.reshape(3, -1, 2, 4).transpose(1, 2)

    qq, kk, vv = heads(attn.q_proj(q)), heads(attn.k_proj(k)), heads(attn.v_proj(v))
    ref = ((qq @ kk.transpose(-2, -1)) / 2.0).softmax(-1) @ vv  # sqrt(4) = 2
    ref = attn.out_proj(ref.transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(q, k, v), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("h", "w", "ws"), [(8, 8, 4), (10, 7, 4), (5, 5, 14)])
def test_window_partition_round_trip(h, w, ws):
    x = torch.randn(2, h, w, 3)
    windows, pad = window_partition(x, ws)
    assert windows.shape[1:3] == (ws, ws)
    assert pad == (-(-h // ws) * ws, -(-w // ws) * ws)
    torch.testing.assert_close(window_unpartition(windows, ws, pad, (h, w)), x)


def test_fresh_lora_changes_nothing_and_touches_only_q_and_v():
    torch.manual_seed(0)
    lora = LoRAQKV(dim=12, rank=3)
    base = torch.nn.Linear(12, 36)
    base.load_state_dict({"weight": lora.weight, "bias": lora.bias})
    x = torch.randn(4, 12)
    torch.testing.assert_close(lora(x), base(x))  # B = 0
    with torch.no_grad():
        lora.lora_b_q.normal_()
        lora.lora_b_v.normal_()
    out, ref = lora(x), base(x)
    torch.testing.assert_close(out[:, 12:24], ref[:, 12:24])  # k untouched
    assert (out[:, :12] - ref[:, :12]).abs().max() > 1e-3
    assert (out[:, 24:] - ref[:, 24:]).abs().max() > 1e-3
    expected_q = ref[:, :12] + x @ (lora.lora_b_q @ lora.lora_a_q).T
    torch.testing.assert_close(out[:, :12], expected_q)
    before = lora.weight.detach().clone()
    lora.merge()
    torch.testing.assert_close(lora(x), out)
    assert not torch.equal(lora.weight, before)
    lora.unmerge()
    torch.testing.assert_close(lora.weight, before)
    torch.testing.assert_close(lora(x), out)


@pytest.mark.parametrize("variant", ["tiny", "tiny_64"])
@pytest.mark.parametrize("num_slices", [1, 3])
def test_forward_backward_shapes(variant, num_slices):
    torch.manual_seed(0)
    cfg = variant_config(variant, num_slices=num_slices, lora_rank=2 if num_slices == 3 else 0)
    model = build_model(cfg)
    s, e = cfg.image_size, cfg.embedding_size
    images = torch.rand(2, 3, s, s) * 255
    boxes = torch.tensor([[4.0, 6.0, s / 2, s / 2 + 3], [1.0, 1.0, s - 2.0, s - 2.0]])
    masks, iou = model(images, boxes=boxes, multimask_output=True)
    assert masks.shape == (2, 3, num_slices, 4 * e, 4 * e)
    assert iou.shape == (2, 3)
    single, iou1 = model(
        images,
        boxes=boxes,
        multimask_output=False,
        mask_prompt=torch.zeros(2, num_slices, 4 * e, 4 * e),
    )
    assert single.shape == (2, 1, num_slices, 4 * e, 4 * e)
    assert iou1.shape == (2, 1)
    (masks.mean() + iou.mean()).backward()
    # every encoder and decoder weight is reached (prompt-encoder parts for points and masks are
    # not used by a box-only loss)
    used = [
        (n, p.grad)
        for n, p in model.named_parameters()
        if n.startswith(("image_encoder.", "mask_decoder."))
    ]
    assert [n for n, g in used if g is None] == []
    assert all(torch.isfinite(g).all() for _, g in used)
    assert model.prompt_encoder.point_embeddings[2].weight.grad is not None  # box corner


def test_trainable_presets():
    model = build_model(variant_config("tiny_64", num_slices=3, lora_rank=2))
    counts = set_trainable(model, "lora")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "image_encoder.patch_embed.proj.weight" in names
    assert "image_encoder.blocks.0.attn.qkv.lora_a_q" in names
    assert "image_encoder.blocks.0.attn.qkv.weight" not in names
    assert "image_encoder.neck.0.weight" not in names
    assert "mask_decoder.output_upscaling3.0.weight" in names
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in names)
    set_trainable(model, "decoder")
    assert all(
        n.startswith("mask_decoder.") for n, p in model.named_parameters() if p.requires_grad
    )
    from slidesam.core import InputError

    with pytest.raises(InputError, match="lora_rank > 0"):
        set_trainable(build_model(variant_config("tiny_64")), "lora")

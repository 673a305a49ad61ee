"""The one factory for 3D models: ``Sam3DConfig`` -> ``Sam3D``, and what trains at which rate."""

from __future__ import annotations

from slidesam.core.errors import InputError
from slidesam.modeling.sam3d.config import Sam3DConfig
from slidesam.modeling.sam3d.image_encoder import ImageEncoderViT3D
from slidesam.modeling.sam3d.mask_decoder import MaskDecoder3D
from slidesam.modeling.sam3d.mea import MaskEnhancedAdapter
from slidesam.modeling.sam3d.prompt_encoder import PromptEncoder3D
from slidesam.modeling.sam3d.sam3d import Sam3D
from slidesam.modeling.transformer import TwoWayTransformer

__all__ = ["TRAINABLE_PRESETS_3D", "build_sam3d", "param_groups", "set_trainable_3d"]


def build_sam3d(config: Sam3DConfig) -> Sam3D:
    """An untrained model from its config (seed torch first for reproducible weights).

    Build inside ``with torch.device("meta"):`` to get the structure without memory.
    """
    p = config.prompt_embed_dim
    model = Sam3D(
        image_encoder=ImageEncoderViT3D(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            out_chans=p,
            window_size=config.window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
            lora_rank=config.lora_rank,
            lora_scale=config.lora_scale,
        ),
        prompt_encoder=PromptEncoder3D(
            embed_dim=p,
            image_embedding_size=config.embedding_size,
            input_image_size=config.image_size,
            mask_in_chans=config.mask_in_chans,
            sam_med3d_pe=config.sam_med3d_pe,
        ),
        mask_decoder=MaskDecoder3D(
            transformer_dim=p,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=p,
                num_heads=config.decoder_num_heads,
                mlp_dim=config.decoder_mlp_dim,
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        mea=MaskEnhancedAdapter(
            dim=p,
            depth=config.mea_depth,
            num_heads=config.mea_num_heads,
            mlp_ratio=config.mea_mlp_ratio,
        )
        if config.use_mea
        else None,
    )
    model.config = config  # the model describes itself; saved with every checkpoint
    return model


#: what trains, by name. ``msam`` is the seed's recipe: encoder LoRA (q, v), the MEA, the
#: encoder neck (the adapter's input side), prompt encoder and decoder; the ViT stays frozen.
TRAINABLE_PRESETS_3D: dict[str, tuple[str, ...]] = {
    "msam": ("lora", "image_encoder.neck", "mea", "prompt_encoder", "mask_decoder"),
    "decoder": ("mea", "prompt_encoder", "mask_decoder"),
    "full": ("image_encoder", "mea", "prompt_encoder", "mask_decoder"),
}

#: parts trained at the base learning rate; everything else trainable gets ``lr * low_lr_scale``
_FAST = ("lora", "image_encoder", "mea")


def _part(name: str, parts: tuple[str, ...]) -> str | None:
    for part in parts:
        if part == "lora" and ".lora_" in name:
            return part
        if name == part or name.startswith(part + "."):
            return part
    return None


def set_trainable_3d(model: Sam3D, preset: str = "msam") -> dict[str, int]:
    """Freeze everything, then unfreeze the parts named by ``preset``.

    Returns:
        {"trainable": n, "frozen": m} parameter counts.
    """
    if preset not in TRAINABLE_PRESETS_3D:
        raise InputError(
            f"unknown trainable preset {preset!r}; use one of {', '.join(TRAINABLE_PRESETS_3D)}"
        )
    parts = TRAINABLE_PRESETS_3D[preset]
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        p.requires_grad = _part(name, parts) is not None
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def param_groups(
    model: Sam3D, *, lr: float, low_lr_scale: float, weight_decay: float
) -> list[dict]:
    """AdamW groups of the trainable parameters: LoRA, encoder and MEA at ``lr``; prompt encoder
    and mask decoder at ``lr * low_lr_scale`` (the seed: 8e-4 and 8e-5)."""
    fast, slow = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if _part(name, _FAST) else slow).append(p)
    groups = [
        {"params": fast, "lr": lr, "weight_decay": weight_decay, "name": "encoder+mea"},
        {"params": slow, "lr": lr * low_lr_scale, "weight_decay": weight_decay, "name": "decoder"},
    ]
    return [g for g in groups if g["params"]]

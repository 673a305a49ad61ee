"""The one factory: ``SamConfig`` -> ``Sam`` modules, and what trains (LoRA, embedding, decoder).

No file I/O here; checkpoints are read in ``slidesam.inference.checkpoint``.
"""

from __future__ import annotations

from slidesam.core.config import SamConfig
from slidesam.core.errors import InputError
from slidesam.modeling.image_encoder import ImageEncoderViT
from slidesam.modeling.mask_decoder import MaskDecoder
from slidesam.modeling.prompt_encoder import PromptEncoder
from slidesam.modeling.sam import Sam
from slidesam.modeling.transformer import TwoWayTransformer

__all__ = ["TRAINABLE_PRESETS", "build_model", "set_trainable"]


def build_model(config: SamConfig) -> Sam:
    """Build an untrained model from its config (seed torch first for reproducible weights)."""
    e = config.embedding_size
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            out_chans=config.prompt_embed_dim,
            window_size=config.window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
            lora_rank=config.lora_rank,
            lora_scale=config.lora_scale,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
            mask_channels=config.num_slices,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=config.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                num_heads=config.decoder_num_heads,
                mlp_dim=config.decoder_mlp_dim,
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
            num_slices=config.num_slices,
        ),
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
    )
    model.config = config  # the model describes itself; saved with every checkpoint
    return model


#: what trains, by name: the paper's default is LoRA + patch embedding + decoder
TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "lora": ("lora", "patch_embed", "prompt_encoder", "mask_decoder"),
    "decoder": ("mask_decoder",),
    "decoder+prompt": ("prompt_encoder", "mask_decoder"),
    "full": ("image_encoder", "prompt_encoder", "mask_decoder"),
}


def set_trainable(model: Sam, preset: str = "lora") -> dict[str, int]:
    """Freeze everything, then unfreeze the parts named by ``preset``.

    Returns:
        {"trainable": n, "frozen": m} parameter counts.
    """
    if preset not in TRAINABLE_PRESETS:
        raise InputError(
            f"unknown trainable preset {preset!r}; use one of {', '.join(TRAINABLE_PRESETS)}"
        )
    parts = TRAINABLE_PRESETS[preset]
    if "lora" in parts and not model.lora_layers():
        raise InputError("preset 'lora' needs a model with lora_rank > 0")
    for name, p in model.named_parameters():
        p.requires_grad = _selected(name, parts)
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def _selected(name: str, parts: tuple[str, ...]) -> bool:
    for part in parts:
        if part == "lora" and ".lora_" in name:
            return True
        if part == "patch_embed" and name.startswith("image_encoder.patch_embed."):
            return True
        if name.startswith(part + "."):
            return True
    return False

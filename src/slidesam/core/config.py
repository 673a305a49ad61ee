"""Model configuration: the numbers that define a SAM / Slide-SAM network.

Torch-free so a checkpoint's config can be read and validated without building the model. One
registry, ``VARIANTS``, holds every named size; ``slidesam.modeling.build_model`` is the one
factory that turns a config into modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from slidesam.core.configfile import from_mapping, with_options
from slidesam.core.errors import InputError

__all__ = ["VARIANTS", "SamConfig", "variant_config"]


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a (Slide-)SAM model.

    Attributes:
        variant: registry name it was derived from (``vit_b``, ``tiny``, ...).
        image_size: square input side in pixels (1024 for SAM).
        patch_size: ViT patch side; embeddings are ``image_size // patch_size`` on a side.
        encoder_embed_dim, encoder_depth, encoder_num_heads: the ViT.
        encoder_global_attn_indexes: blocks with global attention; the others use windows.
        window_size: side of the attention windows, in patches.
        prompt_embed_dim: width of prompt tokens, image embedding channels and the decoder.
        mask_in_chans: hidden channels of the mask-prompt downscaling path.
        decoder_depth, decoder_mlp_dim, decoder_num_heads: the two-way transformer.
        iou_head_hidden_dim: width of the IoU prediction MLP (depth 3).
        num_multimask_outputs: multimask candidates (a single-mask token is added).
        num_slices: 1 = plain SAM; 3 = Slide-SAM (three slices in, three masks out, and a
            3-channel mask prompt).
        lora_rank: rank of the LoRA update on q and v of every encoder block (0 = none).
        lora_scale: factor on the LoRA update (the Slide-SAM reference wrapper uses 1).
        pixel_mean, pixel_std: input normalisation on 0..255 RGB (SAM's ImageNet values).
        roi_context: what the model sees. 0 = the whole slice (SAM, Slide-SAM). ``c > 0`` = a
            square crop around the prompt box, ``c`` times its longer side, resized to
            ``image_size`` (``slidesam.data.roi``): a property of how the model was trained,
            so it is saved with it and the predictor follows it.
    """

    variant: str = "vit_b"
    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    num_slices: int = 1
    lora_rank: int = 0
    lora_scale: float = 1.0
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    roi_context: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "encoder_global_attn_indexes",
            tuple(int(i) for i in self.encoder_global_attn_indexes),
        )
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        if self.image_size % self.patch_size:
            raise InputError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise InputError("encoder_embed_dim must be divisible by encoder_num_heads")
        if self.prompt_embed_dim % self.decoder_num_heads or self.prompt_embed_dim % 8:
            raise InputError("prompt_embed_dim must be divisible by decoder_num_heads and by 8")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise InputError(
                f"global attention indexes {self.encoder_global_attn_indexes} must lie in "
                f"0..{self.encoder_depth - 1}"
            )
        if self.num_slices not in (1, 3):
            raise InputError(f"num_slices must be 1 (SAM) or 3 (Slide-SAM), got {self.num_slices}")
        if self.lora_rank < 0:
            raise InputError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if not (self.roi_context == 0 or 1 <= self.roi_context <= 20):
            raise InputError(
                f"roi_context must be 0 (whole slice) or lie in [1, 20], got {self.roi_context}"
            )
        object.__setattr__(self, "roi_context", float(self.roi_context))
        if self.mask_in_chans % 4:
            raise InputError(f"mask_in_chans must be a multiple of 4, got {self.mask_in_chans}")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for SAM at 1024)."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamConfig:
        return from_mapping(cls, d, "model config")

    def with_options(self, **options) -> SamConfig:
        """A copy with some fields changed; unknown names are an error that lists the valid ones."""
        return with_options(self, "model option", **options)


_SAM_B = SamConfig()

#: every named size. vit_* are SAM's (image 1024, patch 16, 64x64 embeddings, prompt dim 256);
#: tiny variants run and train on 2 CPU cores in tests.
VARIANTS: dict[str, SamConfig] = {
    "vit_b": _SAM_B,
    "vit_l": replace(
        _SAM_B,
        variant="vit_l",
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": replace(
        _SAM_B,
        variant="vit_h",
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # 256 px input, 16 x 16 embeddings, 4 blocks (global at 1 and 3, windows of 8), narrow decoder
    "tiny": replace(
        _SAM_B,
        variant="tiny",
        image_size=256,
        encoder_embed_dim=96,
        encoder_depth=4,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1, 3),
        window_size=8,
        prompt_embed_dim=64,
        mask_in_chans=16,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
    ),
    # smallest: for unit tests of shapes and checkpoint plumbing
    "tiny_64": replace(
        _SAM_B,
        variant="tiny_64",
        image_size=64,
        patch_size=8,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=4,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def variant_config(variant: str, **options) -> SamConfig:
    """The registered config of ``variant`` with ``options`` applied."""
    if variant not in VARIANTS:
        raise InputError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant].with_options(**options) if options else VARIANTS[variant]

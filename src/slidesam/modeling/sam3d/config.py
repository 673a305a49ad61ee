"""``Sam3DConfig``: the numbers of a 3D SAM (SAM-Med3D layout) with M-SAM's Mask-Enhanced Adapter.

Torch-free on purpose (a dataclass and a registry), so a checkpoint's config can be read and
validated without building the network. ``VARIANTS3D`` holds every named size; the one factory is
``slidesam.modeling.sam3d.build.build_sam3d``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from slidesam.core.configfile import from_mapping, with_options
from slidesam.core.errors import InputError

__all__ = ["VARIANTS3D", "Sam3DConfig", "variant3d_config"]


@dataclass(frozen=True)
class Sam3DConfig:
    """Architecture of a 3D SAM + MEA (saved inside every M-SAM checkpoint).

    Attributes:
        variant: registry name it was derived from.
        image_size: cubic input side in voxels (128 for SAM-Med3D).
        patch_size: ViT patch side; the embedding grid is ``image_size // patch_size`` a side.
        in_chans: image channels (1 for CT).
        encoder_embed_dim, encoder_depth, encoder_num_heads: the 3D ViT.
        encoder_global_attn_indexes: blocks with global attention; the others use cubic windows
            of ``window_size`` tokens (SAM-Med3D: 14, larger than its 8-token grid, so a windowed
            block attends over the grid zero-padded to 14^3, exactly as the released code does).
        prompt_embed_dim: width of prompt tokens, image embeddings, MEA and decoder (divisible by
            3, 8 and ``decoder_num_heads``).
        mask_in_chans: hidden channels of the mask-prompt downscaling path (multiple of 4).
        decoder_depth, decoder_mlp_dim, decoder_num_heads: the two-way transformer.
        iou_head_hidden_dim: width of the IoU head (depth 3).
        num_multimask_outputs: multimask candidates (a single-mask token is added).
        lora_rank: LoRA rank on q and v of every encoder block (0 = none).
        lora_scale: factor on the LoRA update.
        use_mea: the Mask-Enhanced Adapter fuses image and mask embeddings (M-SAM); ``False`` is
            SAM-Med3D's plain sum ``image + dense mask embedding`` (the "w/o MEA" ablation).
        mea_depth: Mutual Feature Enhancement Blocks in the MEA.
        mea_num_heads: attention heads inside the MEA.
        mea_mlp_ratio: MLP width of the MEA blocks relative to ``prompt_embed_dim``.
        sam_med3d_pe: reproduce SAM-Med3D's dense positional encoding, whose first two feature
            axes are swapped relative to the point encoding (needed for its released weights);
            ``False`` encodes both in the same (z, y, x) order.
    """

    variant: str = "sam_med3d"
    image_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    lora_rank: int = 4
    lora_scale: float = 1.0
    use_mea: bool = True
    mea_depth: int = 2
    mea_num_heads: int = 8
    mea_mlp_ratio: float = 4.0
    sam_med3d_pe: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "encoder_global_attn_indexes",
            tuple(int(i) for i in self.encoder_global_attn_indexes),
        )
        if self.image_size % self.patch_size:
            raise InputError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise InputError("encoder_embed_dim must be divisible by encoder_num_heads")
        p = self.prompt_embed_dim
        if p % 3 or p % 8 or p % self.decoder_num_heads or p % self.mea_num_heads:
            raise InputError(
                f"prompt_embed_dim {p} must be divisible by 3, 8, decoder_num_heads and "
                "mea_num_heads"
            )
        if (p // 2) % self.decoder_num_heads:
            raise InputError("decoder_num_heads must divide prompt_embed_dim // 2")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise InputError(
                f"global attention indexes {self.encoder_global_attn_indexes} must lie in "
                f"0..{self.encoder_depth - 1}"
            )
        if self.mask_in_chans % 4:
            raise InputError(f"mask_in_chans must be a multiple of 4, got {self.mask_in_chans}")
        if self.lora_rank < 0 or self.mea_depth < 0:
            raise InputError("lora_rank and mea_depth must be >= 0")

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (8 for SAM-Med3D)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution logits and of the mask prompt (4 x embedding)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Sam3DConfig:
        return from_mapping(cls, d, "3D model config")

    def with_options(self, **options) -> Sam3DConfig:
        """A copy with some fields changed; unknown names are an error that lists the valid ones."""
        return with_options(self, "model option", **options)


_SAM_MED3D = Sam3DConfig()

#: every named size. ``sam_med3d`` is SAM-Med3D's ``vit_b_ori`` (the M-SAM seed's base): 128^3,
#: patch 16 -> 8^3 tokens, 768 wide, 12 blocks, 12 heads, neck 384. The tiny ones run on CPU.
VARIANTS3D: dict[str, Sam3DConfig] = {
    "sam_med3d": _SAM_MED3D,
    # 64^3 input, patch 8 -> 8^3 tokens (as many as SAM-Med3D), 2 global blocks: bench / CLI tests
    "tiny": replace(
        _SAM_MED3D,
        variant="tiny",
        image_size=64,
        patch_size=8,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(0, 1),
        window_size=0,
        prompt_embed_dim=48,
        mask_in_chans=8,
        decoder_mlp_dim=96,
        decoder_num_heads=4,
        iou_head_hidden_dim=32,
        lora_rank=4,
        mea_depth=1,
        mea_num_heads=4,
        mea_mlp_ratio=2.0,
        sam_med3d_pe=False,
    ),
    # 32^3 input, 4^3 tokens, one windowed and one global block: unit tests of shapes and loading
    "tiny_32": replace(
        _SAM_MED3D,
        variant="tiny_32",
        image_size=32,
        patch_size=8,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=3,
        prompt_embed_dim=24,
        mask_in_chans=8,
        decoder_mlp_dim=48,
        decoder_num_heads=4,
        iou_head_hidden_dim=16,
        lora_rank=2,
        mea_depth=1,
        mea_num_heads=4,
        mea_mlp_ratio=2.0,
    ),
}


def variant3d_config(variant: str, **options) -> Sam3DConfig:
    """The registered config of ``variant`` with ``options`` applied."""
    if variant not in VARIANTS3D:
        raise InputError(
            f"unknown 3D model variant {variant!r}; choose one of {', '.join(VARIANTS3D)}"
        )
    return VARIANTS3D[variant].with_options(**options) if options else VARIANTS3D[variant]

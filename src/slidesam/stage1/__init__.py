"""Stage 1 of SSA: arterial-phase segmentation (embedded 3D U-Net, nnU-Net v2, or a given mask)."""

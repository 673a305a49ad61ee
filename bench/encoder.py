"""Image-encoder throughput on this CPU, as a fraction of the machine's own fp32 matmul peak.

The peak is measured in the same run with a large square matmul. The encoder's work is counted
with torch's FlopCounterMode (convolutions, linear layers, relative-position einsums) plus the
attention matmuls inside ``scaled_dot_product_attention``, which the counter does not see:
``4 * windows * L^2 * dim`` per block (QK^T and AV), L = tokens per window.
Target (issue 3): >= 75 % of peak for vit_b at 1024.

``--reference`` also times the same weights with SAM's own attention arithmetic (explicit
``softmax(q k^T * scale + rel_h + rel_w) v`` on the whole grid, x zero-padded before ``qkv`` in
windowed blocks), so the gain of our version is measured in the same run: timings on a shared
VM vary by 10-20 % from run to run, so compare numbers from one run only.

The process runs with the allocator setting of the ``slidesam`` command
(``slidesam.core.runtime.reuse_freed_memory``); ``--default-malloc`` leaves glibc's defaults, to
measure what that setting is worth (run both, compare the ratios).

    python bench/encoder.py [--variants tiny vit_b] [--repeats 3] [--reference] [--default-malloc]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from slidesam.core.config import variant_config
from slidesam.core.runtime import reuse_freed_memory
from slidesam.modeling import build_model, common
from slidesam.modeling import image_encoder as ie


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def encoder_flops(encoder, x: torch.Tensor) -> float:
    # the counter does not see oneDNN's fused linear: count on the plain path (same work)
    fast, common._ONEDNN_LINEAR = common._ONEDNN_LINEAR, False
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            encoder(x)
    finally:
        common._ONEDNN_LINEAR = fast
    flops = counter.get_total_flops()
    grid = x.shape[-1] // encoder.patch_embed.proj.kernel_size[0]
    dim = encoder.pos_embed.shape[-1]
    for blk in encoder.blocks:
        ws = blk.window_size
        if ws:
            windows, tokens = math.ceil(grid / ws) ** 2, ws * ws
        else:
            windows, tokens = 1, grid * grid
        flops += 4 * windows * tokens * tokens * dim * x.shape[0]
    return float(flops)


def sam_reference_block(self, x):
    """SAM's original block arithmetic (for --reference): pad x, explicit attention, the
    default GEMM path (torch's nn.Linear)."""
    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
        h, w = x.shape[1], x.shape[2]
        x, pad_hw = ie.window_partition(x, self.window_size)
    b, hh, ww, _ = x.shape
    attn = self.attn
    qkv = attn.qkv(x).reshape(b, hh * ww, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, hh * ww, -1).unbind(0)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    rh, rw = ie.get_rel_pos(hh, hh, attn.rel_pos_h), ie.get_rel_pos(ww, ww, attn.rel_pos_w)
    r_q = q.reshape(b * attn.num_heads, hh, ww, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    logits = (logits.view(-1, hh, ww, hh, ww) + rel_h[..., None] + rel_w[..., None, :]).view(
        -1, hh * ww, hh * ww
    )
    out = (F.softmax(logits, dim=-1) @ v).view(b, attn.num_heads, hh, ww, -1)
    x = attn.proj(out.permute(0, 2, 3, 1, 4).reshape(b, hh, ww, -1))
    if self.window_size > 0:
        x = ie.window_unpartition(x, self.window_size, pad_hw, (h, w))
    x = shortcut + x
    mlp = self.mlp
    return x + mlp.lin2(mlp.act(mlp.lin1(self.norm2(x))))


def time_encoder(encoder, x, repeats: int) -> float:
    with torch.inference_mode():
        encoder(x)  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder(x)
            best = min(best, time.perf_counter() - t0)
    return best


def bench(variant: str, batch: int, repeats: int, reference: bool):
    torch.manual_seed(0)
    cfg = variant_config(variant)
    encoder = build_model(cfg).image_encoder.eval()
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    flops = encoder_flops(encoder, x)  # useful work: the same for both implementations
    runs = [("slidesam", time_encoder(encoder, x, repeats))]
    if reference:
        original = ie.Block.forward
        ie.Block.forward = sam_reference_block
        try:
            runs.append(("SAM-style", time_encoder(encoder, x, repeats)))
        finally:
            ie.Block.forward = original
    return flops, runs


def report(variant, cfg_size, batch, flops, runs, peak) -> None:
    for name, best in runs:
        achieved = flops / best
        print(
            f"{variant:>6} @ {cfg_size:4d}px, batch {batch}, {name:>9}: "
            f"{batch / best:8.3f} images/s, {flops / batch / 1e9:6.1f} GFLOP/image, "
            f"{achieved / 1e9:6.1f} GFLOP/s = {100 * achieved / peak:5.1f} % of peak"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="+", default=["tiny", "vit_b"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also time SAM's original attention arithmetic on the same weights",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's allocator defaults instead of the slidesam command's setting",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    malloc = "glibc defaults" if args.default_malloc else "freed memory reused"
    if not args.default_malloc and not reuse_freed_memory():
        malloc = "glibc defaults (setting unavailable here)"
    peaks = [matmul_peak()]
    results = []
    for variant in args.variants:
        batch = 8 if variant.startswith("tiny") else 1
        flops, runs = bench(variant, batch, args.repeats, args.reference)
        results.append((variant, variant_config(variant).image_size, batch, flops, runs))
    peaks.append(matmul_peak())
    peak = max(peaks)  # the machine's speed drifts; the higher reading makes the ratio honest
    print(
        f"torch {torch.__version__}, {args.threads} threads; fp32 matmul peak (4096^3), "
        f"measured before and after: {' / '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s; "
        f"ratios use {peak / 1e9:.1f}; allocator: {malloc}"
    )
    for row in results:
        report(*row, peak=peak)


if __name__ == "__main__":
    main()

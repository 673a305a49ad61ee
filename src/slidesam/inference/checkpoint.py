"""Reading, converting and writing model checkpoints: safely, strictly, readably.

Three layouts are recognised from their keys:

- ``sam``: official SAM (``sam_vit_b_01ec64.pth`` ...): a flat state dict with prefixes
  ``image_encoder.``, ``prompt_encoder.``, ``mask_decoder.``; one upscaling branch; a 1-channel
  mask prompt; ``attn.qkv.weight``.
- ``slidesam_release``: the Slide-SAM authors' checkpoints, saved after their LoRA wrapper was
  applied: ``attn.qkv.qkv.weight`` with adapters ``attn.qkv.linear_{a,b}_{q,v}.weight``; a
  fine-tuned one nests once more (``attn.qkv.qkv.qkv.weight``, an adapter at each level);
  ``output_upscaling2/3`` and a 3-channel mask prompt.
- ``slidesam``: ours, ``{"format": "slidesam", "config": {...}, "state_dict": {...}}``, so a file
  describes itself.

Everything is loaded with ``torch.load(..., map_location="cpu", weights_only=True)``: a file that
would need arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from slidesam.core.config import VARIANTS, SamConfig
from slidesam.core.errors import InputError
from slidesam.modeling.mask_decoder import upscaling_name

__all__ = [
    "FORMAT",
    "convert_release",
    "detect_layout",
    "infer_variant",
    "load_state",
    "load_strict",
    "read_checkpoint",
    "sam_to_slidesam",
    "save_checkpoint",
]

FORMAT = "slidesam"
FORMAT_VERSION = 1
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_MASK_CONV = "prompt_encoder.mask_downscaling.0.weight"
_QKV = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.qkv)((?:\.qkv)*)\.(.+)$")


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file (or ``model.pt`` in a folder) as plain tensors and containers."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "can still be loaded" in str(exc):
            raise InputError(
                f"{path}: refused: the file holds Python objects other than tensors, which could "
                "run code when loaded (only weights_only checkpoints are read)"
            ) from None
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint (not a pickle of plain tensors)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def load_state(obj: dict) -> tuple[dict[str, torch.Tensor], SamConfig | None]:
    """The state dict (unwrapped, ``module.`` stripped) and our config if the file has one."""
    config = None
    if obj.get("format") == FORMAT:
        config = SamConfig.from_dict(obj["config"])
        obj = obj["state_dict"]
    else:
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise InputError(f"checkpoint entry {k!r} is not a tensor ({type(v).__name__})")
        state[k.removeprefix("module.")] = v
    return state, config


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """``"sam"``, ``"slidesam_release"`` or ``"slidesam"`` (ours, without its config)."""
    if not any(k.startswith("image_encoder.") for k in state):
        raise InputError(
            "not a SAM-family checkpoint: no 'image_encoder.' keys (first keys: "
            + ", ".join(list(state)[:3])
            + ")"
        )
    if any(".attn.qkv.qkv." in k or ".attn.qkv.linear_a_q." in k for k in state):
        return "slidesam_release"
    if any(".attn.qkv.lora_" in k for k in state):
        return "slidesam"
    if f"mask_decoder.{upscaling_name(1)}.0.weight" in state:
        return "slidesam"
    return "sam"


def infer_variant(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """Registered variant whose shapes match the checkpoint, and a description of the shapes."""
    try:
        pos = state["image_encoder.pos_embed"]
        patch = state["image_encoder.patch_embed.proj.weight"]
    except KeyError as exc:
        raise InputError(f"checkpoint lacks {exc.args[0]!r}; not a SAM image encoder") from None
    depth = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
    )
    dim, grid, p = int(pos.shape[-1]), int(pos.shape[1]), int(patch.shape[-1])
    neck = state.get("image_encoder.neck.0.weight")  # (prompt_dim, dim, 1, 1)
    prompt_dim = int(neck.shape[0]) if neck is not None else None
    desc = f"{dim}-dim, {depth} blocks, {grid * p}px input, prompt dim {prompt_dim}"
    for name, cfg in VARIANTS.items():
        if (
            cfg.encoder_embed_dim,
            cfg.encoder_depth,
            cfg.image_size,
            cfg.patch_size,
            cfg.prompt_embed_dim,
        ) == (dim, depth, grid * p, p, prompt_dim):
            return name, desc
    return None, desc


def check_variant(state: dict[str, torch.Tensor], wanted: str | None) -> str:
    """The checkpoint's variant; an error if it is not ``wanted`` (when given) or unknown."""
    found, desc = infer_variant(state)
    if found is None:
        raise InputError(
            f"checkpoint shapes ({desc}) match no known variant ({', '.join(VARIANTS)})"
        )
    if wanted is not None and wanted != found:
        raise InputError(
            f"the checkpoint is {found} ({desc}), but variant {wanted!r} was asked for"
        )
    return found


# ----------------------------------------------------------------------------------------------
# converters (one small filter per foreign layout)
# ----------------------------------------------------------------------------------------------
def sam_to_slidesam(state: dict[str, torch.Tensor], num_slices: int = 3) -> dict[str, torch.Tensor]:
    """Official SAM -> Slide-SAM: copy the upscaling branch to every slice, widen the mask conv.

    The 1-channel mask-downscaling weight is repeated over the 3 channels and divided by 3, so a
    mask repeated on the three slices gives exactly SAM's response (the first conv has a bias and
    is followed by LayerNorm2d, so without the division the response would change). The Slide-SAM
    reference code copies without dividing.
    """
    out = dict(state)
    prefix = f"mask_decoder.{upscaling_name(0)}."
    for i in range(1, num_slices):
        for k, v in state.items():
            if k.startswith(prefix):
                out[f"mask_decoder.{upscaling_name(i)}." + k[len(prefix) :]] = v.clone()
    w = state[_MASK_CONV]
    if w.shape[1] == 1:
        out[_MASK_CONV] = w.repeat(1, num_slices, 1, 1) / num_slices
    return out


def convert_release(
    state: dict[str, torch.Tensor], *, merge: bool = False
) -> tuple[dict[str, torch.Tensor], int]:
    """The Slide-SAM release layout -> ours. Returns (state, LoRA rank kept; 0 if merged).

    Each block's ``attn.qkv(.qkv)*`` chain holds the base ``weight``/``bias`` at its deepest
    level and one adapter (``linear_{a,b}_{q,v}.weight``, A: (r, dim), B: (dim, r), scale 1) at
    every level above it. All inner adapters are merged into the base weight; the outermost is
    kept as our LoRA (its rank read from the shapes), or merged too when ``merge``.
    """
    out: dict[str, torch.Tensor] = {}
    chains: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in state.items():
        m = _QKV.match(k)
        if m is None:
            out[k] = v
            continue
        chains.setdefault(m.group(1), {}).setdefault(m.group(2).count(".qkv"), {})[m.group(3)] = v
    ranks = set()
    for prefix, levels in chains.items():
        depth = max(levels)
        base = levels[depth]
        if "weight" not in base:
            raise InputError(f"{prefix}: no base qkv weight at the deepest level")
        weight = base["weight"].clone()
        dim = weight.shape[1]
        adapters = [levels[d] for d in range(depth - 1, -1, -1)]  # innermost first
        for level, adapter in enumerate(adapters):
            outermost = level == len(adapters) - 1
            if outermost and not merge:
                out[f"{prefix}.lora_a_q"] = adapter["linear_a_q.weight"]
                out[f"{prefix}.lora_b_q"] = adapter["linear_b_q.weight"]
                out[f"{prefix}.lora_a_v"] = adapter["linear_a_v.weight"]
                out[f"{prefix}.lora_b_v"] = adapter["linear_b_v.weight"]
                ranks.add(int(adapter["linear_a_q.weight"].shape[0]))
            else:
                weight[:dim] += adapter["linear_b_q.weight"] @ adapter["linear_a_q.weight"]
                weight[-dim:] += adapter["linear_b_v.weight"] @ adapter["linear_a_v.weight"]
        out[f"{prefix}.weight"] = weight
        if "bias" in base:
            out[f"{prefix}.bias"] = base["bias"]
    if len(ranks) > 1:
        raise InputError(f"the checkpoint's blocks use different LoRA ranks: {sorted(ranks)}")
    return out, (ranks.pop() if ranks else 0)


# ----------------------------------------------------------------------------------------------
# strict loading
# ----------------------------------------------------------------------------------------------
def load_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    allow_missing=lambda key: False,
    what: str = "checkpoint",
) -> None:
    """Load ``state`` exactly; otherwise fail listing missing, unexpected and mis-shaped keys.

    ``allow_missing(key)`` names keys the model may keep at their initial value (e.g. a fresh
    LoRA, which starts at zero).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not allow_missing(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", shapes),
        ):
            if items:
                shown = "; ".join(items[:8]) + (
                    f"; ... ({len(items) - 8} more)" if len(items) > 8 else ""
                )
                parts.append(f"{len(items)} {title}: {shown}")
        raise InputError(f"{what} does not fit the model: " + " | ".join(parts))
    model.load_state_dict(state, strict=False)


def save_checkpoint(
    model: nn.Module, config: SamConfig, path: str | Path, extra: dict | None = None
) -> Path:
    """Write our format: weights (LoRA unmerged) and config in one file, config also as JSON.

    ``path`` ending in ``.pt``/``.pth`` is the file; otherwise it is a folder that receives
    ``model.pt`` and ``config.json``.
    """
    path = Path(path)
    folder = path.parent if path.suffix in (".pt", ".pth") else path
    file = path if path.suffix in (".pt", ".pth") else path / "model.pt"
    folder.mkdir(parents=True, exist_ok=True)
    merged = [m for m in model.modules() if getattr(m, "merged", False)]
    for m in merged:
        m.unmerge()
    try:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    finally:
        for m in merged:
            m.merge()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": state,
        **(extra or {}),
    }
    torch.save(payload, file)
    (
        folder / (file.stem + ".config.json" if file.name != "model.pt" else "config.json")
    ).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return file

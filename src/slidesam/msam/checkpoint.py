"""M-SAM checkpoints (weights + config in one file) and the SAM-Med3D filter.

Our format: ``{"format": "slidesam-msam", "format_version": 1, "config": Sam3DConfig dict,
"preprocess": PreprocessConfig dict, "state_dict": {...}, "extra": {...}}``, plus a
``<name>.config.json`` next to it, so a model folder describes itself.

SAM-Med3D releases (``sam_med3d.pth``, ``sam_med3d_turbo.pth``) hold ``{"model_state_dict":
{...}, ...}`` with ``image_encoder.`` / ``prompt_encoder.`` / ``mask_decoder.`` keys, named as our
modules are: :func:`sam_med3d_filter` is the one conversion (unwrap, strip ``module.``, keep those
three prefixes). Loading is strict: only the parts SAM-Med3D does not have (LoRA, MEA) may stay at
their initial values; anything else missing, unexpected or mis-shaped is listed in the error.
Everything is read with ``torch.load(map_location="cpu", weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from slidesam.core.configfile import plain
from slidesam.core.errors import InputError
from slidesam.inference.checkpoint import load_strict, read_checkpoint
from slidesam.modeling.sam3d import Sam3D, Sam3DConfig, build_sam3d
from slidesam.msam.config import PreprocessConfig

__all__ = [
    "FORMAT",
    "load_msam",
    "load_sam_med3d",
    "sam_med3d_filter",
    "save_msam",
]

FORMAT = "slidesam-msam"
FORMAT_VERSION = 1
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_CONTAINERS = ("model_state_dict", "state_dict", "model")


def sam_med3d_filter(obj: dict) -> dict[str, torch.Tensor]:
    """A SAM-Med3D checkpoint (or its bare state dict) -> a state dict in our key layout.

    Unwraps ``model_state_dict`` (or ``state_dict`` / ``model``), strips a DDP ``module.`` prefix
    and keeps the ``image_encoder.``, ``prompt_encoder.`` and ``mask_decoder.`` entries (the
    training bookkeeping next to them, optimizer state, args, is dropped). Names are not changed:
    our 3D modules use SAM-Med3D's.
    """
    for key in _CONTAINERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        k = k.removeprefix("module.")
        if k.startswith(_SAM_PARTS):
            if not isinstance(v, torch.Tensor):
                raise InputError(f"checkpoint entry {k!r} is not a tensor ({type(v).__name__})")
            state[k] = v
    if not state:
        raise InputError(
            "not a SAM-Med3D checkpoint: no 'image_encoder.', 'prompt_encoder.' or "
            "'mask_decoder.' keys (first keys: " + ", ".join(list(obj)[:3]) + ")"
        )
    return state


def _fresh_part(key: str) -> bool:
    """Parameters SAM-Med3D lacks, which start from their initial values (LoRA B = 0, MEA)."""
    return ".lora_" in key or key.startswith("mea.")


def load_sam_med3d(model: Sam3D, source: str | Path | dict) -> None:
    """Load SAM-Med3D weights (a file path or an already read checkpoint dict) strictly."""
    obj = read_checkpoint(source) if isinstance(source, str | Path) else source
    load_strict(
        model, sam_med3d_filter(obj), allow_missing=_fresh_part, what="SAM-Med3D checkpoint"
    )


def save_msam(
    model: Sam3D,
    path: str | Path,
    *,
    preprocess: PreprocessConfig,
    extra: dict | None = None,
) -> Path:
    """Write our format (file ``path``, and ``<stem>.config.json`` beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config: Sam3DConfig = model.config
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "preprocess": plain(asdict(preprocess)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    torch.save(payload, path)
    meta = {"config": payload["config"], "preprocess": payload["preprocess"]}
    path.with_name(path.stem + ".config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_msam(path: str | Path) -> tuple[Sam3D, PreprocessConfig, dict]:
    """Read one of our checkpoints: (model in eval mode, its preprocessing, ``extra``)."""
    obj = read_checkpoint(path)
    if obj.get("format") != FORMAT:
        raise InputError(
            f"{path}: not an M-SAM checkpoint (format {obj.get('format')!r}); train one with "
            "'slidesam msam train', or start training from SAM-Med3D weights via model.init"
        )
    config = Sam3DConfig.from_dict(obj["config"])
    model = build_sam3d(config)
    load_strict(model, obj["state_dict"], what=f"{path}")
    preprocess = PreprocessConfig(**obj.get("preprocess", {}))
    return model.eval(), preprocess, obj.get("extra", {})

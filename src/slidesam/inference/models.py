"""Public model constructors: ``build_sam``, ``build_slidesam``, ``load_model``.

Each returns a ready ``Sam`` module on the requested device, in eval mode unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slidesam.core.config import variant_config
from slidesam.core.errors import InputError
from slidesam.inference.checkpoint import (
    check_variant,
    convert_release,
    detect_layout,
    load_state,
    load_strict,
    read_checkpoint,
    sam_to_slidesam,
)
from slidesam.modeling import Sam, build_model

__all__ = ["DEFAULT_MODEL_FILE", "build_sam", "build_slidesam", "default_model", "load_model"]

#: the embedded default model shipped inside the package (slidesam/weights/)
DEFAULT_MODEL_FILE = "default_slidesam.pt"


def _ready(model: Sam, device: str | torch.device, eval_mode: bool) -> Sam:
    model.to(_device(device))
    return model.eval() if eval_mode else model


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for, but MPS is not available; use --device cpu")
    return dev


def _is_lora(key: str) -> bool:
    return ".attn.qkv.lora_" in key


def build_sam(
    variant: str | None = None,
    checkpoint: str | Path | None = None,
    *,
    device: str = "cpu",
    eval_mode: bool = True,
) -> Sam:
    """Plain SAM (one slice) in the official layout, optionally with an official checkpoint.

    ``variant`` defaults to the checkpoint's (or ``vit_b`` without one); a checkpoint of another
    variant than the one asked for is an error that says which it is.
    """
    if checkpoint is None:
        return _ready(build_model(variant_config(variant or "vit_b")), device, eval_mode)
    state, _ = load_state(read_checkpoint(checkpoint))
    if detect_layout(state) != "sam":
        raise InputError(f"{checkpoint}: not an official SAM checkpoint; use build_slidesam")
    model = build_model(variant_config(check_variant(state, variant)))
    load_strict(model, state, what=str(checkpoint))
    return _ready(model, device, eval_mode)


def build_slidesam(
    variant: str | None = None,
    checkpoint: str | Path | None = None,
    *,
    device: str = "cpu",
    eval_mode: bool = True,
    merge_lora: bool = False,
    **options,
) -> Sam:
    """Slide-SAM (three slices), from scratch or from any supported checkpoint.

    Args:
        variant: registry name; ``None`` takes it from the checkpoint (``vit_b`` without one).
            A checkpoint of another variant is an error that says which it is.
        checkpoint: official SAM (its single branch copied to the three slices, LoRA at zero),
            a released Slide-SAM checkpoint (adapters converted; rank read from the shapes), or
            one of ours (its saved config is used).
        merge_lora: fold the LoRA update into the base weights (inference only).
        **options: ``SamConfig`` fields to override, e.g. ``lora_rank=4`` (default 8).
    """
    options.setdefault("lora_rank", 8)
    if checkpoint is None:
        model = build_model(variant_config(variant or "vit_b", num_slices=3, **options))
        if merge_lora:
            model.merge_lora()
        return _ready(model, device, eval_mode)

    state, saved_config = load_state(read_checkpoint(checkpoint))
    layout = detect_layout(state)
    found = check_variant(state, variant)
    allow_missing = _is_lora
    if saved_config is not None:
        if saved_config.num_slices != 3:
            raise InputError(f"{checkpoint}: a one-slice (plain SAM) model; use build_sam")
        config = saved_config.with_options(**{k: v for k, v in options.items() if k != "lora_rank"})
        allow_missing = lambda key: False  # noqa: E731 - our own files must be complete
    elif layout == "sam":
        state = sam_to_slidesam(state)
        config = variant_config(found, num_slices=3, **options)
    elif layout == "slidesam_release":
        state, rank = convert_release(state, merge=merge_lora)
        options["lora_rank"] = rank if rank else options["lora_rank"]
        config = variant_config(found, num_slices=3, **options)
    else:  # our layout without the config wrapper: LoRA rank from the shapes
        ranks = {int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_a_q")}
        options["lora_rank"] = ranks.pop() if len(ranks) == 1 else 0
        config = variant_config(found, num_slices=3, **options)
    model = build_model(config)
    load_strict(model, state, allow_missing=allow_missing, what=str(checkpoint))
    if merge_lora:
        model.merge_lora()
    return _ready(model, device, eval_mode)


def load_model(path: str | Path, *, device: str = "cpu", eval_mode: bool = True) -> Sam:
    """One of our checkpoints (file or folder): the config inside builds the model."""
    state, config = load_state(read_checkpoint(path))
    if config is None:
        raise InputError(
            f"{path}: no slidesam config inside; for official SAM or released Slide-SAM weights "
            "use build_sam / build_slidesam"
        )
    model = build_model(config)
    load_strict(model, state, what=str(path))
    return _ready(model, device, eval_mode)


def default_model(*, device: str = "cpu") -> Sam:
    """The small Slide-SAM shipped inside the package (trained on phantoms; see its model card)."""
    from importlib.resources import files

    path = files("slidesam") / "weights" / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise InputError(
            "this installation has no embedded default model yet (it comes with the training "
            "recipe); pass --checkpoint MODEL (official SAM, released Slide-SAM or ours)"
        )
    return load_model(Path(str(path)), device=device)


def load_any(checkpoint: str | Path | None, *, device: str = "cpu") -> Sam:
    """Slide-SAM from any supported checkpoint, or the embedded default when None."""
    if checkpoint is None:
        return default_model(device=device)
    return build_slidesam(checkpoint=checkpoint, device=device)

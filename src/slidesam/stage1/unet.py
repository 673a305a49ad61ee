"""The embedded stage-1 model: a small 3D U-Net (MONAI's ``UNet``) on a fixed-spacing grid.

Pipeline of :meth:`UNetStage1.predict` (the same preprocessing as training, written once here):

1. **Resample** the image (linear, SimpleITK, in world coordinates) onto the *network grid*
   (:func:`network_geometry`): ``config.target_spacing`` (z, y, x) mm, enough voxels to cover
   the input's voxel centres, and the input's axes reordered and flipped into the standard
   axial orientation (z superior, y posterior, x to the patient's left), so an image stored
   with flipped or permuted axes reaches the network as the training images did. For a
   standard image the network grid has the input's origin and direction.
2. **Normalise**: clip to ``config.hu_window`` and scale linearly to 0..1 (:func:`normalize`).
3. **Sliding window** (MONAI ``sliding_window_inference``, windows of ``config.patch_size``,
   Gaussian blending), softmax.
4. **Back to the input grid**: each class probability is resampled linearly onto the input's own
   grid, then the arg-max gives the label (channel ``i`` is KiTS label
   ``config.label_values[i]``). The result has exactly the input's geometry.
5. Optional tumor clean-up (off by default): drop tumor components smaller than ``min_tumor_ml``
   and keep only the ``max_tumors`` largest; dropped voxels take their most probable other class.
   Real kidneys may hold several tumors, so nothing is removed unless asked.

Checkpoints are one file: ``{"format": "slidesam-unet", "format_version": 1, "config": {...},
"state_dict": {...}, "extra": {...}}``, read with ``weights_only=True`` and loaded strictly.
"""

from __future__ import annotations

import importlib.resources
import itertools
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from slidesam.core import KITS_LABELS, PHASES, Geometry, InputError, Volume
from slidesam.core.configfile import from_mapping, plain
from slidesam.data.io import to_sitk
from slidesam.inference.checkpoint import load_strict, read_checkpoint

__all__ = [
    "FORMAT",
    "UNetCheckpoint",
    "UNetConfig",
    "UNetStage1",
    "build_unet",
    "default_unet",
    "load_unet",
    "load_unet_checkpoint",
    "network_geometry",
    "normalize",
    "resample",
    "save_unet_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "slidesam-unet"
FORMAT_VERSION = 1
_NORMS = ("instance", "batch")
_KITS_VALUE = {name: value for value, name in KITS_LABELS.items()}
#: the shipped model, inside the package
_DEFAULT_WEIGHTS = "weights/default_unet.pt"


# ----------------------------------------------------------------------------------------------
# small typed-value checks shared by the configs of this package
# ----------------------------------------------------------------------------------------------
def _as_int(value: Any, name: str, minimum: int | None = None) -> int:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InputError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value!r}")
    return value


def _as_seq(value: Any, name: str, length: int | None = None) -> tuple:
    if isinstance(value, str) or not isinstance(value, list | tuple | np.ndarray):
        raise InputError(f"{name} must be a list, got {value!r}")
    if length is not None and len(value) != length:
        raise InputError(f"{name} must have {length} values, got {list(value)!r}")
    return tuple(value)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _mirror_axes(value: Any) -> tuple[int, ...]:
    axes = tuple(_as_int(a, "mirror_axes", 0) for a in _as_seq(value, "mirror_axes"))
    if any(a > 2 for a in axes) or len(set(axes)) != len(axes):
        raise InputError(f"mirror_axes must be distinct axes among 0, 1, 2; got {list(axes)}")
    return tuple(sorted(axes))


def _stride_product(strides) -> tuple[int, int, int]:
    out = np.ones(3, dtype=int)
    for s in strides:
        out *= np.broadcast_to(np.asarray(s, dtype=int), (3,))
    return tuple(int(v) for v in out)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture and preprocessing of a stage-1 U-Net (saved inside every checkpoint).

    Attributes:
        channels: feature channels per level, e.g. ``(16, 32, 64, 128)``.
        strides: downsampling between levels, ``len(channels) - 1`` values, each one number
            or three (z, y, x), e.g. ``((1, 2, 2), (2, 2, 2), (2, 2, 2))`` to keep the first
            level's z resolution. MONAI's first level already downsamples by ``strides[0]``.
        num_res_units: residual units per block (MONAI ``UNet``).
        norm: ``"instance"`` or ``"batch"``.
        dropout: dropout probability in every block.
        label_names: one KiTS class name per output channel, ``background`` first; channel ``i``
            predicts KiTS label ``KITS_LABELS`` value of ``label_names[i]``. Must include
            ``tumor``. The number of output classes is ``len(label_names)``; training maps
            ground-truth labels not listed here to background.
        target_spacing: voxel size (z, y, x) mm of the network grid images are resampled to.
        hu_window: (low, high) HU clipped and scaled to 0..1 before the network.
        patch_size: (z, y, x) voxels of the sliding windows (inference) and, by default, of the
            training patches; each a multiple of :attr:`patch_multiple`. With instance norm
            the inference window should equal the training patch.
        phase: contrast phase the model was trained on (``plain``, ``arterial``, ``venous``).
        mirror_axes: default test-time mirroring (as nnU-Net's ``allowed_mirroring_axes``):
            network-grid axes (0 z, 1 y, 2 x; patient S-I, A-P, L-R on the axial grid) whose
            flips are averaged, 2 ** len(mirror_axes) passes; only for a model trained with
            flips (``augment.flip_p``). () = one pass. :class:`UNetStage1` may override it.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int | tuple[int, int, int], ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: str = "instance"
    dropout: float = 0.0
    label_names: tuple[str, ...] = ("background", "kidney", "tumor", "cyst")
    target_spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] = (-200.0, 400.0)
    patch_size: tuple[int, int, int] = (32, 80, 80)
    phase: str = "arterial"
    mirror_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        channels = tuple(
            _as_int(c, f"channels[{i}]", 1)
            for i, c in enumerate(_as_seq(self.channels, "channels"))
        )
        if len(channels) < 2:
            raise InputError(f"channels needs at least 2 levels, got {list(channels)}")
        strides = tuple(
            tuple(
                _as_int(v, f"strides[{i}][{j}]", 1)
                for j, v in enumerate(_as_seq(s, f"strides[{i}]", 3))
            )
            if isinstance(s, list | tuple)
            else _as_int(s, f"strides[{i}]", 1)
            for i, s in enumerate(_as_seq(self.strides, "strides"))
        )
        if len(strides) != len(channels) - 1:
            raise InputError(
                f"strides needs len(channels) - 1 = {len(channels) - 1} values, got {list(strides)}"
            )
        set_("channels", channels)
        set_("strides", strides)
        set_("num_res_units", _as_int(self.num_res_units, "num_res_units", 0))
        if self.norm not in _NORMS:
            raise InputError(f"norm must be one of {', '.join(_NORMS)}, got {self.norm!r}")
        dropout = _as_float(self.dropout, "dropout")
        if not 0 <= dropout < 1:
            raise InputError(f"dropout must lie in [0, 1), got {dropout}")
        set_("dropout", dropout)
        names = tuple(str(n) for n in _as_seq(self.label_names, "label_names"))
        bad = [n for n in names if n not in _KITS_VALUE]
        if bad or len(set(names)) != len(names) or names[:1] != ("background",):
            raise InputError(
                f"label_names must be distinct KiTS class names ({', '.join(_KITS_VALUE)}) "
                f"starting with background, got {list(names)}"
            )
        if "tumor" not in names:
            raise InputError(f"label_names must include tumor, got {list(names)}")
        set_("label_names", names)
        spacing = tuple(
            _as_float(s, f"target_spacing[{i}]")
            for i, s in enumerate(_as_seq(self.target_spacing, "target_spacing", 3))
        )
        if min(spacing) <= 0:
            raise InputError(f"target_spacing must be positive (z, y, x) mm, got {list(spacing)}")
        set_("target_spacing", spacing)
        window = tuple(
            _as_float(v, f"hu_window[{i}]")
            for i, v in enumerate(_as_seq(self.hu_window, "hu_window", 2))
        )
        if window[0] >= window[1]:
            raise InputError(f"hu_window must be (low, high) with low < high, got {list(window)}")
        set_("hu_window", window)
        patch = tuple(
            _as_int(p, f"patch_size[{i}]", 1)
            for i, p in enumerate(_as_seq(self.patch_size, "patch_size", 3))
        )
        multiple = _stride_product(strides)
        if any(p % m for p, m in zip(patch, multiple, strict=True)):
            raise InputError(
                f"patch_size {list(patch)} must be multiples of the product of strides "
                f"{list(multiple)} (z, y, x)"
            )
        set_("patch_size", patch)
        if self.phase not in PHASES:
            raise InputError(f"phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        set_("mirror_axes", _mirror_axes(self.mirror_axes))

    @property
    def patch_multiple(self) -> tuple[int, int, int]:
        """(z, y, x) product of the strides: patch sizes must be multiples of it."""
        return _stride_product(self.strides)

    @property
    def num_classes(self) -> int:
        """Output channels of the network (``len(label_names)``)."""
        return len(self.label_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        """KiTS label value of each output channel."""
        return tuple(_KITS_VALUE[n] for n in self.label_names)

    @property
    def tumor_channel(self) -> int:
        return self.label_names.index("tumor")

    def to_dict(self) -> dict:
        """JSON/YAML-ready dict (tuples as lists); :meth:`from_dict` reads it back."""
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: Any, where: str = "U-Net config") -> UNetConfig:
        """Build from plain data; unknown keys are an ``InputError`` that names them."""
        return from_mapping(cls, data, where)


def build_unet(config: UNetConfig) -> nn.Module:
    """The network of ``config``: MONAI ``UNet``, 3D, 1 input channel, ``num_classes`` logits.

    Input (B, 1, Z, Y, X) float32 with Z, Y, X multiples of ``config.patch_multiple``; output
    (B, num_classes, Z, Y, X) logits. Weights are initialised from torch's global generator
    (wrap in ``torch.random.fork_rng`` and seed it for a reproducible start).
    """
    from monai.networks.nets import UNet

    if not isinstance(config, UNetConfig):
        raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=config.num_classes,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=config.norm,
        dropout=config.dropout,
    )


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
@dataclass
class UNetCheckpoint:
    """A loaded checkpoint: the network (eval mode, CPU), its config and the saved extras."""

    model: nn.Module
    config: UNetConfig
    extra: dict


def save_unet_checkpoint(
    model: nn.Module, config: UNetConfig, path: str | Path, *, extra: dict | None = None
) -> Path:
    """Write ``{"format": "slidesam-unet", "format_version", "config", "state_dict", "extra"}``.

    Args:
        model: the network built by :func:`build_unet` from ``config``.
        config: its config.
        path: output file (``.pt``); folders are created.
        extra: JSON-like data (numbers, strings, lists, dicts, None) such as the training log.
    """
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise InputError(f"{path}: a U-Net checkpoint file must end in .pt or .pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": plain(dict(extra or {})),
    }
    torch.save(payload, path)
    return path


def load_unet_checkpoint(path: str | Path) -> UNetCheckpoint:
    """Read a checkpoint written by :func:`save_unet_checkpoint`, strictly.

    Raises:
        InputError: the file is missing, not a weights-only PyTorch file, not of format
            ``slidesam-unet``, has a bad config, or its weights do not fit the config's network
            (the message lists missing, unexpected and mis-shaped keys).
    """
    obj = read_checkpoint(path)  # weights_only=True, readable errors
    if obj.get("format") != FORMAT:
        found = obj.get("format")
        what = f"format {found!r}" if found is not None else "keys " + ", ".join(list(obj)[:4])
        raise InputError(
            f"{path}: not a slidesam U-Net checkpoint ({what}; expected format {FORMAT!r}, "
            "written by slidesam unet-train)"
        )
    version = obj.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{path}: U-Net checkpoint format version {version!r} is newer than this slidesam "
            f"reads ({FORMAT_VERSION}); update slidesam"
        )
    for key in ("config", "state_dict"):
        if not isinstance(obj.get(key), dict):
            raise InputError(f"{path}: U-Net checkpoint has no {key!r} mapping")
    try:
        config = UNetConfig.from_dict(obj["config"])
    except InputError as exc:
        raise InputError(f"{path}: bad U-Net config in the checkpoint: {exc}") from None
    model = build_unet(config)
    load_strict(model, obj["state_dict"], what=f"{path}")
    model.eval()
    extra = obj.get("extra") or {}
    return UNetCheckpoint(
        model=model, config=config, extra=extra if isinstance(extra, dict) else {}
    )


def load_unet(path: str | Path, *, device: str = "cpu", **options: Any) -> UNetStage1:
    """A :class:`UNetStage1` from a checkpoint file; ``options`` go to its constructor."""
    ckpt = load_unet_checkpoint(path)
    return UNetStage1(ckpt.model, ckpt.config, device=device, name=Path(path).name, **options)


def load_default_unet_checkpoint() -> UNetCheckpoint:
    """The checkpoint shipped in the package (``slidesam/weights/default_unet.pt``).

    Raises:
        InputError: the weights file is not installed.
    """
    resource = importlib.resources.files("slidesam").joinpath(_DEFAULT_WEIGHTS)
    if not resource.is_file():
        raise InputError(
            f"the default U-Net weights ({_DEFAULT_WEIGHTS}) are not installed with slidesam; "
            "reinstall the package, or train one with 'slidesam unet-train' and use load_unet"
        )
    with importlib.resources.as_file(resource) as path:
        return load_unet_checkpoint(path)


def default_unet(*, device: str = "cpu", **options: Any) -> UNetStage1:
    """The U-Net shipped in the package (``slidesam/weights/default_unet.pt``).

    Trained on synthetic arterial-phase phantoms only (see ``MODEL_CARD_unet.md`` next to it):
    a demonstration and test model, **not for real CT**.

    Raises:
        InputError: the weights file is not installed.
    """
    ckpt = load_default_unet_checkpoint()
    return UNetStage1(
        ckpt.model, ckpt.config, device=device, name="default U-Net (arterial phantoms)", **options
    )


# ----------------------------------------------------------------------------------------------
# preprocessing, shared by training and inference
# ----------------------------------------------------------------------------------------------
def network_geometry(geometry: Geometry, spacing: tuple[float, float, float]) -> Geometry:
    """The grid a volume is resampled to before the network: axial, in a standard orientation.

    The input's array axes are reordered and flipped (never rotated) so that the network's
    axes (z, y, x) run along the world's superior, posterior and left directions (LPS +z, +y, +x)
    as closely as the input's axes allow: every image reaches the network in the orientation
    it was trained in, whatever the stored axis order. The network grid's direction is the
    input's direction with its columns permuted and negated (identical for a standard image);
    its origin is the input's corner voxel centre that becomes index (0, 0, 0); its voxel size
    is ``spacing`` (z, y, x) mm; and it has the fewest voxels whose centres cover every voxel
    centre of ``geometry`` (so resampling back never leaves the network grid).

    Args:
        geometry: the input grid (any spacing, origin and direction, oblique included).
        spacing: network voxel size (z, y, x) mm, along the network's own axes.
    """
    d = np.asarray(geometry.direction)  # rows: world x, y, z; columns: input axes (z, y, x)
    # network axis k runs along world axis 2 - k; pick the input axis for each k (a permutation)
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(d[2 - k, a]) for k, a in enumerate(perm)),
    )
    signs = [1.0 if d[2 - k, a] >= 0 else -1.0 for k, a in enumerate(best)]
    direction = np.stack([s * d[:, a] for s, a in zip(signs, best, strict=True)], axis=1)
    corner = [0.0, 0.0, 0.0]
    for s, a in zip(signs, best, strict=True):
        corner[a] = 0.0 if s > 0 else geometry.shape[a] - 1.0
    extent = np.array([(geometry.shape[a] - 1) * geometry.spacing[a] for a in best])
    shape = np.ceil(extent / np.asarray(spacing, dtype=np.float64) - 1e-6).astype(int) + 1
    return Geometry(
        shape=tuple(int(n) for n in np.maximum(shape, 1)),
        spacing=spacing,
        origin=tuple(geometry.index_to_world(corner)),
        direction=direction,
    )


def resample(array: np.ndarray, source: Geometry, target: Geometry, *, linear: bool) -> np.ndarray:
    """Resample ``array`` (on ``source``) onto ``target`` in world coordinates (SimpleITK).

    Args:
        array: (Z, Y, X) on ``source``; the output keeps its dtype.
        source: grid of ``array``.
        target: output grid.
        linear: linear interpolation (images, probabilities), else nearest neighbour (labels).
            Points outside ``source`` take the nearest edge value.

    Returns:
        (Z', Y', X') array on ``target``.
    """
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in target.shape[::-1]])
    f.SetOutputSpacing(target.itk_spacing())
    f.SetOutputOrigin(target.origin)
    f.SetOutputDirection(target.itk_direction())
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(f.Execute(to_sitk(array, source)))


def normalize(array: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``hu_window`` and scale linearly to 0..1; float32, same shape."""
    lo, hi = hu_window
    out = np.clip(np.asarray(array, dtype=np.float32), lo, hi)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def _check_image(volume: Volume) -> None:
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a slidesam Volume, got {type(volume).__name__}")
    if volume.array.dtype.kind not in "iuf":
        raise InputError(f"the image must be numeric (CT in HU), got dtype {volume.array.dtype}")
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise InputError("the image holds NaN or infinite values; fill them (e.g. -1024 HU)")


# ----------------------------------------------------------------------------------------------
# the predictor
# ----------------------------------------------------------------------------------------------
class UNetStage1:
    """Stage 1 by a U-Net: CT image -> KiTS label map on the image's own grid.

    Holds the network (eval mode, on ``device``) and its config; stateless between calls.

    Args:
        model: network from :func:`build_unet` (or a module with the same input/output contract:
            (B, 1, Z, Y, X) normalised image -> (B, num_classes, Z, Y, X) logits).
        config: the network's config (preprocessing, labels, window size).
        device: ``cpu``, ``cuda``, ...
        overlap: sliding-window overlap fraction, 0..<1.
        sw_batch_size: windows per forward pass.
        min_tumor_ml: drop tumor components (26-connected) smaller than this, ml; 0 = keep all.
        max_tumors: keep only this many largest tumor components; None = all. Dropped tumor
            voxels take their most probable non-tumor class.
        mirror_axes: test-time mirroring, as nnU-Net does: network-grid axes (0 z, 1 y, 2 x; the
            grid is axial, so patient S-I, A-P, L-R) to flip; the softmax is averaged over
            every combination (2 ** len(mirror_axes) passes). None = ``config.mirror_axes``;
            () = one pass (fastest).
        name: description for logs.
    """

    def __init__(
        self,
        model: nn.Module,
        config: UNetConfig,
        *,
        device: str = "cpu",
        overlap: float = 0.25,
        sw_batch_size: int = 1,
        min_tumor_ml: float = 0.0,
        max_tumors: int | None = None,
        mirror_axes: tuple[int, ...] | None = None,
        name: str = "U-Net",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        if not 0 <= overlap < 1:
            raise InputError(f"overlap must lie in [0, 1), got {overlap!r}")
        self.sw_batch_size = _as_int(sw_batch_size, "sw_batch_size", 1)
        min_tumor_ml = _as_float(min_tumor_ml, "min_tumor_ml")
        if min_tumor_ml < 0:
            raise InputError(f"min_tumor_ml must be >= 0, got {min_tumor_ml}")
        self.max_tumors = None if max_tumors is None else _as_int(max_tumors, "max_tumors", 1)
        self.mirror_axes = config.mirror_axes if mirror_axes is None else _mirror_axes(mirror_axes)
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
        self.model = model.to(self.device).eval()
        self.config = config
        self.overlap = float(overlap)
        self.min_tumor_ml = min_tumor_ml
        self.name = name

    # -- network grid -------------------------------------------------------------------------
    def network_probabilities(self, volume: Volume) -> tuple[np.ndarray, Geometry]:
        """Softmax on the network grid: ((C, Z', Y', X') float32, that grid's Geometry)."""
        from monai.inferers import sliding_window_inference

        _check_image(volume)
        cfg = self.config
        grid = network_geometry(volume.geometry, cfg.target_spacing)
        image = resample(volume.array.astype(np.float32), volume.geometry, grid, linear=True)
        x = torch.from_numpy(normalize(image, cfg.hu_window))[None, None].to(self.device)
        flips = [
            tuple(2 + a for a in combo)
            for k in range(len(self.mirror_axes) + 1)
            for combo in itertools.combinations(self.mirror_axes, k)
        ]
        total = None
        with torch.inference_mode():
            for dims in flips:
                logits = sliding_window_inference(
                    x.flip(dims) if dims else x,
                    roi_size=cfg.patch_size,
                    sw_batch_size=self.sw_batch_size,
                    predictor=self.model,
                    overlap=self.overlap,
                    mode="gaussian",
                )
                if logits.shape[1] != cfg.num_classes:
                    raise InputError(
                        f"the network gives {logits.shape[1]} channels but the config names "
                        f"{cfg.num_classes} classes ({', '.join(cfg.label_names)})"
                    )
                probs = torch.softmax(logits.float(), dim=1)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total + probs
            probs = (total / len(flips))[0].cpu().numpy()
        return np.ascontiguousarray(probs, dtype=np.float32), grid

    # -- input grid ---------------------------------------------------------------------------
    def probabilities(self, volume: Volume) -> np.ndarray:
        """Class probabilities on ``volume``'s grid: (C, Z, Y, X) float32, channel order of
        ``config.label_names``. Needs C float32 copies of the volume in memory."""
        probs, grid = self.network_probabilities(volume)
        return np.stack([resample(p, grid, volume.geometry, linear=True) for p in probs])

    def predict(self, volume: Volume) -> Volume:
        """Segment a CT image.

        Args:
            volume: CT in HU, (Z, Y, X), any grid (any spacing, origin and direction).

        Returns:
            uint8 KiTS label map (0 background, 1 kidney, 2 tumor, 3 cyst) with exactly
            ``volume.geometry``.
        """
        probs, grid = self.network_probabilities(volume)
        cfg = self.config
        t = cfg.tumor_channel
        tumor = resample(probs[t], grid, volume.geometry, linear=True)
        best = np.full(volume.shape, -1.0, dtype=np.float32)  # best non-tumor probability
        best_idx = np.zeros(volume.shape, dtype=np.uint8)
        for c in range(cfg.num_classes):
            if c == t:
                continue
            p = resample(probs[c], grid, volume.geometry, linear=True)
            better = p > best
            best[better] = p[better]
            best_idx[better] = c
        is_tumor = tumor > best
        is_tumor = self._clean_tumor(is_tumor, volume.spacing)
        channel = np.where(is_tumor, np.uint8(t), best_idx)
        lut = np.asarray(cfg.label_values, dtype=np.uint8)
        return volume.with_array(lut[channel])

    def _clean_tumor(self, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        if self.min_tumor_ml <= 0 and self.max_tumors is None:
            return mask
        components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        if n == 0:
            return mask
        sizes = np.bincount(components.reshape(-1), minlength=n + 1)[1:]
        ml = sizes * (math.prod(spacing) / 1000.0)
        keep = ml >= self.min_tumor_ml
        if self.max_tumors is not None:
            order = np.argsort(-sizes, kind="stable")
            keep[order[self.max_tumors :]] = False
        return np.concatenate([[False], keep])[components]

    def __repr__(self) -> str:
        return f"UNetStage1(name={self.name!r}, phase={self.config.phase!r}, device={self.device})"

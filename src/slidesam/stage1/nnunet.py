"""nnU-Net v2 as stage 1: predict with a trained nnU-Net model folder, in this process.

This is the only module that imports ``nnunetv2`` (an optional extra: ``pip install
'slidesam[nnunet]'``), and it does so lazily, in :class:`NnUNetStage1`'s constructor, so that
``import slidesam.stage1`` never needs it.

Point :class:`NnUNetStage1` at the output folder of ``nnUNetv2_train`` (or of
``nnUNetv2_install_pretrained_model_from_zip``), for example
``Dataset220_KiTS2023/nnUNetTrainer__nnUNetPlans__3d_fullres`` holding ``dataset.json``,
``plans.json`` and ``fold_N/checkpoint_final.pth``; or at the dataset folder above it, and the
configuration picks the training folder. Prediction is nnU-Net's own: its preprocessing (crop,
resampling to the plans' spacing, normalisation), its sliding-window ``nnUNetPredictor`` with
Gaussian weighting, mirroring and fold ensembling, and its resampling back to the input grid.

What differs from ``nnUNetv2_predict``:

- No trainer lookup by name. nnU-Net finds the trainer class by importing every trainer module,
  which fails in environments without a working torchvision; the network is built here from the
  plans' ``architecture`` entry instead (what ``nnUNetTrainer.build_network_architecture`` does)
  and the checkpoint is loaded into it strictly. A trainer that builds a different architecture
  is reported with the missing and unexpected weight names.
- Images come in memory, as :class:`~slidesam.core.Volume`. nnU-Net's readers give the network
  the array in SimpleITK order ``(z, y, x)`` with the spacing in the same order, which is exactly
  ``Volume.array`` and ``Geometry.spacing``; for models trained with a reorienting reader
  (``SimpleITKIOWithReorient``, ``NibabelIOWithReorient``) the array is permuted and flipped to
  RAS as that reader does, and back afterwards. No resampling happens outside nnU-Net.
- No worker processes: preprocessing, prediction and export run in this process (nnU-Net uses a
  thread to feed tiles), so no ``if __name__ == "__main__":`` guard is needed.
- Checkpoints are read with ``weights_only=True``; the numpy scalars nnU-Net stores in its
  training log are allowed explicitly.

The returned label map is uint8 with exactly the input's geometry (shape, spacing, origin,
direction), and holds the model's label values (``NnUNetStage1.labels``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from slidesam.core import KITS_LABELS, Geometry, InputError, Volume

__all__ = ["NnUNetStage1", "RasReorientation", "find_model_folder", "load_nnunet_checkpoint"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'slidesam[nnunet]'"

#: nnU-Net readers that hand the network the array in SimpleITK order, as stored
_PLAIN_READERS = ("SimpleITKIO", "NibabelIO")
#: nnU-Net readers that first reorient the image to RAS
_RAS_READERS = ("SimpleITKIOWithReorient", "NibabelIOWithReorient")

_FOLD_DIR = re.compile(r"^fold_(\d+|all)$")

#: KiTS label value of the tumor (stage 2 prompts from it)
KITS_TUMOR = 2


# ----------------------------------------------------------------------------------------------
# nnU-Net import (lazy, one place)
# ----------------------------------------------------------------------------------------------
def _import_nnunet() -> SimpleNamespace:
    """The few nnU-Net names this adapter uses; an InputError when nnunetv2 is missing."""
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import (
            determine_num_input_channels,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if missing == "nnunetv2" or str(missing).startswith("nnunetv2"):
            raise InputError(
                f"the nnU-Net stage 1 needs nnU-Net v2, which is not installed: {_INSTALL_HINT}"
            ) from None
        raise InputError(
            f"nnU-Net v2 is installed but cannot be imported (missing module {missing!r}): "
            f"{_INSTALL_HINT}"
        ) from None
    return SimpleNamespace(
        nnUNetPredictor=nnUNetPredictor,
        get_network_from_plans=get_network_from_plans,
        determine_num_input_channels=determine_num_input_channels,
        PlansManager=PlansManager,
    )


# ----------------------------------------------------------------------------------------------
# model folder, folds, checkpoints
# ----------------------------------------------------------------------------------------------
_NOT_A_MODEL = (
    "not an nnU-Net model folder: expected dataset.json, plans.json and "
    "fold_N/checkpoint_final.pth, as nnUNetv2_train writes them (e.g. "
    "Dataset220_KiTS2023/nnUNetTrainer__nnUNetPlans__3d_fullres), or a dataset folder holding "
    "such Trainer__Plans__configuration folders"
)


def _training_folders(path: Path) -> list[Path]:
    return sorted(
        d
        for d in path.iterdir()
        if d.is_dir() and len(d.name.split("__")) == 3 and (d / "plans.json").is_file()
    )


def find_model_folder(model_dir: str | Path, configuration: str = "auto") -> Path:
    """The nnU-Net training output folder (the one holding ``plans.json``) under ``model_dir``.

    Args:
        model_dir: the training output folder itself, or the dataset folder above it that holds
            ``Trainer__Plans__configuration`` folders.
        configuration: picks among several training folders (``"3d_fullres"``, ``"2d"``, ...);
            ``"auto"`` takes the only one, or ``3d_fullres`` when there are several.
    """
    path = Path(model_dir)
    if not path.exists():
        raise InputError(f"{path}: no such folder; {_NOT_A_MODEL}")
    if not path.is_dir():
        raise InputError(f"{path}: is a file; {_NOT_A_MODEL}")
    if (path / "plans.json").is_file() or (path / "dataset.json").is_file():
        return path
    candidates = _training_folders(path)
    if not candidates:
        raise InputError(f"{path}: {_NOT_A_MODEL}")
    names = ", ".join(d.name for d in candidates)
    if configuration != "auto":
        chosen = [d for d in candidates if d.name.split("__")[2] == configuration]
        if not chosen:
            raise InputError(
                f"{path}: no training folder for configuration {configuration!r}; found {names}"
            )
    else:
        chosen = candidates
        if len(chosen) > 1:
            chosen = [d for d in candidates if d.name.split("__")[2] == "3d_fullres"]
    if len(chosen) != 1:
        raise InputError(
            f"{path}: holds several nnU-Net training folders ({names}); pass the one to use, or a "
            "configuration"
        )
    return chosen[0]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path.parent}: no {path.name}; {_NOT_A_MODEL}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not an nnU-Net {what} (expected a JSON object)")
    return data


def _fold_dir_name(fold: int | str) -> str:
    if isinstance(fold, str) and fold == "all":
        return "fold_all"
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or int(fold) < 0:
        raise InputError(f"folds must be non-negative integers or 'all', got {fold!r}")
    return f"fold_{int(fold)}"


def _checkpoints_in(folder: Path) -> str:
    found = sorted(p.name for p in folder.glob("checkpoint*.pth"))
    return ", ".join(found) if found else "no checkpoint"


def _resolve_folds(model_dir: Path, folds, checkpoint: str) -> list[Path]:
    """Checkpoint files of the requested folds (``"auto"``: every ``fold_N`` holding one)."""
    fold_dirs = sorted(
        (d for d in model_dir.iterdir() if d.is_dir() and _FOLD_DIR.match(d.name)),
        key=lambda d: (d.name == "fold_all", int(d.name[5:]) if d.name[5:].isdigit() else 0),
    )
    if isinstance(folds, str) and folds == "auto":
        numbered = [d for d in fold_dirs if d.name != "fold_all" and (d / checkpoint).is_file()]
        chosen = numbered or [d for d in fold_dirs if (d / checkpoint).is_file()]
        if not chosen:
            if not fold_dirs:
                raise InputError(f"{model_dir}: no fold_N folders; {_NOT_A_MODEL}")
            have = "; ".join(f"{d.name}: {_checkpoints_in(d)}" for d in fold_dirs)
            raise InputError(
                f"{model_dir}: no fold holds {checkpoint} ({have}); training may not have "
                "finished: pass checkpoint='checkpoint_best.pth' or train to the end"
            )
        return [d / checkpoint for d in chosen]
    if isinstance(folds, str | int | np.integer):
        folds = (folds,)
    if not isinstance(folds, Sequence) or len(folds) == 0:
        raise InputError(
            f"folds must be 'auto', 'all', an integer or a list of them, got {folds!r}"
        )
    paths = []
    available = ", ".join(d.name for d in fold_dirs) or "none"
    for fold in folds:
        folder = model_dir / _fold_dir_name(fold)
        if not folder.is_dir():
            raise InputError(f"{model_dir}: no {folder.name} (fold folders: {available})")
        if not (folder / checkpoint).is_file():
            raise InputError(f"{folder}: no {checkpoint} (it has {_checkpoints_in(folder)})")
        paths.append(folder / checkpoint)
    if len(set(paths)) != len(paths):
        raise InputError(f"folds must not repeat, got {list(folds)}")
    return paths


def _numpy_safe_globals() -> list:
    """numpy scalar and array types nnU-Net pickles into its checkpoints (training log, EMA)."""
    from numpy._core.multiarray import _reconstruct, scalar

    dtype_classes = {
        type(np.dtype(t))
        for t in (
            np.float16,
            np.float32,
            np.float64,
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.bool_,
        )
    }
    return [
        np.dtype,
        np.ndarray,
        scalar,
        _reconstruct,
        # checkpoints written with numpy 1.x name the same functions numpy.core.multiarray.*
        (scalar, "numpy.core.multiarray.scalar"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        *sorted(dtype_classes, key=lambda c: c.__name__),
    ]


def load_nnunet_checkpoint(path: str | Path) -> dict:
    """Read an nnU-Net ``checkpoint_*.pth`` on the CPU with ``weights_only=True``.

    Returns the checkpoint dict (``network_weights``, ``init_args``, ``trainer_name``,
    ``inference_allowed_mirroring_axes``, ...). Raises InputError for an unreadable file, a file
    that needs arbitrary code to unpickle, or a file that is not an nnU-Net checkpoint.
    """
    import pickle

    import torch

    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint (torch.save has written zip archives since "
            "PyTorch 1.6; nnU-Net v2 checkpoints are such archives)"
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unsafe = ""
        try:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only to enrich the message
            unsafe = ""
        raise InputError(
            f"{path}: cannot be loaded with weights_only=True"
            + (f" (it pickles {unsafe})" if unsafe else f" ({first})")
            + "; re-save its network_weights, init_args, trainer_name and "
            "inference_allowed_mirroring_axes with plain Python and torch types"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        keys = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(
            f"{path}: not an nnU-Net checkpoint (no 'network_weights'; found {keys or 'nothing'})"
        )
    return ckpt


def _filter_state_dict(state: Mapping) -> dict:
    """Drop the wrappers' prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _check_weights(network, state: dict, source: Path, trainer_name: str) -> None:
    """InputError listing missing, unexpected and misshapen weights, if any."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong:

        def _few(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(
                "wrong shape "
                + _few(
                    [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong]
                )
            )
        raise InputError(
            f"{source}: weights do not fit the network built from plans.json ({'; '.join(parts)}). "
            f"The checkpoint's trainer {trainer_name!r} may build its own architecture; this "
            "adapter builds the plans' architecture, as nnUNetTrainer does"
        )


# ----------------------------------------------------------------------------------------------
# orientation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RasReorientation:
    """Permutation and flips that bring a ``(z, y, x)`` array to RAS order, and back.

    nnU-Net's reorienting readers (``sitk.DICOMOrient(img, "RAS")``, nibabel's
    ``as_reoriented(io_orientation(affine))``) turn the image so that its ITK axes ``(i, j, k)``
    point to the patient's Right, Anterior and Superior; as a ``(z, y, x)`` array that is axis 0
    towards superior (+z LPS), axis 1 towards anterior (-y LPS), axis 2 towards right (-x LPS).
    Only axis permutations and flips are applied (never resampling), so the round trip is exact.
    Oblique grids use the closest world axis of each array axis, as both readers do.

    Attributes:
        perm: ``perm[t]`` is the input array axis that becomes output axis ``t``.
        flip: whether output axis ``t`` is reversed after the permutation.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    #: world axis (LPS x=0, y=1, z=2) and sign that output array axes 0, 1, 2 point along
    _TARGET = ((2, 1.0), (1, -1.0), (0, -1.0))

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> RasReorientation:
        d = np.abs(geometry.direction)  # rows: world x, y, z; columns: array z, y, x
        world_of = [-1, -1, -1]
        taken = d.copy()
        for _ in range(3):  # greedy on the largest cosine, like nibabel's io_orientation
            w, a = np.unravel_index(np.argmax(taken), taken.shape)
            world_of[a] = int(w)
            taken[w, :] = -1
            taken[:, a] = -1
        perm, flip = [], []
        for world, sign in cls._TARGET:
            a = world_of.index(world)
            perm.append(a)
            flip.append(bool(np.sign(geometry.direction[world, a]) != sign))
        return cls(perm=tuple(perm), flip=tuple(flip))

    def forward(self, array: np.ndarray) -> np.ndarray:
        """``(z, y, x)`` array (or ``(C, z, y, x)``) in the volume's order -> RAS order."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + p for p in self.perm)))
        axes = tuple(lead + t for t in range(3) if self.flip[t])
        return np.flip(out, axes) if axes else out

    def backward(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`forward`."""
        lead = array.ndim - 3
        axes = tuple(lead + t for t in range(3) if self.flip[t])
        out = np.flip(array, axes) if axes else array
        inverse = np.argsort(self.perm)
        return np.transpose(out, (*range(lead), *(lead + int(i) for i in inverse)))

    def spacing(self, spacing_zyx) -> tuple[float, float, float]:
        """Voxel spacing in the RAS array's axis order."""
        return tuple(float(spacing_zyx[p]) for p in self.perm)


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def _parse_device(device):
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError) as exc:
        raise InputError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r} ({exc})"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: CUDA is not available here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r}: MPS is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return dev


def _output_labels(dataset_json: dict) -> dict[int, str]:
    """label value -> name of what the model writes (region models: ``regions_class_order``)."""
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "ignore"}
    has_regions = any(isinstance(v, list | tuple) and len(v) > 1 for v in labels.values())
    if not has_regions:
        out = {}
        for name, value in labels.items():
            value = value[0] if isinstance(value, list | tuple) else value
            out[int(value)] = str(name)
        return dict(sorted(out.items()))
    order = dataset_json.get("regions_class_order") or []
    regions = [
        name
        for name, value in labels.items()
        if not (np.all(np.asarray(value) == 0))  # background is not a region
    ]
    out = {0: "background"}
    for name, value in zip(regions, order, strict=False):
        out[int(value)] = str(name)
    return dict(sorted(out.items()))


def _channel_names(dataset_json: dict) -> tuple[str, ...]:
    """Channel names in channel order; ``channel_phases`` (slidesam nnunet-export) wins."""
    names = dataset_json.get("channel_phases") or dataset_json.get("channel_names")
    if names is None:
        names = dataset_json.get("modality")  # nnU-Net v1 style
    if not isinstance(names, Mapping) or not names:
        raise InputError("dataset.json: no channel_names; not an nnU-Net v2 dataset.json")
    try:
        ordered = sorted(names.items(), key=lambda kv: int(kv[0]))
    except (TypeError, ValueError):
        raise InputError(
            f"dataset.json: channel_names keys must be '0', '1', ..., got {list(names)}"
        ) from None
    return tuple(str(v) for _, v in ordered)


class NnUNetStage1:
    """Stage 1 with a trained nnU-Net v2 model: CT volume(s) in, label map on the same grid out.

    Args:
        model_dir: nnU-Net training output folder (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``)
            or the dataset folder above it.
        folds: ``"auto"`` (every ``fold_N`` holding the checkpoint, ensembled, as
            ``nnUNetv2_predict`` does; ``fold_all`` when there is no numbered fold), one fold
            (``0``, ``"all"``) or a list of them.
        checkpoint: checkpoint file name in each fold folder.
        configuration: ``"auto"`` (the checkpoint's own), or a name that must match it; also
            picks the training folder when ``model_dir`` is a dataset folder.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        tile_step_size: sliding-window step as a fraction of the patch size (nnU-Net: 0.5).
        use_mirroring: test-time mirroring on the axes the trainer allowed (8x slower in 3D).
        progress: tqdm bar over the sliding-window tiles.

    Attributes:
        name: ``"nnU-Net <dataset> <configuration>, <folds>"``.
        model_dir: the resolved training output folder.
        configuration: the configuration predicted with.
        folds: fold folder names used (``("fold_0", ...)``).
        channel_names: one name per input channel, in channel order.
        labels: label value -> name of the values the output can hold.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        folds: str | int | Sequence[int | str] = "auto",
        checkpoint: str = "checkpoint_final.pth",
        configuration: str = "auto",
        device="cpu",
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        progress: bool = False,
    ) -> None:
        if (
            isinstance(tile_step_size, bool)
            or not isinstance(tile_step_size, int | float)
            or not 0.0 < float(tile_step_size) <= 1.0
        ):
            raise InputError(f"tile_step_size must lie in (0, 1], got {tile_step_size!r}")
        if not isinstance(checkpoint, str) or not checkpoint.endswith(".pth") or "/" in checkpoint:
            raise InputError(
                f"checkpoint must be a file name like checkpoint_final.pth, got {checkpoint!r}"
            )
        nn = _import_nnunet()
        dev = _parse_device(device)
        folder = find_model_folder(model_dir, configuration)
        dataset_json = _read_json(folder / "dataset.json", "dataset.json")
        plans = _read_json(folder / "plans.json", "plans.json")
        if not isinstance(plans.get("configurations"), dict):
            raise InputError(f"{folder / 'plans.json'}: no 'configurations'; {_NOT_A_MODEL}")
        if "labels" not in dataset_json:
            raise InputError(f"{folder / 'dataset.json'}: no 'labels'; {_NOT_A_MODEL}")
        paths = _resolve_folds(folder, folds, checkpoint)
        checkpoints = [load_nnunet_checkpoint(p) for p in paths]

        first = checkpoints[0]
        init_args = first.get("init_args") if isinstance(first.get("init_args"), dict) else {}
        trained = init_args.get("configuration")
        if trained is None and len(folder.name.split("__")) == 3:
            trained = folder.name.split("__")[2]
        if configuration != "auto" and trained is not None and configuration != trained:
            raise InputError(
                f"{paths[0]}: was trained with configuration {trained!r}, not {configuration!r}"
            )
        config_name = trained if trained is not None else configuration
        if config_name == "auto":
            raise InputError(
                f"{paths[0]}: the checkpoint does not name its configuration; pass configuration="
                f"one of {', '.join(plans['configurations'])}"
            )
        if config_name not in plans["configurations"]:
            raise InputError(
                f"{folder / 'plans.json'}: no configuration {config_name!r} (it has "
                f"{', '.join(plans['configurations'])})"
            )
        for path, ckpt in zip(paths[1:], checkpoints[1:], strict=True):
            other = (ckpt.get("init_args") or {}).get("configuration", config_name)
            if other != config_name:
                raise InputError(
                    f"{path}: trained with {other!r}, but {paths[0]} with {config_name!r}"
                )

        reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
        if reader not in _PLAIN_READERS + _RAS_READERS:
            raise InputError(
                f"{folder / 'plans.json'}: the model reads its images with {reader}; this adapter "
                f"predicts 3D volumes as {', '.join(_PLAIN_READERS + _RAS_READERS)} read them"
            )
        self._reorient = reader in _RAS_READERS

        try:
            plans_manager = nn.PlansManager(plans)
            cm = plans_manager.get_configuration(config_name)
            label_manager = plans_manager.get_label_manager(dataset_json)
            n_in = nn.determine_num_input_channels(plans_manager, cm, dataset_json)
            n_out = label_manager.num_segmentation_heads
            arch = (cm.network_arch_class_name, cm.network_arch_init_kwargs)
            arch_imports = cm.network_arch_init_kwargs_req_import
            if cm.previous_stage_name is not None:
                raise InputError(
                    f"{folder}: configuration {config_name!r} is a cascade stage that needs the "
                    f"{cm.previous_stage_name!r} prediction as input; use a model trained with "
                    "3d_fullres (or 3d_lowres, 2d)"
                )
        except InputError:
            raise
        except (KeyError, ValueError, RuntimeError, AssertionError, TypeError) as exc:
            raise InputError(
                f"{folder}: plans.json or dataset.json is not valid for nnU-Net ({exc})"
            ) from None

        try:
            network = nn.get_network_from_plans(
                arch[0],
                arch[1],
                arch_imports,
                n_in,
                n_out,
                allow_init=False,
                deep_supervision=False,
            )
        except ImportError as exc:
            raise InputError(
                f"{folder / 'plans.json'}: cannot build the network {arch[0]} ({exc}); "
                "architectures from timm (Primus) need timm and torchvision installed"
            ) from None
        except (TypeError, ValueError, KeyError) as exc:
            raise InputError(
                f"{folder / 'plans.json'}: cannot build the network {arch[0]} from the plans "
                f"({exc})"
            ) from None

        trainer_name = str(first.get("trainer_name", "nnUNetTrainer"))
        parameters = []
        for path, ckpt in zip(paths, checkpoints, strict=True):
            state = _filter_state_dict(ckpt["network_weights"])
            _check_weights(network, state, path, trainer_name)  # every fold, before predicting
            parameters.append(state)
        network.load_state_dict(parameters[0], strict=True)
        network.eval()

        mirror_axes = first.get("inference_allowed_mirroring_axes")
        mirror_axes = tuple(int(a) for a in mirror_axes) if mirror_axes is not None else None

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # it prints a notice for every CPU device
            predictor = nn.nnUNetPredictor(
                tile_step_size=float(tile_step_size),
                use_gaussian=True,
                use_mirroring=bool(use_mirroring),
                perform_everything_on_device=dev.type == "cuda",
                device=dev,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=bool(progress),
            )
        for line in printed.getvalue().splitlines():
            log.debug("nnU-Net: %s", line)
        predictor.manual_initialization(
            network, plans_manager, cm, parameters, dataset_json, trainer_name, mirror_axes
        )
        self._predictor = predictor
        self.model_dir = folder
        self.configuration = config_name
        self.folds = tuple(p.parent.name for p in paths)
        self.channel_names = _channel_names(dataset_json)
        if len(self.channel_names) != n_in:
            raise InputError(
                f"{folder / 'dataset.json'}: {len(self.channel_names)} channel names but the "
                f"network takes {n_in} input channels"
            )
        self.labels = _output_labels(dataset_json)
        dataset_name = plans.get("dataset_name", folder.parent.name)
        self.name = f"nnU-Net {dataset_name} {config_name}, {', '.join(self.folds)}"
        if self.labels.get(KITS_TUMOR) != "tumor":
            log.warning(
                "%s: the model's label %d is %r, not the tumor; SSA's stage 2 prompts from label "
                "%d (KiTS: %s)",
                folder,
                KITS_TUMOR,
                self.labels.get(KITS_TUMOR),
                KITS_TUMOR,
                KITS_LABELS,
            )
        log.info(
            "nnU-Net model %s (%s, folds %s, %d channel(s), labels %s) on %s",
            folder,
            config_name,
            ", ".join(self.folds),
            n_in,
            self.labels,
            dev,
        )

    def __repr__(self) -> str:
        return f"NnUNetStage1({str(self.model_dir)!r}, folds={self.folds}, name={self.name!r})"

    def _as_channels(self, image) -> list[Volume]:
        n = len(self.channel_names)
        if isinstance(image, Volume):
            volumes = [image]
        elif isinstance(image, Mapping):
            unknown = [k for k in image if k not in self.channel_names]
            missing = [c for c in self.channel_names if c not in image]
            if len(set(self.channel_names)) != n:
                raise InputError(
                    f"the model's channels are named {list(self.channel_names)} (not unique); "
                    "pass the volumes as a list in channel order"
                )
            if unknown or missing:
                raise InputError(
                    f"the model takes channels {list(self.channel_names)}; got {list(image)}"
                )
            volumes = [image[c] for c in self.channel_names]
        elif isinstance(image, Sequence) and not isinstance(image, str | bytes):
            volumes = list(image)
        else:
            raise TypeError(
                "image must be a Volume, a list of Volumes in channel order or a mapping "
                f"channel name -> Volume, got {type(image).__name__}"
            )
        for v in volumes:
            if not isinstance(v, Volume):
                raise TypeError(f"expected Volume objects, got {type(v).__name__}")
        if len(volumes) != n:
            raise InputError(
                f"the model takes {n} input channel(s) {list(self.channel_names)} (dataset.json "
                f"channel_names), got {len(volumes)} volume(s)"
            )
        for name, v in zip(self.channel_names[1:], volumes[1:], strict=True):
            diff = volumes[0].geometry.mismatch(v.geometry)
            if diff:
                raise InputError(
                    f"channel {name!r} is not on the grid of channel {self.channel_names[0]!r} "
                    f"({diff}); resample every phase onto one grid first (slidesam nnunet-export "
                    "--layout channels does this)"
                )
        return volumes

    def predict(self, image: Volume | Sequence[Volume] | Mapping[str, Volume]) -> Volume:
        """Segment one case.

        Args:
            image: a Volume (single-channel models), or one Volume per channel: a list in
                channel order or a mapping channel name -> Volume (names in ``channel_names``).
                Arrays ``(z, y, x)`` in the model's units (CT: HU), all on one grid.

        Returns:
            uint8 label map ``(z, y, x)`` with exactly the first channel's geometry (and source),
            values in ``labels``.
        """
        volumes = self._as_channels(image)
        ref = volumes[0]
        data = np.stack([v.array for v in volumes])  # (C, z, y, x), as nnU-Net's readers give it
        spacing = ref.geometry.spacing
        reorientation = None
        if self._reorient:
            reorientation = RasReorientation.from_geometry(ref.geometry)
            data = np.ascontiguousarray(reorientation.forward(data))
            spacing = reorientation.spacing(spacing)
        seg = self._predictor.predict_single_npy_array(
            data, {"spacing": [float(s) for s in spacing]}, None, None, False
        )
        seg = np.asarray(seg)
        if reorientation is not None:
            seg = reorientation.backward(seg)
        if seg.shape != ref.shape:  # nnU-Net's export must restore the input shape
            raise RuntimeError(f"nnU-Net returned shape {seg.shape}, expected {ref.shape}")
        if seg.size and int(seg.max()) > 255:
            raise InputError(f"the model predicts label {int(seg.max())}; label maps hold 0..255")
        return ref.with_array(np.ascontiguousarray(seg, dtype=np.uint8))

"""A multi-phase CT cohort as nnU-Net v2 raw datasets, to train stage 1 with nnU-Net's own commands.

Inputs (found by :func:`find_phase_cases`):

- the output folder of ``slidesam phantom``, or any folder of nnU-Net raw datasets with one
  dataset per phase (``Dataset501_RenalPhantomPlain/imagesTr/case_00000_0000.nii.gz`` with
  ``labelsTr/case_00000.nii.gz``; the phase comes from ``dataset.json``'s ``"phase"`` or from the
  end of the dataset name);
- a folder of files ``CASE_plain.nii.gz``, ``CASE_arterial.nii.gz``, ``CASE_venous.nii.gz``
  (directly or in ``images/``), with optional label maps ``CASE_<phase>_seg.nii.gz`` beside
  them or ``labels/CASE_<phase>.nii.gz`` (also ``labels/CASE_<phase>_seg.nii.gz``). NIfTI, NRRD
  and MetaImage files are read. Other suffixes: ``suffixes={"plain": "_nc", ...}``;
- an nnU-Net raw dataset with **one channel per phase** (``CASE_0000.nii.gz`` = plain,
  ``CASE_0001.nii.gz`` = arterial, ...): the channel of each phase comes from ``channels``
  (``{"plain": 0, "arterial": 1}``) or from the dataset's ``"channel_phases"`` (what the
  ``channels`` layout below writes); its label map belongs to every phase (one grid). Pass the
  dataset folder itself, or a folder holding it.

Layouts written by :func:`export_nnunet` under ``out_dir`` (use it as ``nnUNet_raw``):

- ``channels``: one dataset, one channel per phase (``CASE_0000`` = first phase, ...). Every
  phase is resampled onto the reference phase's grid **in world coordinates** (SimpleITK,
  identity transform: linear for images, values outside the phase's field of view set to
  ``fill_value``); the reference phase itself is copied bit for bit. Labels are the reference
  phase's. Patient motion between phases is *not* corrected: register the phases first if they
  moved (the phantoms carry a few mm of true motion on purpose). ``channel_names`` are all
  ``"CT"`` (so nnU-Net applies its CT normalisation per channel); the phase of each channel is
  in ``"channel_phases"``.
- ``per-phase``: one dataset per phase, images (and labels) copied bit for bit.

Cases with labels go to ``imagesTr``/``labelsTr``; cases without to ``imagesTs``. Files are always
``.nii.gz`` (other formats are converted, values and geometry unchanged). Every label map is
checked against its image's grid and the dataset's label values.

The export is resumable and idempotent: a manifest (``slidesam_export.json``) in each dataset
records the settings and, per case, the inputs' sizes and modification times; a rerun skips
unchanged cases, redoes changed ones, removes cases gone from the cohort, and refuses a folder
that holds a different dataset (other settings, another dataset with the same id, or files not
written by this exporter). Files are written to ``.partial/`` and moved into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from slidesam.core import KITS_LABELS, Geometry, InputError, Volume
from slidesam.data.io import (
    image_suffix,
    read_image,
    read_label,
    strip_suffix,
    write_image,
    write_mask,
)

__all__ = [
    "DEFAULT_SUFFIXES",
    "EXPORT_MANIFEST",
    "LAYOUTS",
    "PhaseCase",
    "export_nnunet",
    "find_phase_cases",
    "resample_to_grid",
]

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("channels", "per-phase")
DEFAULT_SUFFIXES: tuple[str, ...] = ("_plain", "_arterial", "_venous")
#: manifest file in every exported dataset folder
EXPORT_MANIFEST = "slidesam_export.json"
#: default dataset ids: channels layout, and the first phase of the per-phase layout
DEFAULT_DATASET_ID = {"channels": 510, "per-phase": 520}

_GENERATOR = "slidesam nnunet-export"
_FILE_ENDING = ".nii.gz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseCase:
    """One case of a multi-phase cohort.

    Attributes:
        case_id: the case identifier (``case_00000``, ``patient7``).
        images: phase -> image file (or DICOM folder), in the order of the suffixes.
        labels: phase -> label map file, for the phases that have one.
    """

    case_id: str
    images: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)


def _phase_suffixes(suffixes: Sequence[str] | Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(suffixes, phase names): a list names each phase by its suffix (``_plain`` -> plain), a
    mapping gives them (``{"plain": "_nc"}``)."""
    if isinstance(suffixes, str) or not suffixes:
        raise InputError(f"suffixes must be a list like {DEFAULT_SUFFIXES}, got {suffixes!r}")
    if isinstance(suffixes, Mapping):
        names = [str(p).lower() for p in suffixes]
        suffixes = [str(s) for s in suffixes.values()]
    else:
        suffixes = [str(s) for s in suffixes]
        names = [s.lstrip("_-.").lower() for s in suffixes]
    if not all(names) or len(set(names)) != len(names) or len(set(suffixes)) != len(suffixes):
        raise InputError(f"suffixes must name distinct phases, got {tuple(suffixes)}")
    return suffixes, names


def find_phase_cases(
    folder: str | Path,
    suffixes: Sequence[str] | Mapping[str, str] = DEFAULT_SUFFIXES,
    *,
    channels: Mapping[str, int] | None = None,
) -> list[PhaseCase]:
    """The cases of a multi-phase cohort folder, sorted by case id.

    Args:
        folder: a folder of nnU-Net raw datasets, one per phase (``slidesam phantom`` output), or
            a folder of ``CASE<suffix>.<ext>`` files (see the module docstring).
        suffixes: file name endings that mark the phases; the phase is the suffix without its
            leading ``_``: ``("_plain", "_arterial", "_venous")`` -> plain, arterial, venous;
            or a mapping phase -> suffix, ``{"plain": "_nc", "arterial": "_art"}``.
        channels: for nnU-Net datasets with several channels: phase -> channel index
            (default: the dataset's ``"channel_phases"``).

    Returns:
        One :class:`PhaseCase` per case. Every case has the same phases: those found in the
        cohort, in the order of ``suffixes``.

    Raises:
        InputError: no such folder, nothing found, a case missing a phase another case has, a
            case or label found twice, or a label map without its image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; pass the cohort folder")
    suffixes, phases = _phase_suffixes(suffixes)
    if channels is not None:
        channels = _check_channels(channels)
        phases = list(channels)
    if (root / "dataset.json").is_file():  # a dataset folder itself: read even our exports
        found = _cases_from_datasets(root, [root], phases, channels, own=True)
    else:
        datasets = [
            d
            for d in sorted(root.iterdir())
            if d.is_dir() and d.name.startswith("Dataset") and (d / "dataset.json").is_file()
        ]
        if datasets:
            found = _cases_from_datasets(root, datasets, phases, channels)
        else:
            found = _cases_from_files(root, suffixes, phases)
    if not found:
        raise InputError(
            f"{root}: no cases found; expected nnU-Net datasets with one phase each (slidesam "
            f"phantom output) or files named CASE{suffixes[0]}.nii.gz, ... (phases "
            f"{', '.join(phases)}), optional labels CASE{suffixes[0]}_seg.nii.gz or labels/"
        )
    present = [p for p in phases if any(p in c.images for c in found.values())]
    incomplete = [c for c in found.values() if set(c.images) != set(present)]
    if incomplete:
        lines = [
            f"{c.case_id} lacks {', '.join(p for p in present if p not in c.images)}"
            for c in incomplete[:5]
        ]
        more = f" (+{len(incomplete) - 5} more cases)" if len(incomplete) > 5 else ""
        raise InputError(
            f"{root}: every case needs every phase ({', '.join(present)}): "
            + "; ".join(lines)
            + more
        )
    return [
        PhaseCase(
            case_id=cid,
            images={p: found[cid].images[p] for p in present},
            labels={p: found[cid].labels[p] for p in present if p in found[cid].labels},
        )
        for cid in sorted(found)
    ]


def _dataset_phase(folder: Path, ds: dict, phases: list[str]) -> str | None:
    phase = ds.get("phase")
    if isinstance(phase, str) and phase.lower() in phases:
        return phase.lower()
    name = folder.name.split("_", 1)[-1].lower()
    matches = [p for p in phases if name.endswith(p)]
    return matches[0] if len(matches) == 1 else None


def _check_channels(channels: Mapping[str, int]) -> dict[str, int]:
    if isinstance(channels, str) or not isinstance(channels, Mapping) or not channels:
        raise InputError(f"channels must map phases to indices (plain=0,arterial=1): {channels}")
    out = {}
    for phase, index in channels.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 9999:
            raise InputError(f"channel of phase {phase!r} must be an index 0..9999, got {index!r}")
        out[str(phase).lower()] = index
    if len(set(out.values())) != len(out):
        raise InputError(f"two phases share a channel: {dict(channels)}")
    return out


def _channel_phases(folder: Path, ds: dict, n: int, phases: list[str], given) -> dict[str, int]:
    """phase -> channel index of a dataset with ``n`` channels ({} if it names no phase)."""
    if given is not None:
        mapping = dict(given)
    else:
        named = ds.get("channel_phases") or {}
        mapping = {
            str(p).lower(): int(i)
            for i, p in named.items()
            if str(i).isdigit() and str(p).lower() in phases
        }
    too_high = {p: i for p, i in mapping.items() if i >= n}
    if too_high:
        raise InputError(f"{folder}: only {n} channels (0..{n - 1}), but channels {too_high}")
    return mapping


def _cases_from_datasets(
    root: Path,
    datasets: list[Path],
    phases: list[str],
    channels: Mapping[str, int] | None = None,
    *,
    own: bool = False,
) -> dict:
    cases: dict[str, PhaseCase] = {}
    by_phase: dict[str, Path] = {}
    for folder in datasets:
        if (folder / EXPORT_MANIFEST).is_file() and not own:
            log.debug("%s: written by nnunet-export, not a source; skipped", folder)
            continue
        try:
            ds = json.loads((folder / "dataset.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{folder / 'dataset.json'}: unreadable ({exc})") from None
        ds = ds if isinstance(ds, dict) else {}
        names = ds.get("channel_names") or ds.get("modality") or {"0": "CT"}
        if len(names) > 1 or channels is not None:
            mapping = _channel_phases(folder, ds, len(names), phases, channels)
            if not mapping:
                log.info("%s: %d channels, none named a phase; skipped", folder, len(names))
                continue
            for phase in mapping:
                if phase in by_phase:
                    raise InputError(
                        f"{root}: two datasets for the {phase} phase: {by_phase[phase].name} "
                        f"and {folder.name}; keep one"
                    )
                by_phase[phase] = folder
            _add_channel_cases(cases, folder, str(ds.get("file_ending", _FILE_ENDING)), mapping)
            continue
        phase = _dataset_phase(folder, ds, phases)
        if phase is None:
            log.info("%s: no phase among %s in its name or dataset.json; skipped", folder, phases)
            continue
        if phase in by_phase:
            raise InputError(
                f"{root}: two datasets for the {phase} phase: {by_phase[phase].name} and "
                f"{folder.name}; keep one"
            )
        by_phase[phase] = folder
        ending = str(ds.get("file_ending", _FILE_ENDING))
        for split in ("imagesTr", "imagesTs"):
            for path in sorted((folder / split).glob(f"*_0000{ending}")):
                cid = path.name[: -len(f"_0000{ending}")]
                case = cases.setdefault(cid, PhaseCase(cid))
                if phase in case.images:
                    raise InputError(f"{folder}: case {cid} twice: {case.images[phase]} and {path}")
                case.images[phase] = path
                label = folder / "labelsTr" / f"{cid}{ending}"
                if split == "imagesTr" and label.is_file():
                    case.labels[phase] = label
    return cases


def _add_channel_cases(
    cases: dict[str, PhaseCase], folder: Path, ending: str, mapping: dict[str, int]
) -> None:
    """Cases of a dataset with a channel per phase; its label map goes to every phase."""
    for split in ("imagesTr", "imagesTs"):
        for first in sorted((folder / split).glob(f"*_0000{ending}")):
            cid = first.name[: -len(f"_0000{ending}")]
            if cid in cases:
                raise InputError(f"{folder}: case {cid} found twice")
            case = cases[cid] = PhaseCase(cid)
            for phase, index in mapping.items():
                path = folder / split / f"{cid}_{index:04d}{ending}"
                if not path.is_file():
                    raise InputError(f"{path}: missing (channel {index}, the {phase} phase)")
                case.images[phase] = path
            label = folder / "labelsTr" / f"{cid}{ending}"
            if split == "imagesTr" and label.is_file():
                case.labels.update(dict.fromkeys(mapping, label))


def _cases_from_files(root: Path, suffixes: list[str], phases: list[str]) -> dict:
    cases: dict[str, PhaseCase] = {}
    seen_labels: dict[tuple[str, str], Path] = {}

    def parse(path: Path, *, label_folder: bool) -> tuple[str, str, bool] | None:
        stem = strip_suffix(path)
        for suffix, phase in zip(suffixes, phases, strict=True):
            if stem.endswith(f"{suffix}_seg"):
                return stem[: -len(f"{suffix}_seg")], phase, True
            if stem.endswith(suffix):
                return stem[: -len(suffix)], phase, label_folder
        return None

    image_dirs = [root] + ([root / "images"] if (root / "images").is_dir() else [])
    label_dirs = [root / "labels"] if (root / "labels").is_dir() else []
    entries = [(p, False) for d in image_dirs for p in sorted(d.iterdir())]
    entries += [(p, True) for d in label_dirs for p in sorted(d.iterdir())]
    for path, in_label_dir in entries:
        if not path.is_file() or not image_suffix(path):
            continue
        parsed = parse(path, label_folder=in_label_dir)
        if parsed is None:
            log.debug("%s: no phase suffix (%s); ignored", path, ", ".join(suffixes))
            continue
        cid, phase, is_label = parsed
        if not cid:
            raise InputError(f"{path}: no case id before the phase suffix; name it CASE_{phase}")
        if is_label:
            if (cid, phase) in seen_labels:
                raise InputError(
                    f"case {cid} has two {phase} label maps: {seen_labels[cid, phase]} and {path}"
                )
            seen_labels[cid, phase] = path
            continue
        case = cases.setdefault(cid, PhaseCase(cid))
        if phase in case.images:
            raise InputError(f"case {cid} has two {phase} images: {case.images[phase]} and {path}")
        case.images[phase] = path
    for (cid, phase), path in seen_labels.items():
        if cid not in cases or phase not in cases[cid].images:
            raise InputError(
                f"{path}: a {phase} label map for case {cid}, which has no {phase} image"
            )
        cases[cid].labels[phase] = path
    return cases


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


def resample_to_grid(
    image: Volume, grid: Geometry, *, interpolation: str = "linear", fill_value: float = -1024.0
) -> Volume:
    """``image`` sampled on ``grid`` in world coordinates (LPS mm), without any registration.

    Each output voxel takes the value of ``image`` at the same world position (identity
    transform), so a patient who moved between acquisitions stays moved.

    Args:
        image: the volume to resample.
        grid: the target grid.
        interpolation: ``"linear"`` (images) or ``"nearest"`` (label maps).
        fill_value: value where the output grid lies outside ``image`` (default -1024, air in HU).

    Returns:
        Volume on ``grid`` with ``image``'s dtype (integers rounded to the nearest value and
        clipped to the dtype's range).
    """
    if interpolation not in _INTERPOLATORS:
        raise InputError(f"interpolation must be one of {', '.join(_INTERPOLATORS)}")
    src = sitk.GetImageFromArray(image.array)
    src.SetSpacing(image.geometry.itk_spacing())
    src.SetOrigin(image.geometry.origin)
    src.SetDirection(image.geometry.itk_direction())
    out = sitk.Resample(
        src,
        [int(s) for s in grid.shape[::-1]],
        sitk.Transform(),
        _INTERPOLATORS[interpolation],
        grid.origin,
        grid.itk_spacing(),
        grid.itk_direction(),
        float(fill_value),
        sitk.sitkFloat64 if interpolation == "linear" else src.GetPixelID(),
    )
    array = sitk.GetArrayFromImage(out)
    dtype = image.array.dtype
    if array.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            array = np.clip(np.rint(array), info.min, info.max)
        array = array.astype(dtype)
    return Volume(array=array, geometry=grid)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def _header_geometry(path: Path) -> Geometry:
    """Grid of an image file from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise InputError(f"{path}: not a readable image ({detail})") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{path}: expected a 3D scalar image, got {reader.GetDimension()}D with "
            f"{reader.GetNumberOfComponents()} component(s)"
        )
    return Geometry.from_itk(
        reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    )


def _signature(paths) -> dict[str, list[int]]:
    out = {}
    for path in paths:
        st = Path(path).stat()
        out[str(Path(path).resolve())] = [st.st_size, st.st_mtime_ns]
    return out


@dataclass
class _Dataset:
    """One output dataset and its manifest."""

    folder: Path
    dataset_id: int
    settings: dict
    channels: list[str]  # phase of each channel
    label_phase: str  # whose labels go to labelsTr
    labels: dict[int, str]
    cases: dict[str, dict] = field(default_factory=dict)  # case id -> manifest entry

    @property
    def manifest_path(self) -> Path:
        return self.folder / EXPORT_MANIFEST

    def write_manifest(self, *, complete: bool) -> None:
        data = {**self.settings, "complete": complete, "cases": self.cases}
        tmp = self.folder / f".{EXPORT_MANIFEST}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.manifest_path)

    @property
    def num_training(self) -> int:
        return sum(1 for c in self.cases.values() if c["split"] == "Tr")

    def dataset_json(self) -> dict:
        out = {
            "channel_names": {str(i): "CT" for i in range(len(self.channels))},
            "labels": {name: value for value, name in sorted(self.labels.items())},
            "numTraining": self.num_training,
            "file_ending": _FILE_ENDING,
            "name": self.folder.name.split("_", 1)[1],
            "description": (
                f"Multi-phase renal CT exported by {_GENERATOR} ({self.settings['layout']} layout) "
                f"from {self.settings['cohort']}"
            ),
            "channel_phases": {str(i): phase for i, phase in enumerate(self.channels)},
        }
        if self.settings["layout"] == "channels":
            out["reference_phase"] = self.label_phase
            out["resampling"] = (
                "every phase resampled onto the reference phase's grid in world coordinates "
                "(linear, identity transform); patient motion between phases not corrected"
            )
        else:
            out["phase"] = self.label_phase
        return out


def _check_folder(ds: _Dataset, out: Path) -> dict:
    """Refuse a folder holding another dataset; return the earlier manifest's cases to resume."""
    prefix = f"Dataset{ds.dataset_id:03d}_"
    others = (
        [d.name for d in out.iterdir() if d.name.startswith(prefix) and d.name != ds.folder.name]
        if out.is_dir()
        else []
    )
    if others:
        raise InputError(
            f"{out}: already holds {others[0]} with the dataset id {ds.dataset_id}; nnU-Net needs "
            "unique ids: pass another --dataset-id"
        )
    if not ds.folder.exists():
        return {}
    if not ds.folder.is_dir():
        raise InputError(f"{ds.folder}: exists and is not a folder")
    if not ds.manifest_path.is_file():
        if any(p for p in ds.folder.iterdir() if p.name != ".partial"):
            raise InputError(
                f"{ds.folder}: exists but was not written by {_GENERATOR}; choose another --out "
                "or --dataset-id, or delete it"
            )
        return {}
    try:
        old = json.loads(ds.manifest_path.read_text())
        old_cases = dict(old.get("cases", {}))
        old_settings = {k: old[k] for k in ds.settings}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(
            f"{ds.manifest_path}: unreadable export manifest; delete {ds.folder} to export again"
        ) from None
    if old_settings != ds.settings:
        what = [
            f"{k} {old_settings[k]!r} != {v!r}"
            for k, v in ds.settings.items()
            if old_settings[k] != v
        ]
        raise InputError(
            f"{ds.folder}: already holds a different export ({'; '.join(what)}); choose another "
            "--out or --dataset-id, or delete it"
        )
    return old_cases


def _copy_or_convert(src: Path, dst: Path, *, label: bool = False) -> None:
    """Bit-exact copy of a .nii.gz file; other formats are rewritten as .nii.gz."""
    if str(src).lower().endswith(_FILE_ENDING):
        shutil.copyfile(src, dst)
    elif label:
        vol = read_label(src)
        write_mask(vol.array, vol, dst)
    else:
        write_image(read_image(src, modality=None), dst)


def _check_label(path: Path, grid: Geometry, labels: Mapping[int, str]) -> None:
    values = np.unique(read_label(path, reference=grid).array)
    unknown = sorted(set(values.tolist()) - set(labels))
    if unknown:
        raise InputError(
            f"{path}: label values {unknown} are not in the dataset's labels "
            f"({', '.join(f'{k} {v}' for k, v in sorted(labels.items()))})"
        )


def _export_case(ds: _Dataset, case: PhaseCase, fill_value: float) -> dict:
    """Write one case into ``ds`` (via .partial/) and return its manifest entry."""
    partial = ds.folder / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    ref_path = case.images[ds.label_phase]
    grid = _header_geometry(ref_path)
    label = case.labels.get(ds.label_phase)
    split = "Tr" if label is not None else "Ts"
    if label is not None:
        _check_label(label, grid, ds.labels)

    staged: list[tuple[Path, Path]] = []
    for channel, phase in enumerate(ds.channels):
        name = f"{case.case_id}_{channel:04d}{_FILE_ENDING}"
        tmp = partial / name
        src = case.images[phase]
        if phase == ds.label_phase:
            _copy_or_convert(src, tmp)
        else:
            moving = read_image(src, modality=None)
            write_image(resample_to_grid(moving, grid, fill_value=fill_value), tmp)
        staged.append((tmp, ds.folder / f"images{split}" / name))
    if label is not None:
        tmp = partial / f"{case.case_id}{_FILE_ENDING}"
        _copy_or_convert(label, tmp, label=True)
        staged.append((tmp, ds.folder / "labelsTr" / f"{case.case_id}{_FILE_ENDING}"))

    inputs = [case.images[p] for p in ds.channels] + ([label] if label is not None else [])
    for tmp, dst in staged:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)
    return {
        "split": split,
        "inputs": _signature(inputs),
        "outputs": [str(dst.relative_to(ds.folder)) for _, dst in staged],
    }


def _is_done(ds: _Dataset, case: PhaseCase, entry: dict | None) -> bool:
    if not entry:
        return False
    label = case.labels.get(ds.label_phase)
    inputs = [case.images[p] for p in ds.channels] + ([label] if label is not None else [])
    try:
        same_inputs = entry.get("inputs") == _signature(inputs)
    except OSError:
        return False
    return same_inputs and all((ds.folder / o).is_file() for o in entry.get("outputs", []))


def _remove_outputs(ds: _Dataset, entry: dict) -> None:
    for rel in entry.get("outputs", []):
        path = ds.folder / rel
        if path.is_file():
            path.unlink()


def export_nnunet(
    cohort: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "channels",
    reference_phase: str = "arterial",
    phases: Sequence[str] | None = None,
    dataset_id: int | None = None,
    name: str = "RenalCT",
    labels: Mapping[int, str] | None = None,
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    fill_value: float = -1024.0,
    progress: bool = True,
) -> dict:
    """Write ``cohort`` as nnU-Net v2 raw dataset(s) under ``out_dir`` (see the module docstring).

    Args:
        cohort: cohort folder (see :func:`find_phase_cases`).
        out_dir: output folder, used as ``nnUNet_raw`` (created).
        layout: ``"channels"`` (one dataset, a channel per phase on the reference grid) or
            ``"per-phase"`` (one dataset per phase, files copied bit for bit).
        reference_phase: channels layout: the phase whose grid and labels the dataset takes.
        phases: phases to export, in channel order (default: every phase in the cohort, in the
            order of ``suffixes``).
        dataset_id: nnU-Net dataset id, 1..999 (default 510 for channels, 520 for per-phase,
            where phase ``i`` gets ``dataset_id + i``).
        name: dataset name (``Dataset510_RenalCT``; per-phase: ``Dataset520_RenalCTPlain``...).
        labels: label value -> name (default: KiTS, 0 background, 1 kidney, 2 tumor, 3 cyst).
        suffixes: phase suffixes for :func:`find_phase_cases`.
        fill_value: channels layout: value outside a resampled phase's field of view (HU).
        progress: tqdm bar over cases.

    Returns:
        ``{"layout", "cases", "cases_resumed", "datasets": {key: {"folder", "dataset_id",
        "channels", "training", "test"}}}``; key is ``"channels"`` or the phase; "cases_resumed"
        counts (case, dataset) pairs left as they were.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"name must be letters, digits, '_' or '-' (e.g. RenalCT), got {name!r}")
    cases = find_phase_cases(cohort, suffixes)
    available = list(cases[0].images)
    if phases is None:
        phases = available
    else:
        phases = [str(p).lower() for p in phases]
        missing = [p for p in phases if p not in available]
        if missing or not phases or len(set(phases)) != len(phases):
            raise InputError(
                f"phases must be distinct phases of the cohort ({', '.join(available)}), "
                f"got {', '.join(phases) or 'none'}"
            )
    if layout == "channels" and reference_phase not in phases:
        raise InputError(
            f"reference phase {reference_phase!r} is not among the exported phases "
            f"({', '.join(phases)})"
        )
    first_id = DEFAULT_DATASET_ID[layout] if dataset_id is None else dataset_id
    if isinstance(first_id, bool) or not isinstance(first_id, int | np.integer):
        raise InputError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    last_id = int(first_id) + (len(phases) - 1 if layout == "per-phase" else 0)
    if first_id < 1 or last_id > 999:
        raise InputError(f"dataset ids must lie in 1..999, got {first_id}..{last_id}")
    labels = dict(KITS_LABELS if labels is None else labels)
    if 0 not in labels:
        raise InputError("labels must include 0 (background)")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    cohort_path = str(Path(cohort).resolve())
    common = {"generator": _GENERATOR, "layout": layout, "cohort": cohort_path}
    label_settings = {str(k): v for k, v in sorted(labels.items())}
    datasets: dict[str, _Dataset] = {}
    if layout == "channels":
        datasets["channels"] = _Dataset(
            folder=out / f"Dataset{int(first_id):03d}_{name}",
            dataset_id=int(first_id),
            settings={
                **common,
                "phases": list(phases),
                "reference_phase": reference_phase,
                "fill_value": float(fill_value),
                "labels": label_settings,
            },
            channels=list(phases),
            label_phase=reference_phase,
            labels=labels,
        )
    else:
        for i, phase in enumerate(phases):
            datasets[phase] = _Dataset(
                folder=out / f"Dataset{int(first_id) + i:03d}_{name}{phase.capitalize()}",
                dataset_id=int(first_id) + i,
                settings={**common, "phases": [phase], "labels": label_settings},
                channels=[phase],
                label_phase=phase,
                labels=labels,
            )
    old_cases = {key: _check_folder(ds, out) for key, ds in datasets.items()}

    resumed = 0
    bar = tqdm(
        total=len(cases) * len(datasets), desc="nnunet-export", unit="case", disable=not progress
    )
    try:
        for key, ds in datasets.items():
            ds.folder.mkdir(parents=True, exist_ok=True)
            current = {c.case_id for c in cases}
            for cid, entry in old_cases[key].items():
                if cid not in current:
                    _remove_outputs(ds, entry)
                    log.info("%s: removed case %s (no longer in the cohort)", ds.folder, cid)
            ds.write_manifest(complete=False)
            for case in cases:
                entry = old_cases[key].get(case.case_id)
                if _is_done(ds, case, entry):
                    ds.cases[case.case_id] = entry
                    resumed += 1
                else:
                    if entry:
                        _remove_outputs(ds, entry)
                    ds.cases[case.case_id] = _export_case(ds, case, fill_value)
                    ds.write_manifest(complete=False)
                bar.update()
            (ds.folder / "dataset.json").write_text(json.dumps(ds.dataset_json(), indent=2))
            ds.write_manifest(complete=True)
            shutil.rmtree(ds.folder / ".partial", ignore_errors=True)
    finally:
        bar.close()

    log.info(
        "exported %d cases (%d already done) as %s",
        len(cases),
        resumed,
        ", ".join(d.folder.name for d in datasets.values()),
    )
    return {
        "layout": layout,
        "cases": len(cases),
        "cases_resumed": resumed,
        "datasets": {
            key: {
                "folder": str(d.folder),
                "dataset_id": d.dataset_id,
                "channels": list(d.channels),
                "training": d.num_training,
                "test": len(d.cases) - d.num_training,
            }
            for key, d in datasets.items()
        },
    }

"""Files the web UI touches: paths under ``--data-dir`` and uploaded images.

Nothing here imports the web framework, so it is tested directly. Two promises:

- a path from the client never leaves the data folder (``resolve_in_data_dir``: relative paths
  only, resolved through symlinks, then checked to lie inside the resolved folder);
- an upload is accepted only as a self-contained image file of a known type whose first bytes
  match its ending (``check_upload``): NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, data
  inline) and MetaImage (``.mha``, ``ElementDataFile = LOCAL``). Detached headers (``.nhdr``,
  ``.mhd``, ``data file:`` lines) are refused: they would make the server read another file.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from slidesam.core import InputError
from slidesam.data.io import image_suffix, strip_suffix

__all__ = [
    "UPLOAD_SUFFIXES",
    "PathOutsideDataDir",
    "check_upload",
    "list_images",
    "mask_path_for",
    "resolve_in_data_dir",
    "safe_name",
]

#: image endings accepted as uploads (self-contained files only)
UPLOAD_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
#: ending of the masks the UI saves next to their image
MASK_TAIL = "_mask.nii.gz"


class PathOutsideDataDir(InputError):
    """A client path that would leave ``--data-dir`` (``..``, absolute, or a symlink out)."""


def safe_name(name: str) -> str:
    """A client file name reduced to a harmless base name (letters, digits, ``._-``)."""
    base = re.split(r"[\\/]", name or "")[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned[:120] or "upload"


def resolve_in_data_dir(data_dir: Path, relative: str) -> Path:
    """The existing image file ``relative`` inside ``data_dir``.

    Raises:
        PathOutsideDataDir: absolute paths, ``..`` components, or a target (after following
            symlinks) outside the data folder.
        InputError: no such file, or not an image ending we read.
    """
    if not relative or "\x00" in relative:
        raise InputError("give a file path relative to the data folder")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ".." in rel.parts:
        raise PathOutsideDataDir(f"{relative}: paths must stay inside the data folder")
    root = data_dir.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise PathOutsideDataDir(f"{relative}: paths must stay inside the data folder")
    if not target.is_file():
        raise InputError(f"{relative}: no such file in the data folder")
    if not image_suffix(target):
        raise InputError(f"{relative}: not an image (.nii.gz, .nii, .nrrd, .mha)")
    return target


def list_images(data_dir: Path, *, max_depth: int = 3, limit: int = 500) -> list[dict]:
    """Image files under ``data_dir`` (relative POSIX paths, sorted), masks flagged."""
    root = data_dir.resolve()
    out: list[dict] = []
    for path in sorted(root.rglob("*")):
        if len(out) >= limit:
            break
        rel = path.relative_to(root)
        if len(rel.parts) > max_depth or any(p.startswith(".") for p in rel.parts):
            continue
        if not path.is_file() or not image_suffix(path):
            continue
        if not path.resolve().is_relative_to(root):
            continue  # a symlink out of the folder is not offered
        out.append(
            {"path": rel.as_posix(), "bytes": path.stat().st_size, "mask": _is_mask(path.name)}
        )
    return out


def _is_mask(name: str) -> bool:
    return name.endswith(MASK_TAIL) or "_mask." in name or name.startswith(("mask", "tumor_"))


def mask_path_for(image: Path) -> Path:
    """Where the mask of ``image`` is saved: ``<stem>_mask.nii.gz`` beside it."""
    return image.with_name(strip_suffix(image) + MASK_TAIL)


def check_upload(name: str, head: bytes) -> str:
    """The ending of an acceptable upload named ``name`` whose file starts with ``head``.

    ``head`` should be the first 4 KiB or more. Raises ``InputError`` saying what is accepted.
    """
    suffix = image_suffix(name)
    if suffix not in UPLOAD_SUFFIXES:
        raise InputError(
            f"{safe_name(name)}: unsupported file type; upload a NIfTI (.nii, .nii.gz), NRRD "
            "(.nrrd) or MetaImage (.mha) file"
        )
    body = head
    if suffix == ".nii.gz":
        if head[:2] != b"\x1f\x8b":
            raise InputError(f"{safe_name(name)}: not gzip-compressed, so not a .nii.gz file")
        try:
            body = gzip.decompress(head)
        except EOFError:  # truncated stream: take what decompresses
            body = _gunzip_prefix(head)
        except OSError as exc:
            raise InputError(f"{safe_name(name)}: broken gzip data ({exc})") from None
    if suffix in (".nii", ".nii.gz"):
        sizes = {int.from_bytes(body[:4], "little"), int.from_bytes(body[:4], "big")}
        magic_ok = body[344:347] in (b"n+1", b"ni1") or body[4:7] in (b"n+2", b"ni2")
        if not (sizes & {348, 540}) or not magic_ok:
            raise InputError(f"{safe_name(name)}: not a NIfTI file (bad header)")
    elif suffix == ".nrrd":
        if not head.startswith(b"NRRD"):
            raise InputError(f"{safe_name(name)}: not a NRRD file (no NRRD magic)")
        header = head.split(b"\n\n", 1)[0].lower()
        if re.search(rb"^data ?file:", header, re.MULTILINE):
            raise InputError(f"{safe_name(name)}: detached NRRD data files are not accepted")
    elif suffix == ".mha":
        text = head[:4096]
        if b"ObjectType" not in text and b"NDims" not in text:
            raise InputError(f"{safe_name(name)}: not a MetaImage file")
        m = re.search(rb"ElementDataFile\s*=\s*(\S+)", text)
        if m is None or m.group(1).upper() != b"LOCAL":
            raise InputError(f"{safe_name(name)}: only .mha with ElementDataFile = LOCAL")
    return suffix


def _gunzip_prefix(data: bytes) -> bytes:
    import zlib

    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)

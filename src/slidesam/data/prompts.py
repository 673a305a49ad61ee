"""Reading ``prompts.json`` (the ``slidesam segment`` contract) into ``Prompt`` objects.

Format::

    {"prompts": [
        {"slice": 27, "box": [x0, y0, x1, y1], "label": 1},
        {"slice": 30, "points": [[x, y]], "point_labels": [1], "label": 1},
        {"box_mm": [[x, y, z], [x, y, z]], "label": 2},
        {"point_mm": [[x, y, z]], "point_labels": [1], "label": 2}
    ]}

``slice`` indexes the first axis (z) of the (z, y, x) array; ``box`` is XYXY and ``points`` XY in
that slice's pixels (x = column, y = row), inclusive. ``box_mm`` (two opposite corners) and
``point_mm`` are world (LPS) points in mm, converted through the image geometry: the slice is the
one nearest to the box centre (or to the points, which must share a slice), unless ``slice`` is
also given. ``label`` (default 1) is the output value; prompts with the same label on several
slices are anchors of one object.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slidesam.core import Geometry, InputError
from slidesam.core.prompts import Prompt

__all__ = ["PROMPT_KEYS", "parse_prompts", "read_prompts"]

PROMPT_KEYS = frozenset({"slice", "box", "points", "point_labels", "label", "box_mm", "point_mm"})


def read_prompts(path: str | Path, geometry: Geometry) -> list[Prompt]:
    """Read and validate a prompts file against the image grid (slicing along z)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    try:
        return parse_prompts(data, geometry, source=path.name)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def parse_prompts(data: dict, geometry: Geometry, *, source: str = "user") -> list[Prompt]:
    """Prompts from the decoded JSON object; every prompt is checked against the grid."""
    if not isinstance(data, dict) or set(data) != {"prompts"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"expected an object with one key 'prompts', got {keys}")
    items = data["prompts"]
    if not isinstance(items, list) or not items:
        raise InputError("'prompts' must be a non-empty list")
    prompts = []
    for i, item in enumerate(items):
        try:
            prompt = _one(item, geometry, source)
            prompt.check_fits(geometry.shape[0], geometry.shape[1:])
        except InputError as exc:
            raise InputError(f"prompt #{i}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"prompt #{i}: malformed value ({exc})") from None
        prompts.append(prompt)
    return prompts


def _one(item, geometry: Geometry, source: str) -> Prompt:
    if not isinstance(item, dict):
        raise InputError(f"each prompt must be an object, got {type(item).__name__}")
    unknown = sorted(set(item) - PROMPT_KEYS)
    if unknown:
        raise InputError(
            f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(PROMPT_KEYS))}"
        )
    if "box" in item and "box_mm" in item:
        raise InputError("give 'box' or 'box_mm', not both")
    if "points" in item and "point_mm" in item:
        raise InputError("give 'points' or 'point_mm', not both")
    slice_index = item.get("slice")
    box = item.get("box")
    points = item.get("points", [])
    world_slices = []
    if "box_mm" in item:
        corners = _to_index(item["box_mm"], geometry, "box_mm", n=2)  # (2, 3) z, y, x
        world_slices.append(float(corners[:, 0].mean()))
        (y0, y1), (x0, x1) = sorted(corners[:, 1]), sorted(corners[:, 2])
        box = [x0, y0, x1, y1]
    if "point_mm" in item:
        idx = _to_index(item["point_mm"], geometry, "point_mm")
        z = np.rint(idx[:, 0])
        if len(set(z.tolist())) > 1 and slice_index is None:
            raise InputError(f"point_mm points fall on different slices {sorted(set(z.tolist()))}")
        world_slices.extend(idx[:, 0].tolist())
        points = idx[:, [2, 1]].tolist()  # (x, y) = (column, row)
    if slice_index is None:
        if not world_slices:
            raise InputError("missing 'slice' (or a box_mm / point_mm to derive it from)")
        slice_index = int(np.rint(np.mean(world_slices)))
    if isinstance(slice_index, bool) or not isinstance(slice_index, int | np.integer):
        raise InputError(f"'slice' must be an integer, got {slice_index!r}")
    label = item.get("label", 1)
    if isinstance(label, bool) or not isinstance(label, int):
        raise InputError(f"'label' must be an integer 1..255, got {label!r}")
    return Prompt(
        slice=int(slice_index),
        label=label,
        box=None if box is None else tuple(box),
        points=tuple(tuple(p) for p in points),
        point_labels=tuple(item.get("point_labels", [])),
        source=source,
    )


def _to_index(value, geometry: Geometry, key: str, n: int | None = None) -> np.ndarray:
    pts = np.asarray(value, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3 or (n is not None and pts.shape[0] != n):
        shape = f"{n} points" if n else "points"
        raise InputError(f"'{key}' must be {shape} [x, y, z] in mm, got {value!r}")
    idx = geometry.world_to_index(pts)
    if not geometry.contains(idx).all():
        raise InputError(f"'{key}' {value} lies outside the image")
    return idx

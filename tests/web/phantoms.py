"""Small phantom volumes for the web tests: a renal phantom cropped to 64 x 64 around the tumour."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slidesam.core import Geometry, Volume
from slidesam.data.phantom import PhantomConfig, generate_case

#: in-plane size of the cropped test volumes (pixels)
SIZE = 64
#: slices kept around the tumour's centre
SLICES = 24


@dataclass(frozen=True)
class SmallCase:
    """A cropped phantom: images per phase, tumour masks (bool, same grids) and a box prompt.

    Attributes:
        images: phase -> Volume (int16 HU), each (SLICES, SIZE, SIZE) with its own geometry.
        tumor: phase -> (z, y, x) bool tumour mask on that phase's grid.
        slice: the plain phase's slice with the largest tumour area.
        box: (x0, y0, x1, y1) inclusive box around the plain tumour on ``slice``, grown 2 px.
    """

    images: dict[str, Volume]
    tumor: dict[str, np.ndarray]
    slice: int
    box: tuple[int, int, int, int]


def _crop(volume: Volume, lo: np.ndarray, size: tuple[int, int, int]) -> Volume:
    z0, y0, x0 = (int(v) for v in lo)
    dz, dy, dx = size
    array = np.ascontiguousarray(volume.array[z0 : z0 + dz, y0 : y0 + dy, x0 : x0 + dx])
    g = volume.geometry
    origin = g.index_to_world(np.array([[z0, y0, x0]], float))[0]
    geometry = Geometry(
        shape=array.shape, spacing=g.spacing, origin=tuple(origin), direction=g.direction
    )
    return Volume(array=array, geometry=geometry)


def small_case(seed: int = 7) -> SmallCase:
    """Plain + arterial phantom (3 x 2 x 2 mm, tumour 30-40 mm), cropped to 24 x 64 x 64."""
    config = PhantomConfig(
        phases=("plain", "arterial"),
        motion_mm=0.0,
        vary_z_spacing=False,
        tumor_diameter_mm=(30.0, 40.0),
        cyst_probability=0.0,
    )
    case = generate_case(0, seed=seed, config=config)
    images, tumor = {}, {}
    plain_tumor = case.labels["plain"].array == 2
    centre = np.round(np.argwhere(plain_tumor).mean(axis=0)).astype(int)
    size = np.array([SLICES, SIZE, SIZE])
    for phase in ("plain", "arterial"):
        vol = case.phases[phase]
        lo = np.clip(centre - size // 2, 0, np.array(vol.shape) - size)
        images[phase] = _crop(vol, lo, tuple(size))
        tumor[phase] = _crop(case.labels[phase], lo, tuple(size)).array == 2
    t = tumor["plain"]
    z = int(np.argmax(t.sum(axis=(1, 2))))
    ys, xs = np.nonzero(t[z])
    box = (
        max(0, int(xs.min()) - 2),
        max(0, int(ys.min()) - 2),
        min(SIZE - 1, int(xs.max()) + 2),
        min(SIZE - 1, int(ys.max()) + 2),
    )
    return SmallCase(images=images, tumor=tumor, slice=z, box=box)

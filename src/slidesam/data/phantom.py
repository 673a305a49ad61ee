"""Synthetic multi-phase renal CT (plain, arterial, venous) with KiTS labels: test and demo data.

The anatomy of a case is defined once, analytically, in millimetres in the patient frame (LPS,
``(x, y, z)``: x to the patient's left, y posterior, z superior; the body axis passes through
``x = y = 0`` and the kidneys are centred near ``z = 0``). Every phase is then *sampled* on its
own voxel grid by evaluating the shapes at the world position of each voxel centre, so the
phases are consistent with each other whatever their grids:

- each phase has its own grid: its own z-spacing and slice count (optionally), and an origin
  that differs from the plain phase by a non-integer number of voxels on every axis;
- each phase except ``plain`` (the reference) carries a true patient-motion translation
  ``t``: the anatomy seen in that phase sits at ``p + t`` in world space;
- optional per-phase axis flips give non-identity direction matrices.

Contents (HU in plain / arterial / venous, each drawn per case around these values): air -1000,
subcutaneous fat -100, muscle wall ~50, visceral fat -90, vertebrae (cortex ~700, cancellous
~250, discs ~80), psoas and paraspinal muscles ~50, aorta 40/300/160, IVC 40/80/150, liver
55/70/110, spleen 45/120 (heterogeneous)/120, bowel loops ~35 with gas, and two kidneys (tilted
ellipsoids, a ~6 mm cortex shell 30/180/160 around the medulla 30/80/160, renal sinus fat and
pelvis at the hilum) in perirenal fat. The tumour (label 2) is an irregular level set in one
kidney: nearly isodense on the plain phase (25-45 HU against kidney ~30, faint texture),
strongly and heterogeneously enhancing on the arterial phase (~120-200), washing out on the
venous phase (~100, below the kidney), sometimes with a non-enhancing necrotic core (15-25 HU)
and often exophytic. A simple cyst (label 3, 5-10 HU) appears in about half the cases.

Images are blurred slightly (partial volume) before correlated Gaussian noise is added, and are
stored as int16 HU. ``write_cohort`` writes one nnU-Net v2 raw dataset per phase.
"""

from __future__ import annotations

import json
import logging
import math
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from slidesam.core import KITS_LABELS, PHASES, Geometry, InputError, Volume
from slidesam.data.io import write_image, write_mask

__all__ = [
    "DATASET_IDS",
    "PhantomCase",
    "PhantomConfig",
    "dataset_folder_name",
    "generate_case",
    "write_cohort",
]

log = logging.getLogger(__name__)

#: nnU-Net dataset id of each phase (fixed, whatever subset of phases is written)
DATASET_IDS: dict[str, int] = {"plain": 501, "arterial": 502, "venous": 503}

#: world box (LPS mm, relative to the body axis) that always holds both kidneys, the tumour, the
#: cyst and the liver noise probe of every case, before motion; it sets the smallest field of
#: view we accept
_RENAL_BOX_LO = np.array([-115.0, -50.0, -62.0])
_RENAL_BOX_HI = np.array([115.0, 80.0, 62.0])

#: partial-volume blur of the noiseless image, in voxels (z, y, x)
_BLUR_SIGMA_VOXELS = (0.4, 0.5, 0.5)
#: correlation of the noise, in voxels (z, y, x); the noise is rescaled to the drawn sigma after
_NOISE_CORRELATION_VOXELS = (0.0, 0.5, 0.5)

_CASE_FILE = re.compile(r"^case_(\d{5})(_0000)?\.nii\.gz$")


def dataset_folder_name(phase: str) -> str:
    """nnU-Net dataset folder of a phase, e.g. ``Dataset501_RenalPhantomPlain``."""
    return f"Dataset{DATASET_IDS[phase]}_RenalPhantom{phase.capitalize()}"


# ----------------------------------------------------------------------------------------------
# configuration and result types
# ----------------------------------------------------------------------------------------------
def _pair(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"{name} must be finite with low <= high, got ({lo}, {hi})")
    return lo, hi


@dataclass(frozen=True)
class PhantomConfig:
    """How the phantom cases are made.

    Attributes:
        shape: plain-phase grid size ``(z, y, x)`` in voxels. The other phases keep ``y, x`` and
            adapt their slice count to their own z-spacing.
        spacing: plain-phase voxel size ``(z, y, x)`` in mm.
        phases: which phases to produce, any of ``"plain"``, ``"arterial"``, ``"venous"``.
            A case's anatomy, motion and grids do not depend on this choice.
        motion_mm: largest patient translation per world axis of the arterial and venous phases
            relative to the plain phase, mm (uniform in ``[-motion_mm, motion_mm]``); 0 disables.
        vary_z_spacing: give the arterial and venous phases a z-spacing of 5/6, 1 or 7/6 times
            the plain one (2.5, 3.0 or 3.5 mm for the default 3 mm).
        random_flips: flip array axes at random per phase (direction matrices with -1 entries;
            at least one phase of each case is flipped).
        noise_hu: range of the per-case noise standard deviation, HU.
        tumor_diameter_mm: range of the tumour diameter (largest extent), mm.
        cyst_probability: chance that a case has a renal cyst (label 3).
        necrosis_probability: chance of a necrotic core in tumours of 20 mm and more.
        exophytic_probability: chance that the tumour centre lies near the kidney surface, so
            that part of it grows out into the perirenal fat.
    """

    shape: tuple[int, int, int] = (48, 160, 160)
    spacing: tuple[float, float, float] = (3.0, 2.0, 2.0)
    phases: tuple[str, ...] = PHASES
    motion_mm: float = 4.0
    vary_z_spacing: bool = True
    random_flips: bool = False
    noise_hu: tuple[float, float] = (10.0, 20.0)
    tumor_diameter_mm: tuple[float, float] = (10.0, 60.0)
    cyst_probability: float = 0.5
    necrosis_probability: float = 0.4
    exophytic_probability: float = 0.6

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
            integral = all(float(s) == int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise InputError(f"shape must be 3 integers (z, y, x), got {self.shape!r}") from None
        if len(shape) != 3 or not integral or min(shape) < 2:
            raise InputError(f"shape must be 3 integers >= 2 (z, y, x), got {self.shape!r}")
        try:
            spacing = tuple(float(s) for s in self.spacing)
        except (TypeError, ValueError):
            raise InputError(f"spacing must be 3 numbers (z, y, x), got {self.spacing!r}") from None
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise InputError(f"spacing must be 3 positive numbers (z, y, x), got {self.spacing!r}")
        phases = (self.phases,) if isinstance(self.phases, str) else tuple(self.phases)
        if not phases:
            raise InputError(f"phases must name at least one of {', '.join(PHASES)}")
        unknown = [p for p in phases if p not in PHASES]
        if unknown:
            raise InputError(f"unknown phase {unknown[0]!r}; choose from {', '.join(PHASES)}")
        if len(set(phases)) != len(phases):
            raise InputError(f"phases must not repeat, got {', '.join(phases)}")
        motion = float(self.motion_mm)
        if not math.isfinite(motion) or motion < 0 or motion > 20:
            raise InputError(f"motion_mm must lie in 0..20 mm, got {self.motion_mm!r}")
        noise = _pair(self.noise_hu, "noise_hu")
        if noise[0] < 0 or noise[1] > 200:
            raise InputError(f"noise_hu must lie in 0..200 HU, got {noise}")
        diameter = _pair(self.tumor_diameter_mm, "tumor_diameter_mm")
        if diameter[0] < 5 or diameter[1] > 70:
            raise InputError(f"tumor_diameter_mm must lie in 5..70 mm, got {diameter}")
        for name in ("cyst_probability", "necrosis_probability", "exophytic_probability"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise InputError(f"{name} must lie in 0..1, got {getattr(self, name)!r}")
            object.__setattr__(self, name, p)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "motion_mm", motion)
        object.__setattr__(self, "vary_z_spacing", bool(self.vary_z_spacing))
        object.__setattr__(self, "random_flips", bool(self.random_flips))
        object.__setattr__(self, "noise_hu", noise)
        object.__setattr__(self, "tumor_diameter_mm", diameter)
        # the kidneys, tumour and cyst must fit the plain grid with motion and a voxel to spare
        fov = np.array([(n - 1) * s for n, s in zip(shape, spacing, strict=True)])  # (z, y, x)
        need = (_RENAL_BOX_HI - _RENAL_BOX_LO)[::-1] + 2 * motion + 2 * np.array(spacing)
        if np.any(fov < need - 1e-9):
            raise InputError(
                "field of view (shape - 1) * spacing = "
                f"{' x '.join(f'{v:.0f}' for v in fov)} mm (z, y, x) is too small to hold both "
                f"kidneys and the tumor: it must be at least "
                f"{' x '.join(f'{math.ceil(v)}' for v in need)} mm with motion_mm={motion:g}; "
                "increase shape or spacing"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> PhantomConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown phantom config keys: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        case_id: ``case_00000``-style name.
        phases: phase name -> image, int16 HU, each on its own grid.
        labels: phase name -> KiTS label map (uint8: 0 background, 1 kidney, 2 tumor, 3 cyst)
            on the same grid as that phase's image.
        truth: JSON-ready ground truth: tumour kidney side, centre and centroid in world LPS mm
            per phase, diameter, volume, exophytic, necrosis, cyst, per-phase motion, noise
            sigma, HU values, a liver point for noise measurement, and every phase's grid
            (``Geometry.to_dict()``).
    """

    case_id: str
    phases: dict[str, Volume]
    labels: dict[str, Volume]
    truth: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# analytic shapes (all in anatomical mm, i.e. world LPS of the plain phase)
# ----------------------------------------------------------------------------------------------
def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _random_unit(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    v = rng.standard_normal((1 if n is None else n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v[0] if n is None else v


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def _rotation_between(a, b) -> np.ndarray:
    """Rotation matrix turning unit vector ``a`` onto unit vector ``b``."""
    a, b = _unit(a), _unit(b)
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


_SPHERE_26 = _fibonacci_sphere(26)


@dataclass(frozen=True)
class _Field:
    """Smooth random field in world mm: a normalised sum of plane cosines (std ~1, |f| <~ 3)."""

    waves: np.ndarray  # (K, 3) rad/mm
    offsets: np.ndarray  # (K,)

    def __call__(self, x, y, z):
        out = 0.0
        for (kx, ky, kz), ph in zip(self.waves, self.offsets, strict=True):
            out = out + np.cos(kx * x + ky * y + kz * z + ph)
        return out * math.sqrt(2.0 / len(self.offsets))


def _random_field(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> _Field:
    lengths = rng.uniform(*wavelength_mm, size=n)
    waves = _random_unit(rng, n) * (2 * np.pi / lengths)[:, None]
    return _Field(waves=waves, offsets=rng.uniform(0, 2 * np.pi, size=n))


@dataclass(frozen=True)
class _Ellipsoid:
    """``sum((R^T (p - c) / semi)^2) <= 1``; columns of ``rot`` are the local axes in world."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def local(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        r = self.rot
        return [r[0, i] * d[0] + r[1, i] * d[1] + r[2, i] * d[2] for i in range(3)]

    def level(self, x, y, z):
        q = self.local(x, y, z)
        return (q[0] / self.semi[0]) ** 2 + (q[1] / self.semi[1]) ** 2 + (q[2] / self.semi[2]) ** 2

    def half_extent(self) -> np.ndarray:
        return np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1))

    def bounds(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        h = self.half_extent() + pad
        return self.center - h, self.center + h

    def to_world(self, local_point) -> np.ndarray:
        return self.center + self.rot @ np.asarray(local_point, dtype=np.float64)

    def surface_point(self, direction_local) -> np.ndarray:
        """Local point on the surface along a local direction."""
        v = _unit(direction_local)
        return v / math.sqrt(float(((v / self.semi) ** 2).sum()))

    def grown(self, pad_mm: float) -> _Ellipsoid:
        return _Ellipsoid(self.center, self.semi + pad_mm, self.rot)

    def with_center(self, center) -> _Ellipsoid:
        return _Ellipsoid(np.asarray(center, dtype=np.float64), self.semi, self.rot)


@dataclass(frozen=True)
class _Blob:
    """Irregular solid: ``|M u| - 1 + sum_k a_k sin(w_k . u + phi_k) <= 0`` with
    ``u = (p - center) / scale``. The bumps are small and slow enough (``sum a_k |w_k| < 1/|M^-1|``)
    for the shape to stay star-shaped around its centre. ``rmax`` bounds ``|u|`` on it."""

    center: np.ndarray
    scale: float
    matrix: np.ndarray
    waves: np.ndarray
    amps: np.ndarray
    offsets: np.ndarray
    rmax: float = 1.5

    def level_u(self, u0, u1, u2):
        m = self.matrix
        q0 = m[0, 0] * u0 + m[0, 1] * u1 + m[0, 2] * u2
        q1 = m[1, 0] * u0 + m[1, 1] * u1 + m[1, 2] * u2
        q2 = m[2, 0] * u0 + m[2, 1] * u1 + m[2, 2] * u2
        out = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2) - 1.0
        for (w0, w1, w2), a, ph in zip(self.waves, self.amps, self.offsets, strict=True):
            out = out + a * np.sin(w0 * u0 + w1 * u1 + w2 * u2 + ph)
        return out

    def level(self, x, y, z):
        c, s = self.center, self.scale
        return self.level_u((x - c[0]) / s, (y - c[1]) / s, (z - c[2]) / s)

    def bounds(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        h = self.scale * self.rmax + pad
        return self.center - h, self.center + h

    def replace(self, **kw) -> _Blob:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(kw)
        return _Blob(**d)


def _draw_blob(rng: np.random.Generator, *, anisotropy: float, bump: float) -> _Blob:
    """A unit-sized irregular blob at the origin (scale 1), with its outer radius bound."""
    axes = rng.uniform(1 - anisotropy, 1 + anisotropy, size=3)
    matrix = np.diag(1.0 / axes) @ _random_rotation(rng).T
    k = 4
    amps = rng.uniform(0.5, 1.0, size=k)
    amps *= bump / amps.sum()
    waves = _random_unit(rng, k) * rng.uniform(1.5, 3.5, size=k)[:, None]
    blob = _Blob(np.zeros(3), 1.0, matrix, waves, amps, rng.uniform(0, 2 * np.pi, size=k))
    return blob.replace(rmax=float((1 + anisotropy) * (1 + bump) * 1.02))


def _blob_surface(blob: _Blob, n_dirs: int = 600) -> np.ndarray:
    """Surface points (in ``u`` units) of a unit blob along ``n_dirs`` rays (bisection)."""
    dirs = _fibonacci_sphere(n_dirs)
    lo = np.zeros(n_dirs)
    hi = np.full(n_dirs, blob.rmax)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        p = dirs * mid[:, None]
        inside = blob.level_u(p[:, 0], p[:, 1], p[:, 2]) <= 0
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return dirs * lo[:, None]


def _max_extent(points: np.ndarray) -> float:
    d = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((d * d).sum(-1)).max())


# ----------------------------------------------------------------------------------------------
# the body (superellipse cross-section, a little wider or narrower along z)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Body:
    a: float  # semi-axis along x (left-right), mm
    b: float  # semi-axis along y (antero-posterior), mm
    n_ant: float  # superellipse exponent of the anterior half
    n_post: float  # ... of the posterior half (flatter back)
    wobble: float  # relative size change along z
    wobble_k: float  # rad/mm
    wobble_phase: float
    fat: float  # subcutaneous fat, mm
    muscle: float  # abdominal wall muscle, mm

    def level(self, x, y, z, inset: float):
        """<= 1 inside the outline moved ``inset`` mm inwards."""
        w = 1.0 + self.wobble * np.sin(self.wobble_k * np.asarray(z) + self.wobble_phase)
        tx = np.abs(x) / (self.a * w - inset)
        ty = np.abs(y) / (self.b * w - inset)
        return np.where(
            np.asarray(y) > 0, tx**self.n_post + ty**self.n_post, tx**self.n_ant + ty**self.n_ant
        )

    @property
    def cavity_inset(self) -> float:
        return self.fat + self.muscle

    def in_cavity(self, points: np.ndarray, margin: float = 0.0) -> bool:
        p = np.atleast_2d(points)
        lev = self.level(p[:, 0], p[:, 1], p[:, 2], self.cavity_inset + margin)
        return bool(np.all(lev <= 1.0))


# ----------------------------------------------------------------------------------------------
# one case's anatomy
# ----------------------------------------------------------------------------------------------
@dataclass
class _Kidney:
    side: str
    shape: _Ellipsoid
    cortex_mm: float
    sinus: _Ellipsoid
    pelvis: _Ellipsoid
    fat_mm: float


@dataclass
class _Anatomy:
    body: _Body
    spine: dict
    vessels: dict
    psoas: dict
    erector: list
    liver: _Ellipsoid
    spleen: _Ellipsoid
    bowel: list  # (_Ellipsoid, gas _Ellipsoid | None)
    kidneys: dict[str, _Kidney]
    tumor: _Blob
    tumor_side: str
    necrosis: _Blob | None
    cyst: _Ellipsoid | None
    cyst_side: str | None
    fields: dict[str, _Field]
    hu: dict[str, dict[str, float]]
    facts: dict  # scalar truth (JSON-ready)
    noise_probe: np.ndarray

    def renal_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World box every phase's grid must cover (before motion): kidneys, tumour, cyst and
        the liver noise probe."""
        boxes = [k.shape.bounds() for k in self.kidneys.values()] + [self.tumor.bounds()]
        boxes.append((self.noise_probe - _PROBE_MM, self.noise_probe + _PROBE_MM))
        if self.cyst is not None:
            boxes.append(self.cyst.bounds())
        return np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)


def _in_renal_box(lo: np.ndarray, hi: np.ndarray) -> bool:
    return bool(np.all(lo >= _RENAL_BOX_LO) and np.all(hi <= _RENAL_BOX_HI))


#: half-size of the homogeneous liver cube around the noise probe, mm
_PROBE_MM = 15.0


def _noise_probe(liver, body, spleen, kidneys, tumor, cyst, spine, vessels, psoas) -> np.ndarray:
    """A point inside the liver with only liver within ``_PROBE_MM`` + 5 mm (for measuring noise).

    Searched on a 5 mm grid over the liver, checked analytically against every structure painted
    over the liver, kept inside the renal box (so every phase's grid covers it); the passing
    point nearest to the middle of the right lobe at kidney level wins. When a huge tumour leaves
    no such point, the clearance is relaxed step by step.
    """
    prefer = np.array([liver.center[0] - 10.0, liver.center[1] - 10.0, 30.0])
    for clear in (_PROBE_MM + 5.0, _PROBE_MM + 2.0, _PROBE_MM - 2.0, _PROBE_MM - 6.0):
        lo = np.maximum(liver.bounds()[0], _RENAL_BOX_LO + clear)
        hi = np.minimum(liver.bounds()[1], _RENAL_BOX_HI - clear)
        axes = [np.arange(lo[j], hi[j] + 1e-9, 5.0) for j in range(3)]
        x, y, z = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
        ok = _Ellipsoid(liver.center, liver.semi - clear, liver.rot).level(x, y, z) <= 1.0
        ok &= body.level(x, y, z, body.cavity_inset + clear) <= 1.0
        blockers = [k.shape.grown(k.fat_mm + clear) for k in kidneys.values()]
        blockers.append(spleen.grown(clear))
        if cyst is not None:
            blockers.append(cyst.grown(5.0 + clear))
        for blocker in blockers:
            ok &= blocker.level(x, y, z) > 1.0
        d = (x - tumor.center[0], y - tumor.center[1], z - tumor.center[2])
        ok &= d[0] ** 2 + d[1] ** 2 + d[2] ** 2 > (tumor.scale * tumor.rmax + 6.0 + clear) ** 2
        columns = [(cx, cy, max(sx, sy) + clear) for cx, cy, sx, sy in vessels.values()]
        columns.append((spine["x"], spine["y"], max(spine["sx"], spine["sy"]) + clear))
        psoas_x = spine["sx"] + 0.9 * 22.0 * psoas["size"]
        columns += [(sgn * psoas_x, psoas["y"], 22.0 * psoas["size"] + clear) for sgn in (1, -1)]
        for cx, cy, r in columns:
            ok &= (x - cx) ** 2 + (y - cy) ** 2 > r**2
        if ok.any():
            cand = np.stack([x[ok], y[ok], z[ok]], axis=1)
            return cand[np.argmin(((cand - prefer) ** 2).sum(axis=1))]
    log.debug("no clean liver point for the noise probe; using the liver centre")
    return np.array([liver.center[0], liver.center[1], 30.0])


def _draw_hu(rng: np.random.Generator) -> tuple[dict[str, dict[str, float]], dict]:
    u = rng.uniform
    kid = u(27.0, 33.0)
    tumor_plain = float(np.clip(u(25.0, 44.0), kid - 8.0, kid + 9.0))  # nearly isodense
    common = {
        "air": -1000.0,
        "subcut_fat": u(-110, -95),
        "fat": u(-100, -85),
        "gas": u(-980, -900),
        "cortical": u(650, 800),
        "cancellous": u(200, 280),
        "disc": u(70, 95),
        "csf": u(5, 15),
        "cyst": u(5, 10),
        "necrosis": u(15, 25),
        "pelvis": u(5, 15),
    }
    common["perirenal_fat"] = common["fat"] - u(0, 8)
    common["sinus_fat"] = common["fat"] + u(5, 15)
    muscle, bowel = u(45, 55), u(30, 40)
    aorta, ivc, liver, spleen = u(35, 45), u(35, 45), u(50, 60), u(40, 50)
    art_amp = u(20, 30)
    per_phase = {
        "plain": {
            "muscle": muscle,
            "bowel": bowel,
            "aorta": aorta,
            "ivc": ivc,
            "liver": liver,
            "spleen": spleen,
            "spleen_texture": 2.0,
            "cortex": kid + u(0, 3),
            "medulla": kid - u(0, 3),
            "kidney_texture": 2.0,
            "tumor": tumor_plain,
            "tumor_texture": 0.0,
            "liver_texture": 2.0,
        },
        "arterial": {
            "muscle": muscle + u(3, 8),
            "bowel": bowel + u(15, 25),
            "aorta": u(260, 340),
            "ivc": u(70, 100),
            "liver": liver + u(10, 20),
            "spleen": u(110, 130),
            "spleen_texture": u(25, 40),
            "cortex": u(165, 200),
            "medulla": u(70, 95),
            "kidney_texture": 8.0,
            "tumor": u(140, 180),
            "tumor_texture": art_amp,
            "liver_texture": 3.0,
        },
        "venous": {
            "muscle": muscle + u(5, 12),
            "bowel": bowel + u(35, 50),
            "aorta": u(150, 180),
            "ivc": u(140, 165),
            "liver": liver + u(50, 65),
            "spleen": u(115, 130),
            "spleen_texture": 4.0,
            "cortex": u(150, 170),
            "medulla": u(145, 165),
            "kidney_texture": 5.0,
            "tumor": u(90, 110),
            "tumor_texture": 0.45 * art_amp,
            "liver_texture": 3.0,
        },
    }
    hu = {p: {**common, **v} for p, v in per_phase.items()}
    return hu, {"kidney_plain_hu": kid}


def _draw_anatomy(rng: np.random.Generator, config: PhantomConfig) -> _Anatomy:
    u = rng.uniform
    body = _Body(
        a=145.0 * u(0.95, 1.05),
        b=102.0 * u(0.95, 1.05),
        n_ant=u(2.1, 2.4),
        n_post=u(2.8, 3.2),
        wobble=u(0.0, 0.02),
        wobble_k=2 * np.pi / u(200, 400),
        wobble_phase=u(0, 2 * np.pi),
        fat=u(8, 20),
        muscle=u(6, 10),
    )
    hu, facts = _draw_hu(rng)

    # spine, muscles, vessels (cylinders along z)
    vb = {"x": 0.0, "y": u(28, 34), "sx": u(19, 23), "sy": u(15, 18), "rim": u(2.0, 3.0)}
    canal_y = vb["y"] + vb["sy"] + u(8, 10)
    spine = {
        **vb,
        "disc_period": u(30, 36),
        "disc_thick": u(7, 10),
        "disc_phase": u(0, 36),
        "canal_y": canal_y,
        "canal_r": u(7, 9),
        "arch": u(4, 6),
        "spinous_y": canal_y + u(20, 26),
        "spinous_sx": u(3.5, 5),
        "spinous_sy": u(10, 13),
    }
    aorta_r = u(9, 12)
    vessels = {
        "aorta": (u(10, 16), vb["y"] - vb["sy"] - aorta_r - u(2, 5), aorta_r, aorta_r),
        "ivc": (-u(18, 24), vb["y"] - vb["sy"] - u(8, 12), u(11, 14), u(7, 10)),
    }
    psoas = {"y": vb["y"] + u(0, 6), "size": u(0.9, 1.1)}
    erector_y = canal_y + u(12, 18)
    erector = [(s * u(30, 36), erector_y, u(22, 28), u(16, 20)) for s in (1.0, -1.0)]

    liver = _Ellipsoid(
        np.array([-u(55, 65), u(-10, 0), u(45, 60)]),
        np.array([u(70, 80), u(65, 75), u(60, 70)]),
        _rotation_between([0, 0, 1], [u(-0.1, 0.1), u(-0.1, 0.1), 1.0]),
    )
    spleen_angle = math.radians(u(20, 35))  # long axis turned towards the left flank
    spleen_rot = _rotation_between([0, 1, 0], [math.sin(spleen_angle), math.cos(spleen_angle), 0])
    spleen = _Ellipsoid(
        np.array([u(80, 90), u(25, 35), u(40, 55)]),
        np.array([u(18, 24), u(40, 50), u(45, 55)]),
        spleen_rot,
    )
    bowel = []
    for _ in range(int(rng.integers(6, 11))):
        loop = _Ellipsoid(
            np.array([u(-85, 85), u(-80, -15), u(-70, 70)]),
            rng.uniform(12, 24, size=3),
            _random_rotation(rng),
        )
        gas = None
        if rng.random() < 0.6:
            r = min(u(3, 8), 0.4 * float(loop.semi.min()))
            off = np.array([u(-0.3, 0.3) * loop.semi[0], 0.0, u(-0.3, 0.3) * loop.semi[2]])
            centre = loop.center + off + np.array([0.0, -0.5 * loop.semi.min(), 0.0])
            gas = _Ellipsoid(centre, np.full(3, r))
        bowel.append((loop, gas))

    # kidneys: tilted ellipsoids, upper pole medial and posterior, hilum anteromedial
    kidneys: dict[str, _Kidney] = {}
    for side, sgn, z0 in (("left", 1.0, 4.0), ("right", -1.0, -4.0)):
        semi = np.array([27.0, 24.0, 52.0]) * u(0.93, 1.05) * rng.uniform(0.95, 1.05, size=3)
        psi = math.radians(u(20, 40))
        lateral = np.array([sgn * math.cos(psi), math.sin(psi), 0.0])
        second = np.array([-sgn * math.sin(psi), math.cos(psi), 0.0])
        base = np.stack([lateral, second, [0.0, 0.0, 1.0]], axis=1)
        tc, ts = math.radians(u(8, 15)), math.radians(u(4, 10))
        axis = _unit([-sgn * math.sin(tc), math.sin(ts), math.cos(tc)])
        rot = _rotation_between([0, 0, 1], axis) @ base
        centre = np.array([sgn * u(62, 70), u(22, 28), z0 + u(-2, 2)])
        shape = _Ellipsoid(centre, semi, rot)
        zlim = _RENAL_BOX_HI[2] - 2.0
        top = abs(centre[2]) + shape.half_extent()[2]
        if top > zlim:  # keep the kidney inside the renal box along z
            shape = _Ellipsoid(centre, semi * (zlim - abs(centre[2])) / shape.half_extent()[2], rot)
        probe = [shape.to_world(shape.semi * d) for d in np.vstack([np.eye(3), -np.eye(3)])]
        probe += [shape.to_world(shape.surface_point(d)) for d in _SPHERE_26]
        for _ in range(60):  # move medially/anteriorly until it sits in the cavity
            if body.in_cavity(np.array(probe), margin=5.0):
                break
            step = np.array([-sgn * 1.0, -0.5, 0.0])
            shape = shape.with_center(shape.center + step)
            probe = [p + step for p in probe]
        s = shape.semi
        kidneys[side] = _Kidney(
            side=side,
            shape=shape,
            cortex_mm=u(5, 7),
            sinus=_Ellipsoid(
                shape.to_world([-0.6 * s[0], 0, 0]), s * np.array([0.5, 0.42, 0.5]), rot
            ),
            pelvis=_Ellipsoid(
                shape.to_world([-0.75 * s[0], 0, 0]), s * np.array([0.3, 0.25, 0.25]), rot
            ),
            fat_mm=u(6, 12),
        )

    def clear_of_midline(c: np.ndarray, r: float) -> bool:
        if math.hypot(c[0] - spine["x"], c[1] - spine["y"]) < max(vb["sx"], vb["sy"]) + r + 4:
            return False
        for vx, vy, sx, sy in vessels.values():
            if math.hypot(c[0] - vx, c[1] - vy) < max(sx, sy) + r + 3:
                return False
        return True

    def fits(c: np.ndarray, r: float) -> bool:
        return (
            _in_renal_box(c - r - 1.0, c + r + 1.0)
            and body.in_cavity(c + r * _SPHERE_26, margin=2.0)
            and clear_of_midline(c, r)
        )

    # tumour: irregular level set scaled to the drawn diameter, placed in one kidney
    tumor_side = "left" if rng.random() < 0.5 else "right"
    kidney = kidneys[tumor_side].shape
    diameter = u(*config.tumor_diameter_mm)
    unit_blob = _draw_blob(rng, anisotropy=0.15, bump=0.15)
    surface = _blob_surface(unit_blob)
    extent_u = _max_extent(surface)
    radius_u = float(np.linalg.norm(surface, axis=1).max())
    exophytic = bool(rng.random() < config.exophytic_probability)
    necrosis_wanted = bool(rng.random() < config.necrosis_probability)
    centre = None
    for attempt in range(400):
        if attempt and attempt % 100 == 0:  # no room: shrink the tumour a little
            diameter = max(config.tumor_diameter_mm[0], 0.9 * diameter)
        r = diameter / extent_u * radius_u
        depth = u(0.85, 1.1) if exophytic else u(0.0, 0.5)
        cand = kidney.to_world(depth * kidney.surface_point(_random_unit(rng)))
        if fits(cand, r):
            centre = cand
            break
    if centre is None:  # the kidney centre always fits the smallest tumours
        centre = kidney.center.copy()
        diameter = config.tumor_diameter_mm[0]
        log.debug("tumour placement fell back to the kidney centre")
    scale = diameter / extent_u
    tumor = unit_blob.replace(center=centre, scale=scale, rmax=radius_u * 1.01)

    necrosis = None
    if necrosis_wanted and diameter >= 20.0:
        core = _draw_blob(rng, anisotropy=0.15, bump=0.1)
        rel = u(0.3, 0.5)
        offset = rng.uniform(-0.1, 0.1, size=3) * scale
        necrosis = core.replace(center=centre + offset, scale=scale * rel)

    # cyst: a small ellipsoid in either kidney, clear of the tumour
    cyst, cyst_side = None, None
    if rng.random() < config.cyst_probability:
        side = "left" if rng.random() < 0.5 else "right"
        host = kidneys[side].shape
        radius = u(4, 15)
        semi = radius * rng.uniform(0.9, 1.1, size=3)
        rot = _random_rotation(rng)
        for _ in range(200):
            c = host.to_world(u(0.55, 1.0) * host.surface_point(_random_unit(rng)))
            far = np.linalg.norm(c - centre) > semi.max() + scale * radius_u + 3.0
            if far and fits(c, float(semi.max())):
                cyst, cyst_side = _Ellipsoid(c, semi, rot), side
                break

    # analytic truth of the tumour: centroid, volume, part outside the kidney
    n = 48
    g = np.linspace(-radius_u * 1.01, radius_u * 1.01, n)
    step = g[1] - g[0]
    gx, gy, gz = np.meshgrid(g, g, g, indexing="ij")
    inside = tumor.level_u(gx, gy, gz) <= 0
    pts = np.stack([gx[inside], gy[inside], gz[inside]], 1) * scale + centre
    centroid = pts.mean(0)
    outside = kidney.level(pts[:, 0], pts[:, 1], pts[:, 2]) > 1.0

    fields = {
        "tumor": _random_field(rng, 12, (8.0, 24.0)),
        "tumor_fine": _random_field(rng, 10, (5.0, 10.0)),
        "tumor_coarse": _random_field(rng, 6, (15.0, 40.0)),
        "kidney": _random_field(rng, 8, (10.0, 30.0)),
        "liver": _random_field(rng, 6, (30.0, 80.0)),
        "spleen": _random_field(rng, 10, (8.0, 20.0)),
    }
    noise_probe = _noise_probe(liver, body, spleen, kidneys, tumor, cyst, spine, vessels, psoas)
    facts.update(
        tumor_kidney_side=tumor_side,
        tumor_diameter_mm=float(diameter),
        tumor_volume_ml=float(inside.sum() * (step * scale) ** 3 / 1000.0),
        tumor_fraction_outside_kidney=float(outside.mean()),
        exophytic=exophytic,
        necrosis=necrosis is not None,
        cyst_present=cyst is not None,
        cyst_kidney_side=cyst_side,
        cyst_radius_mm=None if cyst is None else float(cyst.semi.mean()),
        _tumor_center=centre,
        _tumor_centroid=centroid,
        _cyst_center=None if cyst is None else cyst.center,
    )
    return _Anatomy(
        body=body,
        spine=spine,
        vessels=vessels,
        psoas=psoas,
        erector=erector,
        liver=liver,
        spleen=spleen,
        bowel=bowel,
        kidneys=kidneys,
        tumor=tumor,
        tumor_side=tumor_side,
        necrosis=necrosis,
        cyst=cyst,
        cyst_side=cyst_side,
        fields=fields,
        hu=hu,
        facts=facts,
        noise_probe=noise_probe,
    )


# ----------------------------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------------------------
def _cover_shift(w0, n, s, need_lo, need_hi):
    """Shift a 1D grid by whole steps (and add steps on top if needed) to cover [lo, hi]."""
    if w0 > need_lo:
        w0 -= math.ceil((w0 - need_lo) / s - 1e-9) * s
    top = w0 + (n - 1) * s
    if top < need_hi:
        k = math.ceil((need_hi - top) / s - 1e-9)
        up = min(k, math.floor((need_lo - w0) / s + 1e-9))
        w0 += up * s
        n += k - up
    return w0, n


def _draw_grids(rng: np.random.Generator, config: PhantomConfig, lo, hi, motions) -> dict:
    """Per phase: (start xyz, counts xyz, spacing xyz) of an axis-aligned grid, all phases."""
    n = np.array(config.shape[::-1], dtype=int)  # world-axis order x, y, z
    s = np.array(config.spacing[::-1], dtype=np.float64)
    grids = {}
    # plain: centred on the body axis and kidneys, jittered, shifted continuously to cover
    w0 = rng.uniform(-0.5, 0.5, size=3) * s - (n - 1) * s / 2
    need_lo, need_hi = lo + motions["plain"] - s, hi + motions["plain"] + s
    w0 = np.clip(w0, need_hi - (n - 1) * s, need_lo)
    grids["plain"] = (w0, n.copy(), s.copy())
    for phase in PHASES[1:]:
        factor = float(rng.choice([5 / 6, 1.0, 7 / 6]))
        s2 = s.copy()
        if config.vary_z_spacing:
            s2[2] = s[2] * factor
        n2 = n.copy()
        n2[2] = max(2, round((n[2] - 1) * s[2] / s2[2]) + 1 + int(rng.integers(-2, 3)))
        delta = rng.uniform(0.15, 0.85, size=3) * np.where(rng.random(3) < 0.5, -1.0, 1.0) * s2
        delta[2] += int(rng.integers(-2, 3)) * s2[2]  # a different table start
        m = motions[phase]
        for _ in range(50):
            start, counts = w0 + delta, n2.copy()
            for j in range(3):
                start[j], counts[j] = _cover_shift(
                    start[j], int(counts[j]), s2[j], lo[j] + m[j] - s2[j], hi[j] + m[j] + s2[j]
                )
            # the offset from the plain grid must be a non-integer number of voxels in both
            # spacings (whole-step shifts for coverage keep it in s2, not in s when they differ)
            off = start - w0
            bad = [
                j
                for j in range(3)
                if not (0.1 < (off[j] / s[j]) % 1.0 < 0.9 and 0.1 < (off[j] / s2[j]) % 1.0 < 0.9)
            ]
            if not bad:
                break
            delta[bad] += 0.23 * s2[bad]
        grids[phase] = (start, counts, s2)
    return grids


def _make_geometry(start, counts, spacing, flips) -> Geometry:
    """Geometry from an axis-aligned world grid, flipping array axes where ``flips[a]``."""
    direction = np.eye(3)[:, ::-1].copy()  # column a (array axis z, y, x) -> world z, y, x
    origin = np.array(start, dtype=np.float64)
    for a in range(3):
        if flips[a]:
            j = 2 - a  # world axis of array axis a
            direction[:, a] *= -1.0
            origin[j] = start[j] + (counts[j] - 1) * spacing[j]
    return Geometry(
        shape=tuple(int(c) for c in counts[::-1]),
        spacing=tuple(float(v) for v in spacing[::-1]),
        origin=tuple(float(v) for v in origin),
        direction=direction,
    )


class _Sampler:
    """Anatomical coordinates of the voxel centres of a grid, for the whole grid or a block.

    Anatomical = world minus the phase's motion. Coordinates are returned as three arrays
    broadcastable to the block shape (``(nz, 1, 1)``-like for axis-aligned grids).
    """

    def __init__(self, geometry: Geometry, motion) -> None:
        self.shape = geometry.shape
        self._m = geometry.direction * np.asarray(geometry.spacing)[None, :]
        self._minv = np.linalg.inv(self._m)
        self._o = np.asarray(geometry.origin) - np.asarray(motion, dtype=np.float64)

    def coords(self, lo=(0, 0, 0), hi=None):
        hi = self.shape if hi is None else hi
        idx = [
            np.arange(lo[a], hi[a], dtype=np.float64).reshape(
                [-1 if b == a else 1 for b in range(3)]
            )
            for a in range(3)
        ]
        out = []
        for j in range(3):
            v = np.float64(self._o[j])
            for a in range(3):
                if self._m[j, a] != 0.0:
                    v = v + self._m[j, a] * idx[a]
            out.append(np.asarray(v))
        return tuple(slice(lo[a], hi[a]) for a in range(3)), out

    def block(self, lo_xyz, hi_xyz):
        """Slices and coordinates of the index block covering an anatomical box, or None."""
        lo_xyz, hi_xyz = np.maximum(lo_xyz, -1e5), np.minimum(hi_xyz, 1e5)
        corners = np.array(
            [
                [x, y, z]
                for x in (lo_xyz[0], hi_xyz[0])
                for y in (lo_xyz[1], hi_xyz[1])
                for z in (lo_xyz[2], hi_xyz[2])
            ]
        )
        idx = (corners - self._o) @ self._minv.T
        a = np.clip(np.floor(idx.min(0)).astype(int), 0, self.shape)
        b = np.clip(np.ceil(idx.max(0)).astype(int) + 1, 0, self.shape)
        if np.any(b <= a):
            return None
        return self.coords(a, b)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
_INF = 1e5


def _paint(img, sl, mask, value, restrict=None) -> None:
    view = img[sl]
    mask = np.broadcast_to(mask, view.shape)
    if restrict is not None:
        mask = mask & restrict[sl]
    np.copyto(view, value, where=mask)


def _render(anat: _Anatomy, phase: str, smp: _Sampler) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless float32 HU image and uint8 KiTS labels of one phase on one grid."""
    hu = anat.hu[phase]
    f = anat.fields
    img = np.full(smp.shape, hu["air"], dtype=np.float32)
    lab = np.zeros(smp.shape, dtype=np.uint8)
    _, (x, y, z) = smp.coords()
    body = anat.body
    in_body = body.level(x, y, z, 0.0) <= 1.0
    img[in_body] = hu["subcut_fat"]
    in_wall = body.level(x, y, z, body.fat) <= 1.0
    img[in_wall] = hu["muscle"]
    cavity = body.level(x, y, z, body.cavity_inset) <= 1.0
    img[cavity] = hu["fat"]

    def box2d(cx, cy, sx, sy):
        return np.array([cx - sx, cy - sy, -_INF]), np.array([cx + sx, cy + sy, _INF])

    # paraspinal muscles (inside the body wall)
    for cx, cy, sx, sy in anat.erector:
        blk = smp.block(*box2d(cx, cy, sx, sy))
        if blk:
            sl, (bx, by, _) = blk
            _paint(
                img, sl, ((bx - cx) / sx) ** 2 + ((by - cy) / sy) ** 2 <= 1, hu["muscle"], in_wall
            )

    # bowel loops with gas, liver, spleen (inside the cavity)
    for loop, gas in anat.bowel:
        blk = smp.block(*loop.bounds())
        if blk:
            sl, (bx, by, bz) = blk
            _paint(img, sl, loop.level(bx, by, bz) <= 1, hu["bowel"], cavity)
            if gas is not None:
                _paint(img, sl, gas.level(bx, by, bz) <= 1, hu["gas"], cavity)
    for organ, key in ((anat.liver, "liver"), (anat.spleen, "spleen")):
        blk = smp.block(*organ.bounds())
        if blk:
            sl, (bx, by, bz) = blk
            value = hu[key] + hu[f"{key}_texture"] * f[key](bx, by, bz)
            _paint(img, sl, organ.level(bx, by, bz) <= 1, value, cavity)

    # psoas muscles: grow towards the pelvis
    sp, ps = anat.spine, anat.psoas
    for sgn in (1.0, -1.0):
        blk = smp.block(
            np.array([sgn * 70, ps["y"] - 30, -_INF]),
            np.array([sgn * sp["sx"] * 0.8, ps["y"] + 30, _INF]),
        )
        if blk:
            sl, (bx, by, bz) = blk
            sx = np.clip(13.0 - 0.07 * bz, 8.0, 20.0) * ps["size"]
            cx = sgn * (sp["sx"] + 0.9 * sx)
            _paint(
                img,
                sl,
                ((bx - cx) / sx) ** 2 + ((by - ps["y"]) / (0.8 * sx)) ** 2 <= 1,
                hu["muscle"],
                cavity,
            )

    # perirenal fat around the kidneys, the tumour and the cyst
    capsules = [k.shape.grown(k.fat_mm) for k in anat.kidneys.values()]
    for cap in capsules:
        blk = smp.block(*cap.bounds())
        if blk:
            sl, (bx, by, bz) = blk
            _paint(img, sl, cap.level(bx, by, bz) <= 1, hu["perirenal_fat"], cavity)
    t = anat.tumor
    t_cap = t.replace(scale=t.scale + 6.0 / t.rmax)
    blk = smp.block(*t_cap.bounds())
    if blk:
        sl, (bx, by, bz) = blk
        _paint(img, sl, t_cap.level(bx, by, bz) <= 0, hu["perirenal_fat"], cavity)
    if anat.cyst is not None:
        cap = anat.cyst.grown(5.0)
        blk = smp.block(*cap.bounds())
        if blk:
            sl, (bx, by, bz) = blk
            _paint(img, sl, cap.level(bx, by, bz) <= 1, hu["perirenal_fat"], cavity)

    # aorta and IVC
    for key, (cx, cy, sx, sy) in anat.vessels.items():
        blk = smp.block(*box2d(cx, cy, sx, sy))
        if blk:
            sl, (bx, by, _) = blk
            _paint(img, sl, ((bx - cx) / sx) ** 2 + ((by - cy) / sy) ** 2 <= 1, hu[key])

    # spine: vertebral bodies (cortical rim, cancellous core) with discs, canal, arch, process
    blk = smp.block(*box2d(sp["x"], sp["y"], sp["sx"], sp["sy"]))
    if blk:
        sl, (bx, by, bz) = blk
        outer = ((bx - sp["x"]) / sp["sx"]) ** 2 + ((by - sp["y"]) / sp["sy"]) ** 2 <= 1
        inner = ((bx - sp["x"]) / (sp["sx"] - sp["rim"])) ** 2 + (
            (by - sp["y"]) / (sp["sy"] - sp["rim"])
        ) ** 2 <= 1
        disc = np.mod(bz - sp["disc_phase"], sp["disc_period"]) < sp["disc_thick"]
        _paint(img, sl, outer, hu["cortical"])
        _paint(img, sl, inner, hu["cancellous"])
        _paint(img, sl, outer & disc, hu["disc"])
    r_arch = sp["canal_r"] + sp["arch"]
    blk = smp.block(*box2d(0.0, sp["canal_y"], r_arch, r_arch))
    if blk:
        sl, (bx, by, _) = blk
        rr = bx**2 + (by - sp["canal_y"]) ** 2
        _paint(img, sl, rr <= r_arch**2, hu["cortical"] * 0.8)
        _paint(img, sl, rr <= sp["canal_r"] ** 2, hu["csf"])
    blk = smp.block(*box2d(0.0, sp["spinous_y"], sp["spinous_sx"], sp["spinous_sy"]))
    if blk:
        sl, (bx, by, _) = blk
        m = (bx / sp["spinous_sx"]) ** 2 + ((by - sp["spinous_y"]) / sp["spinous_sy"]) ** 2 <= 1
        _paint(img, sl, m, hu["cortical"] * 0.8, in_body)

    # kidneys: cortex shell, medulla, sinus fat and pelvis at the hilum
    for kid in anat.kidneys.values():
        blk = smp.block(*kid.shape.bounds())
        if not blk:
            continue
        sl, (bx, by, bz) = blk
        kidney = kid.shape.level(bx, by, bz) <= 1
        inner = _Ellipsoid(kid.shape.center, kid.shape.semi - kid.cortex_mm, kid.shape.rot)
        medulla = inner.level(bx, by, bz) <= 1
        sinus = (kid.sinus.level(bx, by, bz) <= 1) & kidney
        texture = hu["kidney_texture"] * f["kidney"](bx, by, bz)
        _paint(img, sl, kidney, hu["cortex"] + texture)
        _paint(img, sl, medulla, hu["medulla"] + texture)
        _paint(img, sl, sinus, hu["sinus_fat"])
        _paint(img, sl, (kid.pelvis.level(bx, by, bz) <= 1) & sinus, hu["pelvis"])
        _paint(lab, sl, kidney & ~sinus, 1)

    if anat.cyst is not None:
        blk = smp.block(*anat.cyst.bounds())
        if blk:
            sl, (bx, by, bz) = blk
            m = anat.cyst.level(bx, by, bz) <= 1
            _paint(img, sl, m, hu["cyst"])
            _paint(lab, sl, m, 3)

    blk = smp.block(*t.bounds())
    if blk:
        sl, (bx, by, bz) = blk
        m = t.level(bx, by, bz) <= 0
        fine = f["tumor_fine"](bx, by, bz)
        if phase == "plain":
            value = hu["tumor"] + 4.0 * fine + 3.0 * f["tumor_coarse"](bx, by, bz)
        else:
            het = np.clip(f["tumor"](bx, by, bz), -2.0, 2.0)
            value = hu["tumor"] + hu["tumor_texture"] * het + 3.0 * fine
        _paint(img, sl, m, value)
        if anat.necrosis is not None:
            core = (anat.necrosis.level(bx, by, bz) <= 0) & m
            _paint(img, sl, core, hu["necrosis"] + 2.0 * fine)
        _paint(lab, sl, m, 2)
    return img, lab


def _finish(img: np.ndarray, sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Partial-volume blur, correlated Gaussian noise of std ``sigma_hu``, int16 HU."""
    out = ndimage.gaussian_filter(img, _BLUR_SIGMA_VOXELS, mode="nearest", truncate=3.0)
    if sigma_hu > 0:
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, _NOISE_CORRELATION_VOXELS, mode="wrap", truncate=3.0)
        out += noise * np.float32(sigma_hu / float(noise.std()))
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _check_index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _round_list(v, nd: int = 3) -> list[float]:
    return [round(float(a), nd) for a in v]


def generate_case(
    case_index: int, *, seed: int, config: PhantomConfig | None = None
) -> PhantomCase:
    """Make one phantom case.

    Deterministic: the case depends only on ``(seed, case_index)`` and ``config`` (through
    ``np.random.default_rng([seed, case_index])``), so case ``i`` is the same whatever the size
    of the cohort. The anatomy, motion and grids of a phase do not depend on which other phases
    are requested, nor on ``config.random_flips`` (flips only reorient the arrays).

    Args:
        case_index: case number >= 0; the id is ``case_{case_index:05d}``.
        seed: cohort seed >= 0.
        config: generator settings (default ``PhantomConfig()``).

    Returns:
        PhantomCase with, per phase in ``config.phases``, an int16 HU image and a uint8 KiTS
        label map on that phase's own grid, and the JSON-ready truth.
    """
    case_index = _check_index(case_index, "case_index")
    seed = _check_index(seed, "seed")
    config = PhantomConfig() if config is None else config
    if not isinstance(config, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig, got {type(config).__name__}")
    rng = np.random.default_rng([seed, case_index])
    anat = _draw_anatomy(rng, config)
    m = config.motion_mm
    motions = {p: np.zeros(3) if p == "plain" else rng.uniform(-m, m, size=3) for p in PHASES}
    lo, hi = anat.renal_bounds()
    grids = _draw_grids(rng, config, lo, hi, motions)
    flips = {p: rng.random(3) < 0.5 for p in PHASES}
    if config.random_flips and not any(flips[p].any() for p in config.phases):
        flips[config.phases[-1]][2] = True  # at least one non-identity direction
    sigma = float(rng.uniform(*config.noise_hu))
    noise_seeds = {p: int(rng.integers(0, 2**63 - 1)) for p in PHASES}

    case_id = f"case_{case_index:05d}"
    images: dict[str, Volume] = {}
    labels: dict[str, Volume] = {}
    for phase in config.phases:
        start, counts, spacing = grids[phase]
        geometry = _make_geometry(
            start, counts, spacing, flips[phase] if config.random_flips else (False,) * 3
        )
        noiseless, lab = _render(anat, phase, _Sampler(geometry, motions[phase]))
        image = _finish(noiseless, sigma, np.random.default_rng(noise_seeds[phase]))
        images[phase] = Volume(array=image, geometry=geometry)
        labels[phase] = Volume(array=lab, geometry=geometry)

    facts = anat.facts
    truth = {
        "case_id": case_id,
        "seed": seed,
        "case_index": case_index,
        "tumor_kidney_side": facts["tumor_kidney_side"],
        "tumor_diameter_mm": round(facts["tumor_diameter_mm"], 3),
        "tumor_volume_ml": round(facts["tumor_volume_ml"], 3),
        "tumor_fraction_outside_kidney": round(facts["tumor_fraction_outside_kidney"], 4),
        "exophytic": facts["exophytic"],
        "necrosis": facts["necrosis"],
        "tumor_center_lps_mm": {
            p: _round_list(facts["_tumor_center"] + motions[p]) for p in config.phases
        },
        "tumor_centroid_lps_mm": {
            p: _round_list(facts["_tumor_centroid"] + motions[p]) for p in config.phases
        },
        "tumor_plain_hu": round(anat.hu["plain"]["tumor"], 2),
        "tumor_hu": {p: round(anat.hu[p]["tumor"], 2) for p in PHASES},
        "kidney_hu": {
            p: {
                "cortex": round(anat.hu[p]["cortex"], 2),
                "medulla": round(anat.hu[p]["medulla"], 2),
            }
            for p in PHASES
        },
        "cyst_present": facts["cyst_present"],
        "cyst_kidney_side": facts["cyst_kidney_side"],
        "cyst_radius_mm": None
        if facts["cyst_radius_mm"] is None
        else round(facts["cyst_radius_mm"], 3),
        "cyst_center_lps_mm": None
        if facts["_cyst_center"] is None
        else {p: _round_list(facts["_cyst_center"] + motions[p]) for p in config.phases},
        "kidney_center_lps_mm": {
            side: _round_list(k.shape.center) for side, k in anat.kidneys.items()
        },
        "motion_mm": {p: _round_list(motions[p]) for p in config.phases},
        "noise_sigma_hu": round(sigma, 3),
        "noise_probe_lps_mm": {
            p: _round_list(anat.noise_probe + motions[p]) for p in config.phases
        },
        "grids": {p: images[p].geometry.to_dict() for p in config.phases},
    }
    log.debug(
        "%s: tumour %.1f mm in the %s kidney",
        case_id,
        facts["tumor_diameter_mm"],
        facts["tumor_kidney_side"],
    )
    return PhantomCase(case_id=case_id, phases=images, labels=labels, truth=truth)


def _dataset_json(phase: str, num_training: int) -> dict:
    return {
        "name": f"RenalPhantom{phase.capitalize()}",
        "description": (
            f"Synthetic renal CT phantom, {phase} phase, KiTS labels (slidesam phantom). "
            "Each phase lies on its own grid with true patient motion between phases."
        ),
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in sorted(KITS_LABELS.items())},
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "phase": phase,
    }


def _write_case(index: int, seed: int, config: PhantomConfig, out_dir: str) -> dict:
    case = generate_case(index, seed=seed, config=config)
    root = Path(out_dir)
    for phase in config.phases:
        folder = root / dataset_folder_name(phase)
        write_image(case.phases[phase], folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        write_mask(
            case.labels[phase].array,
            case.phases[phase],
            folder / "labelsTr" / f"{case.case_id}.nii.gz",
        )
    return case.truth


def _check_out_dir(out: Path, seed: int, config: PhantomConfig) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose a folder for the phantom")
    meta = out / "phantom.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
            old_seed, old_config = old["seed"], old["config"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(
                f"{meta}: unreadable phantom metadata; delete the folder or choose another one"
            ) from None
        new_config = config.to_dict()
        if old_seed != seed or old_config != new_config:
            what = [f"seed {old_seed} != {seed}"] if old_seed != seed else []
            what += [
                f"{k} {old_config.get(k)!r} != {v!r}"
                for k, v in new_config.items()
                if old_config.get(k) != v
            ]
            raise InputError(
                f"{out}: already holds a phantom made with different settings "
                f"({'; '.join(what)}); choose another folder or delete it"
            )
        return
    for phase in PHASES:
        folder = out / dataset_folder_name(phase)
        if folder.is_dir() and any(folder.iterdir()):
            raise InputError(
                f"{folder}: exists but {out} has no phantom.json, so it was not written by "
                "slidesam phantom; choose another folder"
            )


def write_cohort(
    out_dir: str | Path,
    *,
    cases: int,
    seed: int,
    config: PhantomConfig | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Generate ``cases`` phantom cases and write them as nnU-Net v2 raw datasets.

    Layout, one dataset per phase (ids fixed: plain 501, arterial 502, venous 503)::

        out_dir/phantom.json                                   config, seed, every case's truth
        out_dir/Dataset501_RenalPhantomPlain/dataset.json
        out_dir/Dataset501_RenalPhantomPlain/imagesTr/case_00000_0000.nii.gz   int16 HU
        out_dir/Dataset501_RenalPhantomPlain/labelsTr/case_00000.nii.gz        uint8 KiTS labels

    Re-running with the same seed and config rewrites the same files (and removes case files
    beyond ``cases`` left by a larger earlier run); a folder holding a phantom made with another
    seed or config is refused with an ``InputError``.

    Args:
        out_dir: output folder (created).
        cases: number of cases, >= 1; ids ``case_00000`` ... .
        seed: cohort seed, >= 0.
        config: generator settings (default ``PhantomConfig()``).
        workers: processes generating cases in parallel (1: in this process).
        progress: show a tqdm progress bar over cases.

    Returns:
        Summary: ``{"out_dir", "phantom_json", "datasets": {phase: folder}, "cases",
        "case_ids"}``.
    """
    config = PhantomConfig() if config is None else config
    if not isinstance(config, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig, got {type(config).__name__}")
    seed = _check_index(seed, "seed")
    if isinstance(cases, bool) or not isinstance(cases, int | np.integer) or cases < 1:
        raise InputError(f"cases must be a positive integer, got {cases!r}")
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    cases, workers = int(cases), int(workers)
    out = Path(out_dir)
    _check_out_dir(out, seed, config)
    out.mkdir(parents=True, exist_ok=True)
    datasets = {p: out / dataset_folder_name(p) for p in config.phases}
    meta = {
        "generator": "slidesam.data.phantom",
        "seed": seed,
        "config": config.to_dict(),
        "num_cases": cases,
        "complete": False,
        "datasets": {p: d.name for p, d in datasets.items()},
        "cases": [],
    }
    (out / "phantom.json").write_text(json.dumps(meta, indent=2))

    truths: list[dict | None] = [None] * cases
    bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
    try:
        if workers == 1:
            for i in range(cases):
                truths[i] = _write_case(i, seed, config, str(out))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, cases)) as pool:
                futures = {
                    pool.submit(_write_case, i, seed, config, str(out)): i for i in range(cases)
                }
                for fut in as_completed(futures):
                    truths[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()

    for phase, folder in datasets.items():
        for sub in ("imagesTr", "labelsTr"):
            for path in (folder / sub).glob("case_*.nii.gz"):
                match = _CASE_FILE.match(path.name)
                if match and int(match.group(1)) >= cases:
                    path.unlink()
                    log.info("removed %s (beyond %d cases)", path, cases)
        (folder / "dataset.json").write_text(json.dumps(_dataset_json(phase, cases), indent=2))
    meta.update(complete=True, cases=truths)
    (out / "phantom.json").write_text(json.dumps(meta, indent=2))
    log.info("wrote %d phantom cases (%s) to %s", cases, ", ".join(config.phases), out)
    return {
        "out_dir": str(out),
        "phantom_json": str(out / "phantom.json"),
        "datasets": {p: str(d) for p, d in datasets.items()},
        "cases": cases,
        "case_ids": [f"case_{i:05d}" for i in range(cases)],
    }

"""Label conventions shared by phantoms, evaluation and the pipelines.

KiTS convention (KiTS21/KiTS23): 0 background, 1 kidney, 2 tumor, 3 cyst, and the
hierarchical evaluation regions of the challenge.
"""

from __future__ import annotations

__all__ = ["KITS_LABELS", "KITS_REGIONS", "PHASES"]

#: label value -> class name
KITS_LABELS: dict[int, str] = {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}

#: region name -> label values merged into it (KiTS "kidney and masses", "masses", "tumor")
KITS_REGIONS: dict[str, tuple[int, ...]] = {
    "kidney_and_masses": (1, 2, 3),
    "masses": (2, 3),
    "tumor": (2,),
}

#: contrast phases of multi-phase renal CT, in acquisition order
PHASES: tuple[str, ...] = ("plain", "arterial", "venous")

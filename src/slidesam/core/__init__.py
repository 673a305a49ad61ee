"""Small typed objects shared by every layer. Importing this needs numpy only, never torch."""

from slidesam.core.errors import InputError
from slidesam.core.geometry import Geometry
from slidesam.core.labels import KITS_LABELS, KITS_REGIONS, PHASES
from slidesam.core.volume import Volume

__all__ = ["KITS_LABELS", "KITS_REGIONS", "PHASES", "Geometry", "InputError", "Volume"]

"""Guest images: predicted TDX measurements of a direct kernel boot under TDVF.

``predict(firmware=..., kernel=..., initrd=..., cmdline=...)`` returns the MRTD and
RTMR values a TD booted from these files reports, with a note for each register that
cannot be predicted. See :mod:`tdxvm.image.measure` and ``docs/measurements.md``.
"""

from tdxvm.image.measure import (
    DEFAULT_PROFILE,
    PROFILES,
    REGISTERS,
    ExpectedEvent,
    Measurements,
    Profile,
    predict,
)
from tdxvm.image.measureerrors import MeasureError

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "REGISTERS",
    "ExpectedEvent",
    "MeasureError",
    "Measurements",
    "Profile",
    "predict",
]

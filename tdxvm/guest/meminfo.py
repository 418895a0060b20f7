"""How much memory the guest has available (``MemAvailable`` of ``/proc/meminfo``)."""

from __future__ import annotations


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping; None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None

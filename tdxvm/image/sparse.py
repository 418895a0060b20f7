"""Where a sparse file holds data: ``lseek(2)`` ``SEEK_DATA``/``SEEK_HOLE``.

The build writes its root filesystem sparse (mke2fs writes only the blocks it uses, at
the payload offset of the disk file), so the steps after it skip the holes, which read as
zeros, instead of reading them: the verity step hashes only the data, and a payload is
copied without writing its holes. A file system that cannot tell holes reports the whole
file as data (Linux's generic ``SEEK_DATA``), which is slower, never wrong.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


def data_ranges(fd: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """The ranges ``[a, b)`` of ``[start, stop)`` in the file open as ``fd`` that may hold
    non-zero bytes, in order; every byte outside them reads as zero."""
    at = start
    while at < stop:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes from here to the end of the file
                return
            raise
        if data >= stop:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), stop)
        yield data, hole
        at = hole


def copy_data(src: int, dst: int, *, size: int, dst_offset: int) -> None:
    """Copy the first ``size`` bytes of ``src`` to ``dst`` at ``dst_offset``, data ranges
    only: the holes of ``src`` stay holes in ``dst`` (which must read as zeros there, as
    a freshly truncated file does)."""
    for start, end in data_ranges(src, 0, size):
        at = start
        while at < end:
            done = os.copy_file_range(src, dst, end - at, at, dst_offset + at)
            if done == 0:
                raise OSError(errno.EIO, f"the source ended at {at} bytes while it was being copied")
            at += done

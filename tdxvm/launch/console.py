"""The serial console log of a VM, read through libvirt so remote hosts work too.

The serial port writes to ``<vm>.serial.log``, a volume in tdxvm's pool; its tail is
downloaded with ``virStorageVolDownload``. libvirt's test driver runs no guest and has no
log to read. The guest is not trusted: terminal escape sequences and control characters
in its output are removed before anything reaches the operator's terminal.
"""

from __future__ import annotations

import os
import re
import stat
import xml.etree.ElementTree as ET
from contextlib import suppress
from pathlib import Path

import libvirt

from tdxvm.launch.connection import is_local, is_test_driver, libvirt_message
from tdxvm.launch.errors import ConsoleError
from tdxvm.launch.lifecycle import lookup
from tdxvm.launch.volumes import POOL_NAME, pool_path
from tdxvm.textsafe import safe_text

MAX_HOST_FILE = 1 << 30  # what read_host_file takes at most (a host reports the size)
MAX_TAIL = 4 << 20
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def serial_path(domain_xml: str) -> str | None:
    """The file the domain's first serial port writes to, if it writes to one."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    src = root.find("devices/serial[@type='file']/source")
    return src.get("path") if src is not None else None


def clean(raw: bytes) -> str:
    """Guest output made safe for a terminal: UTF-8 (invalid bytes replaced), its colour and
    cursor sequences dropped, any other control character shown as an escape (:func:`safe_text`)."""
    return safe_text(_CONTROL.sub("", raw.decode("utf-8", errors="replace").replace("\r\n", "\n")))


def serial_log_tail(conn: libvirt.virConnect, name: str, *, lines: int = 50) -> str:
    """The last ``lines`` lines of VM ``name``'s serial console log."""
    dom, meta = lookup(conn, name)
    path = meta.labels.get("serial_log") or serial_path(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    if not path:
        raise ConsoleError(f"VM {name} has no serial log file")
    pool = meta.labels.get("pool", POOL_NAME)
    tail = clean(_read_tail(conn, path, lines, pool_name=pool)).splitlines()[-lines:] if lines > 0 else []
    return "".join(line + "\n" for line in tail)


def read_host_file(conn: libvirt.virConnect, path: str) -> bytes:
    """A whole file of the libvirt host that is a storage volume (kernel, initramfs), read
    through libvirt so that remote hosts work the same; local files directly."""
    uri = conn.getURI()
    try:
        vol = conn.storageVolLookupByPath(path)
        size = vol.info()[1]
    except libvirt.libvirtError:
        if is_local(uri) and not is_test_driver(uri):
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConsoleError(f"{path}: {exc.strerror or exc}") from None
        raise ConsoleError(
            f"{path} is not a volume libvirt on {uri} knows: tdxvm reads another host's files only through "
            "libvirt's storage pools (an emulated guest's firmware: leave the VM spec's firmware: out and the "
            "image's TDVF goes into tdxvm's pool, or name a file in a pool of the host)"
        ) from None
    if size > MAX_HOST_FILE:
        raise ConsoleError(f"{path} on {uri} is {size} bytes: more than a kernel, initramfs or firmware")
    return _download(conn, vol, 0, size, path)


def _local_tail(conn: libvirt.virConnect, path: str, pool_name: str = POOL_NAME) -> bytes:
    """The end of a serial log that libvirt's pool has not listed yet (QEMU made it after the
    pool's last refresh): only a regular file directly in tdxvm's pool folder, never through a
    symlink. The path is a metadata label, which the host writes: it must not make the
    controller read (or hang on) any other file of this machine."""
    try:
        folder = pool_path(conn.storagePoolLookupByName(pool_name))
    except libvirt.libvirtError as exc:
        raise ConsoleError(f"serial log {path}: no tdxvm pool: {libvirt_message(exc)}") from None
    if os.path.dirname(os.path.normpath(path)) != os.path.normpath(folder):
        raise ConsoleError(f"serial log {path} is not in tdxvm's pool {folder}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ConsoleError(f"serial log {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno())
        if not stat.S_ISREG(size.st_mode):
            raise ConsoleError(f"serial log {path} is not a regular file")
        f.seek(max(0, size.st_size - MAX_TAIL))
        return f.read(MAX_TAIL)


def _read_tail(conn: libvirt.virConnect, path: str, lines: int, *, pool_name: str = POOL_NAME) -> bytes:
    uri = conn.getURI()
    try:
        vol = conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        vol = None
    if vol is None:
        if is_local(uri) and not is_test_driver(uri):
            return _local_tail(conn, path, pool_name)
        raise ConsoleError(f"serial log {path} is not a volume libvirt on {uri} knows")
    want = max(lines, 1) * 160
    while True:
        try:
            size = vol.info()[1]
        except libvirt.libvirtError as exc:
            raise ConsoleError(f"cannot read serial log {path} on {uri}: {libvirt_message(exc)}") from None
        offset = max(0, size - want)
        data = _download(conn, vol, offset, size - offset, path)
        if offset == 0 or data.count(b"\n") > lines or want >= MAX_TAIL:
            return data
        want *= 4


def _download(conn: libvirt.virConnect, vol: libvirt.virStorageVol, offset: int, length: int, path: str) -> bytes:
    if length <= 0:
        return b""
    stream = conn.newStream(0)
    try:
        vol.download(stream, offset, length, 0)
        chunks, received = [], 0
        while chunk := stream.recv(256 * 1024):
            if isinstance(chunk, int):  # -2: would block; a blocking stream does not
                break
            received += len(chunk)
            if received > length:  # the host's libvirt streams what it likes: never more than was asked
                stream.abort()
                raise ConsoleError(f"{path} on {conn.getURI()}: libvirt sent more than the {length} bytes asked for")
            chunks.append(chunk)
        stream.finish()
        return b"".join(chunks)
    except libvirt.libvirtError as exc:
        with suppress(libvirt.libvirtError):
            stream.abort()
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            raise ConsoleError(
                f"the libvirt driver at {conn.getURI()} keeps no serial log to read (libvirt's test "
                "driver runs no guest)"
            ) from None
        raise ConsoleError(f"cannot read serial log {path}: {libvirt_message(exc)}") from None

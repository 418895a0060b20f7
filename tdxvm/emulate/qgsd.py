"""The emulated quote service for the life of one emulated VM, as a background process.

    python -m tdxvm.emulate.qgsd --uri qemu:///system --uuid UUID [--port PORT]

A launch or ``tdxvm attest`` runs :class:`~tdxvm.emulate.qgs.QuoteService` only while it
attests. The inference service in an emulated guest needs quotes at any time
(``GET /v1/attestation``), as a real TD gets them from the host's QGS daemon. This is
that daemon for one domain: it measures what the domain boots (read through libvirt, as
the one-shot service does), listens on 127.0.0.1 (the guest reaches it at
``10.0.2.2:PORT`` through QEMU user networking), and exits by itself once the domain is
no longer running. It stands in for hardware only where the host is trusted, like the
rest of the emulated platform.

:func:`ensure` starts one for a domain unless one already runs for it, and returns its
port; its pid and port live in ``<emulated dir>/qgsd/<uuid>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import libvirt

from tdxvm.emulate.qgs import GUEST_GATEWAY, LaunchArtifacts, QuoteService, QuoteServiceError

POLL_SECONDS = 2.0
START_TIMEOUT = 30.0
log = logging.getLogger("tdxvm.emulate.qgsd")


def _record(emulated_dir: Path, uuid: str) -> Path:
    return emulated_dir / "qgsd" / f"{uuid}.json"


def _alive(pid: int, uuid: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tdxvm.emulate.qgsd" in cmdline and uuid.encode() in cmdline


def running_port(emulated_dir: Path, uuid: str) -> int | None:
    """The port of the daemon serving domain ``uuid``, if one runs."""
    try:
        doc = json.loads(_record(emulated_dir, uuid).read_text())
        pid, port = int(doc["pid"]), int(doc["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return port if _alive(pid, uuid) else None


def ensure(uri: str, uuid: str, emulated_dir: Path) -> str:
    """Start the daemon for domain ``uuid`` on ``uri`` unless it runs; the address the guest uses."""
    port = running_port(emulated_dir, uuid)
    if port is None:
        record = _record(emulated_dir, uuid)
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        logfile = record.with_suffix(".log").open("ab")
        with logfile:
            proc = subprocess.Popen([sys.executable, "-m", "tdxvm.emulate.qgsd", "--uri", uri, "--uuid", uuid,
                                     "--emulated-dir", str(emulated_dir)],  # fmt: skip
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logfile, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the daemon's one line, then it closes stdout
        proc.stdout.close()
        try:
            doc = json.loads(line)
            port = int(doc["port"])
        except (ValueError, KeyError, TypeError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            tail = record.with_suffix(".log").read_text(errors="replace").strip().splitlines()[-3:]
            raise QuoteServiceError(f"the emulated quote daemon for {uuid} did not start: {' / '.join(tail) or line!r}",
                                    code="qgsd") from None  # fmt: skip
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "port": port}))
        os.replace(tmp, record)
    return f"{GUEST_GATEWAY}:{port}"


def _domain_running(conn: libvirt.virConnect, uuid: str) -> bool:
    try:
        return bool(conn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tdxvm.emulate.qgsd", description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", required=True)
    p.add_argument("--uuid", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--emulated-dir", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from tdxvm.emulate import EmulatedPlatform
    from tdxvm.launch.connection import open_connection
    from tdxvm.launch.console import read_host_file

    try:
        conn = open_connection(args.uri)
        xml = conn.lookupByUUIDString(args.uuid).XMLDesc()
        platform = EmulatedPlatform.load(args.emulated_dir, at=datetime.now(timezone.utc))
        service = QuoteService(platform, LaunchArtifacts.from_domain_xml(xml, read=lambda path: read_host_file(conn, path)),
                               port=args.port)  # fmt: skip
        service.start()
    except Exception as exc:  # any failure to stand up is reported on the line ensure() reads
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"port": service.port}), flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the starter has read its line; nothing more goes there
    log.info("serving quotes for domain %s on %s", args.uuid, service.address)
    try:
        while _domain_running(conn, args.uuid):
            time.sleep(POLL_SECONDS)
    finally:
        service.close()
        record = _record(args.emulated_dir, args.uuid)
        for path in (record, record.with_suffix(".log")):
            with contextlib.suppress(OSError):
                path.unlink()
    log.info("domain %s is no longer running; stopped", args.uuid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

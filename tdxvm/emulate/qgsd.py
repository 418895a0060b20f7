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

It always runs on the controller, where the platform's keys are. For a domain on a
remote ``qemu+ssh://`` host it opens its own SSH session to the host (the URI's identity
and known_hosts) and keeps a port of the host's loopback offered for its whole life
(:func:`tdxvm.launch.tunnel.offer`, ``ssh -R``): PORT is then that port on the host,
and a dropped session is reconnected and the same port asked for again at each poll.

It also keeps the emulated TD's RTMR3 (the guest's extend requests, in memory only), so
it serves one *boot* of the domain, not the domain: libvirt gives a running domain a new
ID each time it starts, and :class:`DomainWatch` remembers the ID it started with. Once
the domain stops or runs under another ID (a reboot: tdxvm's domains stop on a guest
reboot, ``on_reboot=destroy``, and start again only through a new launch or provision),
every request is refused and the daemon exits; the next ``ensure`` starts a fresh one
whose RTMR3 is zero, as a rebooted TD's is. A libvirt connection that breaks is opened
again (the domain counts as the same boot for up to :data:`OUTAGE_LIMIT` seconds
without libvirt).

:func:`ensure` starts one for a domain unless one already runs for it, and returns its
port; its pid and port live in ``<emulated dir>/qgsd/<uuid>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import libvirt

from tdxvm.coredumps import forbid_core_dumps
from tdxvm.emulate.qgs import GUEST_GATEWAY, LaunchArtifacts, QuoteService, QuoteServiceError

POLL_SECONDS = 2.0
START_TIMEOUT = 120.0  # for the daemon to read the domain (over SSH on a remote host), compute RTMR0, offer a port
OUTAGE_LIMIT = 120.0  # seconds without libvirt (an SSH or libvirtd restart) before the daemon gives up
log = logging.getLogger("tdxvm.emulate.qgsd")


def _record(emulated_dir: Path, uuid: str) -> Path:
    return emulated_dir / "qgsd" / f"{uuid}.json"


def _alive(pid: int, uuid: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tdxvm.emulate.qgsd" in cmdline and uuid.encode() in cmdline


def _running(emulated_dir: Path, uuid: str) -> dict | None:
    """``{"pid", "port", "boot_id"}`` of the daemon serving domain ``uuid``, if one runs."""
    try:
        doc = json.loads(_record(emulated_dir, uuid).read_text())
        pid, port = int(doc["pid"]), int(doc["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"pid": pid, "port": port, "boot_id": doc.get("boot_id")} if _alive(pid, uuid) else None


def running_port(emulated_dir: Path, uuid: str) -> int | None:
    """The port of the daemon serving domain ``uuid``, if one runs."""
    doc = _running(emulated_dir, uuid)
    return None if doc is None else int(doc["port"])


def _stop(pid: int, uuid: str) -> None:
    """End the daemon ``pid`` (one this module started for ``uuid``) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid, uuid) and time.monotonic() < deadline:
        time.sleep(0.05)


def ensure(uri: str, uuid: str, emulated_dir: Path, *, boot_id: int | None = None) -> str:
    """Start the daemon for domain ``uuid`` on ``uri`` unless it runs; the address the guest uses.

    With ``boot_id`` (the running domain's libvirt ID), a daemon left from an earlier boot
    of the domain (whose RTMR3 is that boot's) is stopped and a fresh one started."""
    doc = _running(emulated_dir, uuid)
    if doc is not None and boot_id is not None and doc["boot_id"] != boot_id:
        _stop(doc["pid"], uuid)
        doc = None
    port = None if doc is None else int(doc["port"])
    if port is None:
        record = _record(emulated_dir, uuid)
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        logfile = record.with_suffix(".log").open("ab")
        with logfile:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tdxvm.emulate.qgsd",
                    "--uri",
                    uri,
                    "--uuid",
                    uuid,
                    "--emulated-dir",
                    str(emulated_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logfile,
                start_new_session=True,
            )
        assert proc.stdout is not None
        # the daemon's one line, then it closes stdout; within START_TIMEOUT (a host that never
        # answers its libvirt or SSH calls must not hold the attestation that waits for it)
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if not ready:
            proc.kill()
            raise QuoteServiceError(
                f"the emulated quote daemon for {uuid} did not start within {START_TIMEOUT:g} s "
                f"(its log: {record.with_suffix('.log')})",
                code="qgsd",
            )
        try:
            started = json.loads(line)
            port, started_id = int(started["port"]), started.get("boot_id")
        except (ValueError, KeyError, TypeError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            tail = record.with_suffix(".log").read_text(errors="replace").strip().splitlines()[-3:]
            raise QuoteServiceError(
                f"the emulated quote daemon for {uuid} did not start: {' / '.join(tail) or line!r}", code="qgsd"
            ) from None
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "port": port, "boot_id": started_id}))
        os.replace(tmp, record)
    return f"{GUEST_GATEWAY}:{port}"


class DomainWatch:
    """Whether domain ``uuid`` is still the boot this daemon started for: running, under the
    libvirt domain ID it had then.

    With ``reopen`` (a new connection to the same libvirt), a connection that breaks (a
    remote host's SSH dropped, its libvirtd restarted) is opened again at the next check,
    and the domain counts as the same boot meanwhile, for at most ``outage_limit``
    seconds; without it, a broken connection counts as a stopped domain."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        uuid: str,
        *,
        reopen: Callable[[], libvirt.virConnect] | None = None,
        outage_limit: float = OUTAGE_LIMIT,
    ) -> None:
        self.conn, self.uuid, self.reopen, self.outage_limit = conn, uuid, reopen, outage_limit
        self.reopened = 0  # connections opened again after one broke
        self._lock = threading.Lock()  # the serving thread and the poll both ask
        self._lost_since: float | None = None
        self.boot_id = self._running_id()

    def _running_id(self) -> int | None:
        try:
            dom = self.conn.lookupByUUIDString(self.uuid)
            return int(dom.ID()) if dom.isActive() else None
        except libvirt.libvirtError as exc:
            if self.reopen is None or exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _lost(self, exc: libvirt.libvirtError) -> str | None:
        """The connection broke: open another; None (the same boot) until ``outage_limit``."""
        assert self.reopen is not None
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
            log.warning("lost libvirt while watching domain %s: %s", self.uuid, exc)
        try:
            conn = self.reopen()
        except Exception as again:  # noqa: BLE001 - any failure to connect: try again at the next check
            if now - self._lost_since > self.outage_limit:
                return (
                    f"libvirt unreachable for {now - self._lost_since:.0f} s ({again}): whether domain {self.uuid} "
                    "still runs the boot this emulated quote service measured is unknown, so it has stopped"
                )
            return None
        from tdxvm.launch.connection import close  # frees a remote connection's socket and ssh too

        close(self.conn)
        self.conn, self._lost_since = conn, None
        self.reopened += 1
        log.info("libvirt connection opened again (domain %s)", self.uuid)
        return None  # the next check asks the new connection

    def gone(self) -> str | None:
        """None while it is the same boot; else why not (a refusal for the guest)."""
        with self._lock:
            return self._check()

    def _check(self) -> str | None:
        try:
            now = self._running_id()
        except libvirt.libvirtError as exc:
            return self._lost(exc)
        self._lost_since = None
        if self.boot_id is None or now is None:
            return f"domain {self.uuid} is not running: this emulated quote service has stopped"
        if now != self.boot_id:
            return (
                f"domain {self.uuid} booted again (libvirt ID {self.boot_id}, now {now}): this emulated quote service "
                "measured the earlier boot and has stopped"
            )
        return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tdxvm.emulate.qgsd", description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", required=True)
    p.add_argument("--uuid", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--emulated-dir", type=Path, required=True)
    args = p.parse_args(argv)
    forbid_core_dumps()  # it holds the emulated platform's keys
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # a failed reconnect is logged once, below, not traced
    from tdxvm.emulate import EmulatedPlatform
    from tdxvm.launch import tunnel
    from tdxvm.launch.connection import open_connection
    from tdxvm.launch.console import read_host_file
    from tdxvm.launch.rtmr0pin import running_machine
    from tdxvm.launch.sshtarget import HostSshError

    offered = contextlib.ExitStack()
    try:
        conn = open_connection(args.uri)
        watch = DomainWatch(conn, args.uuid, reopen=lambda: open_connection(args.uri))
        if (why := watch.gone()) is not None:
            raise QuoteServiceError(why, code="qgsd")
        dom = conn.lookupByUUIDString(args.uuid)
        xml = dom.XMLDesc()
        platform = EmulatedPlatform.load(args.emulated_dir, at=datetime.now(timezone.utc))
        argv, qemu = running_machine(conn, dom.name())
        artifacts = LaunchArtifacts.from_domain_xml(
            xml, read=lambda path: read_host_file(conn, path), argv=argv, qemu=qemu
        )
        service = QuoteService(platform, artifacts, port=args.port, guard=watch.gone)
        service.start()
        port = offered.enter_context(tunnel.offer(args.uri, "127.0.0.1", service.port))  # the port on the host
    except Exception as exc:  # any failure to stand up is reported on the line ensure() reads
        offered.close()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"port": port, "boot_id": watch.boot_id}), flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the starter has read its line; nothing more goes there
    where = "" if port == service.port else f", offered on the host's loopback at port {port}"
    log.info("serving quotes for domain %s (ID %s) on %s%s", args.uuid, watch.boot_id, service.address, where)
    try:
        while (why := watch.gone()) is None:
            time.sleep(POLL_SECONDS)
            try:
                tunnel.prepare(args.uri)  # a remote host's session: reconnected (and the port offered again)
            except HostSshError as exc:
                log.warning("%s", exc)
        log.info("%s", why)
    finally:
        offered.close()
        service.close()
        record = _record(args.emulated_dir, args.uuid)
        with contextlib.suppress(OSError, ValueError, TypeError):
            if json.loads(record.read_text()).get("pid") == os.getpid():  # not a successor's record
                for path in (record, record.with_suffix(".log")):
                    path.unlink(missing_ok=True)
    log.info("domain %s: stopped", args.uuid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

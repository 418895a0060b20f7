"""The per-VM emulated quote daemon: start-up failures are reported, stale records ignored.
(Serving quotes for a running domain, and exiting with it, is covered end to end by
tests/e2e/test_fleet.py.)"""

from __future__ import annotations

import json
import os

import pytest

from tdxvm.emulate.qgs import QuoteServiceError
from tdxvm.emulate.qgsd import ensure, running_port

NO_SUCH_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def test_a_daemon_that_cannot_stand_up_says_why(tmp_path):
    with pytest.raises(QuoteServiceError) as err:
        ensure("test:///default", NO_SUCH_UUID, tmp_path)
    assert err.value.code == "qgsd" and NO_SUCH_UUID in str(err.value) and "did not start" in str(err.value)
    assert running_port(tmp_path, NO_SUCH_UUID) is None
    assert not (tmp_path / "qgsd" / f"{NO_SUCH_UUID}.json").exists()


def test_stale_or_foreign_records_are_not_a_running_daemon(tmp_path):
    record = tmp_path / "qgsd" / f"{NO_SUCH_UUID}.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"pid": os.getpid(), "port": 12345}))  # a live process, but not the daemon
    assert running_port(tmp_path, NO_SUCH_UUID) is None
    record.write_text("{not json")
    assert running_port(tmp_path, NO_SUCH_UUID) is None


def test_domain_watch_tells_one_boot_from_the_next():
    """The daemon serves one boot: a stopped domain, or one started again (a new libvirt
    domain ID), is gone, and its RTMR3 with it (the real daemon:
    tests/e2e/test_fleet.py)."""
    import libvirt

    from tdxvm.emulate.qgsd import DomainWatch

    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")  # the test driver's running domain
        uuid = dom.UUIDString()
        watch = DomainWatch(conn, uuid)
        assert watch.boot_id == dom.ID() and watch.gone() is None
        dom.destroy()
        assert "is not running" in (watch.gone() or "")
        dom.create()
        assert watch.gone() == (
            f"domain {uuid} booted again (libvirt ID {watch.boot_id}, now {dom.ID()}): this "
            "emulated quote service measured the earlier boot and has stopped"
        )
        assert DomainWatch(conn, uuid).gone() is None  # a daemon for the new boot
    finally:
        conn.close()


def test_domain_watch_opens_a_broken_connection_again():
    """A broken connection (a remote host's SSH dropped) is not a stopped domain: the watch
    opens another and the boot goes on; past its outage limit without libvirt it gives up."""
    import libvirt

    from tdxvm.emulate.qgsd import DomainWatch

    keeper = libvirt.open("test:///default")  # the default test driver's state is shared by its connections
    try:
        dom = keeper.lookupByName("test")
        if not dom.isActive():
            dom.create()
        conn = libvirt.open("test:///default")
        watch = DomainWatch(conn, dom.UUIDString(), reopen=lambda: libvirt.open("test:///default"))
        conn.close()  # every call on it fails now, as on a remote connection whose SSH died
        assert watch.gone() is None and watch.reopened == 1 and watch.conn is not conn
        assert watch.gone() is None and watch.reopened == 1  # the new connection answers
        dom.destroy()
        assert "is not running" in (watch.gone() or "")
        dom.create()

        def unreachable() -> libvirt.virConnect:
            raise libvirt.libvirtError("Cannot recv data: Connection reset by peer")

        patient = DomainWatch(libvirt.open("test:///default"), dom.UUIDString(), reopen=unreachable)
        impatient = DomainWatch(libvirt.open("test:///default"), dom.UUIDString(), reopen=unreachable, outage_limit=-1)
        for w in (patient, impatient):
            w.conn.close()
        assert patient.gone() is None and patient.gone() is None  # within its limit: serving on
        assert "libvirt unreachable" in (impatient.gone() or "") and "has stopped" in impatient.gone()
        no_reopen = libvirt.open("test:///default")
        plain = DomainWatch(no_reopen, dom.UUIDString())
        no_reopen.close()
        assert "is not running" in (plain.gone() or "")  # without reopen: a broken connection is the end
    finally:
        keeper.close()


def test_a_daemon_held_by_a_host_that_never_answers_is_given_up(tmp_path, monkeypatch):
    """The daemon's libvirt accepts and never answers (a host stalling its libvirtd): its
    start line never comes. Before, the attestation that waited for it waited forever."""
    import socket

    from tdxvm.emulate import qgsd

    path = tmp_path / "libvirt-sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    monkeypatch.setattr(qgsd, "START_TIMEOUT", 2.0)
    try:
        with pytest.raises(QuoteServiceError, match="did not start within 2 s"):
            ensure(f"qemu+unix:///system?socket={path}", NO_SUCH_UUID, tmp_path)
    finally:
        listener.close()
    assert running_port(tmp_path, NO_SUCH_UUID) is None

"""A remote host that accepted the connection, then stops answering: its libvirtd frozen
(SIGSTOP) on the namespace host (tests/nshost.py). Before, every libvirt call on that
connection waited forever, and with it a `tdxvm status` or a whole fleet apply; now the
connection's keepalive closes it and the calls fail as LibvirtHostStalled, naming the
URI, in about (KEEPALIVE_COUNT + 1) * KEEPALIVE_INTERVAL s. Each wait is guarded
(tests/hangs.py), so a hang fails the test instead of holding the run."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from tdxvm.errors import EXIT_UNREACHABLE
from tdxvm.fleet.inventory import Connector, survey
from tdxvm.launch import connection as lc
from tdxvm.launch.errors import LibvirtHostStalled
from tdxvm.launch.lifecycle import status
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import VmRecords

from ..clirun import run
from ..hangs import raised_by

GUARD = 120.0  # far above the keepalive's ~35 s: only a hang reaches it


@contextmanager
def frozen(ns_host) -> Iterator[None]:
    """The host's libvirtd stopped (SIGSTOP): its sshd still accepts, it answers nothing.
    Thawed on the test's own thread, whatever a guarded call left running."""
    os.kill(ns_host.libvirtd_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        thaw(ns_host)


def thaw(ns_host) -> None:
    os.kill(ns_host.libvirtd_pid, signal.SIGCONT)


def test_a_frozen_libvirtd_fails_the_calls_of_an_open_connection(ns_host):
    """With the keepalive a user gets (the module's constants): the pending call fails, and so does the next."""
    outcome: list[BaseException | None] = []

    def use() -> None:
        with lc.connection(ns_host.uri) as conn:
            status(conn)  # answers: the host is up
            os.kill(ns_host.libvirtd_pid, signal.SIGSTOP)
            try:
                status(conn)
            finally:
                outcome.append(raised_by(lambda: conn.listAllDomains(0), within=10))  # no wait the second time

    try:
        error = raised_by(use, within=GUARD)
    finally:
        thaw(ns_host)
    assert isinstance(error, LibvirtHostStalled), error
    assert error.exit_status == EXIT_UNREACHABLE and error.code == "libvirt-host-stalled"
    assert f"libvirt at {ns_host.uri} stopped answering" in str(error)
    assert f"{lc.KEEPALIVE_COUNT} keepalive messages sent {lc.KEEPALIVE_INTERVAL} s apart" in str(error)
    assert outcome and outcome[0] is not None  # the later call failed at once too (a libvirtError)


def test_a_fleet_survey_reports_the_frozen_host_and_reads_the_others(ns_host, tmp_path, monkeypatch):
    """The fleet's connector keeps connections open: a host frozen since the last survey is
    reported (its error, code libvirt-host-stalled) while the others are read; the next
    survey's fresh connection to it ends at the open timeout instead of waiting."""
    monkeypatch.setattr(lc, "KEEPALIVE_INTERVAL", 1)
    monkeypatch.setattr(lc, "KEEPALIVE_COUNT", 3)
    hosts = {"here": "test:///default", "there": ns_host.uri}
    connector = Connector(timeout=60)
    records = VmRecords(tmp_path / "records")
    views: list[dict] = []

    def survey_all() -> None:
        views.append(survey(connector, "f", hosts, records=records, controller=Controller("c0")))

    try:
        assert raised_by(survey_all, within=GUARD) is None
        assert views[0]["there"].error is None and views[0]["here"].error is None
        monkeypatch.setattr(lc, "OPEN_TIMEOUT", 5.0)
        with frozen(ns_host):
            assert raised_by(survey_all, within=GUARD) is None
            there = views[1]["there"]
            assert there.error_code == "libvirt-host-stalled" and f"libvirt at {ns_host.uri} stopped answering" in (
                there.error or ""
            )
            assert views[1]["here"].error is None
            assert raised_by(survey_all, within=GUARD) is None
            assert views[2]["there"].error_code == "libvirt-connect" and "no answer within 5 s" in (
                views[2]["there"].error or ""
            )
    finally:
        connector.close()


def test_tdxvm_status_of_a_frozen_host_says_so(ns_host, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(lc, "OPEN_TIMEOUT", 5.0)
    result: list[tuple[int, str, str]] = []
    with frozen(ns_host):
        assert raised_by(lambda: result.append(run(capsys, "status", "--uri", ns_host.uri)), within=GUARD) is None
    code, _out, err = result[0]
    assert code == EXIT_UNREACHABLE, err
    assert f"cannot connect to libvirt at {ns_host.uri}: no answer within 5 s" in err and "Traceback" not in err
    code, _out, err = run(capsys, "status", "--uri", ns_host.uri)  # answering again: no trace of the stall
    assert code == 0, err

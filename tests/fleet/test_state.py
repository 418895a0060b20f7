"""The fleet's state file and lock."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tdxvm.fleet.state import FleetLock, FleetLocked, FleetState, FleetStateError

from ..attested_guest import REPO


def test_second_holder_is_refused_with_who_holds_it(tmp_path):
    with FleetLock(tmp_path, "demo", "apply"):
        with pytest.raises(FleetLocked) as err:
            FleetLock(tmp_path, "demo", "destroy").acquire()
        message = str(err.value)
        assert (
            "fleet demo is locked: another tdxvm apply" in message
            and f"pid {os.getpid()} on {socket.gethostname()}" in message
        )
        assert str(tmp_path / "demo.lock") in message and "never stale" in message
        assert err.value.code == "fleet-locked"
        FleetLock(tmp_path, "other", "apply").acquire().release()  # another fleet is not blocked
    FleetLock(tmp_path, "demo", "apply").acquire().release()  # released


def test_lock_goes_with_its_process(tmp_path):
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from tdxvm.fleet.state import FleetLock; "
        f"FleetLock({str(tmp_path)!r}, 'demo', 'apply').acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(FleetLocked, match=f"pid {proc.pid} "):
            FleetLock(tmp_path, "demo", "apply").acquire()
        proc.send_signal(signal.SIGKILL)  # a crash: nothing released it
        proc.wait(10)
        deadline = time.monotonic() + 5
        while True:
            try:
                FleetLock(tmp_path, "demo", "apply").acquire().release()
                break
            except FleetLocked:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_state_round_trip_private_and_atomic(tmp_path):
    st = FleetState.load(tmp_path, "demo")
    assert st.vms() == {} and not st.path.exists()
    st.remember_host("a", "test:///a.xml")
    st.update_vm("demo-web-0", phase="creating", host="a")
    st.update_vm("demo-web-0", phase="ready")
    again = FleetState.load(tmp_path, "demo")
    assert again.hosts == {"a": "test:///a.xml"}
    assert again.vm("demo-web-0")["phase"] == "ready" and again.vm("demo-web-0")["host"] == "a"
    assert st.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    again.drop_vm("demo-web-0")
    assert FleetState.load(tmp_path, "demo").vms() == {}


def test_unusable_state_file_says_what_to_do(tmp_path):
    (tmp_path / "demo.json").write_text("{not json")
    with pytest.raises(FleetStateError, match=r"demo.json cannot be read .*move it away"):
        FleetState.load(tmp_path, "demo")
    (tmp_path / "demo.json").write_text(json.dumps({"format": "tdxvm-fleet-state/1", "fleet": "other"}))
    with pytest.raises(FleetStateError, match="is not the state of fleet demo"):
        FleetState.load(tmp_path, "demo")


@pytest.mark.parametrize(
    ("top", "said"),
    [
        ({"vms": []}, '"vms" is not an object'),
        ({"vms": {"x": 5}}, '"vms" is not an object'),
        ({"hosts": "x"}, '"hosts" is not an object'),
        ({"hosts": {"a": 1}}, '"hosts" is not an object'),
        ({"vms": {"demo-web-0": {"host": ["a"]}}}, '"vms.demo-web-0.host" is a JSON list'),
        ({"vms": {"demo-web-0": {"replica": "0"}}}, '"vms.demo-web-0.replica" is a JSON str'),
    ],
)
def test_a_state_file_of_another_shape_is_refused_with_what_to_do(tmp_path, top, said):
    """Hand-edited or damaged state: a typed error naming the field, never a traceback later."""
    (tmp_path / "demo.json").write_text(json.dumps({"format": "tdxvm-fleet-state/1", "fleet": "demo", **top}))
    with pytest.raises(FleetStateError, match=f"demo.json: {re.escape(said)}.*move it away"):
        FleetState.load(tmp_path, "demo")

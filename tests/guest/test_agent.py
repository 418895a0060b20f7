"""The guest agent and unlock mode, for real: ``python -m tdxvm.guest.agent`` / ``.unlock`` on
127.0.0.1, quotes from the real emulated quote service, the controller's real handshake."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest import parse_quote
from tdxvm.attest.binding import report_data
from tdxvm.emulate.qgs import QuoteService
from tdxvm.guest import agent as agent_module
from tdxvm.guest import agentwire as wire
from tdxvm.guest import tls
from tdxvm.guest.envelope import seal
from tdxvm.provision.handshake import GuestError, attest_guest

from ..attested_guest import (
    AT,
    CONTROLLER,
    CONTROLLER_PUBLIC,
    REPO,
    Spawned,
    agent_thread,
    anchor,
    artifacts,
    controller_key_file,
    platform,
    policy_for,
)


@pytest.fixture(scope="module")
def qgs():
    with QuoteService(platform(), artifacts()) as service:
        yield service


def attest(address, qgs, **kw):
    return attest_guest(
        address,
        collateral=platform().collateral(),
        policy=policy_for(artifacts()),
        at=AT,
        trust_anchor=anchor(),
        qgs_address=qgs.address,
        timeout=10,
        **kw,
    )


class Conn:
    """A raw protocol connection (for what the handshake module would never send)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.rfile = self.sock.makefile("rb")

    def send(self, raw: bytes) -> dict | None:
        self.sock.sendall(raw)
        line = self.rfile.readline()
        return json.loads(line) if line else None

    def ask(self, **message) -> dict:
        answer = self.send(wire.encode(message))
        assert answer is not None
        return answer

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def ssh_host_key(path):
    key = Ed25519PrivateKey.generate()
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.write_bytes(line + b" root@guest\n")
    return wire.unb64(line.split()[1].decode(), "key")


def test_system_agent_binds_its_keys_and_keeps_secrets(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    blob = ssh_host_key(tmp_path / "ssh_host_ed25519_key.pub")
    identity = tls.ensure_identity(tmp_path / "tls", ["localhost"])
    agent = Spawned(
        "tdxvm.guest.agent",
        "--listen",
        "127.0.0.1:0",
        "--secrets-dir",
        str(tmp_path / "secrets"),
        "--ssh-host-key",
        str(tmp_path / "ssh_host_ed25519_key.pub"),
        "--tls-key",
        str(identity.cert_path),
        "--root",
        str(tmp_path / "root"),
        "--controller-key",
        str(controller_key_file(tmp_path)),
    )
    try:
        with attest(("127.0.0.1", agent.port), qgs, require_keys=("ssh-host", "tls")) as guest:
            assert guest.verdict.accepted and guest.provider == "emulated" and guest.event_log is None
            assert guest.keys["ssh-host"] == blob and guest.keys["tls"] == identity.spki
            assert parse_quote(guest.quote).body.report_data == report_data(guest.nonce, guest.keys)
            guest.release("model-key", b"\x00\x01 model key \xff", sender=CONTROLLER)
            guest.release("disk", b"a" * 64, sender=CONTROLLER)
        for name, value in (("model-key", b"\x00\x01 model key \xff"), ("disk", b"a" * 64)):
            path = tmp_path / "secrets" / name
            assert path.read_bytes() == value
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
        assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == [
            "disk",
            "model-key",
        ]  # no temporary files left
    finally:
        agent.stop()
    assert "received secret 'model-key' (14 bytes)" in agent.stderr
    assert "model key" not in agent.stderr and "aaaa" not in agent.stderr


def test_tls_key_is_bound_only_when_it_exists(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    agent = agent_module.Agent(
        on_secret=agent_module.SecretsDir(tmp_path / "s"),
        root=tmp_path / "root",
        controller_key=CONTROLLER_PUBLIC,
        public_keys=agent_module.system_keys(None, tmp_path / "tls/cert.pem"),
    )
    with agent_module.AgentServer(agent, "127.0.0.1", 0) as server:
        with attest(("127.0.0.1", server.port), qgs) as guest:
            assert set(guest.keys) == {"x25519"}
        identity = tls.ensure_identity(tmp_path / "tls", ["localhost"])
        with attest(("127.0.0.1", server.port), qgs) as guest:
            assert guest.keys["tls"] == identity.spki
    # the key file itself works as well as the certificate
    assert agent_module.tls_spki(identity.key_path) == identity.spki
    assert agent_module.DEFAULT_TLS_KEY == tls.DEFAULT_DIR / tls.CERT_FILE


def test_missing_ssh_host_key_is_an_error_not_an_omission(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    agent = agent_module.Agent(
        on_secret=agent_module.SecretsDir(tmp_path / "s"),
        root=tmp_path / "root",
        controller_key=CONTROLLER_PUBLIC,
        public_keys=agent_module.system_keys(tmp_path / "missing.pub", None),
    )
    with (
        agent_module.AgentServer(agent, "127.0.0.1", 0) as server,
        pytest.raises(GuestError, match="missing.pub") as exc,
    ):
        attest(("127.0.0.1", server.port), qgs)
    assert exc.value.phase == "attest"
    (tmp_path / "bad.pub").write_text("ssh-ed25519 AAAAB3NzaC1yc2E= x\n")  # the blob says ssh-rsa
    with pytest.raises(agent_module.AgentError, match="not an OpenSSH public key line"):
        agent_module.ssh_host_key_blob(tmp_path / "bad.pub")


def test_protocol_errors(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    with agent_thread(tmp_path / "secrets", tmp_path / "root") as server:
        c = Conn(server.port)
        try:
            assert c.ask(op="secret", name="disk", sealed="AAAA") == {
                "ok": False,
                "error": "no attest on this connection yet: a secret is sealed to the key of an attest",
            }
            assert "not UTF-8 JSON" in c.send(b"{nope\n")["error"]
            assert "unknown op 'reboot'" in c.ask(op="reboot")["error"]
            assert "nonce: expected 64 hex digits" in c.ask(op="attest", nonce="00" * 16, qgs=qgs.address)["error"]
            assert "nonce: expected 64 hex digits" in c.ask(op="attest", nonce="zz" * 32, qgs=qgs.address)["error"]
            assert "no TDX quote source" in c.ask(op="attest", nonce="00" * 32, qgs=None)["error"]
            answer = c.ask(op="attest", nonce="00" * 32, qgs=qgs.address)
            assert answer["ok"] and answer["provider"] == "emulated" and set(answer["keys"]) == {"x25519"}
            assert "secret name '../etc/passwd'" in c.ask(op="secret", name="../etc/passwd", sealed="AAAA")["error"]
            assert "sealed: not valid base64" in c.ask(op="secret", name="disk", sealed="@@")["error"]
            assert "invalid X25519 key" in c.ask(op="secret", name="disk", sealed=wire.b64(b"\x00" * 64))["error"]
            to_another_key = seal(b"s", bytes(range(32)), info=wire.secret_info("disk", bytes(32)), sender=CONTROLLER)
            assert "does not open" in c.ask(op="secret", name="disk", sealed=wire.b64(to_another_key))["error"]
        finally:
            c.close()
        c = Conn(server.port)
        try:  # a line over 1 MiB: an answer, then the connection ends (no way to find the next line)
            assert "line longer than" in c.send(b"x" * (wire.MAX_LINE + 1) + b"\n")["error"]
            assert c.rfile.readline() == b""
        finally:
            c.close()
    assert not (tmp_path / "secrets").exists()


def test_secret_opens_only_with_the_latest_attest_of_its_connection(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    with agent_thread(tmp_path / "secrets", tmp_path / "root") as server:
        a, b = Conn(server.port), Conn(server.port)
        try:
            first = a.ask(op="attest", nonce="01" * 32, qgs=qgs.address)
            second = a.ask(op="attest", nonce="02" * 32, qgs=qgs.address)
            other = b.ask(op="attest", nonce="03" * 32, qgs=qgs.address)
            keys = [wire.unb64(x["keys"]["x25519"], "k") for x in (first, second, other)]
            assert len(set(keys)) == 3  # a fresh key per attest
            stale = seal(b"k1", keys[0], info=wire.secret_info("disk", bytes.fromhex("01" * 32)), sender=CONTROLLER)
            assert "does not open" in a.ask(op="secret", name="disk", sealed=wire.b64(stale))["error"]
            wrong_name = seal(
                b"k1", keys[1], info=wire.secret_info("model", bytes.fromhex("02" * 32)), sender=CONTROLLER
            )
            assert "does not open" in a.ask(op="secret", name="disk", sealed=wire.b64(wrong_name))["error"]
            current = seal(b"k1", keys[1], info=wire.secret_info("disk", bytes.fromhex("02" * 32)), sender=CONTROLLER)
            assert (
                "does not open" in b.ask(op="secret", name="disk", sealed=wire.b64(current))["error"]
            )  # another connection
            assert a.ask(op="secret", name="disk", sealed=wire.b64(current)) == {"ok": True}
        finally:
            a.close()
            b.close()
    assert (tmp_path / "secrets/disk").read_bytes() == b"k1"


def test_an_old_release_replayed_on_a_connection_kept_open_is_refused(tmp_path, qgs):
    """The host keeps the connection of an earlier provision open, holding back (or keeping a
    copy of) its API key set, and delivers it after the controller rotated the keys on a new
    attest: refused, the rotation stands. Nor is a release taken twice on one attest."""
    (tmp_path / "root").mkdir()
    with agent_thread(tmp_path / "secrets", tmp_path / "root") as server:
        old, new = Conn(server.port), Conn(server.port)
        try:
            sealed = {}
            for conn, nonce, content in ((old, "01", b"leaked set"), (new, "02", b"rotated set")):
                key = wire.unb64(conn.ask(op="attest", nonce=nonce * 32, qgs=qgs.address)["keys"]["x25519"], "k")
                info = wire.secret_info("api-keys", bytes.fromhex(nonce * 32))
                sealed[conn] = wire.b64(seal(content, key, info=info, sender=CONTROLLER))
            assert new.ask(op="secret", name="api-keys", sealed=sealed[new]) == {"ok": True}
            assert old.ask(op="hello")["ok"]  # kept alive
            replayed = old.ask(op="secret", name="api-keys", sealed=sealed[old])
            assert not replayed["ok"] and "older attest than the one it last came with" in replayed["error"]
            assert (tmp_path / "secrets/api-keys").read_bytes() == b"rotated set"
            again = new.ask(op="secret", name="api-keys", sealed=sealed[new])  # the same release twice
            assert not again["ok"] and "attest again to send another" in again["error"]
            # a new attest on the old connection is as new as any: the controller's next release is taken
            key = wire.unb64(old.ask(op="attest", nonce="03" * 32, qgs=qgs.address)["keys"]["x25519"], "k")
            info = wire.secret_info("api-keys", bytes.fromhex("03" * 32))
            newest = wire.b64(seal(b"newest set", key, info=info, sender=CONTROLLER))
            assert old.ask(op="secret", name="api-keys", sealed=newest) == {"ok": True}
            assert (tmp_path / "secrets/api-keys").read_bytes() == b"newest set"
        finally:
            old.close()
            new.close()


def test_unlock_prints_exactly_the_key(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    passphrase = b"0f" * 32
    unlock = Spawned(
        "tdxvm.guest.unlock",
        "--listen",
        "127.0.0.1:0",
        "--root",
        str(tmp_path / "root"),
        "--controller-key",
        str(controller_key_file(tmp_path)),
    )
    try:
        with attest(("127.0.0.1", unlock.port), qgs) as guest:
            assert set(guest.keys) == {"x25519"}
            with pytest.raises(GuestError, match="unlock mode takes only the secret 'disk', not 'model-key'"):
                guest.release("model-key", b"nope", sender=CONTROLLER)
            guest.release("disk", passphrase, sender=CONTROLLER)
        rc, out = unlock.wait()
    finally:
        unlock.stop()
    assert rc == 0
    assert out == passphrase
    assert "disk key received (64 bytes)" in unlock.stderr
    assert passphrase.decode() not in unlock.stderr


def test_unlock_refuses_an_empty_key_and_keeps_waiting(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    unlock = Spawned(
        "tdxvm.guest.unlock",
        "--listen",
        "127.0.0.1:0",
        "--root",
        str(tmp_path / "root"),
        "--controller-key",
        str(controller_key_file(tmp_path)),
    )
    try:
        with attest(("127.0.0.1", unlock.port), qgs) as guest:
            with pytest.raises(GuestError, match="'disk' is empty"):
                guest.release("disk", b"", sender=CONTROLLER)
            assert unlock.proc.poll() is None
            guest.release("disk", b"k", sender=CONTROLLER)
        rc, out = unlock.wait()
    finally:
        unlock.stop()
    assert (rc, out) == (0, b"k")


# -- secrets from anyone but the controller (the host attests the guest itself) ----------------


def test_unlock_refuses_a_passphrase_the_host_seals_and_still_takes_the_controllers(tmp_path, qgs):
    """The host attests the initramfs itself (the quote is genuine: same kernel, same
    initramfs) and seals the passphrase of a LUKS disk it built to the attested key. The
    unlock step refuses it (the controller's release key did not seal it), logs the refusal,
    keeps waiting, and prints the controller's passphrase when that comes."""
    (tmp_path / "root").mkdir()
    host = X25519PrivateKey.generate()
    unlock = Spawned(
        "tdxvm.guest.unlock",
        "--listen",
        "127.0.0.1:0",
        "--root",
        str(tmp_path / "root"),
        "--controller-key",
        str(controller_key_file(tmp_path)),
    )
    try:
        with attest(("127.0.0.1", unlock.port), qgs) as hosts:  # the host's own attestation, accepted by its own policy
            with pytest.raises(GuestError, match="not sealed by the controller's release key"):
                hosts.release("disk", b"host's passphrase", sender=host)
            raw = Conn(unlock.port)  # and with the guest's key named as the sender (its public half is in every quote)
            try:
                answer = raw.ask(op="attest", nonce="05" * 32, qgs=qgs.address)
                guest_key = wire.unb64(answer["keys"]["x25519"], "k")
                forged = seal(
                    b"host's passphrase",
                    guest_key,
                    info=wire.secret_info("disk", bytes.fromhex("05" * 32)),
                    sender=host,
                )
                assert (
                    "not sealed by the controller"
                    in raw.ask(op="secret", name="disk", sealed=wire.b64(forged))["error"]
                )
            finally:
                raw.close()
        assert unlock.proc.poll() is None  # the slot is still free
        with attest(("127.0.0.1", unlock.port), qgs) as controller:
            controller.release("disk", b"controller's passphrase", sender=CONTROLLER)
        rc, out = unlock.wait()
    finally:
        unlock.stop()
    assert (rc, out) == (0, b"controller's passphrase")
    assert unlock.stderr.count("refused secret 'disk'") == 2
    assert "host's passphrase" not in unlock.stderr


def test_agent_refuses_a_model_key_the_host_seals(tmp_path, qgs):
    """A host-chosen model key (and so host-chosen weights) would be served under a genuine
    attestation: the booted agent refuses it, keeps nothing, and still takes the controller's."""
    (tmp_path / "root").mkdir()
    with (
        agent_thread(tmp_path / "secrets", tmp_path / "root") as server,
        attest(("127.0.0.1", server.port), qgs) as guest,
    ):
        with pytest.raises(GuestError, match="not sealed by the controller's release key"):
            guest.release("model-0123456789abcdef", b"host model key", sender=X25519PrivateKey.generate())
        assert not (tmp_path / "secrets").exists()
        guest.release("model-0123456789abcdef", b"controller model key", sender=CONTROLLER)
    assert (tmp_path / "secrets/model-0123456789abcdef").read_bytes() == b"controller model key"


@pytest.mark.parametrize("content", [None, "not hex\n", "00" * 31 + "\n"])
def test_agent_without_a_usable_controller_key_refuses_to_start(tmp_path, content):
    """No controller key, no secrets: the agent and the unlock step fail closed."""
    path = tmp_path / "controller-release.pub"
    if content is not None:
        path.write_text(content)
    for module in ("tdxvm.guest.agent", "tdxvm.guest.unlock"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--controller-key", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"controller key {path}" in proc.stderr and proc.stdout == ""
    with pytest.raises(agent_module.AgentError, match="32-byte"):
        agent_module.Agent(on_secret=lambda *_: None, controller_key=b"short")


def test_connection_cap(tmp_path, qgs):
    (tmp_path / "root").mkdir()
    agent = agent_module.Agent(
        on_secret=agent_module.SecretsDir(tmp_path / "s"), root=tmp_path / "root", controller_key=CONTROLLER_PUBLIC
    )
    with agent_module.AgentServer(agent, "127.0.0.1", 0, max_connections=1) as server:
        held = Conn(server.port)
        try:
            assert held.ask(op="attest", nonce="00" * 32, qgs=qgs.address)["ok"]
            extra = Conn(server.port)
            assert "already serves 1 connections" in json.loads(extra.rfile.readline())["error"]
            extra.close()
        finally:
            held.close()


def test_tls_key_file_errors(tmp_path):
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(agent_module.AgentError, match="junk.pem: not a PEM certificate") as exc:
        agent_module.tls_spki(tmp_path / "junk.pem")
    assert exc.value.code == "tls-key"


def test_guest_side_imports_nothing_from_the_controller():
    """What ships into the guest (and its initramfs) must import only the standard library,
    ``cryptography``, the REPORTDATA binding and tdxvm's error base."""
    code = "import sys, tdxvm.guest.agent, tdxvm.guest.unlock, tdxvm.guest.tdquote; print(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert {m for m in out if m.startswith("tdxvm")} <= {
        "tdxvm",
        "tdxvm.errors",
        "tdxvm.fileio",
        "tdxvm.attest",
        "tdxvm.attest.binding",
        "tdxvm.guest",
        "tdxvm.guest.agent",
        "tdxvm.guest.agentwire",
        "tdxvm.guest.envelope",
        "tdxvm.guest.tdquote",
        "tdxvm.guest.unlock",
    }
    assert not {m.split(".")[0] for m in out} & {
        "pydantic",
        "yaml",
        "requests",
        "click",
        "libvirt",
        "paramiko",
        "torch",
    }

"""known_hosts as ssh reads it, and what a ``qemu+ssh://`` URI means for SSH (no network).

The hashed entry below was made by OpenSSH's ``ssh-keygen -H`` (see
``test_a_hashed_entry_of_ssh_keygen``, which makes a fresh one), the fingerprint
compared with ``ssh-keygen -lf`` of the same key."""

from __future__ import annotations

import base64
import getpass
import shutil
import subprocess
from pathlib import Path

import pytest

from tdxvm.launch import knownhosts as kh
from tdxvm.launch.sshtarget import HostSshError, needs_ssh, ssh_target

KEY_A = bytes.fromhex("0000000b7373682d656432353531390000002011") + b"\x11" * 31
KEY_B = bytes.fromhex("0000000b7373682d656432353531390000002022") + b"\x22" * 31
RSA = b"\x00\x00\x00\x07ssh-rsa" + b"\x01" * 40


def line(patterns: str, blob: bytes, key_type: str = "ssh-ed25519", marker: str = "") -> str:
    return f"{marker} {patterns} {key_type} {base64.b64encode(blob).decode()}".strip()


def entries(*lines: str) -> list[kh.Entry]:
    return kh.parse("\n".join(["# a comment", "", *lines, "garbage", "host ssh-ed25519 !!notbase64"]), source="kh")


def test_lookup_names_follow_ssh():
    assert kh.lookup_name("host.example", 22) == "host.example"
    assert kh.lookup_name("host.example", 2222) == "[host.example]:2222"
    assert kh.lookup_name("::1", 2222) == "[::1]:2222"


def test_known_changed_unknown():
    es = entries(line("host.example,192.0.2.7", KEY_A), line("other", KEY_B))
    assert [e.line for e in es] == [3, 4]
    assert kh.check(es, "host.example", "ssh-ed25519", KEY_A).status == "known"
    assert kh.check(es, "192.0.2.7", "ssh-ed25519", KEY_A).status == "known"
    changed = kh.check(es, "host.example", "ssh-ed25519", KEY_B)
    assert changed.status == "changed" and [e.line for e in changed.entries] == [3]
    assert kh.check(es, "nobody", "ssh-ed25519", KEY_A).status == "unknown"
    other_type = kh.check(es, "host.example", "ssh-rsa", RSA)
    assert other_type.status == "unknown" and other_type.other_types == ("ssh-ed25519",)


def test_ports_wildcards_and_negation():
    es = entries(line("[*.example]:2222,!bad.example", KEY_A))
    assert kh.check(es, "[a.example]:2222", "ssh-ed25519", KEY_A).status == "known"
    assert kh.check(es, "a.example", "ssh-ed25519", KEY_A).status == "unknown"  # port 22 is another name
    assert kh.check(es, "[a.example]:2223", "ssh-ed25519", KEY_A).status == "unknown"
    es = entries(line("*.example,!bad.example", KEY_A))
    assert kh.check(es, "bad.example", "ssh-ed25519", KEY_A).status == "unknown"
    assert kh.check(es, "GOOD.example", "ssh-ed25519", KEY_A).status == "known"
    assert kh.check(entries(line("host?", KEY_A)), "host1", "ssh-ed25519", KEY_A).status == "known"


def test_revoked_wins_and_cert_authority_is_not_a_host_key():
    es = entries(line("host.example", KEY_A), line("*", KEY_A, marker="@revoked"))
    assert kh.check(es, "host.example", "ssh-ed25519", KEY_A).status == "revoked"
    es = entries(line("host.example", KEY_A, marker="@cert-authority"))
    assert kh.check(es, "host.example", "ssh-ed25519", KEY_A).status == "unknown"


def test_known_types_in_file_order():
    es = entries(line("h", RSA, "ssh-rsa"), line("h", KEY_A), line("h", KEY_B), line("x", KEY_A, "ecdsa-sha2-nistp256"))
    assert kh.known_types(es, "h") == ["ssh-rsa", "ssh-ed25519"]


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is missing")
def test_a_hashed_entry_and_fingerprint_of_ssh_keygen(tmp_path):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    kind, b64 = Path(f"{key}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[host.example]:2222 {kind} {b64}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    es = kh.read_files([tmp_path / "absent", known])
    assert es[0].patterns.startswith("|1|")
    assert kh.check(es, "[host.example]:2222", kind, base64.b64decode(b64)).status == "known"
    assert kh.check(es, "host.example", kind, base64.b64decode(b64)).status == "unknown"
    printed = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True).stdout
    assert printed.split()[1] == kh.fingerprint(base64.b64decode(b64))


def test_which_uris_need_ssh():
    assert needs_ssh("qemu+ssh://root@h/system") is True
    assert needs_ssh("qemu:///system") is False and needs_ssh("test:///default") is False
    assert needs_ssh("qemu://localhost/system") is False
    with pytest.raises(HostSshError, match="not a libvirt URI"):
        needs_ssh("nonsense")


def test_what_a_uri_says(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    t = ssh_target("qemu+ssh://admin@h.example:2200/system?keyfile=~/k&known_hosts=/etc/kh&no_verify=1&no_tty=1")
    assert (t.user, t.host, t.port, t.keyfile, t.known_hosts, t.no_verify) == (
        "admin",
        "h.example",
        2200,
        f"{tmp_path}/k",
        ("/etc/kh",),
        True,
    )
    assert t.known_name == "[h.example]:2200" and t.where == "admin@[h.example]:2200"
    assert t.ssh_command() == f"ssh -i {tmp_path}/k -p 2200 -o UserKnownHostsFile=/etc/kh admin@h.example"
    t = ssh_target("qemu+ssh://h.example/system?no_verify=0")
    assert (t.user, t.port, t.keyfile, t.no_verify) == (getpass.getuser(), 22, None, False)
    assert t.known_hosts[0] == f"{tmp_path}/.ssh/known_hosts" and "/etc/ssh/ssh_known_hosts" in t.known_hosts
    with pytest.raises(HostSshError, match="no_verify='yes' is not a number"):
        ssh_target("qemu+ssh://h.example/system?no_verify=yes")

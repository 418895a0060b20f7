"""The built initramfs's own unlock step, run from the unpacked initramfs itself (its
Python, its `cryptography`, its tdxvm modules, under chroot), takes the volume key given
to it through the real handshake and prints exactly that for the root step; the
initramfs carries the root step, its tools and scripts, and no crypttab; every module the
steps import is already byte-compiled there."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest import Policy, TrustAnchor
from tdxvm.emulate import EmulatedPlatform
from tdxvm.emulate.qgs import LaunchArtifacts, QuoteService
from tdxvm.image import luks
from tdxvm.image.secrets import load
from tdxvm.provision import handshake
from tdxvm.releasekey import GUEST_PATH, release_key
from tdxvm.secretstore import SecretStore


@pytest.fixture(scope="module")
def initramfs_root(smoke_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("initramfs")
    data = (smoke_build.folder / "initrd.img").read_bytes()
    subprocess.run("gzip -dc | cpio -idm --quiet", shell=True, input=data, cwd=root, check=True)
    return root


def test_initramfs_and_rootfs_carry_the_controllers_release_key(smoke_build, initramfs_root):
    """Measured with the initramfs (RTMR2): the key whose seal the unlock step requires."""
    controller = release_key(SecretStore(directory=smoke_build.secrets))
    expected = controller.public_key().public_bytes_raw().hex()
    assert smoke_build.manifest["release_key"] == expected
    assert (initramfs_root / GUEST_PATH.lstrip("/")).read_text().strip() == expected


def test_initramfs_carries_the_unlock_and_root_steps(initramfs_root, smoke_build):
    crypttab = initramfs_root / "cryptroot/crypttab"
    assert not crypttab.exists() or not crypttab.read_text().strip()  # nothing is opened from a LUKS header
    top = (initramfs_root / "scripts/local-top/tdxvm").read_text()
    assert "tdxvm.guest.unlock" in top and "tdxvm.guest.rootdisk" in top and "poweroff -f" in top
    assert f"--listen 0.0.0.0:{smoke_build.manifest['guest_agent_port']}" in top
    assert "lowerdir=" in (initramfs_root / "scripts/local-bottom/tdxvm").read_text()
    for name in ("unlock.py", "rootdisk.py"):
        assert (initramfs_root / "usr/lib/tdxvm/python/tdxvm/guest" / name).is_file()
    for tool in ("cryptsetup", "veritysetup", "dmsetup"):
        assert any((initramfs_root / d / tool).exists() for d in ("usr/sbin", "sbin")), tool
    for module in ("drivers/net/virtio_net", "drivers/md/dm-verity", "drivers/md/dm-crypt", "fs/overlayfs/overlay"):
        assert list(initramfs_root.glob(f"usr/lib/modules/*/kernel/{module}.ko*")) or list(
            initramfs_root.glob(f"lib/modules/*/kernel/{module}.ko*")
        ), module


# In the initramfs: how each module the unlock and root steps import would load (one JSON object)
_BYTECODE_PROBE = """\
import importlib.util, json, os, sys
import tdxvm.guest.unlock, tdxvm.guest.rootdisk
out = {}
for name, module in sorted(sys.modules.items()):
    source = getattr(module, "__file__", None) or ""
    if not source.endswith(".py"):
        continue
    try:
        with open(importlib.util.cache_from_source(source), "rb") as f:
            head = f.read(16)
    except OSError:
        out[name] = "missing"
        continue
    flags = int.from_bytes(head[4:8], "little")
    if flags == 1:
        out[name] = "unchecked-hash"
    elif flags:
        out[name] = "checked-hash"
    else:
        st = os.stat(source)
        fresh = head[8:16] == (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + st.st_size.to_bytes(4, "little")
        out[name] = "timestamp" if fresh else "stale"
print(json.dumps(out))
"""


def test_initramfs_steps_import_only_compiled_modules(initramfs_root):
    """The initramfs is unpacked into memory at every boot: a module without a valid .pyc
    there is compiled on every boot (seconds under TCG). tdxvm's own are unchecked-hash
    .pyc files (no mtime: the same on every build); Debian's keep their sources' mtimes."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": "/usr/lib/tdxvm/python:/usr/lib/python3/dist-packages",
    }
    out = subprocess.run(
        ["chroot", str(initramfs_root), "/usr/bin/python3", "-S", "-B", "-c", _BYTECODE_PROBE],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    modules = json.loads(out)
    assert len(modules) > 50 and "tdxvm.guest.unlock" in modules and "json" in modules
    assert {name: how for name, how in modules.items() if how not in ("unchecked-hash", "timestamp")} == {}
    assert {how for name, how in modules.items() if name.startswith("tdxvm")} == {"unchecked-hash"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unlock_step_receives_the_key_after_attestation(smoke_build, initramfs_root):
    m = smoke_build.manifest
    folder = smoke_build.folder
    launch = LaunchArtifacts(
        kernel=(folder / "vmlinuz").read_bytes(),
        initrd=(folder / "initrd.img").read_bytes(),
        cmdline=m["cmdline"],
        firmware=Path(m["firmware"]["path"]).read_bytes(),
    )
    platform = EmulatedPlatform()
    policy = Policy(mrtd=m["measurements"]["mrtd"], rtmr1=m["measurements"]["rtmr1"], rtmr2=m["measurements"]["rtmr2"])
    volume_key = load(m["luks"]["uuid"], directory=smoke_build.secrets)
    port = _free_port()
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": "/usr/lib/tdxvm/python:/usr/lib/python3/dist-packages",
    }
    proc = subprocess.Popen(
        [
            "chroot",
            str(initramfs_root),
            "/usr/bin/python3",
            "-S",
            "-m",
            "tdxvm.guest.unlock",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with QuoteService(platform, launch) as qgs:
            deadline = time.monotonic() + 60
            while True:
                try:
                    handshake.hello(("127.0.0.1", port), timeout=5)
                    break
                except handshake.HandshakeError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.2)
            with handshake.attest_guest(
                ("127.0.0.1", port),
                collateral=platform.collateral(),
                policy=policy,
                trust_anchor=TrustAnchor.from_der(platform.root_ca_der),
                qgs_address=qgs.address,
            ) as guest:
                assert guest.verdict.accepted and sorted(guest.keys) == ["x25519"]
                # the host, which can attest the initramfs too, seals a key of its own: refused, slot kept
                with pytest.raises(handshake.GuestError, match="not sealed by the controller's release key"):
                    guest.release("disk", bytes(64), sender=X25519PrivateKey.generate())
                assert proc.poll() is None
                guest.release("disk", volume_key, sender=release_key(SecretStore(directory=smoke_build.secrets)))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out == volume_key  # exactly the key on stdout, for the root step
    assert luks.volume_key_matches(luks.read_header(folder / "disk.img"), out)  # the image's own key
    assert out.hex() not in err.decode()
    assert "refused secret 'disk'" in err.decode()

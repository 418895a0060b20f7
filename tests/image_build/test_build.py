"""The smoke image, built for real: LUKS2 that decrypts with the stored key only,
no key anywhere else, reproducible filesystem and verity root hash, a manifest that
predicts the TD's measurements with the root hash on the command line, and no
half-written output when a step fails."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tdxvm.image import luks, manifest, measure
from tdxvm.image.build import build
from tdxvm.image.cache import StepCache
from tdxvm.image.ext4 import ImageStepError
from tdxvm.image.recipe import load_recipe
from tdxvm.image.secrets import keyslot_passphrase, load
from tdxvm.secretstore import SecretStore

from ..conftest import REPO, test_cache_root

EXT4_MAGIC_AT = 1024 + 0x38


def _volume_key(b):
    return load(b.manifest["luks"]["uuid"], directory=b.secrets)


def _payload_sha256(disk: Path, key: bytes) -> tuple[str, bytes]:
    h = hashlib.sha256()
    head = b""
    for chunk in luks.decrypt_payload(disk, key):
        if len(head) < 4096:
            head += chunk[:4096]
        h.update(chunk)
    return h.hexdigest(), head


def test_outputs_and_manifest(smoke_build):
    m = json.loads((smoke_build.folder / "manifest.json").read_text())
    assert m["format"] == manifest.FORMAT
    assert sorted(p.name for p in smoke_build.folder.iterdir()) == [
        "disk.img",
        "initrd.img",
        "manifest.json",
        "rootfs.list.gz",
        "vmlinuz",
    ]
    assert manifest.verify_artifacts(manifest.read(smoke_build.folder), smoke_build.folder) == []
    assert [e.status for e in smoke_build.events if e.step == "encrypt"] == ["start", "done"]
    (encrypted,) = [e for e in smoke_build.events if e.step == "encrypt" and e.status == "done"]
    payload = (smoke_build.folder / "disk.img").stat().st_size - luks.DATA_OFFSET
    assert payload == m["verity"]["data_bytes"] + m["verity"]["hash_bytes"]  # ext4 and tree, nothing else
    rate, unit = encrypted.detail.split()  # payload over the step's time (a moment before its end)
    assert unit == "MB/s" and int(rate) == pytest.approx(payload / encrypted.seconds / 1e6, rel=0.02, abs=1)
    firmware = Path(m["firmware"]["path"]).read_bytes()
    again = measure.predict(
        firmware=firmware,
        kernel=(smoke_build.folder / "vmlinuz").read_bytes(),
        initrd=(smoke_build.folder / "initrd.img").read_bytes(),
        cmdline=m["cmdline"],
    )
    assert m["measurements"] == again.to_dict()
    predicted = m["measurements"]["predicted"]
    assert predicted == {"mrtd": True, "rtmr0": False, "rtmr1": True, "rtmr2": True, "rtmr3": False}
    assert "not predicted" in m["measurements"]["notes"]["rtmr0"]
    # the Linux >= 6.9 EFI stub measures the command line and the initrd into RTMR2
    assert m["measurements"]["inputs"]["efi_stub_cc_measurement"] == "yes"
    assert re.match(r"^6\.(9|1\d)", m["kernel_version"]) or int(m["kernel_version"].split(".")[0]) >= 7
    # the verity root hash is pinned on the measured command line
    v = m["verity"]
    assert (
        m["cmdline"]
        == f"{load_recipe(REPO / 'images/smoke.yaml').recipe.cmdline} tdxvm.verity={v['data_blocks']}:{v['root_hash']}"
    )
    assert v["data_bytes"] == v["hash_offset"] == v["data_blocks"] * 4096 == 1 << 30
    assert (v["hash_algorithm"], v["data_block_size"], v["hash_block_size"], v["salt"]) == ("sha256", 4096, 4096, None)
    assert [e.status for e in smoke_build.events if e.step == "verity"] == ["start", "done"]


def test_volume_key_is_only_in_the_secret_store(smoke_build):
    key = _volume_key(smoke_build)
    secret_file = smoke_build.secrets / smoke_build.manifest["luks"]["key_secret"]
    assert secret_file.stat().st_mode & 0o777 == 0o600
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key), keyslot_passphrase(key)]
    written = [p for p in smoke_build.folder.rglob("*") if p.is_file()]
    written += [p for p in (test_cache_root() / "image").rglob("*") if p.is_file() and p.suffix != ".tar"]
    for path in written:
        with open(path, "rb") as f:
            prev = b""
            while chunk := f.read(8 << 20):
                window = prev + chunk
                for form in forms:
                    assert form not in window, f"the volume key appears in {path}"
                prev = chunk[-200:]


def test_decrypts_with_the_stored_key_and_not_another(smoke_build):
    disk = smoke_build.folder / "disk.img"
    key = _volume_key(smoke_build)
    assert luks.open_keyslot(disk, keyslot_passphrase(key)) == key
    with pytest.raises(luks.LuksError):
        luks.open_keyslot(disk, keyslot_passphrase(bytes(64)))
    head = next(luks.decrypt_payload(disk, key))
    assert head[EXT4_MAGIC_AT : EXT4_MAGIC_AT + 2] == b"\x53\xef"
    uuid = head[1024 + 0x68 : 1024 + 0x78].hex()
    assert uuid == smoke_build.manifest["rootfs_uuid"].replace("-", "")
    with pytest.raises(luks.LuksError, match="does not match the header's digest"):
        next(luks.decrypt_payload(disk, bytes(range(64))))


@pytest.fixture(scope="module")
def rootfs_image(smoke_build, tmp_path_factory):
    """The decrypted ext4 image, to look inside with debugfs (no mounts)."""
    out = tmp_path_factory.mktemp("ext4") / "rootfs.ext4"
    with open(out, "wb") as f:
        for chunk in luks.decrypt_payload(smoke_build.folder / "disk.img", _volume_key(smoke_build)):
            f.write(chunk)
    return out


def _debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)
    return proc.stdout


def test_image_has_no_host_keys_or_passwords(rootfs_image):
    ssh = _debugfs(rootfs_image, "ls -l /etc/ssh")
    assert "sshd_config" in ssh and "ssh_host_" not in ssh  # made inside the TD at first boot
    shadow = _debugfs(rootfs_image, "cat /etc/shadow")
    for line in shadow.splitlines():
        user, password = line.split(":")[:2]
        assert password in ("*", "!", "!*") or password.startswith("!"), f"{user} has a usable password"
    assert _debugfs(rootfs_image, "cat /etc/machine-id") == ""
    keys = _debugfs(rootfs_image, "cat /root/.ssh/authorized_keys")
    assert keys.startswith("ssh-ed25519 ") and keys.count("\n") == 1
    assert "PasswordAuthentication no" in _debugfs(rootfs_image, "cat /etc/ssh/sshd_config.d/tdxvm.conf")


def test_image_has_the_unlock_and_root_steps_and_agent(rootfs_image):
    crypttab = _debugfs(rootfs_image, "cat /etc/crypttab")  # Debian's, comments only: nothing opens from a LUKS header
    assert [line for line in crypttab.splitlines() if line.strip() and not line.startswith("#")] == []
    fstab = _debugfs(rootfs_image, "cat /etc/fstab")  # / is the initramfs's overlay: no entry
    assert [line for line in fstab.splitlines() if line.strip() and not line.startswith("#")] == []
    top = _debugfs(rootfs_image, "cat /etc/initramfs-tools/scripts/local-top/tdxvm")
    assert "-m tdxvm.guest.unlock --listen 0.0.0.0:7300" in top and "-m tdxvm.guest.rootdisk" in top
    guest = _debugfs(rootfs_image, "ls /usr/lib/tdxvm/python/tdxvm/guest")
    for module in ("unlock.py", "rootdisk.py", "agent.py", "tdquote.py", "envelope.py"):
        assert module in guest
    compiled = _debugfs(rootfs_image, "ls /usr/lib/tdxvm/python/tdxvm/guest/__pycache__")  # no boot compiles them
    for module in ("unlock", "rootdisk", "agent", "tdquote", "envelope"):
        assert f"{module}.cpython-311.pyc" in compiled
    wants = _debugfs(rootfs_image, "ls /etc/systemd/system/multi-user.target.wants")
    assert "tdxvm-agent.service" in wants and "tdxvm-ssh-keygen.service" in wants


def test_rebuild_is_reproducible_and_reuses_the_cache(smoke_build, tmp_path):
    secrets = smoke_build.secrets  # the same controller SSH key goes into the image
    again = build(
        load_recipe(REPO / "images/smoke.yaml"),
        output=tmp_path / "again",
        cache=StepCache(test_cache_root() / "image"),
        secret_store=SecretStore(directory=secrets),
    )
    assert again["cache"]["hit"] == ["rootfs"]
    assert again["luks"]["uuid"] != smoke_build.manifest["luks"]["uuid"]  # a fresh key per build
    for name in ("vmlinuz", "initrd.img"):
        assert again["artifacts"][name] == smoke_build.manifest["artifacts"][name]
    assert again["measurements"] == smoke_build.manifest["measurements"]
    assert again["verity"] == smoke_build.manifest["verity"] and again["cmdline"] == smoke_build.manifest["cmdline"]
    first, _ = _payload_sha256(smoke_build.folder / "disk.img", _volume_key(smoke_build))
    second, _ = _payload_sha256(tmp_path / "again/disk.img", load(again["luks"]["uuid"], directory=secrets))
    assert first == second  # byte-identical ext4 filesystems


def test_failed_step_leaves_no_output(smoke_build, tmp_path):
    text = (REPO / "images/smoke.yaml").read_text().replace("disk_size: 1GiB", "disk_size: 64MiB")
    recipe = tmp_path / "small.yaml"
    recipe.write_text(text)
    shutil.copyfile(REPO / "images/smoke.lock", tmp_path / "small.lock")  # the disk size is no lock input
    (tmp_path / "build").mkdir()
    out = tmp_path / "build" / "out"
    with pytest.raises(ImageStepError) as err:
        build(
            load_recipe(recipe),
            output=out,
            cache=StepCache(test_cache_root() / "image"),
            secret_store=SecretStore(directory=tmp_path / "secrets"),
        )
    assert err.value.step == "mkfs.ext4" and "mkfs.ext4" in str(err.value)
    assert err.value.stderr  # what mkfs said
    assert list((tmp_path / "build").iterdir()) == []  # no output, no work folder


def test_the_payload_holds_the_data_and_its_hash_tree(smoke_build, rootfs_image):
    """The decrypted payload is the ext4 image followed by its tree, whose root is the
    command line's: recomputed here with hashlib, independently of veritysetup (format 1,
    SHA-256, 4 KiB blocks, no salt; 128 digests to a zero-padded block per level)."""
    v = smoke_build.manifest["verity"]
    with open(rootfs_image, "rb") as f:
        digests = b"".join(hashlib.sha256(f.read(4096)).digest() for _ in range(v["data_blocks"]))
        assert f.read(4096) != bytes(4096)  # the tree's top level follows the data
    while True:
        blocks = [digests[i : i + 4096].ljust(4096, b"\0") for i in range(0, len(digests), 4096)]
        if len(blocks) == 1:
            break
        digests = b"".join(hashlib.sha256(b).digest() for b in blocks)
    assert hashlib.sha256(blocks[0]).hexdigest() == v["root_hash"]

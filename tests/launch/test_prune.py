"""``tdxvm image prune``: the pool's volumes no domain uses, on a test-driver host.

The host has VM smoke (its image's kernel and initramfs named in its XML, its image's
disk behind its overlay), the volumes of a rebuilt image no VM boots, the own volumes of a
VM whose domain is gone, and a file tdxvm did not name. The real daemon's part (a volume
taken between listing and deleting) is in test_volumes_libvirtd.py.
"""

from __future__ import annotations

import json

import pytest

from tdxvm.launch.volumes import POOL_PATH, content_name, overlay_name, scratch_name, serial_log_name

from .conftest import host_xml, image_volumes, make_image
from .test_cli_vm import run, smoke_domain


def _volume(name: str, size: int, backing: str | None = None) -> str:
    back = f"<backingStore><path>{POOL_PATH}/{backing}</path><format type='raw'/></backingStore>" if backing else ""
    return (
        f"<volume type='file'><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
        f"<allocation unit='bytes'>{size}</allocation><target><path>{POOL_PATH}/{name}</path>"
        f"<format type='raw'/></target>{back}</volume>"
    )


@pytest.fixture
def host(image, tmp_path, make_host):
    dom, _ = smoke_domain(image)
    used = image_volumes(image.manifest())
    rebuilt = image_volumes(make_image(tmp_path / "rebuilt", seed=b"rebuilt").manifest())
    disk = content_name("disk", image.manifest().disk.sha256)
    own = [(serial_log_name("smoke"), 10), (scratch_name("smoke"), 4096)]
    gone = [(overlay_name("gone"), 200), (serial_log_name("gone"), 30), (scratch_name("gone"), 5000)]
    volumes = "".join(_volume(n, s) for n, s in [*used, *own, *rebuilt, *gone, ("notes.txt", 7)])
    volumes += _volume(overlay_name("smoke"), 1000, backing=disk)
    xml = host_xml(domains=[dom])
    assert "</target></pool>" in xml  # the pool, without volumes
    return make_host(xml.replace("</target></pool>", f"</target>{volumes}</pool>")), rebuilt, gone


def test_dry_run_lists_the_unused_image_and_what_a_gone_vm_left(capsys, host):
    uri, rebuilt, gone = host
    code, out, err = run(capsys, "image", "prune", "--uri", uri, "--dry-run", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    listed = {(v["name"], v["kind"], v["allocation"]) for v in doc["volumes"]}
    assert listed == {(n, "image", s) for n, s in rebuilt} | {(n, "leftover", s) for n, s in gone}
    assert doc["deleted"] is False and doc["bytes"] == sum(s for _, s in rebuilt + gone)
    assert all(v["path"] == f"{POOL_PATH}/{v['name']}" for v in doc["volumes"])


def test_prune_asks_without_yes_and_deletes_with_it(capsys, host):
    uri, rebuilt, gone = host
    code, _, err = run(capsys, "image", "prune", "--uri", uri)
    assert code == 2 and "pass --yes to confirm, or --dry-run" in err and "6 unused volume(s)" in err
    code, out, err = run(capsys, "image", "prune", "--uri", uri, "--yes")
    assert code == 0, err
    lines = out.splitlines()
    assert sorted(line.split()[1].rsplit("/", 1)[1] for line in lines[:-1]) == sorted(n for n, _ in rebuilt + gone)
    assert all(line.startswith("deleted ") for line in lines[:-1])
    assert "(image no VM uses)" in out and "(left by a VM that no longer exists)" in out
    assert lines[-1] == f"{uri}: freed 0 MiB"  # a few KiB


def test_a_partial_file_whose_writer_cannot_be_seen_is_kept(capsys, image, make_host):
    """The test driver's pool folder is not on this machine (no lock to try) and its
    volumes carry no mtime: an upload may still be writing the file, so it stays.
    Killed and running uploads on a real daemon: test_volumes_libvirtd.py."""
    partial = f".{content_name('disk', image.manifest().disk.sha256)}.partial-4242-0123abcd"
    uri = make_host(host_xml(pool_volumes=[(partial, 4096)]))
    code, out, err = run(capsys, "image", "prune", "--uri", uri, "--dry-run", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["volumes"] == []


def test_a_host_with_nothing_unused(capsys, image, make_host):
    dom, _ = smoke_domain(image)
    uri = make_host(host_xml(domains=[dom]))
    code, out, err = run(capsys, "image", "prune", "--uri", uri, "--yes")
    assert code == 0, err
    assert out == f"{uri}: no unused volumes in the tdxvm pool\n"
    code, out, _ = run(capsys, "image", "prune", "--uri", make_host(host_xml(pool=False)), "-o", "json")
    assert code == 0 and json.loads(out)["volumes"] == []

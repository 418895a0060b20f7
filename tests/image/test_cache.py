"""The step cache: only its owner may reach its folder, and an entry is used only as its
step wrote it (every file's SHA-256 and size in ``entry.json``, checked on use)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tdxvm.cli.output import run_guarded
from tdxvm.errors import TdxvmError
from tdxvm.image import debian
from tdxvm.image.cache import ENTRY_FILE, CacheError, FileDigest, StepCache, private_folder, step_key, verify_file
from tests.killedwriter import Writer

INPUTS = {"suite": "bookworm", "packages": ["a", "b"]}
KEY = step_key("rootfs", INPUTS)
TAR = b"rootfs tarball\n" * 1000


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def filled(cache: StepCache):
    with cache.put("rootfs", KEY, INPUTS) as staging:
        (staging / "rootfs.tar").write_bytes(TAR)
        (staging / "epoch").write_text("1700000000\n")
    return cache.get("rootfs", KEY)


def test_a_good_entry_round_trips(tmp_path):
    cache = StepCache(tmp_path / "cache")
    assert cache.get("rootfs", KEY) is None
    entry = filled(cache)
    assert entry == cache.path("rootfs", KEY) and sorted(os.listdir(entry)) == [ENTRY_FILE, "epoch", "rootfs.tar"]
    record = json.loads((entry / ENTRY_FILE).read_text())
    assert record["step"] == "rootfs" and record["key"] == KEY and record["inputs"] == INPUTS
    assert record["files"]["rootfs.tar"] == {"sha256": hashlib.sha256(TAR).hexdigest(), "size": len(TAR)}
    assert cache.digest(entry, "rootfs.tar") == FileDigest(hashlib.sha256(TAR).hexdigest(), len(TAR))
    assert cache.verified_file(entry, "rootfs.tar").read_bytes() == TAR
    assert cache.verified_file(entry, "epoch").read_text() == "1700000000\n"
    assert mode(tmp_path / "cache") == 0o700 and mode(entry) == 0o700


def test_an_interrupted_put_leaves_no_entry(tmp_path):
    cache = StepCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt), cache.put("rootfs", KEY, INPUTS) as staging:
        (staging / "rootfs.tar").write_bytes(TAR[:100])
        raise KeyboardInterrupt
    assert cache.get("rootfs", KEY) is None and os.listdir(tmp_path / "cache") == []
    (tmp_path / "cache" / (cache.path("rootfs", KEY).name + ".partial-1")).mkdir()  # a killed build's
    assert cache.get("rootfs", KEY) is None


_PUTTER = """
import sys
from pathlib import Path
from tdxvm.image.cache import StepCache
with StepCache(Path(sys.argv[1])).put("rootfs", sys.argv[2], {}) as staging:
    (staging / "rootfs.tar").write_bytes(b"half a tarball")
    print(staging, flush=True)
    sys.stdin.readline()  # a build still running: until the test kills it
"""


def test_a_killed_builds_partial_folder_is_removed_by_the_next_put_and_a_running_ones_kept(tmp_path):
    cache = StepCache(tmp_path / "cache")
    child = subprocess.Popen(
        [sys.executable, "-c", _PUTTER, str(tmp_path / "cache"), KEY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        running = Path(child.stdout.readline().strip())
        assert running.name.startswith(cache.path("rootfs", KEY).name + ".partial-")
        filled(cache)  # another build of the same step meanwhile
        assert (running / "rootfs.tar").exists()  # kept: its build holds it
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert (running / "rootfs.tar").exists()  # what the kill left
    filled(cache)
    assert not running.exists()
    assert sorted(os.listdir(tmp_path / "cache")) == [cache.path("rootfs", KEY).name]


_UNPACKING = """
import sys
from pathlib import Path
from tdxvm.image import debian
with debian._unpacking(Path(sys.argv[1])) as staging:
    (staging / "usr" / "share").mkdir(parents=True)
    (staging / "usr" / "share" / "OVMF.fd").write_bytes(b"half a firmware")
    print(staging, flush=True)
    sys.stdin.readline()  # an unpack still at work: until the test kills it
"""


def test_a_killed_debian_unpacks_partial_folder_is_removed_by_the_next_unpack_and_a_running_ones_kept(tmp_path):
    root = debian.cache_folder(tmp_path / "debian") / "ovmf_2024.11-1"
    with Writer(_UNPACKING, root) as killed:
        killed.kill()
    assert killed.path.parent == root.parent and killed.path.name.startswith("ovmf_2024.11-1.partial-")
    assert (killed.path / "usr" / "share" / "OVMF.fd").is_file()  # what the kill left
    with Writer(_UNPACKING, root) as running:
        with debian._unpacking(root) as staging:
            (staging / ".complete").write_text("done\n")
            staging.rename(root)
        assert sorted(os.listdir(root.parent)) == ["ovmf_2024.11-1", running.path.name]  # the killed one's: gone
        assert (running.path / "usr" / "share" / "OVMF.fd").is_file()  # kept: its unpack holds it


def test_a_tampered_file_is_refused_with_both_digests(tmp_path):
    cache = StepCache(tmp_path / "cache")
    entry = filled(cache)
    (entry / "rootfs.tar").write_bytes(TAR.replace(b"rootfs", b"poison"))  # same size: get cannot tell
    assert cache.get("rootfs", KEY) == entry
    with pytest.raises(CacheError) as info:
        cache.verified_file(entry, "rootfs.tar")
    text = str(info.value)
    good, bad = hashlib.sha256(TAR).hexdigest(), hashlib.sha256(TAR.replace(b"rootfs", b"poison")).hexdigest()
    assert f"{entry / 'rootfs.tar'}" in text and f"SHA-256 {bad}, expected {good}" in text
    assert f"rm -rf {entry}" in text and info.value.code == "cache"
    with pytest.raises(CacheError, match="epoch is 11 bytes, expected 3 "):
        verify_file(entry / "epoch", sha256=good, size=3)


@pytest.mark.parametrize(
    "damage", ["truncated", "missing", "extra", "no entry.json", "other key", "bad json", "symlink"]
)
def test_a_damaged_or_old_entry_is_a_miss(tmp_path, damage):
    cache = StepCache(tmp_path / "cache")
    entry = filled(cache)
    record = json.loads((entry / ENTRY_FILE).read_text())
    if damage == "truncated":
        (entry / "rootfs.tar").write_bytes(TAR[:-1])
    elif damage == "missing":
        (entry / "epoch").unlink()
    elif damage == "extra":
        (entry / "run.sh").write_text("#!/bin/sh\n")
    elif damage == "no entry.json":  # an entry of an older tdxvm
        (entry / ENTRY_FILE).rename(entry / "inputs.json")
    elif damage == "other key":
        (entry / ENTRY_FILE).write_text(json.dumps({**record, "key": "0" * 64}))
    elif damage == "bad json":
        (entry / ENTRY_FILE).write_text("{")
    elif damage == "symlink":
        (entry / "rootfs.tar").unlink()
        (entry / "rootfs.tar").symlink_to(tmp_path / "elsewhere.tar")
        (tmp_path / "elsewhere.tar").write_bytes(TAR)
    assert cache.get("rootfs", KEY) is None
    assert filled(cache) == entry  # rebuilt over it
    assert cache.verified_file(entry, "rootfs.tar").read_bytes() == TAR
    assert os.listdir(tmp_path / "cache") == [entry.name]  # the old one, renamed aside, is gone


def test_a_step_writes_plain_files_only(tmp_path):
    cache = StepCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="plain files only"), cache.put("rootfs", KEY, INPUTS) as staging:
        (staging / "link").symlink_to("/etc/passwd")
    assert os.listdir(tmp_path / "cache") == []


def test_default_folders_are_made_private(tmp_path, monkeypatch):
    monkeypatch.delenv("TDXVM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert StepCache().get("rootfs", KEY) is None
    assert mode(tmp_path / "xdg") == 0o755 & ~current_umask()  # not tdxvm's: the usual mode
    assert mode(tmp_path / "xdg/tdxvm") == 0o700 and mode(tmp_path / "xdg/tdxvm/image") == 0o700
    assert debian.cache_folder() == tmp_path / "xdg/tdxvm/debian" and mode(tmp_path / "xdg/tdxvm/debian") == 0o700
    monkeypatch.setenv("TDXVM_CACHE", str(tmp_path / "mine"))
    filled(StepCache())
    assert mode(tmp_path / "mine") == 0o700 and mode(tmp_path / "mine/image") == 0o700
    assert debian.cache_folder(tmp_path / "a/b") == tmp_path / "a/b" and mode(tmp_path / "a/b") == 0o700


def current_umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, -1)
    cache = StepCache(folder)
    for use in (lambda: cache.get("rootfs", KEY), lambda: filled(cache)):
        with pytest.raises(CacheError) as info:
            use()
        text = str(info.value)
        assert (
            f"cache folder {folder} (owner uid 12345, mode 0700)" in text and f"chown {os.geteuid()} {folder}" in text
        )
    assert os.listdir(folder) == []  # nothing written
    with pytest.raises(CacheError, match="owner uid 12345"):
        debian.cache_folder(folder)


def test_a_folder_open_to_others_is_refused_on_every_use(tmp_path):
    cache = StepCache(tmp_path / "cache")
    entry = filled(cache)
    os.chmod(tmp_path / "cache", 0o755)
    with pytest.raises(CacheError) as info:
        cache.get("rootfs", KEY)
    text = str(info.value)
    assert f"(owner uid {os.geteuid()}, mode 0755) is open to group or others" in text
    assert text.endswith(f"fix: chmod 700 {tmp_path / 'cache'}") and "chown" not in text
    os.chmod(tmp_path / "cache", 0o700)
    assert cache.get("rootfs", KEY) == entry
    os.chmod(tmp_path / "cache", 0o770)
    with pytest.raises(CacheError, match="mode 0770"):
        filled(cache)
    with pytest.raises(CacheError, match="chmod 700"):
        debian.cache_folder(tmp_path / "cache")


def test_a_symlink_or_a_file_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(CacheError, match=f"cache folder {tmp_path / 'link'} .* is a symlink to {real}"):
        StepCache(tmp_path / "link").get("rootfs", KEY)
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheError, match="is not a folder"):
        private_folder(tmp_path / "file")


def test_the_cli_reports_a_cache_error_as_one_line(tmp_path, capsys):
    (tmp_path / "cache").mkdir(mode=0o777)
    os.chmod(tmp_path / "cache", 0o777)

    @click.group()
    def cli() -> None:
        pass

    @cli.command("build")
    def build() -> None:
        StepCache(tmp_path / "cache").get("rootfs", KEY)

    assert run_guarded(cli, ["build"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: cache folder {tmp_path / 'cache'} (owner uid") and line.endswith(
        "chmod 700 " + str(tmp_path / "cache")
    )
    assert isinstance(CacheError(tmp_path, "x"), TdxvmError)


def test_a_put_keeps_the_entry_another_build_published_meanwhile(tmp_path):
    """Same key, same inputs: the first build to finish publishes, the later one drops its
    folder and uses that entry, which a reader may already hold."""
    cache = StepCache(tmp_path / "cache")
    with cache.put("rootfs", KEY, INPUTS) as staging:
        (staging / "rootfs.tar").write_bytes(b"later build\n")
        first = filled(cache)  # another build finishes first
    assert cache.get("rootfs", KEY) == first == cache.path("rootfs", KEY)
    assert cache.verified_file(first, "rootfs.tar").read_bytes() == TAR
    assert os.listdir(tmp_path / "cache") == [first.name]


def test_get_is_a_miss_when_the_entry_goes_while_it_looks(tmp_path, monkeypatch):
    from tdxvm.image import cache as module

    cache = StepCache(tmp_path / "cache")
    entry = filled(cache)
    recorded = module._recorded_files

    def then_removed(record):
        shutil.rmtree(entry)  # another build renamed it aside and removed it
        return recorded(record)

    monkeypatch.setattr(module, "_recorded_files", then_removed)
    assert cache.get("rootfs", KEY) is None


ROUNDS = 8
FORK = multiprocessing.get_context("fork")
DATA = bytes(range(256)) * 1024  # 256 KiB


def _build(root: Path, go: object, results: object) -> None:
    """One image build's use of the step (rootimage._rootfs_step): put it, then read the
    entry it published (or found published)."""
    cache = StepCache(root)
    go.wait()  # type: ignore[attr-defined]
    try:
        with cache.put("rootfs", KEY, INPUTS) as staging:
            (staging / "rootfs.tar").write_bytes(DATA)
        entry = cache.path("rootfs", KEY)
        cache.digest(entry, "rootfs.tar")
        cache.verified_file(entry, "rootfs.tar")
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - what the test reports
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def _read(root: Path, go: object, stop: object, results: object) -> None:
    """A build that found the entry cached (get) and reads it."""
    cache = StepCache(root)
    go.wait()  # type: ignore[attr-defined]
    seen = []
    while not stop.is_set():  # type: ignore[attr-defined]
        try:
            entry = cache.get("rootfs", KEY)
            if entry is not None:
                cache.verified_file(entry, "rootfs.tar")
        except Exception as exc:  # noqa: BLE001 - what the test reports
            seen.append(f"{type(exc).__name__}: {exc}")
        stop.wait(0.0005)  # type: ignore[attr-defined]
    results.put(seen)  # type: ignore[attr-defined]


@pytest.mark.parametrize("before", ["missing", "cached", "damaged"])
def test_builds_of_one_entry_at_once_all_use_it_and_a_reader_keeps_it(tmp_path, before):
    for n in range(ROUNDS):
        root = tmp_path / f"cache{n}"
        cache = StepCache(root)
        if before != "missing":
            with cache.put("rootfs", KEY, INPUTS) as staging:
                (staging / "rootfs.tar").write_bytes(DATA)
        if before == "damaged":
            (cache.path("rootfs", KEY) / "rootfs.tar").write_bytes(DATA[:-1])  # a miss: rebuilt
        go, stop, results, seen = FORK.Event(), FORK.Event(), FORK.Queue(), FORK.Queue()
        builds = [FORK.Process(target=_build, args=(root, go, results)) for _ in range(3)]
        reader = FORK.Process(target=_read, args=(root, go, stop, seen))
        for p in [*builds, reader]:
            p.start()
        go.set()
        outcomes = [results.get(timeout=120) for _ in builds]
        stop.set()
        problems = seen.get(timeout=60)
        for p in [*builds, reader]:
            p.join(60)
        assert outcomes == ["ok"] * 3
        if before != "damaged":  # a damaged entry is replaced: a reader of it may lose it
            assert problems == []
        entry = cache.get("rootfs", KEY)
        assert entry is not None and cache.verified_file(entry, "rootfs.tar").read_bytes() == DATA
        assert os.listdir(root) == [entry.name]  # no partial or old folder left

"""The guest's receiver, driven with raw frames: resume, refusal of altered data, commit, install.

The receiver runs as its own process (``python -m tdxvm.guest.receiver``), as in the
guest; the test speaks the wire format of :mod:`tdxvm.guest.transferwire` itself, so
it can send what a correct controller never would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tdxvm.guest.receiver import MAX_NOTES, MAX_REFUSALS
from tdxvm.guest.staging import PARTIAL, Staging, StagingError, install_model, upload_path
from tdxvm.guest.transferwire import (
    END_OF_STREAM,
    MAC_KEY_SIZE,
    MAGIC,
    MIN_BLOCK_SIZE,
    SEGMENT,
    BlockMac,
    Manifest,
    ManifestFile,
    WireError,
    build_manifest,
)
from tdxvm.guest.weights import INDEX_NAME, WeightsError, encrypt_model, generate_model_key

BLOCK = MIN_BLOCK_SIZE
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory) -> tuple[Path, Path, bytes]:
    """(model folder, encrypted folder, key): two weight files of several blocks and a small one."""
    root = tmp_path_factory.mktemp("enc")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model-1.safetensors").write_bytes(os.urandom(5 * BLOCK + 1234))
    (model / "model-2.safetensors").write_bytes(os.urandom(3 * BLOCK))
    key = generate_model_key()
    encrypt_model(model, root / "enc", key, chunk_size=4096)
    return model, root / "enc", key


def same_tree(a: Path, b: Path) -> bool:
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    return files(a) == files(b) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


class Session:
    """One receiver process and what the controller side would say to it."""

    live: list[Session] = []  # ended after each test (see the autouse fixture below)

    def __init__(self, manifest: Manifest, enc: Path, dest: Path, *, lock_timeout: float = 10.0) -> None:
        self.manifest, self.enc, self.dest = manifest, enc, dest
        Session.live.append(self)
        self.key = secrets.token_bytes(MAC_KEY_SIZE)
        self.mac = BlockMac(self.key)
        cmd = [
            sys.executable,
            "-m",
            "tdxvm.guest.receiver",
            "--dest",
            str(dest),
            "--listen",
            "127.0.0.1:0",
            "--expect",
            manifest.upload_id,
            "--lock-timeout",
            str(lock_timeout),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
        )
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(manifest.to_bytes() + b"\n" + json.dumps({"mac_key": self.key.hex()}).encode() + b"\n")
        self.proc.stdin.flush()
        self.ready = self.line()

    def line(self) -> dict:
        assert self.proc.stdout
        raw = self.proc.stdout.readline()
        assert raw, (
            f"receiver exited: {self.proc.wait()} {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
        )
        return json.loads(raw)

    def control(self, op: str) -> dict:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps({"op": op}).encode() + b"\n")
        self.proc.stdin.flush()
        return self.line()

    def stream(self, token: bytes | None = None) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.ready["port"]), timeout=10)
        s.sendall(MAGIC + (token if token is not None else bytes.fromhex(self.ready["token"])))
        return s

    def block(self, i: int, b: int) -> bytes:
        with (self.enc / self.manifest.files[i].name).open("rb") as f:
            f.seek(b * self.manifest.block_size)
            return f.read(self.manifest.block_len(i, b))

    def send(
        self, blocks: list[tuple[int, int]], *, alter: tuple[int, int] | None = None, data_of: dict | None = None
    ) -> dict:
        """Send single-block segments; ``alter`` flips a byte of that block after tagging it."""
        with self.stream() as s:
            for i, b in blocks:
                data = (data_of or {}).get((i, b)) or self.block(i, b)
                tag = self.mac.tag(i, b, data)
                if (i, b) == alter:
                    data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
                try:
                    s.sendall(SEGMENT.pack(i, 1, b) + tag + data)
                except OSError:
                    break
            with contextlib.suppress(OSError):
                s.sendall(SEGMENT.pack(END_OF_STREAM, 0, 0))
            return json.loads(s.makefile("rb").readline())

    def all_blocks(self) -> list[tuple[int, int]]:
        return [(i, b) for i, f in enumerate(self.manifest.files) for b in range(f.blocks(self.manifest.block_size))]

    def stop(self) -> int:
        assert self.proc.stdin
        self.proc.stdin.close()  # the SSH session ending
        return self.proc.wait(10)

    def end(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture(autouse=True)
def _end_sessions():
    yield
    while Session.live:
        Session.live.pop().end()


@pytest.fixture
def manifest(encrypted) -> Manifest:
    return build_manifest(encrypted[1], block_size=BLOCK)


def by_size(manifest: Manifest) -> list[int]:
    """File indexes, largest first (blob names are random file ids, so the order in the manifest is too)."""
    return sorted(range(len(manifest.files)), key=lambda i: -manifest.files[i].size)


# -- manifest ------------------------------------------------------------------------------


def test_manifest_names_one_encryption(encrypted, manifest, tmp_path):
    _, enc, key = encrypted
    assert manifest.files[0].name == INDEX_NAME and len(manifest.files) == 4
    assert Manifest.from_bytes(manifest.to_bytes(), expect=manifest.upload_id) == manifest
    assert manifest.total_bytes == sum(p.stat().st_size for p in enc.rglob("*.tdxw"))
    with pytest.raises(WireError) as e:
        Manifest.from_bytes(manifest.to_bytes(), expect="00" * 32)
    assert e.value.code == "manifest-mismatch"
    # the same model encrypted again (same key even) is another upload
    again = tmp_path / "again"
    encrypt_model(encrypted[0], again, key, chunk_size=4096)
    assert build_manifest(again, block_size=BLOCK).upload_id != manifest.upload_id


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["files"][1].update(size=d["files"][1]["size"] + 16), "its header says"),
        (lambda d: d["files"][1].update(name="files/../../etc/passwd"), "neither"),
        (lambda d: d["files"][1].update(name="files/" + "0" * 32 + ".tdxw"), "not the one its name gives"),
        (lambda d: d["files"].append(dict(d["files"][0])), "duplicate"),
        (lambda d: d.update(block=1000), "multiple of 4096"),
        (lambda d: d["files"][2].update(header="00" * 96), "bad magic"),
    ],
)
def test_manifest_checks(manifest, edit, message):
    doc = json.loads(manifest.to_bytes())
    edit(doc)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(WireError, match=message):
        Manifest.from_bytes(raw)


def test_manifest_of_a_folder_with_strays_is_refused(encrypted, tmp_path):
    enc = tmp_path / "enc"
    shutil.copytree(encrypted[1], enc)
    (enc / "files" / ".tmp.tdxw").write_bytes(b"x")
    with pytest.raises(WireError, match="unexpected entry") as e:
        build_manifest(enc)
    assert e.value.code == "bad-folder"
    with pytest.raises(WireError, match="no index.tdxw"):
        build_manifest(tmp_path)


# -- receiving -----------------------------------------------------------------------------


def test_full_receive_commits_in_one_rename(encrypted, manifest, tmp_path):
    dest = tmp_path / "uploads"
    s = Session(manifest, encrypted[1], dest)
    assert s.ready["ok"] and s.ready["have"] == 0 and s.ready["total"] == manifest.total_bytes
    assert s.ready["resume"] == {f.name: 0 for f in manifest.files}
    reply = s.send(s.all_blocks())
    assert reply == {"ok": True, "blocks": len(s.all_blocks())}
    assert not upload_path(dest, manifest.upload_id).exists()  # nothing visible before commit
    done = s.control("commit")
    assert (
        done["ok"] and done["committed"] == str(dest / manifest.upload_id) and done["received"] == manifest.total_bytes
    )
    assert s.proc.wait(10) == 0
    assert same_tree(encrypted[1], dest / manifest.upload_id)
    assert list((dest / PARTIAL).iterdir()) == []
    # a retry of a complete upload needs nothing
    again = Session(manifest, encrypted[1], dest)
    assert again.ready["complete"] and again.ready["have"] == manifest.total_bytes and again.ready["missing"] == {}
    assert again.control("commit")["ok"] and again.proc.wait(10) == 0


def test_interrupted_receive_resumes_from_verified_blocks(encrypted, manifest, tmp_path):
    dest = tmp_path / "uploads"
    s = Session(manifest, encrypted[1], dest)
    blocks = s.all_blocks()
    big = by_size(manifest)[0]
    assert manifest.files[big].blocks(BLOCK) == 6
    first = [(0, 0), (big, 0), (big, 1), (big, 2), (big, 5)]  # leaves a hole, as parallel streams can
    assert s.send(first)["ok"]
    assert s.stop() == 3  # stdin closed: stopped, partial kept
    assert not upload_path(dest, manifest.upload_id).exists()

    s2 = Session(manifest, encrypted[1], dest)
    have = sum(manifest.block_len(i, b) for i, b in first)
    assert s2.ready["have"] == have and not s2.ready["complete"]
    f1 = manifest.files[big].name
    assert s2.ready["missing"][f1] == [[3 * BLOCK, 5 * BLOCK]]
    assert s2.ready["resume"][f1] == 3 * BLOCK
    assert s2.control("commit")["code"] == "incomplete"  # and it goes on serving
    rest = [x for x in blocks if x not in first]
    assert s2.send(rest)["ok"]
    assert s2.control("commit")["ok"]
    assert same_tree(encrypted[1], dest / manifest.upload_id)


def test_altered_block_is_refused_and_not_kept(encrypted, manifest, tmp_path):
    dest = tmp_path / "uploads"
    s = Session(manifest, encrypted[1], dest)
    big = by_size(manifest)[0]
    blocks = [(big, b) for b in range(4)]
    reply = s.send(blocks, alter=(big, 2))
    assert reply["ok"] is False and reply["code"] == "refused"
    assert (
        f"{manifest.files[big].name}: block 2 (bytes {2 * BLOCK}.." in reply["error"]
        and "fails its tag" in reply["error"]
    )
    assert s.stop() == 3
    s2 = Session(manifest, encrypted[1], dest)
    assert s2.ready["have"] == 2 * BLOCK  # the blocks before the altered one; neither it nor any after
    s2.stop()


def test_block_with_a_valid_tag_but_another_header_is_refused(encrypted, manifest, tmp_path):
    """A controller whose file changed after the manifest was made: block 0 must carry the listed header."""
    s = Session(manifest, encrypted[1], tmp_path / "uploads")
    other = bytearray(s.block(1, 0))
    other[20] ^= 1  # inside the header (its file id)
    reply = s.send([(1, 0)], data_of={(1, 0): bytes(other)})
    assert reply["code"] == "header-mismatch"
    s.stop()


@pytest.mark.parametrize(
    "segment, message",
    [((9, 1, 0), "manifest has 4"), ((1, 1, 6), "outside"), ((1, 0, 0), "outside")],
)
def test_out_of_protocol_segments_are_refused(encrypted, manifest, tmp_path, segment, message):
    s = Session(manifest, encrypted[1], tmp_path / "uploads")
    with s.stream() as conn:
        conn.sendall(SEGMENT.pack(*segment))
        reply = json.loads(conn.makefile("rb").readline())
    assert reply["code"] == "protocol" and message in reply["error"]
    s.stop()


def test_stream_without_the_token_is_dropped(encrypted, manifest, tmp_path):
    s = Session(manifest, encrypted[1], tmp_path / "uploads")
    with s.stream(token=bytes(16)) as conn:
        with contextlib.suppress(OSError):
            conn.sendall(
                SEGMENT.pack(0, 1, 0)
                + s.mac.tag(0, 0, s.block(0, 0))
                + s.block(0, 0)
                + SEGMENT.pack(END_OF_STREAM, 0, 0)
            )
        try:
            answer = conn.recv(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed without a word
    assert s.stop() == 3
    assert Session(manifest, encrypted[1], tmp_path / "uploads").ready["have"] == 0


def test_what_strangers_make_the_receiver_say_is_bounded(encrypted, manifest, tmp_path):
    """The port is open to anyone the host lets reach it: connections without the token and
    streams of nonsense cost a bounded number of stderr lines and reasons, never more."""
    s = Session(manifest, encrypted[1], tmp_path / "uploads")
    for _ in range(MAX_NOTES + 20):
        with s.stream(token=bytes(16)) as conn, contextlib.suppress(OSError):
            conn.recv(1)  # closed without a word
    for _ in range(MAX_REFUSALS + 4):
        with s.stream() as conn:
            conn.sendall(SEGMENT.pack(9, 1, 0))
            assert json.loads(conn.makefile("rb").readline())["code"] == "protocol"
    assert s.send(s.all_blocks())["ok"]
    done = s.control("commit")
    assert done["ok"] and done["refused"] == MAX_REFUSALS + 4 and len(done["refusals"]) == MAX_REFUSALS
    assert s.proc.wait(10) == 0 and s.proc.stderr is not None
    said = s.proc.stderr.read().decode().splitlines()
    assert len(said) == MAX_NOTES and said[-1].endswith("(further notes left out)")


def test_manifest_mismatch_and_busy_upload(encrypted, manifest, tmp_path):
    dest = tmp_path / "uploads"
    bad = subprocess.run(
        [sys.executable, "-m", "tdxvm.guest.receiver", "--dest", str(dest), "--expect", "00" * 32],
        input=manifest.to_bytes() + b"\n" + json.dumps({"mac_key": "11" * 32}).encode() + b"\n",
        capture_output=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and json.loads(bad.stdout)["code"] == "manifest-mismatch"
    first = Session(manifest, encrypted[1], dest)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "tdxvm.guest.receiver",
            "--dest",
            str(dest),
            "--expect",
            manifest.upload_id,
            "--lock-timeout",
            "0.3",
        ],
        input=manifest.to_bytes() + b"\n" + json.dumps({"mac_key": "11" * 32}).encode() + b"\n",
        capture_output=True,
        cwd=REPO,
    )
    assert second.returncode == 1 and json.loads(second.stdout)["code"] == "busy"
    first.stop()


# -- the partial state on disk ------------------------------------------------------------------


def _stage_all(dest: Path, manifest: Manifest, enc: Path, blocks: list[tuple[int, int]] | None = None) -> None:
    st = Staging.open(dest, manifest)
    for i, f in enumerate(manifest.files):
        data = (enc / f.name).read_bytes()
        for b in range(f.blocks(manifest.block_size)):
            if blocks is None or (i, b) in blocks:
                st.write_block(i, b, memoryview(data)[b * manifest.block_size : (b + 1) * manifest.block_size])
    st.close()


def test_damaged_partial_data_is_found_on_resume(encrypted, manifest, tmp_path):
    dest, enc = tmp_path / "uploads", encrypted[1]
    _stage_all(dest, manifest, enc)
    data = dest / PARTIAL / manifest.upload_id / "data"
    big, mid = by_size(manifest)[:2]
    f1, f2 = manifest.files[big].name, manifest.files[mid].name
    with (data / f1).open("r+b") as f:  # bit rot / a torn write in block 2
        f.seek(2 * BLOCK + 77)
        byte = f.read(1)
        f.seek(2 * BLOCK + 77)
        f.write(bytes([byte[0] ^ 0x80]))
    os.truncate(data / f2, BLOCK + 10)  # a crash before writeback: blocks 1.. lost
    st = Staging.open(dest, manifest)
    report = st.resume_report()
    assert report["missing"] == {f1: [[2 * BLOCK, 3 * BLOCK]], f2: [[BLOCK, manifest.files[mid].size]]}
    assert report["resume"][f1] == 2 * BLOCK
    with pytest.raises(StagingError, match="blocks still missing") as e:
        st.commit()
    assert e.value.code == "incomplete" and not upload_path(dest, manifest.upload_id).exists()
    st.close()

    (dest / PARTIAL / manifest.upload_id / "state" / "key").write_bytes(b"torn")  # the local key lost: nothing trusted
    st = Staging.open(dest, manifest)
    assert st.have_bytes() == 0
    st.close()


def test_commit_is_durable_and_complete(encrypted, manifest, tmp_path):
    dest, enc = tmp_path / "uploads", encrypted[1]
    _stage_all(dest, manifest, enc)
    st = Staging.open(dest, manifest)
    assert st.is_complete()
    path = st.commit()
    st.close()
    assert path == dest / manifest.upload_id and same_tree(enc, path)
    assert (
        not (dest / PARTIAL / manifest.upload_id).exists()
        and not (dest / PARTIAL / f"{manifest.upload_id}.lock").exists()
    )
    # a truncated "complete" folder is not taken as complete
    (path / manifest.files[by_size(manifest)[0]].name).write_bytes(b"short")
    with pytest.raises(StagingError, match="wrong size") as e:
        Staging.open(dest, manifest)
    assert e.value.code == "inconsistent"


def test_write_block_checks_the_manifest_header(encrypted, tmp_path):
    m = build_manifest(encrypted[1], block_size=BLOCK)
    f = m.files[1]
    forged = Manifest(
        block_size=BLOCK, files=(m.files[0], ManifestFile(f.name, f.size, f.header[:-1] + b"\x01"), *m.files[2:])
    )
    st = Staging.open(tmp_path, forged)
    with pytest.raises(WireError, match="does not start with the header"):
        st.write_block(1, 0, memoryview((encrypted[1] / f.name).read_bytes())[:BLOCK])
    st.close()


# -- installing ------------------------------------------------------------------------------------


def test_install_model_all_or_nothing(encrypted, manifest, tmp_path):
    model, enc, key = encrypted
    dest = tmp_path / "uploads"
    _stage_all(dest, manifest, enc)
    st = Staging.open(dest, manifest)
    upload = st.commit()
    st.close()
    served = tmp_path / "models" / "llama"
    # leftovers of an install killed half way: removed, never loaded
    (served.parent / ".llama.installing-dead").mkdir(parents=True)
    (served.parent / ".llama.installing-dead" / "config.json").write_text("{}")
    (served.parent / "..llama.installing-dead.partial-1").mkdir()
    entries = install_model(upload, served, key)
    assert len(entries) == 3 and same_tree(model, served)
    assert sorted(p.name for p in served.parent.iterdir()) == ["llama"]

    with pytest.raises(StagingError) as e:
        install_model(upload, served, key)
    assert e.value.code == "exists"

    # a damaged upload (or the wrong key) leaves the installed model as it was, and no partial one
    with (upload / manifest.files[by_size(manifest)[0]].name).open("r+b") as f:
        f.seek(200)
        f.write(b"\xff")
    with pytest.raises(WeightsError, match="fails authentication"):
        install_model(upload, served, key, replace=True)
    assert same_tree(model, served) and sorted(p.name for p in served.parent.iterdir()) == ["llama"]
    with pytest.raises(WeightsError):
        install_model(upload, tmp_path / "models" / "other", generate_model_key())
    assert sorted(p.name for p in served.parent.iterdir()) == ["llama"]


def test_install_model_replace_swaps_in_the_new_model(encrypted, manifest, tmp_path):
    model, enc, key = encrypted
    served = tmp_path / "llama"
    served.mkdir()
    (served / "old.bin").write_bytes(b"old")
    install_model(enc, served, key, replace=True)
    assert same_tree(model, served) and sorted(p.name for p in tmp_path.iterdir()) == ["llama"]

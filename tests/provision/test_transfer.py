"""Uploads through a real OpenSSH server on loopback: full, interrupted, damaged, tampered.

The receiver runs on this host as the guest side, started through a private sshd
(:mod:`tests.provision.sshd`) by the paramiko client with the server's host key pinned,
exactly as :func:`tdxvm.provision.transfer.upload` starts it in a guest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tdxvm.guest.staging import PARTIAL, Staging, install_model, upload_path
from tdxvm.guest.transferwire import MIN_BLOCK_SIZE, build_manifest
from tdxvm.guest.weights import encrypt_model, generate_model_key
from tdxvm.provision.transfer import TransferError, upload
from tests.provision.sshd import LocalSshd, unavailable

BLOCK = MIN_BLOCK_SIZE
REPO = Path(__file__).resolve().parents[2]
GUEST_PYTHON = ["env", f"PYTHONPATH={REPO}", sys.executable]


@pytest.fixture(scope="module")
def sshd():
    why = unavailable()
    if why:
        pytest.skip(f"no private sshd: {why}")
    with LocalSshd() as server:
        yield server


@pytest.fixture(scope="module")
def client(sshd):
    c = sshd.client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory) -> tuple[Path, Path, bytes]:
    root = tmp_path_factory.mktemp("enc")
    model = root / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer" / "tokenizer.json").write_bytes(os.urandom(70_000))
    (model / "model.safetensors").write_bytes(os.urandom(6 << 20))
    key = generate_model_key()
    encrypt_model(model, root / "enc", key, chunk_size=BLOCK)
    return model, root / "enc", key


def same_tree(a: Path, b: Path) -> bool:
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    return files(a) == files(b) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def verified_blocks(dest: Path, upload_id: str) -> int:
    """Blocks the receiver has verified and written so far (non-zero stored tags)."""
    state = dest / PARTIAL / upload_id / "state"
    n = 0
    for p in state.glob("*.tags") if state.is_dir() else []:
        raw = p.read_bytes()
        n += sum(1 for i in range(0, len(raw) - 15, 16) if raw[i : i + 16] != bytes(16))
    return n


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def receiver_pids(dest: Path) -> list[int]:
    """Receiver processes working on ``dest`` (this test's own temporary folder)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                if b"tdxvm.guest.receiver" in cmd and str(dest).encode() in cmd:
                    pids.append(int(p.name))
    return pids


class Interrupted(Exception):
    pass


class Proxy:
    """A TCP man in the middle: forwards to ``target``, counts client bytes, may flip one."""

    def __init__(self, target: tuple[str, int], *, flip_at: int | None = None) -> None:
        self.target, self.flip_at = target, flip_at
        self.forwarded = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        offset = 0
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if upstream:
                    if self.flip_at is not None and offset <= self.flip_at < offset + len(data):
                        i = self.flip_at - offset
                        data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
                    offset += len(data)
                    self.forwarded += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- full uploads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via, streams", [("tcp", 1), ("tcp", 3), ("ssh", 2)])
def test_full_upload_then_install(client, encrypted, tmp_path, via, streams):
    model, enc, key = encrypted
    dest = tmp_path / "uploads"
    upload_id = build_manifest(enc, block_size=BLOCK).upload_id
    seen: list[tuple[int, int]] = []

    def progress(held: int, total: int) -> None:
        assert not upload_path(dest, upload_id).exists()  # never visible before it is complete
        seen.append((held, total))

    report = upload(
        enc,
        ssh_client=client,
        guest_address="127.0.0.1",
        via=via,
        streams=streams,
        dest=str(dest),
        python=GUEST_PYTHON,
        block_size=BLOCK,
        progress=progress,
    )
    total = sum(p.stat().st_size for p in enc.rglob("*.tdxw"))
    assert (report.via, report.streams, report.total_bytes, report.sent_bytes, report.resumed_bytes) == (
        via,
        streams,
        total,
        total,
        0,
    )
    assert report.upload_id == upload_id and report.remote_path == str(dest / upload_id)
    assert report.bytes_per_second > 0 and report.to_dict()["bytes_per_second"] > 0
    assert seen[0] == (0, total) and seen[-1] == (total, total) and [h for h, _ in seen] == sorted(h for h, _ in seen)
    assert same_tree(enc, dest / upload_id) and not any((dest / PARTIAL).iterdir())
    install_model(dest / upload_id, tmp_path / "served", key)
    assert same_tree(model, tmp_path / "served")

    again = upload(
        enc,
        ssh_client=client,
        guest_address="127.0.0.1",
        via=via,
        dest=str(dest),
        python=GUEST_PYTHON,
        block_size=BLOCK,
    )
    assert (again.sent_bytes, again.resumed_bytes, again.streams) == (0, total, 0)


def test_receiver_on_the_guests_python(client, encrypted, tmp_path):
    """Debian 12's python3 with its cryptography 38, as in the guest image: interrupted, resumed."""
    system = "/usr/bin/python3"
    if (
        not Path(system).exists()
        or subprocess.run([system, "-c", "import cryptography"], capture_output=True).returncode
    ):
        pytest.skip(f"{system} with cryptography is not installed")
    guest = ["env", f"PYTHONPATH={REPO}", system]
    enc, dest = encrypted[1], tmp_path / "uploads"
    upload_id = build_manifest(enc, block_size=BLOCK).upload_id

    def stop(held: int, total: int) -> None:
        if held > total // 2:
            wait_for(lambda: verified_blocks(dest, upload_id) >= 4, "the guest to verify some blocks")
            raise Interrupted()

    with pytest.raises(Interrupted):
        upload(
            enc,
            ssh_client=client,
            guest_address="127.0.0.1",
            dest=str(dest),
            python=guest,
            block_size=BLOCK,
            progress=stop,
        )
    wait_for(lambda: not receiver_pids(dest), "the receiver to exit")
    report = upload(enc, ssh_client=client, guest_address="127.0.0.1", dest=str(dest), python=guest, block_size=BLOCK)
    assert report.resumed_bytes > 0 and same_tree(enc, Path(report.remote_path))


# -- interrupted, damaged, tampered ---------------------------------------------------------------------


def test_interrupted_upload_resumes_with_only_the_rest(client, encrypted, tmp_path):
    enc = encrypted[1]
    dest = tmp_path / "uploads"
    upload_id = build_manifest(enc, block_size=BLOCK).upload_id

    def stop_half_way(held: int, total: int) -> None:
        if held > total // 2:
            wait_for(lambda: verified_blocks(dest, upload_id) >= 8, "the guest to verify some blocks")
            raise Interrupted()

    with pytest.raises(Interrupted):
        upload(
            enc,
            ssh_client=client,
            guest_address="127.0.0.1",
            streams=1,
            dest=str(dest),
            python=GUEST_PYTHON,
            block_size=BLOCK,
            progress=stop_half_way,
        )
    assert not upload_path(dest, upload_id).exists()
    wait_for(lambda: not receiver_pids(dest), "the receiver to exit")
    manifest = build_manifest(enc, block_size=BLOCK)
    st = Staging.open(dest, manifest)
    held = st.have_bytes()
    st.close()
    assert 0 < held < manifest.total_bytes

    port = free_port()
    proxy = Proxy(("127.0.0.1", port))  # counts what really crosses the wire
    try:
        report = upload(
            enc,
            ssh_client=client,
            guest_address=("127.0.0.1", proxy.port),
            listen=f"127.0.0.1:{port}",
            streams=1,
            dest=str(dest),
            python=GUEST_PYTHON,
            block_size=BLOCK,
        )
    finally:
        proxy.close()
    assert report.resumed_bytes == held and report.sent_bytes == manifest.total_bytes - held
    blocks = -(-report.sent_bytes // BLOCK) + len(manifest.files)
    assert (
        report.sent_bytes <= proxy.forwarded <= report.sent_bytes + 40 + blocks * (16 + 16)
    )  # + hello, segments, tags
    assert same_tree(enc, dest / upload_id)


def test_receiver_killed_mid_stream_then_resumed(client, encrypted, tmp_path):
    enc = encrypted[1]
    dest = tmp_path / "uploads"
    upload_id = build_manifest(enc, block_size=BLOCK).upload_id
    killed: list[int] = []

    def kill_receiver(held: int, total: int) -> None:
        if held > total // 3 and not killed:
            wait_for(lambda: verified_blocks(dest, upload_id) >= 4, "the guest to verify some blocks")
            for pid in receiver_pids(dest):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    with pytest.raises(TransferError) as e:
        upload(
            enc,
            ssh_client=client,
            guest_address="127.0.0.1",
            streams=2,
            dest=str(dest),
            python=GUEST_PYTHON,
            block_size=BLOCK,
            progress=kill_receiver,
        )
    assert killed and e.value.code in ("stream", "receiver")
    assert not upload_path(dest, upload_id).exists()

    report = upload(
        enc,
        ssh_client=client,
        guest_address="127.0.0.1",
        streams=2,
        dest=str(dest),
        python=GUEST_PYTHON,
        block_size=BLOCK,
    )
    assert report.resumed_bytes > 0 and report.sent_bytes == report.total_bytes - report.resumed_bytes
    assert same_tree(enc, dest / upload_id)


def test_damaged_partial_data_is_sent_again(client, encrypted, tmp_path):
    enc = encrypted[1]
    dest = tmp_path / "uploads"
    manifest = build_manifest(enc, block_size=BLOCK)

    def stop(held: int, total: int) -> None:
        if held > total // 2:
            wait_for(lambda: verified_blocks(dest, manifest.upload_id) >= 8, "the guest to verify some blocks")
            raise Interrupted()

    with pytest.raises(Interrupted):
        upload(
            enc,
            ssh_client=client,
            guest_address="127.0.0.1",
            streams=1,
            dest=str(dest),
            python=GUEST_PYTHON,
            block_size=BLOCK,
            progress=stop,
        )
    wait_for(lambda: not receiver_pids(dest), "the receiver to exit")
    st = Staging.open(dest, manifest)
    held = st.have_bytes()
    big = max(range(len(manifest.files)), key=lambda i: manifest.files[i].size)
    assert st.verified[big][1]
    st.close()
    partial = dest / PARTIAL / manifest.upload_id / "data" / manifest.files[big].name
    with partial.open("r+b") as f:  # the disk returns something else for block 1
        f.seek(BLOCK + 5000)
        byte = f.read(1)
        f.seek(BLOCK + 5000)
        f.write(bytes([byte[0] ^ 0xFF]))

    report = upload(
        enc, ssh_client=client, guest_address="127.0.0.1", dest=str(dest), python=GUEST_PYTHON, block_size=BLOCK
    )
    assert report.resumed_bytes == held - BLOCK  # everything but the damaged block
    assert same_tree(enc, dest / manifest.upload_id)


def test_tampered_stream_is_refused(client, encrypted, tmp_path):
    enc = encrypted[1]
    dest = tmp_path / "uploads"
    upload_id = build_manifest(enc, block_size=BLOCK).upload_id
    port = free_port()
    proxy = Proxy(("127.0.0.1", port), flip_at=3 * BLOCK + 1000)  # one bit, in the third block or so
    try:
        with pytest.raises(TransferError) as e:
            upload(
                enc,
                ssh_client=client,
                guest_address=("127.0.0.1", proxy.port),
                listen=f"127.0.0.1:{port}",
                streams=1,
                dest=str(dest),
                python=GUEST_PYTHON,
                block_size=BLOCK,
            )
    finally:
        proxy.close()
    # what the stream says only explains: it may be the host's forward speaking, so it asks for a retry at most
    assert e.value.code == "stream" and "fails its tag" in str(e.value)
    assert not upload_path(dest, upload_id).exists()

    report = upload(
        enc, ssh_client=client, guest_address="127.0.0.1", dest=str(dest), python=GUEST_PYTHON, block_size=BLOCK
    )
    assert 0 < report.resumed_bytes < 3 * BLOCK + 1000  # only what came before the altered block was kept
    assert same_tree(enc, dest / upload_id)


# -- refusals before any byte --------------------------------------------------------------------------


def test_not_an_encrypted_folder(client, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(TransferError, match="not an encrypted model folder") as e:
        upload(
            tmp_path / "model",
            ssh_client=client,
            guest_address="127.0.0.1",
            dest=str(tmp_path / "d"),
            python=GUEST_PYTHON,
        )
    assert e.value.code == "bad-folder"


def test_receiver_that_cannot_start(client, encrypted, tmp_path):
    with pytest.raises(TransferError, match="No such file") as e:
        upload(
            encrypted[1],
            ssh_client=client,
            guest_address="127.0.0.1",
            dest=str(tmp_path),
            python=["/nonexistent/python3"],
            timeout=10,
        )
    assert e.value.code == "receiver"
    with pytest.raises(ValueError, match="guest_address"):
        upload(encrypted[1], ssh_client=client, guest_address=None, dest=str(tmp_path))
    with pytest.raises(ValueError, match="needs listen"):
        upload(encrypted[1], ssh_client=client, guest_address=("127.0.0.1", 7301), dest=str(tmp_path))

"""Encrypted weights: round trip, and every kind of tampering refused."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvm.guest.weights import (
    HEADER_SIZE,
    INDEX_NAME,
    TAG_SIZE,
    WeightsError,
    decrypt_model,
    encrypt_model,
    generate_model_key,
    read_index,
)

CHUNK = 4096


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model-00001-of-00002.safetensors").write_bytes(os.urandom(3 * CHUNK + 123))
    (d / "model-00002-of-00002.safetensors").write_bytes(os.urandom(2 * CHUNK))
    (d / "sub" / "tokenizer.model").write_bytes(os.urandom(100))
    (d / "empty.txt").write_bytes(b"")
    return d


@pytest.fixture
def key() -> bytes:
    return generate_model_key()


@pytest.fixture
def enc(model, key, tmp_path) -> Path:
    out = tmp_path / "enc"
    encrypt_model(model, out, key, chunk_size=CHUNK)
    return out


def same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / p).read_bytes() == (b / p).read_bytes() for p in fa)


def test_round_trip(model, enc, key, tmp_path):
    out = tmp_path / "out"
    done = []
    entries = decrypt_model(enc, out, key, progress=done.append)
    assert same_tree(model, out)
    assert sum(done) == sum(e.size for e in entries)
    assert {e.path for e in entries} == {
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "sub/tokenizer.model",
        "empty.txt",
    }


def test_ciphertext_reveals_no_names_or_content(model, enc):
    names = {p.name for p in enc.rglob("*")}
    assert not any("safetensors" in n or "config" in n or "tokenizer" in n for n in names)
    blobs = b"".join(p.read_bytes() for p in enc.rglob("*.tdxw"))
    for f in model.rglob("*"):
        if f.is_file() and f.stat().st_size >= 16:
            assert f.read_bytes()[:16] not in blobs
    assert b"llama" not in blobs and b"safetensors" not in blobs


def _blobs(enc: Path) -> list[Path]:
    return sorted((enc / "files").iterdir(), key=lambda p: p.stat().st_size, reverse=True)


def expect_refused(enc, key, tmp_path, needle):
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match=needle):
        decrypt_model(enc, out, key)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_wrong_key(enc, tmp_path):
    expect_refused(enc, generate_model_key(), tmp_path, "fails authentication")


def test_flipped_byte_anywhere_in_a_chunk(enc, key, tmp_path):
    big = _blobs(enc)[0]
    data = bytearray(big.read_bytes())
    data[HEADER_SIZE + (CHUNK + TAG_SIZE) + 7] ^= 1
    big.write_bytes(bytes(data))
    expect_refused(enc, key, tmp_path, r"chunk 1 \(byte 4208\) fails authentication")


def test_reordered_chunks(enc, key, tmp_path):
    big = _blobs(enc)[0]
    data = big.read_bytes()
    n = CHUNK + TAG_SIZE
    c0, c1 = data[HEADER_SIZE : HEADER_SIZE + n], data[HEADER_SIZE + n : HEADER_SIZE + 2 * n]
    big.write_bytes(data[:HEADER_SIZE] + c1 + c0 + data[HEADER_SIZE + 2 * n :])
    expect_refused(enc, key, tmp_path, "chunk 0")


def test_truncated_file(enc, key, tmp_path):
    big = _blobs(enc)[0]
    big.write_bytes(big.read_bytes()[: HEADER_SIZE + 2 * (CHUNK + TAG_SIZE)])
    expect_refused(enc, key, tmp_path, "truncated in chunk 2")


def test_truncated_at_chunk_boundary_with_edited_size(enc, key, tmp_path):
    """Dropping whole chunks and shrinking the size field: the header is authenticated."""
    big = _blobs(enc)[0]
    data = bytearray(big.read_bytes())
    struct.pack_into("<Q", data, 32, 2 * CHUNK)
    big.write_bytes(bytes(data[: HEADER_SIZE + 2 * (CHUNK + TAG_SIZE)]))
    expect_refused(enc, key, tmp_path, "does not match the index")


def test_header_is_authenticated_by_every_chunk(enc, key):
    """Even without the index, a header edit makes the chunks fail (header digest is AAD)."""
    import io

    from tdxvm.guest.weights import decrypt_chunks

    entry = next(e for e in read_index(enc, key) if e.size > 2 * CHUNK)
    data = bytearray((enc / entry.blob).read_bytes())
    data[40] ^= 1  # the plaintext SHA-256
    header, chunks = decrypt_chunks(io.BytesIO(bytes(data)), key=key, path=entry.path, where="x")
    with pytest.raises(WeightsError, match="chunk 0 .* fails authentication"):
        next(chunks)
    _, chunks = decrypt_chunks(io.BytesIO((enc / entry.blob).read_bytes()), key=key, path="another/path", where="x")
    with pytest.raises(WeightsError, match="fails authentication"):
        next(chunks)


def test_last_chunk_dropped_from_exact_multiple(enc, key, tmp_path):
    """A file of exactly 2 chunks cut to 1: the remaining chunk is not marked last."""
    two = [p for p in _blobs(enc) if p.stat().st_size == HEADER_SIZE + 2 * (CHUNK + TAG_SIZE)][0]
    two.write_bytes(two.read_bytes()[: HEADER_SIZE + CHUNK + TAG_SIZE])
    expect_refused(enc, key, tmp_path, "truncated in chunk 1")


def test_trailing_bytes(enc, key, tmp_path):
    big = _blobs(enc)[0]
    big.write_bytes(big.read_bytes() + b"x")
    expect_refused(enc, key, tmp_path, "after the last chunk")


def test_files_swapped(enc, key, tmp_path):
    """Swap two encrypted files of the same size: each opens only under its own path."""
    a, b = [p for p in _blobs(enc) if p.stat().st_size > HEADER_SIZE + TAG_SIZE][:2]
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    expect_refused(enc, key, tmp_path, "does not match the index|fails authentication")


def test_file_removed_or_index_replaced(enc, key, tmp_path, model):
    victim = _blobs(enc)[-1]
    victim.unlink()
    expect_refused(enc, key, tmp_path, "missing")
    # An index from another encryption of the same model, same key, does not fit.
    other = tmp_path / "other"
    encrypt_model(model, other, key, chunk_size=CHUNK)
    shutil.copy(other / INDEX_NAME, enc / INDEX_NAME)
    expect_refused(enc, key, tmp_path, "missing|does not match")


def test_header_edits(enc, key, tmp_path):
    big = _blobs(enc)[0]
    original = big.read_bytes()
    for offset, value, needle in [
        (0, b"X", "bad magic"),
        (8, b"\x03", "unsupported format"),
        (8, b"\x01", "format 1, from an earlier tdxvm .* encrypt the model again"),
        (12, b"\x00\x00\x00\x00", "chunk size"),
        (40, b"\x00", "does not match the index"),
    ]:
        data = bytearray(original)
        data[offset : offset + len(value)] = value
        big.write_bytes(bytes(data))
        expect_refused(enc, key, tmp_path, needle)


def test_the_folder_shows_no_files_sha256_to_whoever_holds_it(model, enc):
    """The host holds the encrypted folder (its upload passes the host's port forward): a
    plaintext SHA-256 in a header would let it confirm guesses of small files (the
    architecture in config.json). No file's SHA-256, raw or in hex, is anywhere in it."""
    import hashlib

    held = b"".join(p.read_bytes() for p in sorted(enc.rglob("*")) if p.is_file())
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).digest()
        assert digest not in held and digest.hex().encode() not in held, path


def test_decrypted_weights_are_their_owners_only(enc, key, tmp_path):
    old = os.umask(0o022)
    try:
        decrypt_model(enc, tmp_path / "out", key)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700
    assert set(modes.values()) == {0o600, 0o700} and modes["out/sub"] == 0o700, modes


def test_refuses_existing_targets(model, enc, key, tmp_path):
    with pytest.raises(WeightsError, match="not empty"):
        encrypt_model(model, enc, key)
    (tmp_path / "out").mkdir()
    with pytest.raises(WeightsError, match="already exists"):
        decrypt_model(enc, tmp_path / "out", key)


def test_symlinks_refused(model, key, tmp_path):
    (model / "link").symlink_to(model / "config.json")
    with pytest.raises(WeightsError, match="symbolic link"):
        encrypt_model(model, tmp_path / "enc2", key)


def test_index_lists_sizes_and_digests(model, enc, key):
    import hashlib

    for e in read_index(enc, key):
        data = (model / e.path).read_bytes()
        assert e.size == len(data) and e.sha256 == hashlib.sha256(data).digest()


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3 * 257 + 5), st.integers(min_value=1, max_value=300))
def test_any_size_round_trips(tmp_path_factory, data, chunk):
    base = tmp_path_factory.mktemp("w")
    (base / "m").mkdir()
    (base / "m" / "f.bin").write_bytes(data)
    key = generate_model_key()
    encrypt_model(base / "m", base / "e", key, chunk_size=chunk)
    decrypt_model(base / "e", base / "o", key)
    assert (base / "o" / "f.bin").read_bytes() == data

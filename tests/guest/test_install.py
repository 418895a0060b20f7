"""The guest's model install (``python3 -m tdxvm.guest.install``): decrypt, swap in, clean up, configure.

Every path the module would use in the guest (the key file, the model folder, its marker,
the service's environment file) is a folder under ``tmp_path`` here; the upload is a
model encrypted with :func:`tdxvm.guest.weights.encrypt_model` into a folder named like
an upload id, as the receiver leaves a complete upload.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tdxvm.guest import install as install_mod
from tdxvm.guest.install import (
    InstallError,
    Serving,
    configure,
    install,
    installed_upload,
    key_secret_name,
    main,
    serve_env,
)
from tdxvm.guest.weights import HEADER_SIZE, WeightsError, encrypt_model, generate_model_key

CHUNK = 4096
ID_A, ID_B = "ab" * 32, "cd" * 32


@dataclass(frozen=True)
class Guest:
    """The guest's install paths, all under one test folder."""

    key_file: Path
    model_dir: Path
    marker: Path
    env_file: Path
    uploads: Path

    def install(
        self,
        upload: Path,
        *,
        name: str = "tiny",
        dtype: str = "float32",
        threads: int | None = None,
        qgs: str | None = None,
    ) -> dict:
        return install(
            upload,
            serving=Serving(name=name, dtype=dtype, threads=threads),
            qgs=qgs,
            key_file=self.key_file,
            model_dir=self.model_dir,
            marker=self.marker,
            env_file=self.env_file,
        )

    def hidden_leftovers(self) -> list[str]:
        """Hidden files an install left beside the model (its lock file stays: it is reused)."""
        return sorted(
            p.name
            for p in self.model_dir.parent.iterdir()
            if p.name.startswith(".") and p.name != ".tdxvm-install.lock"
        )


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    lib = tmp_path / "var-lib-tdxvm"
    lib.mkdir()
    (tmp_path / "secrets").mkdir()
    return Guest(
        key_file=tmp_path / "secrets" / "model",
        model_dir=lib / "model",
        marker=lib / "model.installed",
        env_file=tmp_path / "etc" / "serve.env",
        uploads=tmp_path / "uploads",
    )


def make_model(folder: Path, files: dict[str, int]) -> Path:
    """A small Hugging Face-like folder: config.json and files of random bytes (name → size)."""
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    for name, size in files.items():
        (folder / name).write_bytes(os.urandom(size))
    return folder


def make_upload(guest: Guest, tmp_path: Path, upload_id: str, files: dict[str, int]) -> tuple[Path, Path, bytes]:
    """(plaintext model, complete upload folder, key); the key is put where the agent leaves it."""
    model = make_model(tmp_path / f"hf-{upload_id[:4]}", files)
    key = generate_model_key()
    upload = guest.uploads / upload_id
    encrypt_model(model, upload, key, chunk_size=CHUNK)
    guest.key_file.write_bytes(key)
    return model, upload, key


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FILES_A = {"model.safetensors": 3 * CHUNK + 17, "sub/tokenizer.model": 200}
FILES_B = {"weights-b.safetensors": 2 * CHUNK, "tokenizer.json": 50}


# -- install ---------------------------------------------------------------------------------


def test_install_decrypts_records_and_cleans_up(guest, tmp_path):
    model, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    result = guest.install(upload, name="llama-2-7b", dtype="bfloat16")
    assert tree(guest.model_dir) == tree(model)
    assert guest.marker.read_text() == ID_A + "\n"
    assert not guest.key_file.exists() and not upload.exists()
    assert guest.env_file.read_text() == "TDXVM_SERVE_ARGS=--name llama-2-7b --dtype bfloat16\n"
    assert result["ok"] is True and result["upload"] == ID_A and result["installed"] == str(guest.model_dir)
    assert result["files"] == 3 and result["bytes"] == sum(len(b) for b in tree(model).values())
    assert installed_upload(guest.marker, guest.model_dir) == ID_A
    assert guest.hidden_leftovers() == []


def test_install_env_file_with_threads_and_qgs(guest, tmp_path):
    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.install(upload, name="org/model:v1", threads=8, qgs="10.0.2.2:4050")
    assert (
        guest.env_file.read_text()
        == "TDXVM_SERVE_ARGS=--name org/model:v1 --dtype float32 --threads 8 --qgs 10.0.2.2:4050\n"
    )


def test_second_install_replaces_the_first(guest, tmp_path):
    _, upload_a, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.install(upload_a, name="a")
    model_b, upload_b, _ = make_upload(guest, tmp_path, ID_B, FILES_B)
    guest.install(upload_b, name="b", dtype="int8")
    assert tree(guest.model_dir) == tree(model_b)
    assert not (guest.model_dir / "model.safetensors").exists() and not (guest.model_dir / "sub").exists()
    assert guest.marker.read_text() == ID_B + "\n"
    assert guest.env_file.read_text() == "TDXVM_SERVE_ARGS=--name b --dtype int8\n"
    assert guest.hidden_leftovers() == []


def test_missing_key_file(guest, tmp_path):
    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.key_file.unlink()
    with pytest.raises(InstallError, match="no model key") as info:
        guest.install(upload)
    assert info.value.code == "no-key"
    assert upload.is_dir() and not guest.model_dir.exists() and not guest.env_file.exists()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_length(guest, tmp_path, size):
    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.key_file.write_bytes(os.urandom(size))
    with pytest.raises(InstallError, match=f"{size} bytes, expected a 32-byte model key") as info:
        guest.install(upload)
    assert info.value.code == "no-key"
    assert upload.is_dir() and guest.key_file.exists() and not guest.model_dir.exists()


def test_wrong_key_changes_nothing_but_the_marker(guest, tmp_path):
    model_a, upload_a, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.install(upload_a, name="a")
    _, upload_b, _ = make_upload(guest, tmp_path, ID_B, FILES_B)
    guest.key_file.write_bytes(generate_model_key())  # 32 bytes, but not this model's key
    with pytest.raises(WeightsError, match="fails authentication"):
        guest.install(upload_b, name="b")
    assert tree(guest.model_dir) == tree(model_a)  # the previous model, intact
    assert not guest.marker.exists()  # no upload counts as installed any more
    assert installed_upload(guest.marker, guest.model_dir) is None
    assert guest.key_file.exists() and upload_b.is_dir()  # kept for a retry
    assert guest.env_file.read_text() == "TDXVM_SERVE_ARGS=--name a --dtype float32\n"
    assert guest.hidden_leftovers() == []


def test_wrong_key_without_a_previous_model(guest, tmp_path):
    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.key_file.write_bytes(generate_model_key())
    with pytest.raises(WeightsError):
        guest.install(upload)
    assert not guest.model_dir.exists() and not guest.marker.exists() and not guest.env_file.exists()
    assert guest.hidden_leftovers() == []


def test_tampered_ciphertext_leaves_no_partial_model(guest, tmp_path):
    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    blob = max((upload / "files").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[HEADER_SIZE + 2 * CHUNK] ^= 1  # inside the last chunks: earlier files are already decrypted
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="fails authentication"):
        guest.install(upload)
    assert not guest.model_dir.exists() and not guest.marker.exists()
    assert guest.hidden_leftovers() == []
    assert guest.key_file.exists() and upload.is_dir()


def test_bad_arguments_are_refused_before_anything_is_touched(guest, tmp_path):
    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.install(upload, name="a")
    guest.key_file.write_bytes(generate_model_key())
    with pytest.raises(InstallError) as info:
        guest.install(upload, name="a b")
    assert info.value.code == "usage"
    assert guest.key_file.exists() and guest.marker.read_text() == ID_A + "\n"


def test_missing_upload_folder(guest, tmp_path):
    from tdxvm.guest.staging import StagingError

    guest.key_file.write_bytes(generate_model_key())
    with pytest.raises(StagingError, match="not a complete upload folder"):
        guest.install(guest.uploads / ID_A)
    assert not guest.model_dir.exists() and guest.key_file.exists()


# -- serve_env, configure, installed_upload ----------------------------------------------------


@pytest.mark.parametrize(
    ("serving", "qgs", "needle"),
    [
        (Serving(name="my model"), None, "model name"),
        (Serving(name="model\n"), None, "model name"),
        (Serving(name="a\nTDXVM_SERVE_ARGS=x"), None, "model name"),
        (Serving(name=""), None, "model name"),
        (Serving(name="-model"), None, "model name"),
        (Serving(name="m" * 129), None, "model name"),
        (Serving(name="model", dtype="float16"), None, "dtype 'float16'"),
        (Serving(name="model", threads=0), None, "threads 0"),
        (Serving(name="model", threads=1025), None, "threads 1025"),
        (Serving(name="model", max_batch=0), None, "max_batch 0: expected 1 to 256"),
        (Serving(name="model", max_batch=257), None, "max_batch 257"),
        (Serving(name="model", kv_cache_mib=-1), None, "kv_cache_mib -1"),
        (Serving(name="model", kv_cache_mib=2**20 + 1), None, "kv_cache_mib 1048577"),
        (Serving(name="model"), "localhost", "qgs 'localhost'"),
        (Serving(name="model"), "host:4050 --x", "qgs"),
    ],
)
def test_serve_env_refuses(serving, qgs, needle):
    with pytest.raises(InstallError, match=needle) as info:
        serve_env(serving, qgs)
    assert info.value.code == "usage"


def test_serve_env_accepts():
    serving = Serving(name="m" * 128, dtype="int8", threads=1024, max_batch=256, kv_cache_mib=2**20)
    assert serve_env(serving, "qgs.local:1") == (
        f"TDXVM_SERVE_ARGS=--name {'m' * 128} --dtype int8 --threads 1024 --max-batch 256 --kv-cache-mib 1048576 "
        "--qgs qgs.local:1\n".encode()
    )


def test_configure_reports_whether_the_arguments_changed(tmp_path):
    env_file = tmp_path / "etc" / "serve.env"
    first = configure(serving=Serving(name="m"), qgs=None, env_file=env_file)
    assert first == {"ok": True, "configured": str(env_file), "changed": True}
    assert env_file.read_text() == "TDXVM_SERVE_ARGS=--name m --dtype float32\n"
    assert configure(serving=Serving(name="m"), qgs=None, env_file=env_file)["changed"] is False
    assert configure(serving=Serving(name="m", threads=4), qgs=None, env_file=env_file)["changed"] is True
    assert env_file.read_text() == "TDXVM_SERVE_ARGS=--name m --dtype float32 --threads 4\n"
    assert configure(serving=Serving(name="m", threads=4, max_batch=4), qgs=None, env_file=env_file)["changed"] is True
    assert env_file.read_text() == "TDXVM_SERVE_ARGS=--name m --dtype float32 --threads 4 --max-batch 4\n"
    with pytest.raises(InstallError):
        configure(serving=Serving(name="m", dtype="fp8", threads=4), qgs=None, env_file=env_file)
    assert env_file.read_text() == "TDXVM_SERVE_ARGS=--name m --dtype float32 --threads 4 --max-batch 4\n"


def test_installed_upload_needs_marker_and_model(tmp_path):
    marker, model_dir = tmp_path / "model.installed", tmp_path / "model"
    assert installed_upload(marker, model_dir) is None
    marker.write_text(ID_A + "\n")
    assert installed_upload(marker, model_dir) is None  # no model folder
    model_dir.mkdir()
    (model_dir / "weights.safetensors").write_bytes(b"x")
    assert installed_upload(marker, model_dir) is None  # no config.json
    (model_dir / "config.json").write_text("{}")
    assert installed_upload(marker, model_dir) == ID_A
    marker.unlink()
    assert installed_upload(marker, model_dir) is None


# -- main ------------------------------------------------------------------------------------


@pytest.fixture
def as_guest(guest, monkeypatch) -> Guest:
    """Point the module's guest paths (main's defaults) at the test's; the key file is where
    the agent leaves the key of upload ID_A."""
    monkeypatch.setattr(install_mod, "MODEL_DIR", guest.model_dir)
    monkeypatch.setattr(install_mod, "INSTALLED", guest.marker)
    monkeypatch.setattr(install_mod, "SERVE_ENV", guest.env_file)
    monkeypatch.setattr(install_mod, "SECRETS_DIR", guest.key_file.parent)
    return dataclasses.replace(guest, key_file=guest.key_file.parent / key_secret_name(ID_A))


def run_main(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out  # exactly one JSON line
    return code, json.loads(out)


def test_main_check_when_nothing_is_installed(as_guest, capsys):
    assert run_main(capsys, "--check", ID_A) == (0, {"ok": True, "installed": False})


def test_main_install_then_check_then_configure(as_guest, tmp_path, capsys):
    _, upload, _ = make_upload(as_guest, tmp_path, ID_A, FILES_A)
    code, result = run_main(capsys, "--upload", str(upload), "--name", "tiny", "--threads", "2")
    assert code == 0 and result["ok"] is True and result["upload"] == ID_A and result["files"] == 3
    assert run_main(capsys, "--check", ID_A) == (0, {"ok": True, "installed": True})
    assert run_main(capsys, "--check", ID_B) == (0, {"ok": True, "installed": False})
    code, result = run_main(capsys, "--name", "tiny", "--threads", "2")
    assert (code, result["changed"]) == (0, False)
    code, result = run_main(capsys, "--name", "tiny", "--dtype", "bfloat16")
    assert (code, result["changed"]) == (0, True)
    assert as_guest.env_file.read_text() == "TDXVM_SERVE_ARGS=--name tiny --dtype bfloat16\n"
    code, result = run_main(capsys, "--name", "tiny", "--max-batch", "4", "--kv-cache-mib", "64")
    assert (code, result["changed"]) == (0, True)
    assert (
        as_guest.env_file.read_text()
        == "TDXVM_SERVE_ARGS=--name tiny --dtype float32 --max-batch 4 --kv-cache-mib 64\n"
    )
    code, result = run_main(capsys, "--name", "tiny", "--max-batch", "0")
    assert (code, result["code"]) == (2, "usage") and "max_batch 0" in result["error"]


def test_main_usage_error_without_name(as_guest, tmp_path, capsys):
    code, result = run_main(capsys, "--upload", str(tmp_path / "uploads" / ID_A))
    assert code == 2 and result["ok"] is False and result["code"] == "usage" and "--name" in result["error"]
    code, result = run_main(capsys, "--upload", str(tmp_path / "uploads" / ID_A), "--name", "bad name")
    assert code == 2 and result["code"] == "usage"


def test_main_configure_without_a_model(as_guest, capsys):
    code, result = run_main(capsys, "--name", "tiny")
    assert code == 1 and result["ok"] is False and result["code"] == "no-model"
    assert not as_guest.env_file.exists()


def test_main_failures_are_one_json_line(as_guest, tmp_path, capsys):
    _, upload, _ = make_upload(as_guest, tmp_path, ID_A, FILES_A)
    as_guest.key_file.write_bytes(generate_model_key())
    code, result = run_main(capsys, "--upload", str(upload), "--name", "tiny")
    assert (code, result["ok"], result["code"]) == (1, False, "weights")
    as_guest.key_file.unlink()
    code, result = run_main(capsys, "--upload", str(upload), "--name", "tiny")
    assert (code, result["code"]) == (1, "no-key")
    as_guest.key_file.write_bytes(generate_model_key())
    code, result = run_main(capsys, "--upload", str(tmp_path / "nowhere" / ID_A), "--name", "tiny")
    assert (code, result["code"]) == (1, "incomplete")


def test_an_install_that_finds_its_upload_installed_by_a_concurrent_one(guest, tmp_path):
    """A controller that died mid-install leaves the guest's install running; a retried
    provision's install waits for it (lock), then finds the model installed and only
    tidies up its own key file."""
    model, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    guest.install(upload, name="a")
    guest.key_file.write_bytes(bytes(32))  # released again by the retried provision
    again = guest.install(upload, name="a2")  # its upload folder is gone already
    assert again["already"] is True and again["files"] == 3 and tree(guest.model_dir) == tree(model)
    assert not guest.key_file.exists() and "--name a2" in guest.env_file.read_text()


def test_a_held_install_lock_is_reported(guest, tmp_path):
    import fcntl

    _, upload, _ = make_upload(guest, tmp_path, ID_A, FILES_A)
    lock = guest.marker.with_name(".tdxvm-install.lock")
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InstallError) as err:
            install(
                upload,
                serving=Serving(name="a"),
                qgs=None,
                key_file=guest.key_file,
                model_dir=guest.model_dir,
                marker=guest.marker,
                env_file=guest.env_file,
                lock_timeout=0.3,
            )
    assert err.value.code == "busy" and "another install" in str(err.value)
    assert upload.exists() and guest.key_file.exists()  # nothing touched

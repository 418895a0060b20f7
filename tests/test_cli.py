"""The tdxvm command: exit codes, JSON contract, clear errors (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from tdxvm.cli import cli, main
from tdxvm.secretstore import SecretStore
from tests.clirun import run
from tests.killedwriter import Writer

V4_AT = "2025-06-20T00:00:00Z"
MEASUREMENT_KEYS = {
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
    "mr_seam",
    "td_attributes",
    "xfam",
    "report_data",
}


def test_verify_quote_accepts_real_v4_json(capsys, testdata):
    d = testdata / "dcap-qvl-v4"
    code, out, err = run(
        capsys, "verify-quote", d / "quote.bin", "--collateral", d / "collateral.json", "--at", V4_AT, "-o", "json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verdict"] == "accept"
    assert doc["tcb_status"] == "UpToDate"
    assert doc["advisory_ids"] == [] and doc["reasons"] == []
    assert doc["quote_version"] == 4
    assert set(doc["measurements"]) >= MEASUREMENT_KEYS
    assert all(v == v.lower() for v in doc["measurements"].values() if v)


def test_verify_quote_human_summary(capsys, testdata):
    d = testdata / "dcap-qvl-v4"
    code, out, _ = run(
        capsys, "verify-quote", d / "quote.bin", "--collateral", d / "collateral.json", "--at", "1750377600"
    )
    assert code == 0
    assert "ACCEPTED" in out and "UpToDate" in out and "mrtd" in out


def test_verify_quote_hex_input(capsys, testdata, tmp_path):
    d = testdata / "dcap-qvl-v4"
    hexfile = tmp_path / "quote.hex"
    hexfile.write_text((d / "quote.bin").read_bytes().hex())
    code, _, _ = run(capsys, "verify-quote", hexfile, "--collateral", d / "collateral.json", "--at", V4_AT)
    assert code == 0


def test_verify_quote_refused_exit_1_with_reasons(capsys, testdata):
    d = testdata / "dcap-qvl-v4"
    code, out, _ = run(
        capsys,
        "verify-quote",
        d / "quote.bin",
        "--collateral",
        d / "collateral.json",
        "--at",
        "2025-07-21T00:00:00Z",
        "-o",
        "json",
    )
    assert code == 1
    doc = json.loads(out)
    assert doc["verdict"] == "reject" and doc["tcb_status"] is None
    assert "collateral-expired" in {r["code"] for r in doc["reasons"]}


def test_no_tcb_level_refused(capsys, testdata):
    d = testdata / "dcap-qvl-v5-no-tcb-level"
    code, out, _ = run(
        capsys,
        "verify-quote",
        d / "quote.bin",
        "--collateral",
        d / "collateral.json",
        "--at",
        "2026-03-01T00:00:00Z",
        "-o",
        "json",
    )
    assert code == 1
    assert [r["code"] for r in json.loads(out)["reasons"]] == ["tcb-level-not-found"]


def test_policy_file_mismatch(capsys, testdata, tmp_path):
    d = testdata / "dcap-qvl-v4"
    policy = tmp_path / "p.yaml"
    policy.write_text("mrtd: " + "00" * 48 + "\n")
    code, out, _ = run(
        capsys,
        "verify-quote",
        d / "quote.bin",
        "--collateral",
        d / "collateral.json",
        "--at",
        V4_AT,
        "--policy",
        policy,
        "-o",
        "json",
    )
    assert code == 1
    reasons = json.loads(out)["reasons"]
    assert reasons[0]["code"] == "measurement-mismatch" and "MR_TD" in reasons[0]["message"]


@pytest.mark.parametrize(
    ("args", "needle", "code_"),
    [
        (["verify-quote", "/nonexistent/quote.bin", "--collateral", "x"], "quote /nonexistent/quote.bin", "usage"),
        (["verify-quote", "{q}", "--collateral", "{q}"], "not UTF-8", "collateral"),
        (["verify-quote", "{q}", "--collateral", "{c}", "--at", "yesterday"], "--at", "usage"),
        (["verify-quote", "{q}", "--collateral", "{c}", "--policy", "{c}"], "policy", "policy-file"),
        (["verify-quote", "{q}", "--collateral", "{c}", "--root-ca", "{c}"], "root CA", "certificate"),
        (["verify-quote", "{q}", "--collateral", "{c}", "--pccs", "http://127.0.0.1:9"], "not both", "usage"),
        # The verifier's own inputs come first: a broken bundle is an error even beside a broken quote.
        (["verify-quote", "{c}", "--collateral", "{q}"], "not UTF-8", "collateral"),
    ],
)
def test_unusable_input_exit_2_one_line(capsys, testdata, args, needle, code_):
    d = testdata / "dcap-qvl-v4"
    argv = [a.format(q=d / "quote.bin", c=d / "collateral.json") for a in args]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    assert needle in err, err
    code, out, _ = run(capsys, *argv, "-o", "json")
    assert code == 2
    doc = json.loads(out)
    assert doc["verdict"] == "error" and doc["error"]["code"] == code_ and needle in doc["error"]["message"]


def test_eventlog_replay_matches_quote(capsys, testdata):
    d = testdata / "go-tdx-guest-ccel"
    code, out, _ = run(
        capsys,
        "eventlog",
        "replay",
        d / "ccel_data.bin",
        "--quote",
        d / "quote.bin",
        "--ccel-table",
        d / "ccel_table.bin",
        "-o",
        "json",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["matches"] is True and all(c["matches"] for c in doc["comparison"])


def test_eventlog_replay_names_differing_register(capsys, testdata):
    d = testdata / "cc-api-preprod-root"
    code, out, _ = run(capsys, "eventlog", "replay", d / "ccel_data.bin", "--quote", d / "quote.bin")
    assert code == 1
    assert "RTMR2" in out and "DIFFERS" in out
    assert out.count("matches quote") == 3
    assert "\x1b" not in out and "\\x1b" not in out  # off a terminal: no colour, and no escaped colour codes


def test_eventlog_replay_colours_on_a_terminal(testdata):
    d = testdata / "cc-api-preprod-root"
    args = ["eventlog", "replay", str(d / "ccel_data.bin"), "--quote", str(d / "quote.bin")]
    out = CliRunner().invoke(cli, args, color=True).output
    assert "\x1b[31mDIFFERS from quote" in out and out.count("\x1b[32mmatches quote\x1b[0m") == 3
    assert "\\x1b" not in out  # the codes themselves, not their escaped text


def test_eventlog_replay_dstack_json(capsys, testdata):
    code, out, _ = run(capsys, "eventlog", "replay", testdata / "dstack-eventlog" / "getquote.json", "-o", "json")
    assert code == 0
    assert json.loads(out)["matches"] is True


def test_console_script_and_no_guest_dependencies():
    """The installed command works, and the controller never imports torch/transformers."""
    code = (
        "import sys; from tdxvm.cli import main; rc = main(['--help']);"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "sys.exit(3 if bad else rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "verify-quote" in proc.stdout
    exe = subprocess.run(
        [str(__import__("pathlib").Path(sys.executable).parent / "tdxvm"), "--version"], capture_output=True, text=True
    )
    assert exe.returncode == 0 and "tdxvm" in exe.stdout


def test_emulated_platform_end_to_end(capsys, tmp_path):
    """init → collateral → quote → verify-quote with the emulated root; forgeries refused."""
    plat = tmp_path / "platform"
    assert run(capsys, "emulate", "init", plat)[0] == 0
    assert oct((plat / "root-ca.key").stat().st_mode & 0o777) == "0o600"
    at = "2026-01-15T00:00:00Z"
    assert run(capsys, "emulate", "collateral", plat, "--out", tmp_path / "bundle.json", "--at", at)[0] == 0
    mrtd = "ab" * 48
    assert (
        run(
            capsys,
            "emulate",
            "quote",
            plat,
            "--out",
            tmp_path / "q.bin",
            "--version",
            "5",
            "--mrtd",
            mrtd,
            "--report-data",
            "cd" * 64,
            "--at",
            at,
        )[0]
        == 0
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"mrtd: {mrtd}\nreport_data: {'cd' * 64}\n")
    common = [
        "--collateral",
        tmp_path / "bundle.json",
        "--root-ca",
        plat / "root-ca.pem",
        "--at",
        at,
        "--policy",
        policy,
        "-o",
        "json",
    ]
    code, out, _ = run(capsys, "verify-quote", tmp_path / "q.bin", *common)
    assert code == 0, out
    assert json.loads(out)["measurements"]["mrtd"] == mrtd
    # Intel's root does not vouch for the emulated platform.
    code, out, _ = run(
        capsys, "verify-quote", tmp_path / "q.bin", "--collateral", tmp_path / "bundle.json", "--at", at, "-o", "json"
    )
    assert code == 1 and "untrusted-root" in {r["code"] for r in json.loads(out)["reasons"]}
    # A DEBUG TD and a tampered quote are refused.
    run(
        capsys,
        "emulate",
        "quote",
        plat,
        "--out",
        tmp_path / "d.bin",
        "--mrtd",
        mrtd,
        "--report-data",
        "cd" * 64,
        "--debug",
        "--at",
        at,
    )
    code, out, _ = run(capsys, "verify-quote", tmp_path / "d.bin", *common)
    assert code == 1 and [r["code"] for r in json.loads(out)["reasons"]] == ["debug-td"]
    raw = bytearray((tmp_path / "q.bin").read_bytes())
    raw[48 + 6 + 200] ^= 1
    (tmp_path / "t.bin").write_bytes(bytes(raw))
    code, out, _ = run(capsys, "verify-quote", tmp_path / "t.bin", *common)
    assert code == 1 and "quote-signature" in {r["code"] for r in json.loads(out)["reasons"]}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """An emulated platform's trust anchor and collateral on disk, and a quote signer."""
    from datetime import datetime, timezone

    from tdxvm.emulate import EmulatedPlatform

    at = datetime(2025, 7, 1, 12, 0, 0, tzinfo=timezone.utc)
    platform = EmulatedPlatform(at=at, seed="tests/test_cli")
    folder = tmp_path_factory.mktemp("emulated")
    (folder / "root-ca.pem").write_text(platform.root_ca_pem)
    (folder / "bundle.json").write_text(platform.collateral().to_json())

    def verify(capsys, name, quote, *policy_lines, json_out=True):
        (folder / f"{name}.bin").write_bytes(quote)
        args = [
            "verify-quote",
            folder / f"{name}.bin",
            "--collateral",
            folder / "bundle.json",
            "--root-ca",
            folder / "root-ca.pem",
            "--at",
            "2025-07-01T12:00:00Z",
        ]
        if policy_lines:
            (folder / f"{name}.yaml").write_text("".join(f"{line}\n" for line in policy_lines))
            args += ["--policy", folder / f"{name}.yaml"]
        code, out, _ = run(capsys, *args, *(["-o", "json"] if json_out else []))
        return code, json.loads(out) if json_out else out

    return platform, verify


def test_verify_quote_td_attributes(capsys, emulated):
    from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_MIGRATABLE, TD_ATTR_SEPT_VE_DISABLE

    platform, verify = emulated
    migratable = platform.sign_quote(version=5, td_attributes=TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_MIGRATABLE)
    code, doc = verify(capsys, "migratable", migratable)
    assert code == 1 and [r["code"] for r in doc["reasons"]] == ["migratable-td"]
    code, doc = verify(capsys, "migratable-allowed", migratable, "allow_migratable: true")
    assert code == 0 and doc["policy_exceptions"][0].startswith("allow_migratable: true")
    debug = platform.sign_quote(version=4, td_attributes=TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG)
    code, doc = verify(capsys, "debug", debug)
    assert code == 1 and [r["code"] for r in doc["reasons"]] == ["debug-td"]
    launched = TD_ATTR_SEPT_VE_DISABLE.to_bytes(8, "little").hex()
    assert verify(capsys, "pinned", platform.sign_quote(), f"td_attributes: {launched}")[0] == 0
    code, doc = verify(capsys, "pinned-debug", debug, "allow_debug: true", f"td_attributes: {launched}")
    assert code == 1 and [r["code"] for r in doc["reasons"]] == ["td-attributes"]
    assert doc["reasons"][0]["message"].endswith("set but not expected: DEBUG")


def test_verify_quote_service_td(capsys, emulated):
    platform, verify = emulated
    v4 = platform.sign_quote(version=4)
    assert verify(capsys, "v4", v4)[0] == 0
    code, doc = verify(capsys, "v4-pinned", v4, "mr_service_td: " + "00" * 48)
    assert code == 1 and "v4 quote has no MR_SERVICETD field" in doc["reasons"][0]["message"]
    assert verify(capsys, "v5-pinned", platform.sign_quote(version=5), "mr_service_td: " + "00" * 48)[0] == 0
    code, doc = verify(capsys, "v5-bound", platform.sign_quote(version=5, mr_service_td=b"\x01" * 48))
    assert code == 1 and "MR_SERVICETD is " + "01" * 48 in doc["reasons"][0]["message"]


def test_verify_quote_lists_unpinned_registers(capsys, emulated):
    platform, verify = emulated
    mrtd = "ab" * 48
    quote = platform.sign_quote(mr_td=bytes.fromhex(mrtd))
    code, doc = verify(capsys, "unpinned", quote, f"mrtd: {mrtd}")
    assert code == 0
    assert [line.split(" not pinned: ")[0] for line in doc["policy_exceptions"]] == ["rtmr0", "rtmr1", "rtmr2", "rtmr3"]
    code, out = verify(capsys, "unpinned-text", quote, f"mrtd: {mrtd}", json_out=False)
    assert code == 0 and "policy exception: rtmr0 not pinned: the host chooses the TD's ACPI tables" in out
    assert "policy exception: rtmr3 not pinned: run-time measurements (the served model) are not checked" in out
    assert "mrtd not pinned" not in out


def test_emulate_errors_are_clear(capsys, tmp_path):
    code, _, err = run(capsys, "emulate", "quote", tmp_path / "none", "--out", tmp_path / "q.bin")
    assert code == 2 and "no emulated platform here" in err
    run(capsys, "emulate", "init", tmp_path / "p")
    code, _, err = run(capsys, "emulate", "quote", tmp_path / "p", "--out", tmp_path / "q.bin", "--mrtd", "abc")
    assert code == 2 and "--mrtd" in err
    code, _, err = run(capsys, "emulate", "init", tmp_path / "p")
    assert code == 2 and "not empty" in err


def test_weights_encrypt_decrypt(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(os.urandom(300_000))
    store = tmp_path / "secrets"
    code, out, _ = run(capsys, "weights", "encrypt", model, "--out", tmp_path / "enc", "--secrets", store, "-o", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["key"] == "weights/enc" and doc["files"] == 2
    key = (store / "weights" / "enc").read_bytes()
    assert len(key) == 32
    # The key is in no file of the encrypted folder and was printed nowhere.
    assert key.hex() not in out and all(key not in p.read_bytes() for p in (tmp_path / "enc").rglob("*") if p.is_file())
    # -o is the output format, --out the folder: `-o DIR` is a usage error, never a folder named after a format
    code, _, err = run(capsys, "weights", "decrypt", tmp_path / "enc", "-o", tmp_path / "out", "--secrets", store)
    assert code == 2 and "'-o' / '--output'" in err and not (tmp_path / "out").exists()
    code, out, _ = run(
        capsys, "weights", "decrypt", tmp_path / "enc", "--out", tmp_path / "out", "--secrets", store, "-o", "json"
    )
    assert code == 0 and json.loads(out)["files"] == 2
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    code, _, err = run(
        capsys,
        "weights",
        "decrypt",
        tmp_path / "enc",
        "--out",
        tmp_path / "out2",
        "--secrets",
        store,
        "--key-name",
        "other",
    )
    assert code == 2 and "weights/other is not in" in err
    blob = next((tmp_path / "enc" / "files").iterdir())
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    code, _, err = run(capsys, "weights", "decrypt", tmp_path / "enc", "--out", tmp_path / "out3", "--secrets", store)
    assert code == 2 and "fails authentication" in err and not (tmp_path / "out3").exists()
    code, out, _ = run(  # scripts tell tampering from a typo by its code
        capsys, "weights", "decrypt", tmp_path / "enc", "--out", tmp_path / "out3", "--secrets", store, "-o", "json"
    )
    assert code == 2 and json.loads(out)["error"]["code"] == "weights-authentication"
    code, _, err = run(capsys, "weights", "decrypt", model, "--out", tmp_path / "out4", "--secrets", store)
    assert code == 2 and f"{model}: not an encrypted model folder (no index.tdxw" in err


def test_weights_encrypt_names_a_file_it_cannot_read(capsys, tmp_path, monkeypatch):
    import tdxvm.guest.weights as weights_mod

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(weights_mod, "_sha256_of", unreadable)
    code, out, err = run(capsys, "weights", "encrypt", model, "--out", tmp_path / "enc", "--secrets", tmp_path / "s")
    assert code == 2 and f"{model / 'config.json'}: Permission denied" in err and "Traceback" not in err
    assert not (tmp_path / "enc").exists() and not (tmp_path / "s" / "weights" / "enc").exists()


def test_weights_encrypt_interrupted_at_the_last_step_leaves_no_key_without_its_folder(capsys, tmp_path, monkeypatch):
    """Ctrl-C between storing the key and moving the folder into place: before, the key
    stayed and its name was taken ("choose another --key-name"), with nothing it opens."""
    from pathlib import Path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    real_rename = Path.rename

    def interrupted(self, target):
        if Path(target).name == "enc":
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    code, _, err = run(capsys, "weights", "encrypt", model, "--out", tmp_path / "enc", "--secrets", tmp_path / "s")
    assert code == 130 and not (tmp_path / "enc").exists() and not (tmp_path / "s" / "weights" / "enc").exists()
    monkeypatch.setattr(Path, "rename", real_rename)
    code, _, err = run(capsys, "weights", "encrypt", model, "--out", tmp_path / "enc", "--secrets", tmp_path / "s")
    assert code == 0, err  # the name is free


_ENCRYPT = """
import sys
import tdxvm.cli.weights as weights
from tdxvm.cli import main
encrypt = weights.encrypt_model
def encrypt_then_wait(model, stage, *args, **kwargs):
    entries = encrypt(model, stage, *args, **kwargs)  # the real encryption, into the partial folder
    print(stage, flush=True)
    sys.stdin.readline()  # an encrypt still at work: until the test kills it
    return entries
weights.encrypt_model = encrypt_then_wait
sys.exit(main(sys.argv[1:]))
"""


def _model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(100_000))
    return model


def test_weights_encrypt_removes_the_partial_folder_a_killed_encrypt_of_that_folder_left(capsys, tmp_path):
    """An encrypt killed outright (SIGKILL, power loss) leaves its model-sized partial
    folder beside ENC_DIR; the next encrypt into ENC_DIR removes it."""
    model, out = _model(tmp_path), tmp_path / "out"
    with Writer(_ENCRYPT, "weights", "encrypt", model, "--out", out / "enc", "--secrets", tmp_path / "s") as killed:
        killed.kill()
    assert killed.path.parent == out and killed.path.name.startswith(".enc.partial-")
    assert (killed.path / "index.tdxw").is_file()  # what the kill left: a whole encrypted copy
    other = out / ".other.partial-1-0123abcd"  # an abandoned partial of another folder: not this run's to judge
    other.mkdir()
    code, _, err = run(capsys, "weights", "encrypt", model, "--out", out / "enc", "--secrets", tmp_path / "s")
    assert code == 0, err
    assert sorted(os.listdir(out)) == [other.name, "enc"]


def test_weights_encrypt_keeps_the_partial_folder_of_an_encrypt_still_running(capsys, tmp_path):
    model, out = _model(tmp_path), tmp_path / "out"
    with Writer(_ENCRYPT, "weights", "encrypt", model, "--out", out / "enc", "--secrets", tmp_path / "s") as running:
        code, _, err = run(
            capsys, "weights", "encrypt", model, "--out", out / "enc", "--secrets", tmp_path / "s2", "-o", "json"
        )
        assert code == 0, err
        assert (running.path / "index.tdxw").is_file()  # kept: its encrypt holds it
        assert sorted(os.listdir(out)) == [running.path.name, "enc"]


# -- the refusal contract: a quote that cannot be read is a "no" (exit 1), never an error --


def _v4(testdata) -> bytes:
    return (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes()


MALFORMED = {
    "truncated": (lambda q: q[:450], "body.rtmr1", 424),
    "quote version 3": (lambda q: (3).to_bytes(2, "little") + q[2:], "header.version", 0),
    "attestation key type 3": (lambda q: q[:2] + (3).to_bytes(2, "little") + q[4:], "header.attestation_key_type", 2),
    "TEE type SGX": (lambda q: q[:4] + bytes(4) + q[8:], "header.tee_type", 4),
    "certification data type 5": (
        lambda q: q[:764] + (5).to_bytes(2, "little") + q[766:],
        "signature_data.certification_data.type",
        764,
    ),
    "empty file": (lambda q: b"", "quote", 0),
    "base64 text": (lambda q: __import__("base64").b64encode(q), "quote", 0),
    "PEM text": (lambda q: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "quote", 0),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_unreadable_quote_is_refused_exit_1(capsys, testdata, tmp_path, name):
    mutate, field, offset = MALFORMED[name]
    bad = tmp_path / "bad.quote"
    bad.write_bytes(mutate(_v4(testdata)))
    coll = testdata / "dcap-qvl-v4" / "collateral.json"
    code, out, err = run(capsys, "verify-quote", bad, "--collateral", coll, "--at", V4_AT, "-o", "json")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["verdict"] == "reject"
    assert [(r["code"], r["field"], r["offset"]) for r in doc["reasons"]] == [("quote-format", field, offset)]
    assert f"{field} at byte offset {offset}: " in doc["reasons"][0]["message"]
    assert doc["tcb_status"] is None and doc["measurements"] is None and doc["quote_version"] is None
    assert doc["verified_at"] == "2025-06-20T00:00:00Z" and len(doc["policy_exceptions"]) == 5
    code, out, err = run(capsys, "verify-quote", bad, "--collateral", coll, "--at", V4_AT)
    assert code == 1 and "REFUSED" in out and f"[quote-format] {field} at byte offset {offset}" in out and not err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "the quote file is empty (0 bytes)"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "PEM text (CERTIFICATE)"),
        (None, "the quote file is a collateral bundle"),  # the bundle given as the quote
        (b'{"quote": "04000200", "event_log": []}', "jq -r .quote"),
    ],
)
def test_first_message_for_common_mistakes(capsys, testdata, tmp_path, content, words):
    coll = testdata / "dcap-qvl-v4" / "collateral.json"
    quote = coll if content is None else tmp_path / "q"
    if content is not None:
        quote.write_bytes(content)
    code, out, _ = run(capsys, "verify-quote", quote, "--collateral", coll, "--at", V4_AT)
    assert code == 1 and words in out


def test_base64_quote_message(capsys, testdata, tmp_path):
    import base64

    (tmp_path / "q.b64").write_bytes(base64.b64encode(_v4(testdata)) + b"\n")
    code, out, _ = run(
        capsys,
        "verify-quote",
        tmp_path / "q.b64",
        "--collateral",
        testdata / "dcap-qvl-v4" / "collateral.json",
        "--at",
        V4_AT,
    )
    assert code == 1 and "base64 text (of what starts like a v4 quote)" in out and "base64 -d" in out


def test_unreadable_quote_refused_before_fetching_collateral(capsys, tmp_path, monkeypatch):
    """No collateral is fetched for bytes that are no quote: the answer is "no" at once."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "q").write_bytes(b"")
    code, out, _ = run(capsys, "verify-quote", tmp_path / "q", "--pccs", "http://127.0.0.1:9", "-o", "json")
    assert code == 1 and json.loads(out)["reasons"][0]["code"] == "quote-format"


@pytest.mark.parametrize("source", ["offline", "online"])
def test_a_quote_whose_pck_chain_cannot_be_read_is_refused_not_an_error(
    capsys, testdata, tmp_path, monkeypatch, source
):
    """The quote parses, but its PCK certificate cannot: the relying party's answer is
    "no" (exit 1, pck-chain) with collateral given or to be fetched; nothing is fetched
    for such a quote (its FMSPC is in that certificate)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quote = _v4(testdata)
    body = quote.index(b"-----BEGIN CERTIFICATE-----\n") + len(b"-----BEGIN CERTIFICATE-----\n")
    bad = tmp_path / "bad-pck.quote"
    bad.write_bytes(quote[:body] + b"!!!!" + quote[body + 4 :])  # same length: the quote still parses
    where = (
        ["--collateral", testdata / "dcap-qvl-v4" / "collateral.json"]
        if source == "offline"
        else ["--pccs", "https://127.0.0.1:1"]  # nobody listens: a fetch would be exit 3
    )
    code, out, err = run(capsys, "verify-quote", bad, *where, "--at", V4_AT, "-o", "json")
    doc = json.loads(out)
    assert code == 1, err
    assert doc["verdict"] == "reject" and doc["fmspc"] is None and doc["tcb_status"] is None
    assert "pck-chain" in [r["code"] for r in doc["reasons"]]
    code, out, err = run(capsys, "verify-quote", bad, *where, "--at", V4_AT)
    assert code == 1 and "REFUSED" in out and "[pck-chain]" in out and "Traceback" not in err


def test_every_json_output_has_a_verdict(capsys, testdata, monkeypatch):
    d = testdata / "dcap-qvl-v4"
    base = ["verify-quote", d / "quote.bin", "--collateral", d / "collateral.json", "-o", "json"]
    # A usage error click finds before the command runs.
    code, out, err = run(capsys, *base, "--at")
    assert code == 2 and json.loads(out) == {
        "verdict": "error",
        "error": {"code": "usage", "message": "Option '--at' requires an argument."},
    }
    code, out, _ = run(capsys, *base, "--bogus")
    assert code == 2 and json.loads(out)["verdict"] == "error"
    # A bug: exit 4, still a verdict.
    import tdxvm.cli.attest as cli_attest

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_attest, "appraise", boom)
    code, out, err = run(capsys, *base, "--at", V4_AT)
    assert code == 4 and "Traceback" in err
    doc = json.loads(out)
    assert doc["verdict"] == "error" and doc["error"]["code"] == "internal" and "boom" in doc["error"]["message"]


def test_other_commands_error_json_unchanged(capsys, tmp_path):
    code, out, _ = run(capsys, "eventlog", "replay", tmp_path / "missing.log", "-o", "json")
    assert code == 2 and set(json.loads(out)) == {"error"}


def test_relaunch_advised_says_what_to_do(capsys, emulated, tmp_path):
    platform, verify = emulated
    old, new = platform.tee_tcb_svn_for("OutOfDate"), platform.tee_tcb_svn_for("UpToDate")
    quote = platform.sign_quote(version=5, tee_tcb_svn=old, tee_tcb_svn2=new)
    code, doc = verify(capsys, "relaunch", quote)
    assert (
        code == 1 and doc["tcb_status"] == "TDRelaunchAdvised" and [r["code"] for r in doc["reasons"]] == ["tcb-status"]
    )
    assert (doc["tcb"]["launch_status"], doc["tcb"]["current_status"]) == ("OutOfDate", "UpToDate")
    code, out = verify(capsys, "relaunch-text", quote, json_out=False)
    assert code == 1 and "TCB TDRelaunchAdvised" in out
    assert (
        "relaunch the TD to pick up the updated TDX module" in out
        and "launched on a TDX module whose TCB is OutOfDate" in out
    )
    code, doc = verify(capsys, "relaunch-accepted", quote, "accepted_tcb_statuses: [UpToDate, TDRelaunchAdvised]")
    assert code == 0 and doc["verdict"] == "accept"
    # TEE_TCB_SVN2 that no TCB level knows: refused, with the field named.
    code, doc = verify(
        capsys,
        "unknown-current",
        platform.sign_quote(version=5, tee_tcb_svn=old, tee_tcb_svn2=bytes([2, 1, 2]) + bytes(13)),
    )
    assert code == 1 and [r["code"] for r in doc["reasons"]] == ["current-tcb-not-supported"]


def test_emulate_quote_tee_tcb_svn2(capsys, tmp_path):
    plat = tmp_path / "platform"
    assert run(capsys, "emulate", "init", plat)[0] == 0
    at = "2026-01-15T00:00:00Z"
    assert run(capsys, "emulate", "collateral", plat, "--out", tmp_path / "bundle.json", "--at", at)[0] == 0
    old, new = "0301" + "02" + "00" * 13, "0501" + "02" + "00" * 13
    args = [
        "emulate",
        "quote",
        plat,
        "--out",
        tmp_path / "q.bin",
        "--version",
        "5",
        "--tee-tcb-svn",
        old,
        "--tee-tcb-svn2",
        new,
        "--at",
        at,
    ]
    assert run(capsys, *args)[0] == 0
    code, out, _ = run(
        capsys,
        "verify-quote",
        tmp_path / "q.bin",
        "--collateral",
        tmp_path / "bundle.json",
        "--root-ca",
        plat / "root-ca.pem",
        "--at",
        at,
        "-o",
        "json",
    )
    doc = json.loads(out)
    assert code == 1 and doc["tcb_status"] == "TDRelaunchAdvised" and doc["measurements"]["tee_tcb_svn"] == old
    code, _, err = run(capsys, "emulate", "quote", plat, "--out", tmp_path / "q4.bin", "--tee-tcb-svn2", new)
    assert code == 2 and "--tee-tcb-svn2 needs a TD report 1.5 body" in err


# -- paths the user gives for writing: checked first, exit 2, no traceback -----------------------


@pytest.fixture
def places(tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(["emulate", "init", str(tmp_path / "plat")]) == 0
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["emulate", "init", "{t}/afile/x"], "{t}/afile is a file, not a folder"),
        (["emulate", "collateral", "{t}/plat", "--out", "{t}"], "{t}: is a folder, not a file"),
        (["emulate", "collateral", "{t}/plat", "--out", "{t}/missing/c.json"], "its folder {t}/missing does not exist"),
        (["emulate", "quote", "{t}/plat", "--out", "{t}/missing/q.bin"], "its folder {t}/missing does not exist"),
        (["emulate", "quote", "{t}/plat", "--out", "{t}/afile/q.bin"], "its folder {t}/afile is a file, not a folder"),
        (["emulate", "tiny-llama", "{t}/afile"], "{t}/afile: exists and is not a folder"),
        (["collateral", "fetch", "{t}/afile", "--out", "{t}/plat"], "{t}/plat: is a folder, not a file"),
        (
            ["weights", "encrypt", "{t}/model", "--out", "{t}/afile/enc", "--secrets", "{t}/s"],
            "{t}/afile is a file, not a folder",
        ),
        (
            ["weights", "encrypt", "{t}/model", "--out", "{t}/enc", "--secrets", "{t}/afile/s"],
            "{t}/afile is a file, not a folder",
        ),
        (
            ["weights", "decrypt", "{t}/enc", "--out", "{t}/afile", "--secrets", "{t}/s"],
            "{t}/afile: exists and is not a folder",
        ),
        (["image", "build", "{t}/recipe.yaml", "--out", "{t}/afile/out"], "{t}/afile is a file, not a folder"),
        (["image", "build", "{t}/recipe.yaml", "--firmware", "{t}/missing.fd"], "does not exist"),
    ],
)
def test_an_unusable_output_path_is_exit_2_before_any_work(capsys, places, argv, message):
    code, out, err = run(capsys, *(a.format(t=places) for a in argv))
    assert code == 2 and message.format(t=places) in err, err
    assert "Traceback" not in out + err and not (places / "enc").exists()


@pytest.mark.parametrize("url", ["ftp://pccs.example", "http://pccs.example:8081", "https://", "pccs.example"])
def test_a_pccs_that_is_not_https_is_a_usage_error(capsys, testdata, url):
    code, out, err = run(capsys, "verify-quote", testdata / "dcap-qvl-v4" / "quote.bin", "--pccs", url, "-o", "json")
    assert code == 2 and "is not an https URL with a host" in err + out


@pytest.mark.parametrize("url", ["https://[::1", "https://pccs.example:99999", "https://pccs.example:abc"])
def test_a_pccs_that_is_not_a_url_is_a_usage_error(capsys, testdata, tmp_path, url):
    quote = testdata / "dcap-qvl-v4" / "quote.bin"
    for command in (["verify-quote", quote], ["collateral", "fetch", quote, "--out", tmp_path / "b.json"]):
        code, out, err = run(capsys, *command, "--pccs", url, "-o", "json")
        assert code == 2 and "is not a URL" in json.loads(out)["error"]["message"] and "Traceback" not in err


def test_at_now_is_the_current_time(capsys, testdata):
    d = testdata / "dcap-qvl-v4"
    code, out, _ = run(
        capsys, "verify-quote", d / "quote.bin", "--collateral", d / "collateral.json", "--at", "now", "-o", "json"
    )
    doc = json.loads(out)
    assert code == 1 and doc["verified_at"].startswith(datetime.now(timezone.utc).strftime("%Y-%m-%d"))


def test_weights_encrypt_refuses_an_output_inside_the_model_and_leaves_no_debris(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    store = tmp_path / "secrets"
    code, _, err = run(capsys, "weights", "encrypt", model, "--out", model / "enc", "--secrets", store)
    assert code == 2 and "inside the model folder" in err and not (model / "enc").exists()
    SecretStore(directory=store).put(
        "weights/taken", b"k" * 32
    )  # the key name is taken: refused before anything is written
    code, _, err = run(capsys, "weights", "encrypt", model, "--out", tmp_path / "taken", "--secrets", store)
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "secrets"]  # no staging folder left behind
    code, _, err = run(capsys, "weights", "encrypt", model, "--out", tmp_path / "enc", "--secrets", store)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "model", "secrets"]
    assert (tmp_path / "enc" / "index.tdxw").is_file()


def test_a_usage_error_with_o_json_is_json_on_stdout_for_every_command(capsys):
    for argv in (
        ["weights", "decrypt", "ENC", "-o", "json"],
        ["status", "--no-such-option", "-o", "json"],
        ["verify-quote", "-o", "json"],
    ):
        code, out, err = run(capsys, *argv)
        doc = json.loads(out)
        assert code == 2 and doc["error"]["code"] == "usage" and doc["error"]["message"] in err, argv

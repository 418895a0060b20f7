"""Commands that work with a QUOTE (``collateral fetch``, ``eventlog replay --quote``)
read it as verify-quote does (:func:`tdxvm.attest.quotefile.load_quote`): a file that is
not a TDX quote is unusable input, exit 2 with the same first message, never a
traceback (verify-quote itself answers such a file with a refusal, exit 1)."""

from __future__ import annotations

import base64
import json

import pytest

from tdxvm.attest import pcs
from tests.clirun import run

EMPTY = "the quote file is empty (0 bytes)"
BASE64 = "the quote file is base64 text (of what starts like a v4 quote)"


@pytest.fixture
def bad_quotes(testdata, tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    b64 = tmp_path / "quote.b64"
    b64.write_bytes(base64.encodebytes((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes()))
    return {"empty": (empty, EMPTY), "base64": (b64, BASE64)}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a quote file that is not a quote must be refused before any request")

    monkeypatch.setattr(pcs, "PcsClient", refuse)


@pytest.mark.parametrize("kind", ["empty", "base64"])
def test_collateral_fetch_refuses_a_file_that_is_not_a_quote(capsys, bad_quotes, tmp_path, no_network, kind):
    path, message = bad_quotes[kind]
    code, out, err = run(capsys, "collateral", "fetch", path, "--out", tmp_path / "bundle.json")
    assert code == 2 and out == ""
    assert err.startswith(f"error: quote at byte offset 0: {message}")
    assert "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "bundle.json").exists()


@pytest.mark.parametrize("kind", ["empty", "base64"])
def test_eventlog_replay_refuses_a_quote_file_that_is_not_a_quote(capsys, testdata, bad_quotes, kind):
    path, message = bad_quotes[kind]
    log = testdata / "go-tdx-guest-ccel" / "ccel_data.bin"
    code, out, err = run(capsys, "eventlog", "replay", log, "--quote", path)
    assert code == 2 and out == ""
    assert err.startswith(f"error: quote at byte offset 0: {message}")
    assert "Traceback" not in err and "internal error" not in err
    code, out, _ = run(capsys, "eventlog", "replay", log, "--quote", path, "-o", "json")
    doc = json.loads(out)
    assert code == 2 and set(doc) == {"error"} and doc["error"]["code"] == "quote-format"
    assert doc["error"]["message"].startswith(f"quote at byte offset 0: {message}")


def test_eventlog_replay_reads_hex_and_embedded_quotes_as_before(capsys, testdata, tmp_path):
    d = testdata / "go-tdx-guest-ccel"
    hexfile = tmp_path / "quote.hex"
    hexfile.write_text((d / "quote.bin").read_bytes().hex())
    code, out, _ = run(capsys, "eventlog", "replay", d / "ccel_data.bin", "--quote", hexfile, "-o", "json")
    assert json.loads(out)["comparison"] and code in (0, 1)
    binary = run(capsys, "eventlog", "replay", d / "ccel_data.bin", "--quote", d / "quote.bin", "-o", "json")
    assert (code, out) == binary[:2]
    code, out, _ = run(capsys, "eventlog", "replay", testdata / "dstack-eventlog" / "getquote.json", "-o", "json")
    assert code == 0 and json.loads(out)["matches"] is True


@pytest.mark.parametrize("quote", [None, "", "  ", {"hex": "04"}, 4])
def test_an_embedded_quote_that_is_not_a_quote_is_an_error_not_nothing_to_compare(capsys, testdata, tmp_path, quote):
    """A JSON log whose RTMR0 the host changed, with a quote that is not a quote's text:
    before, the quote was dropped, nothing compared, exit 0."""
    doc = json.loads((testdata / "dstack-eventlog" / "getquote.json").read_text())
    doc["quote"] = quote
    path = tmp_path / "log.json"
    path.write_text(json.dumps(doc))
    code, out, _ = run(capsys, "eventlog", "replay", path, "-o", "json")
    assert code == 2 and "'quote' is not a quote's text" in json.loads(out)["error"]["message"]


def test_replay_without_a_quote_says_nothing_was_compared(capsys, testdata, tmp_path):
    d = testdata / "go-tdx-guest-ccel"
    code, out, _ = run(capsys, "eventlog", "replay", d / "ccel_data.bin")
    assert code == 0 and out.endswith("no quote: nothing compared (give --quote QUOTE)\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run(capsys, "eventlog", "replay", deep)
    assert code == 2 and "nested too deeply" in err

"""Quote files as people hand them over: binary or hex text, and a plain first message
for the common mistakes (an empty file, base64 or PEM text, a JSON document).

:func:`load_quote` is how a QUOTE argument is read. Every failure is a
:class:`~tdxvm.attest.errors.QuoteFormatError` (code ``quote-format``, a field and a
byte offset): the bytes are not a quote tdxvm reads, which a relying party answers
with "no". :func:`diagnose` is only asked once parsing failed, so no guess ever changes
how a real quote is read; its errors name the field ``quote`` at offset 0 (the whole
input), where a TDX quote's header would start.
"""

from __future__ import annotations

import base64
import binascii
import json
import string

from tdxvm.attest.errors import QuoteFormatError
from tdxvm.attest.quote import Quote, parse_quote, read_quote_bytes

_HEX = frozenset(b"0123456789abcdefABCDEF")
_BASE64 = frozenset((string.ascii_letters + string.digits + "+/-_=").encode())
_SPACE = frozenset(b" \t\r\n")
_PRINTABLE = frozenset(string.printable.encode())
_BUNDLE_KEYS = frozenset({"tcb_info", "qe_identity", "pck_crl", "root_ca_crl"})


def load_quote(data: bytes) -> Quote:
    """Parse a quote file's bytes (binary, or hex text); see the module docstring."""
    try:
        return parse_quote(read_quote_bytes(data))
    except QuoteFormatError:
        better = diagnose(data)
        if better is None:
            raise
        raise better from None


def _error(message: str) -> QuoteFormatError:
    return QuoteFormatError(message, field="quote", offset=0)


def _json_message(doc: object) -> str:
    what = "a TDX quote is binary (or hex text), not JSON"
    if isinstance(doc, dict):
        if isinstance(doc.get("quote"), str):
            return (
                f'the quote file is a JSON object; {what}: its "quote" member may hold one '
                "(extract it, e.g. jq -r .quote FILE > quote.hex)"
            )
        if _BUNDLE_KEYS & doc.keys():
            return (
                f"the quote file is a collateral bundle (JSON with {', '.join(sorted(_BUNDLE_KEYS & doc.keys()))}); "
                f"{what}"
            )
        return f"the quote file is a JSON object; {what}"
    return f"the quote file is a JSON document; {what}"


def _base64_quote(text: bytes) -> int | None:
    """The quote version base64 ``text`` decodes to the start of, if it does."""
    compact = bytes(c for c in text if c not in _SPACE)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(compact + b"=" * (-len(compact) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) >= 2 and int.from_bytes(raw[:2], "little") in (4, 5):
            return int.from_bytes(raw[:2], "little")
    return None


def diagnose(data: bytes) -> QuoteFormatError | None:
    """A first message for input that plainly is not a TDX quote, else ``None``."""
    text = data.strip()
    if not text:
        what = "empty (0 bytes)" if not data else f"only whitespace ({len(data)} bytes)"
        return _error(f"the quote file is {what}; a TDX quote is binary (or hex text) and starts with a 48-byte header")
    if text.startswith(b"-----BEGIN "):
        label = text[11 : text.find(b"-----", 11)].decode("ascii", "replace")
        return _error(
            f"the quote file is PEM text ({label}), not a TDX quote; a quote carries its PCK certificate chain "
            "itself: give the binary (or hex) quote the TD produced"
        )
    if text[:1] in (b"{", b"["):
        try:
            return _error(_json_message(json.loads(text)))
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    digits = text[2:] if text[:2].lower() == b"0x" else text
    if set(digits) <= _HEX | _SPACE:  # hex text: the error about its decoded bytes stands, unless it is cut
        count = sum(c in _HEX for c in digits)
        return (
            _error(f"the quote file is hex text with an odd number of digits ({count}): cut short?")
            if count % 2
            else None
        )
    chars = set(text)
    if chars <= _BASE64 | _SPACE and (version := _base64_quote(text)) is not None:
        return _error(
            f"the quote file is base64 text (of what starts like a v{version} quote); tdxvm reads binary or hex: "
            "decode it first, e.g. base64 -d FILE > quote.bin"
        )
    if chars <= _PRINTABLE:
        head = text[:16].decode("ascii", "replace")
        return _error(f"the quote file is text ({head!r}…), neither a binary TDX quote nor hex")
    return None

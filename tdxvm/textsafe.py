"""Text from the host or a guest, made safe to print on a terminal.

A libvirt host writes domain names, metadata labels, serial console output and error
bodies; a guest writes its agent's errors, its service's responses and completions.
Printed raw, such text can move the cursor, rewrite a line (a green "accepted" over a
refusal), set the window title or write the clipboard (OSC 52). :func:`safe_text` shows
every control character as a visible escape instead (``\\x1b``, ``\\u202e``): the C0
controls but newline and tab, DEL, the C1 controls (U+0080..U+009F, which some terminals
take as 8-bit CSI and OSC), and the bidirectional marks, embeddings, overrides and
isolates (which reorder what is shown). Once ESC is shown as text, no sequence can start.
JSON output needs none of this: ``json.dumps`` escapes every control character.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: object) -> str:
    """``str(text)`` with every control character shown as an escape (see the module doc)."""
    return _UNSAFE.sub(_shown, str(text))

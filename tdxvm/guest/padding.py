"""Padding against what the host learns from sizes.

The host carries every byte between a client and the model's service: encrypted by TLS,
but it sees how large each TLS record is. One streamed event per token would show each
token's length, which is enough to guess the text (Weiss et al., "What Was Your
Prompt? A Remote Keylogging Attack on AI Assistants", 2024); a request's size shows its
prompt's length. So the service pads every streamed event, every whole completion and
every error answer (one may name a count, such as a prompt's tokens), and tdxvm's
client (:mod:`tdxvm.provision.client`) every request body, with JSON whitespace (which
no JSON reader sees) to a multiple of :data:`PAD` bytes. What stays visible: how many
events, when each is sent, and lengths to within :data:`PAD` bytes.
"""

from __future__ import annotations

PAD = 1024


def padded(data: bytes, *, end: bytes = b"") -> bytes:
    """``data`` and spaces up to a multiple of :data:`PAD` bytes, counting ``end`` (what the
    caller appends after it: an event's blank line)."""
    return data + b" " * (-(len(data) + len(end)) % PAD)

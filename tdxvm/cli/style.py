"""Colour for the CLI's own words (REFUSED, a failed step), never for what a host wrote.

NO_COLOR (https://no-color.org), set to anything but the empty string, turns colour off
even on a terminal; off a terminal click strips it anyway.
"""

from __future__ import annotations

import os
from typing import Any

import click


def colour_wanted() -> bool:
    return not os.environ.get("NO_COLOR")


def styled(text: str, **style: Any) -> str:
    """``click.style(text, **style)``, or ``text`` as it is under NO_COLOR."""
    return click.style(text, **style) if colour_wanted() else text

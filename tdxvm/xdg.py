"""Where tdxvm keeps its files by default: its folder in each XDG base directory.

One rule, the XDG Base Directory Specification's: ``$XDG_CACHE_HOME``,
``$XDG_DATA_HOME`` and ``$XDG_STATE_HOME`` name the base folders, and a variable that
is unset, empty or not an absolute path is ignored ("If an implementation encounters a
relative path in any of these variables it should consider the path invalid and ignore
it"), leaving the default: ``~/.cache``, ``~/.local/share``, ``~/.local/state``.
tdxvm's folder is ``tdxvm`` in each:

* cache (:func:`cache_home`): what can be fetched or built again (image build steps,
  Intel's collateral, verified-collateral results);
* data (:func:`data_home`): what cannot (the secret store, VM records, the emulated
  platform's keys);
* state (:func:`state_home`): what the controller did (fleet state and locks).

Nothing here makes a folder; the modules that write there do, with their own modes.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "tdxvm"


def _base(variable: str, default: tuple[str, ...]) -> Path:
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home().joinpath(*default)


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/tdxvm``, else ``~/.cache/tdxvm``."""
    return _base("XDG_CACHE_HOME", (".cache",)) / APP


def data_home() -> Path:
    """``$XDG_DATA_HOME/tdxvm``, else ``~/.local/share/tdxvm``."""
    return _base("XDG_DATA_HOME", (".local", "share")) / APP


def state_home() -> Path:
    """``$XDG_STATE_HOME/tdxvm``, else ``~/.local/state/tdxvm``."""
    return _base("XDG_STATE_HOME", (".local", "state")) / APP

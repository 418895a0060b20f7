"""tdxvm's default folders: one XDG rule (tdxvm.xdg), and every default folder follows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdxvm import xdg
from tdxvm.attest.pcs import default_cache_dir
from tdxvm.attest.verifiedcache import default_verified_dir
from tdxvm.fleet.state import default_state_dir
from tdxvm.image.cache import base_folder
from tdxvm.provision.trust import emulated_platform_dir
from tdxvm.secretstore import default_directory

KINDS = [  # (function, variable, default under $HOME)
    (xdg.cache_home, "XDG_CACHE_HOME", ".cache"),
    (xdg.data_home, "XDG_DATA_HOME", ".local/share"),
    (xdg.state_home, "XDG_STATE_HOME", ".local/state"),
]


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for variable in (
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "TDXVM_CACHE",
        "TDXVM_STATE_DIR",
        "TDXVM_VERIFIED_CACHE",
    ):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path / "home"


@pytest.mark.parametrize(("folder", "variable", "default"), KINDS)
def test_an_absolute_variable_names_the_base(home, monkeypatch, tmp_path, folder, variable, default):
    monkeypatch.setenv(variable, str(tmp_path / "base"))
    assert folder() == tmp_path / "base" / "tdxvm"


@pytest.mark.parametrize("value", [None, "", "relative/base", "./base", "~/base"])
@pytest.mark.parametrize(("folder", "variable", "default"), KINDS)
def test_an_unset_empty_or_relative_variable_is_ignored(home, monkeypatch, folder, variable, default, value):
    if value is not None:
        monkeypatch.setenv(variable, value)
    assert folder() == home / default / "tdxvm"


def test_one_variable_does_not_move_the_others(home, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert xdg.data_home() == tmp_path / "data" / "tdxvm"
    assert xdg.cache_home() == home / ".cache" / "tdxvm" and xdg.state_home() == home / ".local/state" / "tdxvm"


def test_every_default_folder_follows_the_rule(home, monkeypatch, tmp_path):
    """Relative variables are ignored by every module's default (one rule, not two)."""
    for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(variable, "relative")
    assert base_folder() == home / ".cache/tdxvm"
    assert default_cache_dir() == home / ".cache/tdxvm/collateral"
    assert default_verified_dir() == home / ".cache/tdxvm/verified"
    assert default_directory() == home / ".local/share/tdxvm/secrets"
    assert emulated_platform_dir() == home / ".local/share/tdxvm/emulated"
    assert default_state_dir() == home / ".local/state/tdxvm/fleets"
    for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    assert base_folder() == tmp_path / "XDG_CACHE_HOME/tdxvm"
    assert default_cache_dir() == tmp_path / "XDG_CACHE_HOME/tdxvm/collateral"
    assert default_verified_dir() == tmp_path / "XDG_CACHE_HOME/tdxvm/verified"
    assert default_directory() == tmp_path / "XDG_DATA_HOME/tdxvm/secrets"
    assert emulated_platform_dir() == tmp_path / "XDG_DATA_HOME/tdxvm/emulated"
    assert default_state_dir() == tmp_path / "XDG_STATE_HOME/tdxvm/fleets"


def test_own_overrides_come_first(home, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TDXVM_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("TDXVM_STATE_DIR", str(tmp_path / "state"))
    assert base_folder() == tmp_path / "mine"
    assert default_state_dir() == tmp_path / "state"

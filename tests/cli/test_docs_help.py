"""docs/cli.md shows exactly what ``tdxvm … --help`` prints, for every command and
subcommand (the lazily imported ones included). After changing a command, regenerate
the blocks: ``python -m tdxvm.cli.helpdoc``."""

from __future__ import annotations

import pytest

from tdxvm.cli import COMMANDS
from tdxvm.cli.helpdoc import DOC, command_paths, regenerate, render_help, section, stale_headings, title

PATHS = command_paths()
FIX = "docs/cli.md is out of date; regenerate its help blocks with: python -m tdxvm.cli.helpdoc"


def test_every_command_is_walked():
    """Every lazy top-level command, and the subcommands of groups, are found (not only
    those some earlier test happened to import)."""
    top = {p[0] for p in PATHS if len(p) == 1}
    assert top == set(COMMANDS)
    assert {("image", "build"), ("collateral", "status"), ("emulate", "quote"), ("weights", "digest")} <= set(PATHS)
    assert () in PATHS


@pytest.mark.parametrize("path", PATHS, ids=[title(p) for p in PATHS])
def test_help_block_is_verbatim_in_the_docs(path):
    help_text = render_help(path)
    assert help_text.startswith(f"Usage: {title(path)} ")
    assert section(path, help_text) in DOC.read_text(), FIX


def test_no_section_names_a_command_that_does_not_exist():
    assert stale_headings(DOC.read_text(), PATHS) == []


def test_regenerate_replaces_only_the_block_and_adds_missing_sections():
    doc = "# CLI\n\n### tdxvm stop\n\n```text\nold help\n```\n\nprose kept\n\n## Later\n\ntail\n"
    new = regenerate(doc, {("stop",): "Usage: tdxvm stop NAME\n", ("launch",): "Usage: tdxvm launch VM.yaml\n"})
    assert new == (
        "# CLI\n\n### tdxvm stop\n\n```text\nUsage: tdxvm stop NAME\n```\n\nprose kept\n\n"
        "### tdxvm launch\n\n```text\nUsage: tdxvm launch VM.yaml\n```\n\n## Later\n\ntail\n"
    )
    assert regenerate(new, {("stop",): "Usage: tdxvm stop NAME\n", ("launch",): "Usage: tdxvm launch VM.yaml\n"}) == new
    assert stale_headings(new, [("stop",)]) == ["### tdxvm launch"]

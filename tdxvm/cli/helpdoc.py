"""docs/cli.md's help blocks: exactly what ``tdxvm … --help`` prints, for every command.

    python -m tdxvm.cli.helpdoc            # rewrite the blocks in docs/cli.md
    python -m tdxvm.cli.helpdoc --check    # change nothing; exit 1 naming each block that differs

Each command and subcommand (the lazy ones included, :mod:`tdxvm.cli.lazy`) has a
section headed ``### tdxvm image build`` whose first fenced ``text`` block is its help,
as click prints it on a terminal 80 columns wide or wider (click caps the help at 78
columns). Only those blocks are rewritten; the prose around them is kept. A command with
no section yet gets one after the last command section; tests/cli/test_docs_help.py
fails while any block differs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click
from click.testing import CliRunner

WIDTH = 78  # what click's help formatter uses on any terminal at least 80 columns wide
DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
FENCE = "```"


def command_paths() -> list[tuple[str, ...]]:
    """``()`` for ``tdxvm`` itself, then every command and subcommand, in help order."""
    from tdxvm.cli import cli

    def walk(group: click.Group, path: tuple[str, ...], ctx: click.Context) -> Iterator[tuple[str, ...]]:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            yield (*path, name)
            if isinstance(command, click.Group):
                yield from walk(command, (*path, name), click.Context(command, info_name=name, parent=ctx))

    return [(), *walk(cli, (), click.Context(cli, info_name="tdxvm"))]


def title(path: tuple[str, ...]) -> str:
    return " ".join(("tdxvm", *path))


def render_help(path: tuple[str, ...]) -> str:
    """``tdxvm PATH --help`` as printed at :data:`WIDTH` columns, colour off."""
    from tdxvm.cli import cli

    result = CliRunner().invoke(
        cli, [*path, "--help"], prog_name="tdxvm", terminal_width=WIDTH, color=False, catch_exceptions=False
    )
    if result.exit_code != 0:
        raise RuntimeError(f"{title(path)} --help exited {result.exit_code}: {result.output}")
    return result.output


def section(path: tuple[str, ...], help_text: str) -> str:
    return f"### {title(path)}\n\n{FENCE}text\n{help_text}{FENCE}\n"


def _block(lines: list[str], heading: int) -> tuple[int, int] | None:
    """Line numbers of the first ``text`` fence after ``heading`` and of its closing fence,
    None when the next heading comes first."""
    start = None
    for i in range(heading + 1, len(lines)):
        if start is None and lines[i].startswith("#"):
            return None
        if start is None and lines[i] == FENCE + "text":
            start = i
        elif start is not None and lines[i] == FENCE:
            return start, i
    return None


def regenerate(doc: str, helps: dict[tuple[str, ...], str]) -> str:
    """``doc`` with every command's block replaced by ``helps[path]``; new sections for
    commands without one go after the last command section."""
    lines = doc.split("\n")
    for path, help_text in helps.items():
        heading = f"### {title(path)}"
        if heading in lines:
            at = lines.index(heading)
            block = _block(lines, at)
            new = [FENCE + "text", *help_text.rstrip("\n").split("\n"), FENCE]
            if block is None:
                lines[at + 1 : at + 1] = ["", *new]
            else:
                lines[block[0] : block[1] + 1] = new
            continue
        ends = [i for i, line in enumerate(lines) if line.startswith("### tdxvm")]
        after = max(ends, default=len(lines) - 1)
        nxt = next((i for i in range(after + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[nxt:nxt] = [*section(path, help_text).split("\n")]
    return "\n".join(lines)


def stale_headings(doc: str, paths: list[tuple[str, ...]]) -> list[str]:
    """``### tdxvm …`` headings that name no command (one renamed or removed)."""
    known = {f"### {title(p)}" for p in paths}
    return [line for line in doc.split("\n") if line.startswith("### tdxvm") and line not in known]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    doc = DOC.read_text()
    paths = command_paths()
    new = regenerate(doc, {p: render_help(p) for p in paths})
    stale = stale_headings(new, paths)
    for line in stale:
        print(f"{DOC}: {line!r} names no command; remove or rename that section", file=sys.stderr)
    if new == doc:
        return 1 if stale else 0
    if check:
        print(f"{DOC}: help blocks differ from --help; run: python -m tdxvm.cli.helpdoc", file=sys.stderr)
        return 1
    DOC.write_text(new)
    print(f"rewrote the help blocks of {DOC}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

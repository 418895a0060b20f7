"""Subcommands imported on first use, so that ``tdxvm verify-quote`` does not pay for
libvirt, paramiko, the image builder and the fleet code it never runs.

:class:`LazyCommands` is the ``commands`` mapping of the ``tdxvm`` group: looking a
name up (``get``, ``[]``, ``in``) imports that command's module only; listing the names
(``--help``) needs no import until the help text itself is formatted.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import click

# name -> "module:attribute"; the attribute is a click command or a function that makes one.
Target = str


class LazyCommands(dict[str, click.Command]):
    """A ``dict`` of commands whose entries are imported when first looked up."""

    def __init__(self, targets: dict[str, Target]) -> None:
        super().__init__()
        self._targets = dict(targets)

    def _load(self, name: str) -> click.Command | None:
        target = self._targets.pop(name, None)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        value: click.Command | Callable[[], click.Command] = getattr(importlib.import_module(module), attr)
        command = value if isinstance(value, click.Command) else value()
        super().__setitem__(name, command)
        return command

    def get(self, name: str, default: click.Command | None = None) -> click.Command | None:  # type: ignore[override]
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        command = self._load(name)
        return default if command is None else command

    def __missing__(self, name: str) -> click.Command:
        command = self._load(name)
        if command is None:
            raise KeyError(name)
        return command

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter([*dict.keys(self), *self._targets])

    def __len__(self) -> int:
        return dict.__len__(self) + len(self._targets)

    def keys(self):  # type: ignore[override]
        return list(self)

    def values(self):  # type: ignore[override]
        return [self[name] for name in self]

    def items(self):  # type: ignore[override]
        return [(name, self[name]) for name in self]

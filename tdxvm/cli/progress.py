"""The one progress printer of the CLI: phase lines and byte meters on stderr, for people.

Every line is two spaces, the phase in a column ``width`` wide, then what happened::

    rootfs     done       312.4 s  debian trixie, 412 packages
    upload      42.0%  1,210 of 2,880 MiB  95 MiB/s

With ``-o json`` nothing is printed (scripts read stdout, and stderr stays for errors).
On a terminal a phase that has started shows ``phase ...`` until its result overwrites
it, and a meter refreshes in place (at most five times a second); elsewhere (a log file,
CI) only finished lines are written, without carriage returns, and no meters. Colour
(the status word of a failed step) only without NO_COLOR. Names and details may come
from a host or a guest: they are printed through :func:`tdxvm.textsafe.safe_text`.
Calls may come from several threads (a fleet's VMs come up in parallel).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import click

from tdxvm.cli.style import styled
from tdxvm.textsafe import safe_text

_STATUS_COLOUR = {"failed": "red", "refused": "red", "halted": "yellow", "interrupted": "yellow"}
_REFRESH = 0.2  # seconds between two meter updates on a terminal


class Progress:
    """Phase lines for ``output == "text"``; silent otherwise. ``tty`` and ``clock`` are
    stderr's ``isatty()`` and :func:`time.monotonic` unless a test gives them."""

    def __init__(
        self, output: str, *, width: int = 8, tty: bool | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enabled = output == "text"
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.width, self.clock = width, clock
        self._open = ""  # what stands on the terminal's last line, not ended yet
        self._open_phase: str | None = None
        self._shown = float("-inf")
        self._lock = threading.Lock()

    # -- what the commands call ----------------------------------------------------------

    def step(self, phase: str, status: str, seconds: float = 0.0, detail: str = "") -> None:
        """An event shaped like :class:`tdxvm.image.build.StepEvent` or
        :class:`tdxvm.provision.bringup.PhaseEvent`: ``start``, or how it ended."""
        if status == "start":
            self.start(phase)
        else:
            self.done(phase, status, seconds=seconds, detail=detail)

    def start(self, phase: str) -> None:
        """``phase ...`` on a terminal, until :meth:`done` writes the result over it."""
        if self.enabled and self.tty:
            self._write(self._head(phase) + " ...", phase=phase, end=False)

    def done(self, phase: str, status: str = "", *, seconds: float | None = None, detail: str = "") -> None:
        """A finished phase: its status, the seconds it took, and a detail."""
        if not self.enabled:
            return
        line = self._head(phase)
        if status:
            colour = _STATUS_COLOUR.get(status)
            line += " " + (styled(status.ljust(8), fg=colour) if colour else status.ljust(8))
        if seconds is not None:
            line += f" {seconds:6.1f} s"
        if detail:
            line += f"  {safe_text(detail)}"
        self._write(line.rstrip(), phase=phase)

    def note(self, phase: str, text: str) -> None:
        """A line about a phase that is no result: waiting, skipping, retrying."""
        if self.enabled:
            line = f"{self._head(phase)} {safe_text(text)}" if phase else f"  {safe_text(text)}"
            self._write(line.rstrip(), phase=phase, over=False)

    def meter(self, phase: str, done: int, total: int, seconds: float) -> None:
        """Bytes done of ``total`` after ``seconds``, on a terminal only; the line ends
        once ``done`` reaches ``total``."""
        if not (self.enabled and self.tty):
            return
        finished = done >= total
        now = self.clock()
        if not finished and now - self._shown < _REFRESH:
            return
        self._shown = now
        pct = 100 * done / total if total else 100.0
        rate = done / max(seconds, 1e-9) / 2**20
        line = f"{self._head(phase)} {pct:5.1f}%  {done / 2**20:,.0f} of {total / 2**20:,.0f} MiB  {rate:,.0f} MiB/s"
        self._write(line, phase=phase, end=finished)

    def counter(self, phase: str, total: int) -> Callable[[int], None]:
        """A callable that adds ``n`` bytes to a meter of ``total`` started now."""
        started, done = self.clock(), 0

        def add(n: int) -> None:
            nonlocal done
            done += n
            self.meter(phase, done, total, self.clock() - started)

        return add

    # -- the terminal's last line ----------------------------------------------------------

    def _head(self, phase: str) -> str:
        return f"  {safe_text(phase):<{self.width}}"

    def _write(self, text: str, *, phase: str, end: bool = True, over: bool = True) -> None:
        """``text`` as the last line; ``over``: in place of the same phase's unfinished line."""
        with self._lock:
            if self._open and over and self._open_phase == phase:
                text = "\r" + text.ljust(len(self._open))
            elif self._open:  # any other unfinished line: end it first
                text = "\n" + text
            click.echo(text, err=True, nl=end)
            self._open, self._open_phase = ("", None) if end else (text.lstrip("\r\n"), phase)

"""The steps of an image build and the events they report with their times."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

STEPS = ("rootfs", "python", "configure", "ext4", "verity", "encrypt", "measure")


@dataclass(frozen=True, slots=True)
class StepEvent:
    step: str
    status: str  # "start", "cached", "done", "skipped"
    seconds: float = 0.0
    detail: str = ""


Progress = Callable[[StepEvent], None]


def quiet(_: StepEvent) -> None:
    pass


class Timer:
    """One step: reports its start at once and its end with the seconds since."""

    def __init__(self, progress: Progress, step: str) -> None:
        self.progress, self.step, self.start = progress, step, time.monotonic()
        progress(StepEvent(step, "start"))

    def done(self, status: str = "done", detail: str = "") -> float:
        seconds = time.monotonic() - self.start
        self.progress(StepEvent(self.step, status, seconds, detail))
        return seconds

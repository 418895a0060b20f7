"""A call that must return: run it on a thread, fail the test if it is still running."""

from __future__ import annotations

import threading
from collections.abc import Callable


def raised_by(call: Callable[[], object], *, within: float = 60.0) -> BaseException | None:
    """What ``call()`` raised (None if it returned); an AssertionError if it is still
    running after ``within`` seconds (it hangs: the thread is left behind, a daemon)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(within)
    if worker.is_alive():
        raise AssertionError(f"still running after {within:g} s")
    return outcome[0]

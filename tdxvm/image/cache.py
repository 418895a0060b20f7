"""The image build's step cache: a step's output, kept under the hash of its inputs.

An entry is a folder ``<root>/<step>-<key>`` holding the step's files and
``inputs.json`` (what was hashed, for people reading the cache). It is built in a
``.partial`` folder beside it and renamed into place when the step has finished, so an
interrupted build never leaves an entry that a later build would take for complete.
The root is ``$TDXVM_CACHE`` (else ``$XDG_CACHE_HOME/tdxvm``, else ``~/.cache/tdxvm``),
then ``image/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tdxvm.image.recipe import canonical


def default_root() -> Path:
    base = os.environ.get("TDXVM_CACHE")
    if base:
        return Path(base) / "image"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tdxvm" / "image"


def step_key(step: str, inputs: Mapping[str, Any]) -> str:
    """The cache key of ``step`` for ``inputs`` (SHA-256 of their canonical JSON)."""
    return hashlib.sha256(step.encode() + b"\0" + canonical(inputs)).hexdigest()


class StepCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, step: str, key: str) -> Path:
        return self.root / f"{step}-{key[:32]}"

    def get(self, step: str, key: str) -> Path | None:
        """The entry for ``step`` and ``key`` if a build finished it, else None."""
        entry = self.path(step, key)
        return entry if (entry / "inputs.json").is_file() else None

    @contextmanager
    def put(self, step: str, key: str, inputs: Mapping[str, Any]) -> Iterator[Path]:
        """A fresh folder to build the entry in; published only if the block succeeds."""
        entry = self.path(step, key)
        staging = entry.with_name(entry.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, mode=0o700)
        try:
            yield staging
            (staging / "inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True, default=str) + "\n")
            shutil.rmtree(entry, ignore_errors=True)
            staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

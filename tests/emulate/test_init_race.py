"""``tdxvm emulate init DIR`` run several times at once, as separate processes do it: one
makes the platform, the others find DIR taken (exit 2), and a reader never sees a
folder with part of a platform, or parts of two."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pytest

from tdxvm.emulate import EmulatedPlatform

ROUNDS = 6
INITS = 3
FORK = multiprocessing.get_context("fork")


def _init(folder: Path, log: Path, go: object, codes: object) -> None:
    from tdxvm.cli import main

    with open(log, "w") as out:
        sys.stdout = sys.stderr = out
        go.wait()  # type: ignore[attr-defined]
        code = main(["emulate", "init", str(folder)])
    codes.put(code)  # type: ignore[attr-defined]


def _reader(folder: Path, go: object, stop: object, problems: object) -> None:
    """What a command using the platform does (cli/emulate.py _load): once root-ca.pem is
    there, load the platform from the folder."""
    go.wait()  # type: ignore[attr-defined]
    seen = []
    while not stop.is_set():  # type: ignore[attr-defined]
        if (folder / "root-ca.pem").is_file():
            try:
                EmulatedPlatform.load(folder)
            except (OSError, ValueError, TypeError) as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
        stop.wait(0.002)  # type: ignore[attr-defined]
    problems.put(seen)  # type: ignore[attr-defined]


def _race(folder: Path, logs: Path) -> tuple[list[int], list[str], list[str]]:
    go, stop, codes, problems = FORK.Event(), FORK.Event(), FORK.Queue(), FORK.Queue()
    inits = [FORK.Process(target=_init, args=(folder, logs / f"init{i}.log", go, codes)) for i in range(INITS)]
    reader = FORK.Process(target=_reader, args=(folder, go, stop, problems))
    for p in [*inits, reader]:
        p.start()
    go.set()
    results = sorted(codes.get(timeout=120) for _ in inits)
    for p in inits:
        p.join(60)
    stop.set()
    seen = problems.get(timeout=60)
    reader.join(60)
    return results, seen, [(logs / f"init{i}.log").read_text() for i in range(INITS)]


@pytest.mark.parametrize("existing", ["missing", "empty"])
def test_one_of_several_inits_at_once_makes_the_platform(tmp_path, existing):
    for n in range(ROUNDS):
        folder, logs = tmp_path / f"platform{n}", tmp_path / f"logs{n}"
        logs.mkdir()
        if existing == "empty":
            folder.mkdir()
        codes, seen, outputs = _race(folder, logs)
        assert codes == [0] + [2] * (INITS - 1), outputs
        assert sum("exists and is not empty" in out for out in outputs) == INITS - 1, outputs
        assert seen == []  # never a half-made platform, nor parts of two
        EmulatedPlatform.load(folder)  # the root CA certificate is the root key's
        assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_create_refuses_a_folder_that_is_not_empty(tmp_path):
    platform = EmulatedPlatform(seed="one")
    assert platform.create(tmp_path / "p") == tmp_path / "p"
    with pytest.raises(FileExistsError):
        EmulatedPlatform(seed="two").create(tmp_path / "p")
    assert EmulatedPlatform.load(tmp_path / "p").root_ca_der == platform.root_ca_der
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError):
        platform.create(tmp_path / "q")
    assert os.listdir(tmp_path / "q") == ["notes.txt"]


def test_save_into_a_folder_a_platform_reached_meanwhile_refuses(tmp_path, monkeypatch):
    """save() writes a missing folder whole and renames it into place; if another
    platform got there first, it is kept and this one is refused, never mixed in."""
    first, second = EmulatedPlatform(seed="first"), EmulatedPlatform(seed="second")
    write = EmulatedPlatform._write

    def meanwhile(self, folder):
        write(self, folder)
        if self is second:
            first.save(tmp_path / "p")  # another process, between the look and the rename

    monkeypatch.setattr(EmulatedPlatform, "_write", meanwhile)
    with pytest.raises(FileExistsError):
        second.save(tmp_path / "p")
    assert EmulatedPlatform.load(tmp_path / "p").root_ca_der == first.root_ca_der
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no partial folder left

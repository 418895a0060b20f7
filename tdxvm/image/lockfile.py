"""Image locks: the exact packages an image is built from (``images/<recipe>.lock``).

A lock is committed beside its recipe and says, for one set of recipe inputs, exactly
what goes into the image:

* every Debian package installed in the root filesystem: name, version, architecture,
  and the SHA-256, size and pool path of its ``.deb`` as the signed archive indexes
  listed them when the lock was taken;
* the archive suites they came from (``bookworm``, ``bookworm-updates``,
  ``bookworm-security``, the kernel's suite), each with the SHA-256 and ``Date`` of the
  ``InRelease`` file apt verified;
* the Python packages of the pip step, each a wheel with its SHA-256 (installed with
  ``--require-hashes --only-binary=:all:``: no sdist's setup code runs on the build host);
* the firmware package (``debian:PACKAGE/PATH``) with its version and ``.deb`` SHA-256;
* when the lock was taken (``taken_at``, also the build's ``SOURCE_DATE_EPOCH`` unless
  the recipe sets ``epoch``), so two builds from one lock have the same timestamps.

``tdxvm image lock RECIPE`` takes a new lock (security updates included);
``tdxvm image build`` installs exactly the lock and refuses a lock taken for other
recipe inputs. The file is JSON with one package per line, so a refresh reads as a diff
of versions.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tdxvm.errors import TdxvmError
from tdxvm.fileio import write_atomic

FORMAT = "tdxvm-image-lock/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]*$")
_VERSION = re.compile(r"^[A-Za-z0-9.+~:_-]+$")


class LockError(TdxvmError):
    code = "lock"


@dataclass(frozen=True, slots=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    sha256: str
    size: int
    filename: str  # the pool path in the archive

    @property
    def pin(self) -> str:
        """``name=version`` (``name:arch=version`` for a foreign architecture), for apt."""
        return f"{self.name}={self.version}"

    @property
    def deb_name(self) -> str:
        """The file name apt and debootstrap give the ``.deb`` in ``/var/cache/apt/archives``."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


@dataclass(frozen=True, slots=True)
class Source:
    uri: str
    suite: str
    inrelease_sha256: str
    date: str  # the InRelease file's Date field


@dataclass(frozen=True, slots=True)
class Wheel:
    name: str
    version: str
    sha256: str
    file: str  # the wheel's file name

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True, slots=True)
class Firmware:
    package: str
    suite: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Lock:
    recipe: str
    taken_at: int  # seconds since the epoch, UTC
    inputs: dict[str, Any]  # the recipe inputs the lock was taken for (see :func:`lock_inputs`)
    debootstrap: str
    sources: tuple[Source, ...]
    packages: tuple[DebPackage, ...]
    wheels: tuple[Wheel, ...]
    firmware: Firmware | None

    def package(self, name: str) -> DebPackage | None:
        return next((p for p in self.packages if p.name == name), None)

    def debian_digest(self) -> str:
        """SHA-256 over what decides the root filesystem's packages (the rootfs cache key)."""
        return _digest(
            {
                "sources": [s.suite for s in self.sources],
                "inputs": self.inputs,
                "packages": [asdict(p) for p in self.packages],
            }
        )

    def wheels_digest(self) -> str:
        return _digest([asdict(w) for w in self.wheels])

    def taken_at_text(self) -> str:
        return datetime.fromtimestamp(self.taken_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lock_path(recipe_path: Path) -> Path:
    """``images/smoke.yaml`` → ``images/smoke.lock``."""
    return recipe_path.with_suffix(".lock")


def dump(lock: Lock) -> str:
    """The lock as JSON text: top-level keys on their own lines, one package per line."""

    def one(obj: object) -> str:
        return json.dumps(obj, sort_keys=True, separators=(", ", ": "))

    def rows(items: list[object]) -> str:
        if not items:
            return "[]"
        return "[\n" + ",\n".join(f"  {one(i)}" for i in items) + "\n ]"

    fields = [
        ("format", one(FORMAT)),
        ("recipe", one(lock.recipe)),
        ("taken_at", one(lock.taken_at_text())),
        ("inputs", one(lock.inputs)),
        ("debootstrap", one(lock.debootstrap)),
        ("sources", rows([asdict(s) for s in lock.sources])),
        ("packages", rows([asdict(p) for p in lock.packages])),
        ("wheels", rows([asdict(w) for w in lock.wheels])),
        ("firmware", one(asdict(lock.firmware) if lock.firmware else None)),
    ]
    return "{\n" + ",\n".join(f" {one(k)}: {v}" for k, v in fields) + "\n}\n"


def write(lock: Lock, path: Path) -> None:
    write_atomic(path, dump(lock).encode(), mode=0o644)


def load(path: Path) -> Lock:
    """Read and check a lock; every error names the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(
            f"{path}: no lock for this recipe (take one: tdxvm image lock {path.with_suffix('.yaml')})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LockError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # an integer too long, absurd nesting
        raise LockError(f"{path}: not usable JSON: {exc}") from None
    return parse(data, source=str(path))


def parse(data: Any, *, source: str) -> Lock:
    r = _Reader(source)
    if not isinstance(data, dict):
        raise LockError(f"{source}: a lock is a JSON object")
    if data.get("format") != FORMAT:
        raise LockError(
            f"{source}: format {data.get('format')!r} is not {FORMAT!r} (take a new lock: tdxvm image lock RECIPE)"
        )
    unknown = sorted(
        set(data)
        - {"format", "recipe", "taken_at", "inputs", "debootstrap", "sources", "packages", "wheels", "firmware"}
    )
    if unknown:
        raise LockError(f"{source}: unknown field {unknown[0]!r}")
    taken = r.text(data, "taken_at")
    try:
        taken_at = int(datetime.strptime(taken, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        raise LockError(f"{source}: taken_at: {taken!r} is not a UTC time like 2026-12-03T17:40:00Z") from None
    inputs = data.get("inputs")
    if not isinstance(inputs, dict):
        raise LockError(f"{source}: inputs: expected an object")
    sources = tuple(
        Source(
            uri=r.text(s, "uri", at),
            suite=r.name(s, "suite", at),
            inrelease_sha256=r.sha(s, "inrelease_sha256", at),
            date=r.text(s, "date", at),
        )
        for at, s in r.rows(data, "sources")
    )
    packages = tuple(
        DebPackage(
            name=r.name(p, "name", at),
            version=r.version(p, "version", at),
            architecture=r.name(p, "architecture", at),
            sha256=r.sha(p, "sha256", at),
            size=r.size(p, "size", at),
            filename=r.text(p, "filename", at),
        )
        for at, p in r.rows(data, "packages")
    )
    names = [p.name for p in packages]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LockError(f"{source}: packages: {dup} is listed twice")
    wheels = tuple(
        Wheel(
            name=r.name(w, "name", at),
            version=r.version(w, "version", at),
            sha256=r.sha(w, "sha256", at),
            file=r.text(w, "file", at),
        )
        for at, w in r.rows(data, "wheels")
    )
    fw = data.get("firmware")
    firmware = None
    if fw is not None:
        at = "firmware"
        firmware = Firmware(
            package=r.name(fw, "package", at),
            suite=r.name(fw, "suite", at),
            version=r.version(fw, "version", at),
            sha256=r.sha(fw, "sha256", at),
        )
    return Lock(
        recipe=r.text(data, "recipe"),
        taken_at=taken_at,
        inputs=inputs,
        debootstrap=r.text(data, "debootstrap"),
        sources=sources,
        packages=packages,
        wheels=wheels,
        firmware=firmware,
    )


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def _get(self, obj: Any, key: str, at: str) -> Any:
        if not isinstance(obj, dict):
            raise LockError(f"{self.source}: {at}: expected an object")
        if key not in obj:
            raise LockError(f"{self.source}: {at + '.' if at else ''}{key}: missing")
        return obj[key]

    def text(self, obj: Any, key: str, at: str = "") -> str:
        v = self._get(obj, key, at)
        if not isinstance(v, str) or not v:
            raise LockError(f"{self.source}: {at + '.' if at else ''}{key}: expected a non-empty string")
        return v

    def _match(self, obj: Any, key: str, at: str, pattern: re.Pattern[str], what: str) -> str:
        v = self.text(obj, key, at)
        if not pattern.fullmatch(v):
            raise LockError(f"{self.source}: {at}.{key}: {v!r} is not {what}")
        return v

    def name(self, obj: Any, key: str, at: str) -> str:
        return self._match(obj, key, at, _NAME, "a package name")

    def version(self, obj: Any, key: str, at: str) -> str:
        return self._match(obj, key, at, _VERSION, "a version")

    def sha(self, obj: Any, key: str, at: str) -> str:
        return self._match(obj, key, at, _SHA256, "a SHA-256 (64 lowercase hex digits)")

    def size(self, obj: Any, key: str, at: str) -> int:
        v = self._get(obj, key, at)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise LockError(f"{self.source}: {at}.{key}: expected a byte count")
        return v

    def rows(self, data: dict[str, Any], key: str) -> list[tuple[str, Any]]:
        v = data.get(key)
        if not isinstance(v, list):
            raise LockError(f"{self.source}: {key}: expected a list")
        return [(f"{key}[{i}]", item) for i, item in enumerate(v)]


def stale_inputs(lock: Lock, inputs: dict[str, Any], *, path: Path, recipe_path: Path) -> LockError | None:
    """None when ``lock`` was taken for ``inputs``; else the error that says what changed."""
    if lock.inputs == inputs:
        return None
    changes = []
    for key in sorted(set(lock.inputs) | set(inputs)):
        before, now = lock.inputs.get(key), inputs.get(key)
        if before == now:
            continue
        if isinstance(before, list) and isinstance(now, list):
            added = sorted(set(map(str, now)) - set(map(str, before)))
            removed = sorted(set(map(str, before)) - set(map(str, now)))
            parts = ([f"added {', '.join(added)}"] if added else []) + (
                [f"removed {', '.join(removed)}"] if removed else []
            )
            changes.append(f"{key}: {'; '.join(parts) or 'reordered'}")
        else:
            changes.append(
                f"{key}: {json.dumps(before, sort_keys=True)} in the lock, {json.dumps(now, sort_keys=True)} now"
            )
    return LockError(
        f"{path} was taken for other recipe inputs than {recipe_path} has now ({'; '.join(changes)}): take a new "
        f"lock with: tdxvm image lock {recipe_path}"
    )

"""Image locks: the committed locks load, every bad field is named, a lock taken for other
recipe inputs is refused before any step runs, and the pinned install refuses packages
that are not the lock's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tdxvm.image import debpins, lockfile
from tdxvm.image.build import build
from tdxvm.image.lockfile import DebPackage, Lock, LockError
from tdxvm.image.recipe import BASE_PACKAGES, load_recipe
from tdxvm.secretstore import SecretStore

from .conftest import write_lock_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["smoke", "model-smoke", "llama2"])
def test_every_recipe_has_a_current_lock(name):
    recipe = ROOT / "images" / f"{name}.yaml"
    loaded = load_recipe(recipe)
    lock = lockfile.load(lockfile.lock_path(recipe))
    assert (
        lockfile.stale_inputs(lock, loaded.recipe.lock_inputs(), path=lockfile.lock_path(recipe), recipe_path=recipe)
        is None
    )
    names = {p.name for p in lock.packages}
    assert set(BASE_PACKAGES) <= names and loaded.recipe.kernel.package in names
    assert [s.suite for s in lock.sources] == [
        "bookworm",
        "bookworm-updates",
        "bookworm-security",
        "bookworm-backports",
    ]
    assert any("/updates/" in p.filename for p in lock.packages)  # security fixes are in
    assert lock.firmware is not None and lock.firmware.package == "ovmf-inteltdx"
    assert bool(lock.wheels) == bool(loaded.recipe.python.requirements)
    torch = [w for w in lock.wheels if w.name == "torch"]
    assert not lock.wheels or (len(torch) == 1 and torch[0].version.startswith("2.13.0"))
    assert all(w.file.endswith(".whl") for w in lock.wheels)  # wheels only: no sdist runs code on the build host
    assert lockfile.dump(lock) == lockfile.lock_path(recipe).read_text()  # the committed file is what dump writes


def _lock(**changes) -> Lock:
    package = DebPackage(
        name="bash",
        version="5.2.15-2+b13",
        architecture="amd64",
        sha256="ab" * 32,
        size=10,
        filename="pool/main/b/bash/bash_5.2.15-2+b13_amd64.deb",
    )
    base = Lock(
        recipe="x",
        taken_at=1_796_318_000,
        inputs={"suite": "bookworm"},
        debootstrap="1.0.128",
        sources=(
            lockfile.Source(
                uri="http://deb.debian.org/debian",
                suite="bookworm",
                inrelease_sha256="cd" * 32,
                date="Sat, 11 Jul 2026 10:16:37 UTC",
            ),
        ),
        packages=(package,),
        wheels=(lockfile.Wheel(name="torch", version="2.13.0+cpu", sha256="ef" * 32, file="t.whl"),),
        firmware=lockfile.Firmware(package="ovmf-inteltdx", suite="unstable", version="2026.08+ds-2", sha256="01" * 32),
    )
    return replace(base, **changes)


def test_a_lock_round_trips_one_package_per_line():
    text = lockfile.dump(_lock())
    assert lockfile.parse(json.loads(text), source="x.lock") == _lock()
    assert (
        '  {"architecture": "amd64", "filename": "pool/main/b/bash/' in text
    )  # one line per package: refreshes read as diffs
    assert '"taken_at": "2026-12-03T' in text


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="tdxvm-image-lock/0"), "format 'tdxvm-image-lock/0' is not"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d.update(taken_at="yesterday"), "taken_at: 'yesterday' is not a UTC time"),
        (lambda d: d["packages"][0].update(sha256="AB" * 32), "packages[0].sha256: 'ABAB"),
        (lambda d: d["packages"][0].pop("version"), "packages[0].version: missing"),
        (lambda d: d["packages"][0].update(size=-1), "packages[0].size: expected a byte count"),
        (lambda d: d["packages"].append(dict(d["packages"][0])), "packages: bash is listed twice"),
        (
            lambda d: d["wheels"][0].update(name="torch; rm -rf /"),
            "wheels[0].name: 'torch; rm -rf /' is not a package name",
        ),
        (lambda d: d["sources"][0].pop("inrelease_sha256"), "sources[0].inrelease_sha256: missing"),
        (lambda d: d["firmware"].update(version="1 2"), "firmware.version: '1 2' is not a version"),
        (lambda d: d.update(inputs=[]), "inputs: expected an object"),
    ],
)
def test_a_bad_lock_names_the_field(mutate, message):
    data = json.loads(lockfile.dump(_lock()))
    mutate(data)
    with pytest.raises(LockError) as info:
        lockfile.parse(data, source="images/x.lock")
    assert str(info.value).startswith("images/x.lock: ") and message in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(LockError, match=r"x\.lock: no lock for this recipe \(take one: tdxvm image lock .*x\.yaml\)"):
        lockfile.load(tmp_path / "x.lock")
    (tmp_path / "x.lock").write_text("{\n\n  nope")
    with pytest.raises(LockError, match=r"x\.lock:3: not valid JSON"):
        lockfile.load(tmp_path / "x.lock")


def test_a_lock_taken_for_other_inputs_is_refused_before_any_step(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\npackages: [curl]\n")
    write_lock_for(recipe)
    recipe.write_text("name: r\npackages: [wget]\npython:\n  requirements: [numpy]\n")
    (tmp_path / "build").mkdir()
    with pytest.raises(LockError) as info:
        build(
            load_recipe(recipe),
            output=tmp_path / "build" / "r",
            secret_store=SecretStore(directory=tmp_path / "s"),
            cache=None,
        )
    text = str(info.value)
    assert "packages: added wget; removed curl" in text and "python: added numpy" in text
    assert text.endswith(f"take a new lock with: tdxvm image lock {recipe.resolve()}")
    assert list((tmp_path / "build").iterdir()) == []  # nothing built, no work folder


def _tree_with_debs(tmp_path: Path, debs: dict[str, bytes]) -> Path:
    root = tmp_path / "root"
    archives = root / debpins.ARCHIVES
    archives.mkdir(parents=True)
    for name, data in debs.items():
        (archives / name).write_bytes(data)
    return root


def _package(name: str, data: bytes, version: str = "1.0-1") -> DebPackage:
    return DebPackage(
        name=name,
        version=version,
        architecture="amd64",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        filename=f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb",
    )


def _check(root: Path, lock: Lock, installed: dict[str, tuple[str, str]], monkeypatch) -> None:
    # dpkg-query in the chroot is the one piece replaced: the tree here is not a Debian system
    monkeypatch.setattr(debpins, "installed", lambda _root: installed)
    debpins.check_installed(root, lock, lock_file=Path("images/x.lock"), recipe_file=Path("images/x.yaml"))


def test_the_installed_packages_must_be_exactly_the_locks(tmp_path, monkeypatch):
    a, b = _package("alpha", b"alpha deb"), _package("beta", b"beta deb", version="1:2.0-1")
    assert b.deb_name == "beta_1%3a2.0-1_amd64.deb"  # the name apt gives an epoch version
    root = _tree_with_debs(tmp_path, {a.deb_name: b"alpha deb", b.deb_name: b"beta deb"})
    lock = _lock(packages=(a, b))
    _check(root, lock, {"alpha": ("1.0-1", "amd64"), "beta": ("1:2.0-1", "amd64")}, monkeypatch)  # exact: accepted

    with pytest.raises(
        LockError, match=r"the mirror's base system now installs gamma, which images/x\.lock does not list"
    ):
        _check(
            root, lock, {"alpha": ("1.0-1", "amd64"), "beta": ("1:2.0-1", "amd64"), "gamma": ("1", "all")}, monkeypatch
        )
    with pytest.raises(
        LockError, match=r"beta: images/x\.lock locks 1:2\.0-1 \(amd64\) but apt installed 1:2\.0-2 \(amd64\)"
    ):
        _check(root, lock, {"alpha": ("1.0-1", "amd64"), "beta": ("1:2.0-2", "amd64")}, monkeypatch)
    with pytest.raises(LockError, match=r"beta: images/x\.lock locks .* but apt installed nothing"):
        _check(root, lock, {"alpha": ("1.0-1", "amd64")}, monkeypatch)


def test_a_deb_that_is_not_the_locked_bytes_is_refused(tmp_path, monkeypatch):
    a = _package("alpha", b"alpha deb")
    root = _tree_with_debs(tmp_path, {a.deb_name: b"alpha deb, as a mirror rebuilt it"})
    with pytest.raises(LockError) as info:
        _check(root, _lock(packages=(a,)), {"alpha": ("1.0-1", "amd64")}, monkeypatch)
    assert f"not {a.sha256} as locked in images/x.lock" in str(info.value)
    (root / debpins.ARCHIVES / a.deb_name).unlink()
    with pytest.raises(LockError, match="its .deb is not in var/cache/apt/archives"):
        _check(root, _lock(packages=(a,)), {"alpha": ("1.0-1", "amd64")}, monkeypatch)


def test_apt_cache_records_are_read_per_paragraph():
    text = (
        "Package: bash\nVersion: 5.2\nArchitecture: amd64\nDescription: shell\n multi-line\n text\nSHA256: aa\n\n"
        "Package: dash\nVersion: 0.5\nArchitecture: amd64\nSHA256: bb\n"
    )
    records = debpins._records(text)
    assert [(r["Package"], r["SHA256"]) for r in records] == [("bash", "aa"), ("dash", "bb")]


def test_a_lock_whose_apt_sources_are_not_the_recipes_is_refused(tmp_path):
    """apt installs from the lock's sources: a lock whose inputs match but whose sources point
    elsewhere (with apt options smuggled in) must not be built from."""
    from tdxvm.image.rootimage import resolve_inputs

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    lock_file = write_lock_for(recipe)
    lock = lockfile.load(lock_file)
    evil = "[trusted=yes] http://evil.example/debian"
    lockfile.write(replace(lock, sources=(replace(lock.sources[0], uri=evil), *lock.sources[1:])), lock_file)
    with pytest.raises(LockError, match=r"lists other apt sources \(\[trusted=yes\] http://evil.example/debian"):
        resolve_inputs(load_recipe(recipe))

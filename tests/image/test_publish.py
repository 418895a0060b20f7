"""Publishing a finished build over an older one (tdxvm.image.build._publish), interrupted."""

from __future__ import annotations

import shutil

import pytest

from tdxvm.image import build


def _builds(tmp_path):
    old, new = tmp_path / "smoke", tmp_path / ".smoke.staging"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    return old, new


def test_the_new_builds_key_is_kept_once_it_is_in_place_even_if_deleting_the_old_one_is_interrupted(
    tmp_path, monkeypatch
):
    """Deleting the old build (GiBs) is where a Ctrl-C lands; before, the build's cleanup then
    deleted the disk key of the image just published, which nothing could open again."""
    output, staging = _builds(tmp_path)
    calls = []

    def interrupted(path, ignore_errors=False):
        calls.append("rmtree")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build._publish(staging, output, published=lambda: calls.append("published"))
    assert calls == ["published", "rmtree"] and (output / "manifest.json").read_text() == "new"


def test_a_new_build_that_cannot_be_moved_in_puts_the_old_one_back(tmp_path):
    output, staging = _builds(tmp_path)
    shutil.rmtree(staging)  # gone (the rename fails)
    published = []
    with pytest.raises(FileNotFoundError):
        build._publish(staging, output, published=lambda: published.append(1))
    assert not published and (output / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["smoke"]

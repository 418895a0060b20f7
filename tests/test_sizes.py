"""Sizes in YAML files: binary units only, whole numbers, and nothing absurd."""

from __future__ import annotations

import pytest

from tdxvm.sizes import MAX_SIZE, parse_size


def test_sizes_are_binary_units():
    assert parse_size("512MiB") == 512 << 20 and parse_size(" 2GiB ") == 2 << 30 and parse_size("4KiB") == 4096
    assert parse_size("64TiB") == MAX_SIZE


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("2G", "is not a size like 512MiB"),
        ("1.5GiB", "is not a size"),
        ("-1GiB", "is not a size"),
        ("", "is not a size"),
        ("65TiB", "65TiB is more than 64TiB"),
        ("99999999999999999TiB", "is more than 64TiB"),
        ("1" * 40 + "KiB", "is not a size"),  # not even converted: no 40-digit arithmetic on input
    ],
)
def test_other_text_is_refused_saying_why(text, said):
    with pytest.raises(ValueError, match=said):
        parse_size(text)

"""Tree listings: one exact line per file type, names escaped and sorted by their bytes,
symlinks never followed; the first difference between two listings named in a sentence;
listings stored and read back byte for byte."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from tdxvm.image.listing import (
    FORMAT,
    ListingError,
    escape,
    first_difference,
    listing_sha256,
    read_listing,
    tree_listing,
    unescape,
    write_listing,
)

T = 1_700_000_000
UID, GID = os.getuid(), os.getgid()


def _lines(root: Path) -> dict[str, str]:
    return {line.split("\t")[0]: line for line in tree_listing(root)}


def _stamp(path: Path, ns: int = T * 10**9) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def test_a_line_for_each_file_type(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir(mode=0o750)
    (tmp_path / "dir").chmod(0o750)
    (tmp_path / "file").write_bytes(b"hello\n")
    (tmp_path / "file").chmod(0o4755)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hard").hardlink_to(tmp_path / "file")
    (tmp_path / "link").symlink_to("../outside/target")
    os.mkfifo(tmp_path / "fifo", 0o600)
    monkeypatch.chdir(tmp_path)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
    for name in ("dir", "file", "empty", "link", "fifo", "sock"):
        _stamp(tmp_path / name)
    _stamp(tmp_path / "empty", T * 10**9 + 5)
    _stamp(tmp_path)
    owner = f"{UID}:{GID}"
    digest = hashlib.sha256(b"hello\n").hexdigest()
    assert tree_listing(tmp_path) == [
        f"/\td\t{stat.S_IMODE(tmp_path.stat().st_mode):04o}\t{owner}\t{T}\t-\t-",
        f"/dir\td\t0750\t{owner}\t{T}\t-\t-",
        f"/empty\tf\t0644\t{owner}\t{T}.000000005\t0\t{hashlib.sha256(b'').hexdigest()}",
        f"/fifo\tp\t0600\t{owner}\t{T}\t-\t-",
        f"/file\tf\t4755\t{owner}\t{T}\t6\t{digest}",
        f"/hard\tf\t4755\t{owner}\t{T}\t6\t{digest}\tlink=/file",
        f"/link\tl\t0777\t{owner}\t{T}\t17\t../outside/target",
        f"/sock\ts\t{stat.S_IMODE(os.lstat(tmp_path / 'sock').st_mode):04o}\t{owner}\t{T}\t-\t-",
    ]


def test_devices_are_listed_by_number(tmp_path):
    try:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(tmp_path / "vda", 0o660 | stat.S_IFBLK, os.makedev(254, 0))
    except PermissionError:
        pytest.skip("making device nodes needs CAP_MKNOD")
    lines = _lines(tmp_path)
    assert lines["/null"].split("\t")[1:2] + lines["/null"].split("\t")[5:] == ["c", "-", "1:3"]
    assert lines["/vda"].split("\t")[1:2] + lines["/vda"].split("\t")[5:] == ["b", "-", "254:0"]


def test_extended_attributes_are_listed_sorted_in_hex(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    try:
        os.setxattr(path, "user.zeta", b"\x01\x02")
        os.setxattr(path, "user.a=b", b"v")
    except OSError:
        pytest.skip("this filesystem has no user extended attributes")
    assert _lines(tmp_path)["/f"].split("\t")[7:] == ["xattr:user.a\\x3db=76", "xattr:user.zeta=0102"]


def test_symlinks_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host file")
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    (root / "passwd").symlink_to(outside / "secret")
    lines = _lines(root)
    assert sorted(lines) == ["/", "/etc", "/passwd"]
    assert lines["/etc"].split("\t")[1] == "l" and lines["/passwd"].split("\t")[6] == str(outside / "secret")
    with pytest.raises(ListingError, match="not a directory"):
        tree_listing(root / "etc")


def test_names_are_escaped_and_sorted_by_their_bytes(tmp_path):
    root = os.fsencode(tmp_path)
    names = [b"a", b"a\tb", b"a-b", b"back\\slash", b"caf\xc3\xa9", b"line\nbreak", b"raw\xff", b"\xe2\x80\xa8sep"]
    for name in names:
        with open(root + b"/" + name, "wb"):
            pass
    os.mkdir(root + b"/dir")
    open(root + b"/dir/x", "wb").close()
    lines = tree_listing(tmp_path)
    paths = [line.split("\t")[0] for line in lines]
    assert paths == [
        "/",
        "/a",
        "/a\\x09b",
        "/a-b",
        "/back\\\\slash",
        "/caf\u00e9",
        "/dir",
        "/dir/x",
        "/line\\x0abreak",
        "/raw\\xff",
        "/\\u2028sep",
    ]
    assert all(len(line.split("\t")) == 7 and "\n" not in line for line in lines)
    assert [unescape(p) for p in paths] == sorted(unescape(p) for p in paths)
    for name in names:
        assert unescape(escape(name)) == name


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\\",
        b"\\x41",
        b"\xc3",
        b"\xf0\x9f\x98\x80",
        b"\x7f\x85",
        "\u0085".encode(),
        b"tab\there",
        bytes(range(256)),
    ],
)
def test_escape_round_trips(raw):
    text = escape(raw)
    assert text.isprintable() and "\t" not in text and "\n" not in text
    assert unescape(text) == raw


LINE_A = "/etc/shadow\tf\t0640\t0:42\t1700000000\t100\t" + "a" * 64


def _with(line: str, index: int, value: str) -> str:
    fields = line.split("\t")
    fields[index] = value
    return "\t".join(fields)


@pytest.mark.parametrize(
    ("b_line", "sentence"),
    [
        (
            _with(LINE_A, 6, "b" * 64),
            "/etc/shadow differs between the first listing and the second listing: content "
            "(sha256 aaaaaaaaaaaaaaaa… vs bbbbbbbbbbbbbbbb…)",
        ),
        (
            _with(_with(LINE_A, 6, "b" * 64), 5, "101"),
            "content (sha256 aaaaaaaaaaaaaaaa… vs bbbbbbbbbbbbbbbb…, size 100 vs 101)",
        ),
        (_with(LINE_A, 2, "0644"), "mode (0640 vs 0644)"),
        (_with(LINE_A, 3, "0:0"), "owner (0:42 vs 0:0)"),
        (_with(LINE_A, 4, "1700000001"), "mtime (1700000000 vs 1700000001)"),
        (_with(_with(LINE_A, 2, "0600"), 4, "1"), "mode (0640 vs 0600), mtime (1700000000 vs 1)"),
        (_with(_with(LINE_A, 1, "l"), 6, "shadow.real"), "type (regular file vs symlink)"),
        (LINE_A + "\tlink=/etc/gshadow", "hard link (none vs /etc/gshadow)"),
        (LINE_A + "\txattr:security.capability=0100", "extended attribute security.capability (absent vs 0100)"),
    ],
)
def test_first_difference_says_what_differs(b_line, sentence):
    a = ["/\td\t0755\t0:0\t1\t-\t-", LINE_A]
    b = ["/\td\t0755\t0:0\t1\t-\t-", b_line]
    found = first_difference(a, b)
    assert found is not None and found.startswith("/etc/shadow differs between") and found.endswith(sentence)


def test_first_difference_names_the_first_path_in_listing_order(tmp_path):
    a = [
        "/\td\t0755\t0:0\t1\t-\t-",
        "/a\\x09b\tf\t0644\t0:0\t1\t1\t" + "0" * 64,
        "/a/b\tf\t0644\t0:0\t1\t1\t" + "0" * 64,
    ]
    assert first_difference(a, a) is None
    assert first_difference(a, []) == "/ (directory) is only in the first listing"
    assert first_difference(a[:2], a) == "/a/b (regular file) is only in the second listing"
    assert (
        first_difference([a[0], a[2]], a, labels=("build 1", "build 2")) == "/a\\x09b (regular file) is only in build 2"
    )
    changed = [a[0], a[1], _with(a[2], 2, "0600")]
    assert first_difference(a, changed) == (
        "/a/b differs between the first listing and the second listing: mode (0644 vs 0600)"
    )
    links = ["/l\tl\t0777\t0:0\t1\t1\tx"], ["/l\tl\t0777\t0:0\t1\t1\ty"]
    assert first_difference(*links).endswith("symlink target (x vs y)")
    devices = ["/d\tc\t0666\t0:0\t1\t-\t1:3"], ["/d\tc\t0666\t0:0\t1\t-\t1:5"]
    assert first_difference(*devices).endswith("device number (1:3 vs 1:5)")


def test_first_difference_on_real_trees(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "etc").mkdir(parents=True)
        (root / "etc/hostname").write_text("smoke\n")
        _stamp(root / "etc/hostname")
        _stamp(root / "etc")
        _stamp(root)
    assert first_difference(tree_listing(a), tree_listing(b)) is None
    (b / "etc/hostname").write_text("vm\n")
    _stamp(b / "etc/hostname")
    found = first_difference(tree_listing(a), tree_listing(b))
    assert found is not None and found.startswith("/etc/hostname differs") and "size 6 vs 3" in found


def test_write_and_read_back(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/x").write_bytes(b"x")
    lines = tree_listing(tmp_path / "tree")
    write_listing(lines, tmp_path / "one.gz")
    write_listing(lines, tmp_path / "two.gz")
    assert (tmp_path / "one.gz").read_bytes() == (tmp_path / "two.gz").read_bytes()  # no time or name in the header
    assert read_listing(tmp_path / "one.gz") == lines
    text = gzip.decompress((tmp_path / "one.gz").read_bytes())
    assert text.startswith(FORMAT.encode() + b"\n") and listing_sha256(lines) == hashlib.sha256(text).hexdigest()
    assert read_listing(_gz(tmp_path / "empty.gz", FORMAT + "\n")) == []


def _gz(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", ":1: expected the header"),
        ("/\td\t0755\t0:0\t1\t-\t-\n", ":1: expected the header"),
        (FORMAT + "\n/\td\t0755\t0:0\t1\t-\t-", ":2: the last line does not end with a newline"),
        (FORMAT + "\n/\td\t0755\t0:0\t1\t-\n", ":2: not a listing line"),
        (FORMAT + "\n/\tq\t0755\t0:0\t1\t-\t-\n", ":2: not a listing line"),
        (
            FORMAT + "\n/\td\t0755\t0:0\t1\t-\t-\n/b\td\t0755\t0:0\t1\t-\t-\n/a\td\t0755\t0:0\t1\t-\t-\n",
            ":4: /a is out of order",
        ),
        (FORMAT + "\n/\td\t0755\t0:0\t1\t-\t-\n/\td\t0755\t0:0\t1\t-\t-\n", ":3: / is out of order"),
        (FORMAT + "\n/a\\q\td\t0755\t0:0\t1\t-\t-\n", ":2: bad escape"),
    ],
)
def test_a_bad_listing_file_is_refused_with_its_line(tmp_path, text, where):
    path = _gz(tmp_path / "listing.gz", text)
    with pytest.raises(ListingError) as caught:
        read_listing(path)
    assert str(caught.value).startswith(f"{path}{where}")


def test_a_file_that_is_not_gzip_is_refused(tmp_path):
    (tmp_path / "plain").write_text(FORMAT + "\n")
    with pytest.raises(ListingError, match="not a gzip-compressed tree listing"):
        read_listing(tmp_path / "plain")

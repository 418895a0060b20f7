"""The build manifest: what an image is and what a genuine TD booted from it reports.

``manifest.json`` beside the artifacts: the SHA-256 and size of every artifact, the
kernel command line (with the verity root hash), the dm-verity tree (root hash,
algorithm, block sizes, data and hash sizes), the LUKS2 volume's UUID and the
secret-store name of its key (the name only, never the key), and the predicted TDX measurements with a note per register
saying whether and how it was predicted. A launch reads its default attestation policy
from here, so a fresh image needs no hand-copied hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "tdxvm-image-manifest/2"  # 2: verified root (dm-verity), volume key released
ARTIFACTS = ("disk.img", "vmlinuz", "initrd.img")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def artifact_entry(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def dump(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def verify_artifacts(manifest: dict[str, Any], folder: Path) -> list[str]:
    """Artifacts whose size or SHA-256 differ from the manifest (empty: all match)."""
    bad = []
    for name in ARTIFACTS:
        path = folder / name
        want = manifest["artifacts"][name]
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif path.stat().st_size != want["size"] or file_sha256(path) != want["sha256"]:
            bad.append(f"{path}: differs from the manifest (sha256 {want['sha256']})")
    return bad

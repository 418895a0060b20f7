"""The image manifest as a launch reads it: :class:`tdxvm.image.manifest.ImageManifest`.

``tdxvm image build`` writes ``manifest.json`` beside ``disk.img``, ``vmlinuz`` and
``initrd.img``; the same model reads it here. A launch needs the artifacts' SHA-256 and
sizes (the volumes on the libvirt host are named by them, and uploads are checked
against them), the kernel command line, the predicted MRTD/RTMRs (the default
attestation policy), the TDVF the MRTD was predicted for, the guest's ports, the disk
key's name and the release key the image trusts. Errors name the manifest file and the
field, as :class:`~tdxvm.launch.errors.ManifestError`.
"""

from __future__ import annotations

from pathlib import Path

from tdxvm.image.manifest import FORMAT, UPLOAD_PORT, Artifact, ImageManifest, ImageManifestError, read
from tdxvm.launch.errors import ManifestError

__all__ = ["FORMAT", "UPLOAD_PORT", "Artifact", "ImageManifest", "load_manifest"]


def load_manifest(path: str | Path) -> ImageManifest:
    """Read ``manifest.json`` (or a build folder holding one) and check what a launch needs."""
    try:
        return read(path)
    except ImageManifestError as exc:
        raise ManifestError(str(exc)) from None

"""The rootfs overlay: what every image gets, and what the ``model-server`` profile adds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdxvm.image.configure import GUEST_PYTHON, apply_overlay
from tdxvm.image.ext4 import ImageStepError

UNITS = "etc/systemd/system"
WANTS = f"{UNITS}/multi-user.target.wants"
GUEST_PACKAGE = GUEST_PYTHON.lstrip("/") + "/tdxvm"


def test_model_server_profile_installs_the_service_which_the_boot_does_not_start(tmp_path):
    """Provision starts the service; a booted TD's scratch disk holds no model. The boot
    starts the SSH key step and the agent, not the scratch disk's format (its first user does)."""
    apply_overlay(tmp_path, agent_port=7300, profile="model-server", service_port=8443)
    unit = (tmp_path / UNITS / "tdxvm-serve.service").read_text()
    assert "--port 8443 " in unit and "@SERVICE_PORT@" not in unit
    assert "EnvironmentFile=/etc/tdxvm/serve.env" in unit
    assert "[Install]" not in unit and not (tmp_path / WANTS / "tdxvm-serve.service").exists()
    assert "[Install]" not in (tmp_path / UNITS / "tdxvm-scratch.service").read_text()
    assert sorted(p.name for p in (tmp_path / WANTS).iterdir()) == [
        "systemd-networkd.service",
        "tdxvm-agent.service",
        "tdxvm-ssh-keygen.service",
    ]
    for unit_name in ("tdxvm-agent.service", "tdxvm-ssh-keygen.service"):
        assert os.readlink(tmp_path / WANTS / unit_name) == f"/etc/systemd/system/{unit_name}"


def test_smoke_profile_has_no_inference_service(tmp_path):
    apply_overlay(tmp_path, agent_port=7300, profile="smoke")
    assert not (tmp_path / UNITS / "tdxvm-serve.service").exists()
    assert not (tmp_path / WANTS / "tdxvm-serve.service").is_symlink()
    assert (tmp_path / UNITS / "tdxvm-agent.service").is_file()
    assert "7300" in (tmp_path / UNITS / "tdxvm-agent.service").read_text()


def test_model_server_profile_needs_a_service_port(tmp_path):
    with pytest.raises(ImageStepError, match="@SERVICE_PORT@"):
        apply_overlay(tmp_path, agent_port=7300, profile="model-server", service_port=None)


def test_overlay_applied_twice_is_the_same(tmp_path):
    """Re-running on a rootfs that has the overlay (a rebuild from the package cache) replaces, not fails."""
    apply_overlay(tmp_path, agent_port=7300, profile="model-server", service_port=8443)
    apply_overlay(tmp_path, agent_port=7300, profile="model-server", service_port=9443)
    assert "--port 9443 " in (tmp_path / UNITS / "tdxvm-serve.service").read_text()
    assert os.readlink(tmp_path / WANTS / "tdxvm-agent.service") == "/etc/systemd/system/tdxvm-agent.service"


def test_guest_modules_include_the_installer(tmp_path):
    apply_overlay(tmp_path, agent_port=7300, profile="model-server", service_port=8443)
    package = tmp_path / GUEST_PACKAGE
    repo_install = Path(__file__).resolve().parents[2] / "tdxvm" / "guest" / "install.py"
    assert (package / "guest" / "install.py").read_bytes() == repo_install.read_bytes()
    for rel in ("__init__.py", "errors.py", "fileio.py", "guest/staging.py", "guest/weights.py", "guest/serve.py"):
        assert (package / rel).is_file(), rel


def test_shipped_installer_imports_only_shipped_modules(tmp_path):
    """``python3 -m tdxvm.guest.install`` in the guest finds everything it imports under the guest's Python folder.

    ``-S``: no site hooks, so the development install's finder cannot supply a module that
    is not shipped; third-party packages (``cryptography``) come from their own folder.
    """
    import cryptography

    apply_overlay(tmp_path, agent_port=7300, profile="model-server", service_port=8443)
    shipped = tmp_path / GUEST_PYTHON.lstrip("/")
    third_party = Path(cryptography.__file__).resolve().parents[1]
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; import tdxvm.guest.install, tdxvm; "
        "assert tdxvm.__file__.startswith(sys.argv[1]), tdxvm.__file__"
    )
    subprocess.run(
        [sys.executable, "-S", "-c", code, str(shipped), str(third_party)], check=True, cwd=tmp_path, timeout=60
    )

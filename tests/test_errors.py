"""One error model: every exception tdxvm defines is a :class:`tdxvm.errors.TdxvmError`,
and its class (never its attributes) says which exit status the CLI returns."""

from __future__ import annotations

import importlib
import inspect
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import tdxvm
from tdxvm.errors import EXIT_INPUT, EXIT_REFUSED, EXIT_UNREACHABLE, Refused, TdxvmError, Unreachable

PACKAGE = Path(tdxvm.__file__).parent
GUEST_EXTRA = {"torch", "transformers"}  # the guest extra: modules that need it are skipped where it is missing


def _module_names() -> list[str]:
    """Every module under tdxvm/, found by file (tdxvm.guest is a namespace package, which
    pkgutil would not walk)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] in GUEST_EXTRA:
                continue
            raise
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == name and issubclass(cls, Exception):
                found[f"{name}.{cls.__name__}"] = cls
    return found


CLASSES = _exception_classes()


def test_every_exception_tdxvm_defines_derives_from_tdxvm_error():
    """Errors (``...Error``, ``...Refused``, ``...Mismatch``) and every other exception
    class in every module, the guest's included: the CLI tells ours from a bug by
    ``isinstance`` alone."""
    assert (
        "tdxvm.guest.agent.AgentError" in CLASSES and "tdxvm.cli.output.CliError" in CLASSES
    )  # the walk reaches both ends
    assert len(CLASSES) > 80
    named = [n for n in CLASSES if n.endswith(("Error", "Refused", "Mismatch"))]
    assert len(named) > 60
    outside = sorted(n for n, cls in CLASSES.items() if not issubclass(cls, TdxvmError))
    assert outside == [], f"not derived from tdxvm.errors.TdxvmError: {outside}"


def test_every_code_is_a_string():
    """A class that sets no code of its own inherits one; none is None or empty (the
    guest engine's RequestError sets its code per request: OpenAI's error shape)."""
    no_code = sorted(n for n, cls in CLASSES.items() if not (isinstance(cls.code, str) and cls.code))
    assert no_code == []


REFUSED = [
    "tdxvm.provision.handshake.AttestationRefused",
    "tdxvm.provision.endpoint.EndpointRefused",
    "tdxvm.launch.records.RecordMismatch",
    "tdxvm.provision.pinning.PinMismatchError",
    "tdxvm.provision.ssh.HostKeyMismatch",
    "tdxvm.provision.client.ApiRefused",
    "tdxvm.guest.agent.SecretRefused",
    "tdxvm.launch.sshtarget.HostKeyRefused",
]
UNREACHABLE = [
    "tdxvm.launch.errors.LibvirtUnreachable",
    "tdxvm.launch.errors.LibvirtdNotRunningError",
    "tdxvm.launch.errors.SshTransportError",
    "tdxvm.fleet.inventory.HostUnreachable",
    "tdxvm.provision.ssh.SshUnreachable",
    "tdxvm.attest.errors.CollateralFetchError",
    "tdxvm.provision.handshake.GuestUnreachable",
    "tdxvm.provision.handshake.HandshakeTimeout",
    "tdxvm.provision.endpoint.EndpointUnreachable",
    "tdxvm.provision.attestation.BringUpTimeout",
    "tdxvm.provision.model.ProvisionUnreachable",
    "tdxvm.provision.transfer.TransferUnreachable",
    "tdxvm.provision.client.ApiUnreachable",
    "tdxvm.launch.sshtarget.HostSshUnreachable",
]
INPUT = [  # the user's to fix; among them the bases the unreachable and refused ones split from
    "tdxvm.launch.errors.ConnectError",
    "tdxvm.launch.errors.LibvirtPermissionError",
    "tdxvm.provision.ssh.SshError",
    "tdxvm.provision.handshake.HandshakeError",
    "tdxvm.provision.handshake.GuestProtocolError",
    "tdxvm.provision.transfer.TransferError",
    "tdxvm.provision.model.ProvisionError",
    "tdxvm.provision.attestation.BringUpError",
    "tdxvm.provision.pinning.UnpinnedRequestError",
    "tdxvm.attest.errors.CollateralError",
    "tdxvm.yamlfile.SpecError",
    "tdxvm.cli.output.CliError",
    "tdxvm.launch.sshtarget.HostSshError",
    "tdxvm.launch.sshtarget.HostSshAuthError",
    "tdxvm.launch.sshtarget.TransportUnsupported",
]


@pytest.mark.parametrize(
    ("names", "base", "status"), [(REFUSED, Refused, EXIT_REFUSED), (UNREACHABLE, Unreachable, EXIT_UNREACHABLE)]
)
def test_refusals_and_unreachables_by_class(names, base, status):
    wrong = [n for n in names if not (issubclass(CLASSES[n], base) and CLASSES[n].exit_status == status)]
    assert wrong == []


def test_input_errors_are_neither_refused_nor_unreachable():
    wrong = [n for n in INPUT if issubclass(CLASSES[n], (Refused, Unreachable)) or CLASSES[n].exit_status != EXIT_INPUT]
    assert wrong == []


def test_requests_errors_stay_requests_errors():
    """The pinned session's refusals are still what ``requests`` and its callers catch."""
    import requests

    from tdxvm.provision.pinning import PinMismatchError, UnpinnedRequestError

    err = PinMismatchError("other key", presented="aa", pinned="bb")
    assert isinstance(err, requests.exceptions.SSLError) and isinstance(err, Refused)
    assert (str(err), err.code, err.presented) == ("other key", "tls-pin-mismatch", "aa")
    assert isinstance(UnpinnedRequestError("plain http"), requests.RequestException)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def test_no_answer_from_a_guest_is_unreachable():
    """SSH, the agent handshake and the bulk upload to a port nobody listens on."""
    from tdxvm.provision import handshake, ssh, transfer

    port = _closed_port()
    with pytest.raises(ssh.SshUnreachable) as err:
        ssh.connect(("127.0.0.1", port), host_key=b"", client_key=Ed25519PrivateKey.generate(), timeout=5)
    assert err.value.exit_status == EXIT_UNREACHABLE and err.value.code == "ssh"
    with pytest.raises(handshake.GuestUnreachable) as err:
        handshake.hello(("127.0.0.1", port), timeout=5)
    assert err.value.exit_status == EXIT_UNREACHABLE
    with pytest.raises(transfer.TransferUnreachable) as err:
        transfer._open_conn("tcp", None, ("127.0.0.1", port), port, 5)  # type: ignore[arg-type]
    assert err.value.exit_status == EXIT_UNREACHABLE and err.value.code == "connect"

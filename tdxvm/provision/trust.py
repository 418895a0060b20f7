"""What the controller trusts when it attests a guest: Intel's root, or the emulated one.

:class:`Trust` is what every attestation needs of a backend; :func:`for_backend` gives
the one for a backend name:

* ``tdx`` (:class:`TdxTrust`): Intel's SGX root CA (pinned in :mod:`tdxvm.attest.chain`)
  and collateral from Intel's PCS (or a PCCS), cached on disk. The guest's quotes come
  from its host's QGS; nothing runs here for them.
* ``emulated`` (:class:`EmulatedTrust`): the controller's emulated platform (``tdxvm
  emulate``), kept in ``$XDG_DATA_HOME/tdxvm/emulated`` (keys mode 0600) and made on
  first use. Its quote service signs for emulated guests; its private root CA is the
  trust anchor, so a quote from any other signer is refused. The verification code is
  the same.

For an emulated guest the trust also starts the quote service for one attestation:
it measures the kernel, initramfs and command line the domain really boots (read back
through libvirt) and the firmware named in the domain's tdxvm metadata; and, for the
guest's inference service, a per-domain quote daemon (:mod:`tdxvm.emulate.qgsd`). Both
run on the controller, which keeps the emulated platform's keys; a guest of a remote
``qemu+ssh://`` host reaches them through a port the host's SSH offers on its loopback
(:func:`tdxvm.launch.tunnel.offer`, ``ssh -R`` over the host's shared session). This
is the only module of ``provision/`` and ``fleet/`` that reaches :mod:`tdxvm.emulate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tdxvm.attest import Collateral, TrustAnchor
from tdxvm.attest.collateral import CollateralOrigin
from tdxvm.attest.quote import Quote
from tdxvm.fileio import lock_exclusive
from tdxvm.launch import tunnel
from tdxvm.xdg import data_home

if TYPE_CHECKING:
    from tdxvm.emulate import EmulatedPlatform

CollateralGetter = Callable[[Quote], tuple[Collateral, CollateralOrigin]]


def emulated_platform_dir() -> Path:
    """Where the controller keeps its emulated platform: ``emulated`` in :func:`tdxvm.xdg.data_home`."""
    return data_home() / "emulated"


class Trust(Protocol):
    """The collateral source and trust anchor of one backend, and where its guests get
    their quotes. :class:`TdxTrust` and :class:`EmulatedTrust` implement it."""

    @property
    def backend(self) -> str: ...  # "tdx" or "emulated", as VM specs and records name it

    @property
    def collateral(self) -> Collateral | CollateralGetter: ...

    @property
    def trust_anchor(self) -> TrustAnchor | None: ...  # None: Intel's SGX root CA

    def quote_service(
        self,
        domain_xml: str,
        read: Callable[[str], bytes],
        *,
        guest_on_host: bool = False,
        argv: list[str] | None = None,
        qemu: str | None = None,
        uri: str | None = None,
    ) -> AbstractContextManager[str | None]:
        """For one attestation: yields the address the guest asks for its quote (None: the
        guest uses its own TDX). ``read`` reads a file of the domain's host; ``argv``: the
        QEMU libvirt runs for the domain (the emulated TD's RTMR0 describes its machine),
        run with ``qemu`` (None: the argv's own binary); ``uri``: the domain's libvirt host
        (None: this machine).

        A guest on QEMU user networking reaches the service at the gateway address (on a
        remote host: a port the host's SSH offers there, relayed to the controller);
        ``guest_on_host`` (libvirt's test driver, where the guest's agent runs on this
        machine) gives its loopback address instead."""
        ...

    def ensure_quote_daemon(self, uri: str, uuid: str, *, boot_id: int | None = None) -> str | None:
        """For the guest's inference service, which asks for quotes as long as it runs: the
        address of the quote daemon of domain ``uuid`` on ``uri``, started unless it runs
        for this boot (``boot_id``, libvirt's domain ID); None where the guest has its own
        TDX."""
        ...


@dataclass(frozen=True)
class TdxTrust:
    """Intel's root (pinned: ``trust_anchor`` None) and ``collateral`` for each quote; the
    guest's quotes come from its host's QGS."""

    collateral: CollateralGetter
    trust_anchor: TrustAnchor | None = field(default=None, init=False)
    backend: str = field(default="tdx", init=False)

    @contextmanager
    def quote_service(
        self,
        domain_xml: str,
        read: Callable[[str], bytes],
        *,
        guest_on_host: bool = False,
        argv: list[str] | None = None,
        qemu: str | None = None,
        uri: str | None = None,
    ) -> Iterator[str | None]:
        yield None

    def ensure_quote_daemon(self, uri: str, uuid: str, *, boot_id: int | None = None) -> str | None:
        return None


@dataclass(frozen=True)
class EmulatedTrust:
    """The emulated ``platform`` kept in ``emulated_dir``: its collateral, its root CA as
    the trust anchor, its quote service and quote daemons."""

    platform: EmulatedPlatform
    emulated_dir: Path  # the quote daemons load the platform from there
    collateral: Collateral
    trust_anchor: TrustAnchor
    backend: str = field(default="emulated", init=False)

    @classmethod
    def load(cls, folder: Path) -> EmulatedTrust:
        """The platform kept in ``folder``, made and kept there first if there is none."""
        from tdxvm.emulate import EmulatedPlatform

        now = datetime.now(timezone.utc)
        if not (folder / "root-ca.pem").is_file():  # made once: two processes at once must not mix two platforms
            folder.parent.mkdir(parents=True, exist_ok=True)
            lock = lock_exclusive(folder.parent / f".{folder.name}.lock", timeout=60)
            try:
                if not (folder / "root-ca.pem").is_file():
                    EmulatedPlatform(at=now).save(folder)
            finally:
                os.close(lock)
        platform = EmulatedPlatform.load(folder, at=now)
        return cls(platform, folder, platform.collateral(), TrustAnchor.from_der(platform.root_ca_der))

    @contextmanager
    def quote_service(
        self,
        domain_xml: str,
        read: Callable[[str], bytes],
        *,
        guest_on_host: bool = False,
        argv: list[str] | None = None,
        qemu: str | None = None,
        uri: str | None = None,
    ) -> Iterator[str | None]:
        from tdxvm.emulate.qgs import GUEST_GATEWAY, LaunchArtifacts, QuoteService

        artifacts = LaunchArtifacts.from_domain_xml(domain_xml, read=read, argv=argv, qemu=qemu)
        with QuoteService(self.platform, artifacts) as service:
            if guest_on_host:
                yield service.address
                return
            with tunnel.offer(uri or "qemu:///system", "127.0.0.1", service.port) as port:
                yield f"{GUEST_GATEWAY}:{port}"

    def ensure_quote_daemon(self, uri: str, uuid: str, *, boot_id: int | None = None) -> str | None:
        from tdxvm.emulate.qgsd import ensure

        return ensure(uri, uuid, self.emulated_dir, boot_id=boot_id)


def for_backend(backend: str, *, emulated_dir: Path | None = None, pccs_url: str | None = None) -> Trust:
    """The trust of ``backend`` ("emulated"; anything else is "tdx"). ``emulated_dir``:
    where the emulated platform is kept (default :func:`emulated_platform_dir`);
    ``pccs_url``: a PCCS to ask for Intel's collateral instead of Intel's PCS."""
    if backend == "emulated":
        return EmulatedTrust.load(emulated_dir or emulated_platform_dir())
    from tdxvm.attest.pcs import CollateralCache, PcsClient, get_collateral

    client = PcsClient(base_url=pccs_url) if pccs_url else PcsClient()
    cache = CollateralCache()

    def collateral(quote: Quote) -> tuple[Collateral, CollateralOrigin]:
        return get_collateral(quote, client=client, cache=cache, at=datetime.now(timezone.utc))

    return TdxTrust(collateral)

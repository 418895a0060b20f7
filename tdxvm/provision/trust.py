"""What the controller trusts when it attests a guest: Intel's root, or the emulated one.

* ``tdx`` backend: Intel's SGX root CA (pinned in :mod:`tdxvm.attest.chain`) and
  collateral from Intel's PCS (or a PCCS), cached on disk.
* ``emulated`` backend: the controller's emulated platform (``tdxvm emulate``), kept in
  ``$XDG_DATA_HOME/tdxvm/emulated`` (keys mode 0600) and made on first use. Its quote
  service signs for emulated guests; its private root CA is the trust anchor, so a quote
  from any other signer is refused. The verification code is the same.

For an emulated guest the trust also starts the quote service for one attestation:
it measures the kernel, initramfs and command line the domain really boots (read back
through libvirt) and the firmware named in the domain's tdxvm metadata.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tdxvm.attest import Collateral, TrustAnchor
from tdxvm.attest.collateral import CollateralOrigin
from tdxvm.attest.quote import Quote


def emulated_platform_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tdxvm" / "emulated"


@dataclass(frozen=True)
class Trust:
    """Collateral source and trust anchor for one backend; :meth:`quote_service` is the
    emulated quote service for one domain (a no-op for TDX, whose quotes come from the host's QGS)."""

    backend: str
    collateral: Collateral | Callable[[Quote], tuple[Collateral, CollateralOrigin]]
    trust_anchor: TrustAnchor | None
    platform: Any = None  # EmulatedPlatform for the emulated backend
    emulated_dir: Path | None = None  # where that platform is kept (the quote daemon loads it from there)

    @contextmanager
    def quote_service(self, domain_xml: str, read: Callable[[str], bytes], *, guest_on_host: bool = False,
                      argv: list[str] | None = None) -> Iterator[str | None]:  # fmt: skip
        """Yields the address the guest asks for its quote (None: the guest uses its own TDX).
        ``argv``: the QEMU libvirt runs for the domain (the emulated TD's RTMR0 describes its machine).

        A guest on QEMU user networking reaches the service at the gateway address;
        ``guest_on_host`` (libvirt's test driver, where the guest's agent runs on this
        machine) gives its loopback address instead."""
        if self.platform is None:
            with nullcontext():
                yield None
            return
        from tdxvm.emulate.qgs import LaunchArtifacts, QuoteService

        artifacts = LaunchArtifacts.from_domain_xml(domain_xml, read=read, argv=argv)
        with QuoteService(self.platform, artifacts) as service:
            yield service.address if guest_on_host else service.guest_address()


def for_backend(backend: str, *, emulated_dir: Path | None = None, pccs_url: str | None = None) -> Trust:
    if backend == "emulated":
        from tdxvm.emulate import EmulatedPlatform

        folder = emulated_dir or emulated_platform_dir()
        now = datetime.now(timezone.utc)
        if (folder / "root-ca.pem").is_file():
            platform = EmulatedPlatform.load(folder, at=now)
        else:
            platform = EmulatedPlatform(at=now)
            platform.save(folder)
        return Trust("emulated", platform.collateral(), TrustAnchor.from_der(platform.root_ca_der), platform, folder)
    from tdxvm.attest.pcs import CollateralCache, PcsClient, get_collateral

    client = PcsClient(base_url=pccs_url) if pccs_url else PcsClient()
    cache = CollateralCache()

    def collateral(quote: Quote) -> tuple[Collateral, CollateralOrigin]:
        return get_collateral(quote, client=client, cache=cache, at=datetime.now(timezone.utc))

    return Trust("tdx", collateral, None)

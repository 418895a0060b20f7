"""Host port forwards of a VM: the spec's, plus the guest agent, ssh and service ports.

Forwards use QEMU user-mode networking (``hostfwd``), so the guest's ports appear on the
libvirt host at ``address:port``. Ports left out of the spec are chosen at random from
:data:`AUTO_PORTS`, skipping ports other tdxvm VMs on the host forward and, when the host
is this machine, ports that cannot be bound now. A remote host's free ports cannot be
probed through libvirt; there the other VMs' forwards are all that is avoided.
"""

from __future__ import annotations

import random
import socket

from tdxvm.launch.domain import PortForward
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.manifest import ImageManifest
from tdxvm.launch.spec import VmSpec

AUTO_PORTS = range(20000, 32768)  # below Linux's ephemeral range, so outgoing connections do not take them


def bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def choose_forwards(
    spec: VmSpec, manifest: ImageManifest, *, taken: set[int], local: bool, rng: random.Random | None = None
) -> tuple[PortForward, ...]:
    """The spec's forwards in order, then agent/ssh/service forwards the spec does not give."""
    rng = rng or random.Random()
    used = set(taken)
    for f in spec.network.forwards:
        if f.host is None:
            continue
        if f.host in taken:
            raise LaunchError(
                f"host port {f.host} is already forwarded to another tdxvm VM on {spec.uri}; pick "
                "another or leave host: out",
                code="port-in-use",
            )
        if local and not bindable(f.address, f.host):
            raise LaunchError(
                f"host port {f.address}:{f.host} is in use on this host; pick another or leave host: out",
                code="port-in-use",
            )
        used.add(f.host)
    wanted = [(f.guest, f.host, f.address) for f in spec.network.forwards]
    given = {f.guest for f in spec.network.forwards}
    wanted += [(port, None, "127.0.0.1") for port in manifest.guest_ports().values() if port not in given]
    out = []
    for guest, host, address in wanted:
        if host is None:
            host = _free_port(address, used, local, rng)
            used.add(host)
        out.append(PortForward(host_port=host, guest_port=guest, host_address=address))
    return tuple(out)


def _free_port(address: str, used: set[int], local: bool, rng: random.Random) -> int:
    for _ in range(200):
        port = rng.choice(AUTO_PORTS)
        if port not in used and (not local or bindable(address, port)):
            return port
    raise LaunchError(f"no free host port found in {AUTO_PORTS.start}-{AUTO_PORTS.stop - 1}", code="port-in-use")

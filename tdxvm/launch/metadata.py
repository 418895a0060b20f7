"""tdxvm's record in a domain's ``<metadata>``: ownership, image, ports, last attestation.

One element in :data:`~tdxvm.launch.domain.TDXVM_NS` marks a domain as tdxvm's; tdxvm
never stops or deletes a domain without it. Inside::

    <tdxvm:owner backend="emulated">
      <tdxvm:label name="image">smoke</tdxvm:label>            (name → text, see LABELS)
      <tdxvm:firmware path="/…/OVMF.inteltdx.fd"/>              (emulated backend only)
      <tdxvm:attestation verdict="accept" at="2026-…Z">{json}</tdxvm:attestation>
    </tdxvm:owner>

libvirt keeps one element per namespace; updates rewrite it whole with
``virDomainSetMetadata``. Nothing secret is stored here: the host can read it. And the
host can write it: the policy, verdict and model labels are a display copy for people
using ``virsh``; every trust decision reads the controller's own record instead
(:mod:`tdxvm.launch.records`), which refuses a VM whose backend or forwards here differ.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from tdxvm.launch.domain import TDXVM_NS, PortForward

KEY = "tdxvm"  # the namespace prefix libvirt writes
CONTROLLER = "controller"
LABELS = {
    CONTROLLER: (
        "id of the controller that launched the VM (SHA-256 of its SSH public key, 16 hex digits); "
        "another controller never stops, replaces or deletes it"
    ),
    "image": "image name from its manifest",
    "manifest": "path of the image manifest on the controller",
    "pool": "the storage pool holding the VM's volumes",
    "overlay": "path of the VM's disk overlay volume on the host",
    "serial_log": "path of the serial console log volume on the host",
    "scratch": "path of the VM's scratch disk volume on the host (ciphertext only: the TD keeps its key)",
    "forwards": "host port forwards, address:host-guest, comma-separated",
    "agent_port": "guest port of the tdxvm guest agent",
    "ssh_port": "guest port of sshd",
    "service_port": "guest port of the inference service",
    "defined_at": "when tdxvm defined the domain (UTC)",
    "started_at": "when tdxvm last started the domain (UTC)",
    "policy_exceptions": "JSON list: rules of the effective policy looser than the strict default",
    "policy": "JSON: the effective attestation policy the VM was launched with",
    "model": "the model the VM serves (tdxvm provision)",
    "model_url": "the service's URL as this host reaches it",
    "model_tls_spki": "SHA-256 of the service's attested TLS key (SubjectPublicKeyInfo)",
    "model_at": "when tdxvm last provisioned the model (UTC)",
    "model_digest": "the model digest (sha256:HEX) the service's RTMR3 model event named when provisioned",
}
# Attestation fields kept from a verdict (tdxvm.attest Verdict.to_dict); the rest is not needed by status.
ATTESTATION_KEYS = ("verdict", "verified_at", "tcb_status", "advisory_ids", "reasons", "policy_exceptions")


@dataclass
class VmMetadata:
    backend: str
    labels: dict[str, str] = field(default_factory=dict)
    attestation: dict[str, Any] | None = None
    firmware: str | None = None  # the emulated TD's TDVF, read by the emulated quote service

    def forwards(self) -> tuple[PortForward, ...]:
        return parse_forwards(self.labels.get("forwards", ""))


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _from_element(owner: ET.Element) -> VmMetadata:
    meta = VmMetadata(backend=owner.get("backend", ""))
    for child in owner:
        tag = _local(child.tag)
        if tag == "label" and child.get("name"):
            meta.labels[child.get("name", "")] = child.text or ""
        elif tag == "firmware":
            meta.firmware = child.get("path")
        elif tag == "attestation":
            try:
                data = json.loads(child.text or "{}")
            except (ValueError, RecursionError):  # the host writes it: not JSON, absurd nesting, huge numbers
                data = {}
            meta.attestation = {
                **(data if isinstance(data, dict) else {}),
                "verdict": child.get("verdict"),
                "recorded_at": child.get("at"),
            }
    return meta


def from_domain_xml(xml: str) -> VmMetadata | None:
    """tdxvm's metadata in a full domain XML; None when the domain is not tdxvm's."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    owner = root.find(f"metadata/{{{TDXVM_NS}}}owner")
    return _from_element(owner) if owner is not None else None


def from_element_xml(text: str) -> VmMetadata:
    """Parse what ``virDomainGetMetadata`` returns (the element, without its namespace)."""
    return _from_element(ET.fromstring(text))


def to_element_xml(meta: VmMetadata) -> str:
    """The element for ``virDomainSetMetadata`` (libvirt puts it in TDXVM_NS with prefix KEY)."""
    owner = ET.Element("owner", {"backend": meta.backend})
    for name in sorted(meta.labels):
        ET.SubElement(owner, "label", {"name": name}).text = meta.labels[name]
    if meta.firmware is not None:
        ET.SubElement(owner, "firmware", {"path": meta.firmware})
    if meta.attestation is not None:
        att = {k: meta.attestation[k] for k in ATTESTATION_KEYS if k in meta.attestation}
        attrs = {
            "verdict": str(meta.attestation.get("verdict") or "unknown"),
            "at": str(meta.attestation.get("recorded_at") or ""),
        }
        ET.SubElement(owner, "attestation", attrs).text = json.dumps(att, sort_keys=True)
    return ET.tostring(owner, encoding="unicode")


def forwards_label(forwards: tuple[PortForward, ...]) -> str:
    return ",".join(f"{f.host_address}:{f.host_port}-{f.guest_port}" for f in forwards)


def port_number(text: str) -> int | None:
    """A TCP port written in a label (1..65535, ASCII digits), else None."""
    if not re.fullmatch(r"[0-9]{1,5}", text):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def parse_forwards(text: str) -> tuple[PortForward, ...]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        address, _, ports = item.rpartition(":")
        host, _, guest = ports.partition("-")
        host_port, guest_port = port_number(host), port_number(guest)
        if address and host_port is not None and guest_port is not None:
            out.append(PortForward(host_port=host_port, guest_port=guest_port, host_address=address))
    return tuple(out)

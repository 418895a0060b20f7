"""Intel's SGX extension of a PCK certificate, encoded for the emulated platform.

"Intel SGX PCK Certificate and Certificate Revocation List Profile Specification",
section 1.5 ("Intel SGX PCK Certificate", SGX Extensions): extension OID
1.2.840.113741.1.13.1, non-critical, whose value is a SEQUENCE of
SEQUENCE { OID, value }:

- ``.1`` PPID, OCTET STRING (16)
- ``.2`` TCB, SEQUENCE of ``.2.1`` .. ``.2.16`` component SVNs (INTEGER), ``.2.17``
  PCESVN (INTEGER), ``.2.18`` CPUSVN (OCTET STRING 16)
- ``.3`` PCE-ID, OCTET STRING (2)
- ``.4`` FMSPC, OCTET STRING (6)
- ``.5`` SGX Type, ENUMERATED (0 standard, 1 scalable, 2 scalable with integrity)
- platform CA certificates only: ``.6`` PlatformInstanceID, OCTET STRING (16), and
  ``.7`` Configuration, SEQUENCE of ``.7.1`` dynamicPlatform, ``.7.2`` cachedKeys,
  ``.7.3`` smtEnabled (BOOLEAN)

The field order and encodings copy real Intel PCK certificates byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from tdxvm.emulate import der

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
SGX_TYPE_STANDARD = 0
SGX_TYPE_SCALABLE = 1
SGX_TYPE_SCALABLE_WITH_INTEGRITY = 2


def _field(suffix: str, value: bytes) -> bytes:
    return der.sequence(der.oid(f"{SGX_EXTENSION_OID}.{suffix}"), value)


def _exact(name: str, value: bytes, size: int) -> bytes:
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"SGX extension {name} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SgxExtension:
    """The values carried by a PCK certificate's SGX extension.

    ``cpu_svn`` defaults to the 16 component SVNs as bytes, which is how the emulated
    platform relates its raw CPUSVN to the TCB components. Set ``platform_instance_id``
    (and the configuration flags) for a certificate issued by the PCK Platform CA;
    leave it ``None`` for one issued by the Processor CA.
    """

    ppid: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    cpu_svn: bytes | None = None
    sgx_type: int = SGX_TYPE_SCALABLE
    platform_instance_id: bytes | None = None
    dynamic_platform: bool = True
    cached_keys: bool = True
    smt_enabled: bool = True

    def __post_init__(self) -> None:
        comps = tuple(self.tcb_components)
        if len(comps) != 16 or any(not 0 <= c <= 255 for c in comps):
            raise ValueError("SGX extension needs 16 TCB component SVNs, each 0..255")
        object.__setattr__(self, "tcb_components", comps)
        if not 0 <= self.pce_svn <= 0xFFFF:
            raise ValueError(f"PCESVN {self.pce_svn} is not a u16")
        _exact("PPID", self.ppid, 16)
        _exact("PCE-ID", self.pce_id, 2)
        _exact("FMSPC", self.fmspc, 6)
        if self.cpu_svn is not None:
            _exact("CPUSVN", self.cpu_svn, 16)
        if self.platform_instance_id is not None:
            _exact("PlatformInstanceID", self.platform_instance_id, 16)

    @property
    def effective_cpu_svn(self) -> bytes:
        return bytes(self.cpu_svn) if self.cpu_svn is not None else bytes(self.tcb_components)

    def encode(self) -> bytes:
        """The extension value (``extnValue`` contents): one DER SEQUENCE."""
        tcb = [_field(f"2.{i}", der.integer(svn)) for i, svn in enumerate(self.tcb_components, 1)]
        tcb.append(_field("2.17", der.integer(self.pce_svn)))
        tcb.append(_field("2.18", der.octet_string(self.effective_cpu_svn)))
        fields = [
            _field("1", der.octet_string(self.ppid)),
            _field("2", der.sequence(*tcb)),
            _field("3", der.octet_string(self.pce_id)),
            _field("4", der.octet_string(self.fmspc)),
            _field("5", der.enumerated(self.sgx_type)),
        ]
        if self.platform_instance_id is not None:
            fields.append(_field("6", der.octet_string(self.platform_instance_id)))
            fields.append(
                _field(
                    "7",
                    der.sequence(
                        _field("7.1", der.boolean(self.dynamic_platform)),
                        _field("7.2", der.boolean(self.cached_keys)),
                        _field("7.3", der.boolean(self.smt_enabled)),
                    ),
                )
            )
        return der.sequence(*fields)

    def to_x509(self) -> x509.UnrecognizedExtension:
        """The extension for a certificate builder (add it with ``critical=False``)."""
        return x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), self.encode())

"""The emulated TDX platform for tests, CI and emulated guests.

A private root CA and PCK chain shaped like Intel's ("Intel SGX PCK Certificate and CRL
Profile"), collateral in Intel's formats ("Intel SGX and Intel TDX PCS API v4" TDX TCB
info v3, TDX QE identity v2, CRLs) and a quote signer for TDX quotes v4 and v5. A
verifier given :attr:`EmulatedPlatform.root_ca_der` as its trust anchor verifies the
platform's quotes with exactly the code it uses for Intel's.

>>> from datetime import datetime, timezone
>>> import dcap_qvl
>>> platform = EmulatedPlatform(at=datetime(2025, 7, 1, tzinfo=timezone.utc), seed="demo")
>>> quote = platform.sign_quote(version=5, body_type=3, report_data=bytes(64))
>>> bundle = dcap_qvl.QuoteCollateralV3.from_json(platform.collateral().to_json())
>>> dcap_qvl.verify_with_root_ca(quote, bundle, platform.root_ca_der, platform.unix_time).status
'UpToDate'
"""

from tdxvm.emulate.collateral import intel_time, pcs_qe_identity_body, pcs_tcb_info_body, sign_json
from tdxvm.emulate.keys import PlatformKeys
from tdxvm.emulate.pki import Validity
from tdxvm.emulate.platform import EmulatedPlatform, PlatformOptions
from tdxvm.emulate.quote import (
    DEFAULT_QE_AUTH_DATA,
    DEFAULT_TD_ATTRIBUTES,
    DEFAULT_XFAM,
    QuoteSigner,
    TdReportFields,
)
from tdxvm.emulate.sgxext import SgxExtension
from tdxvm.emulate.tcb import (
    DEFAULT_ADVISORIES,
    DEFAULT_FMSPC,
    DEFAULT_TCB_LEVELS,
    TCB_STATUSES,
    IsvTcbLevel,
    QeProfile,
    TcbLevel,
    TdxModuleIdentity,
)

__all__ = [
    "DEFAULT_ADVISORIES",
    "DEFAULT_FMSPC",
    "DEFAULT_QE_AUTH_DATA",
    "DEFAULT_TCB_LEVELS",
    "DEFAULT_TD_ATTRIBUTES",
    "DEFAULT_XFAM",
    "TCB_STATUSES",
    "EmulatedPlatform",
    "IsvTcbLevel",
    "PlatformKeys",
    "PlatformOptions",
    "QeProfile",
    "QuoteSigner",
    "SgxExtension",
    "TcbLevel",
    "TdReportFields",
    "TdxModuleIdentity",
    "Validity",
    "intel_time",
    "pcs_qe_identity_body",
    "pcs_tcb_info_body",
    "sign_json",
]

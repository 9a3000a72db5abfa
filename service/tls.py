"""The one place TLS contexts are made: the server side for the DICOM listener and the HTTP port, the client side for
DICOM destinations; BCP 195 (RFC 9325; DICOM PS3.15 B.9) minimum version and ciphers from ``TLSConfig`` on both, and
mutual TLS when a CA and client certificates are required (server) or a client certificate is given (client)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from filmgate.config_checks import one_of

# BCP 195 (RFC 9325) and DICOM's BCP 195 TLS profile (PS3.15 B.9): TLS 1.2 or later, forward-secret key exchange
# with AEAD ciphers only. TLS 1.3 suites are OpenSSL's defaults (all of them AEAD) and not affected by this list.
BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS on the listener (hospital IT often requires it between sites), with BCP 195's settings."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = False
    min_version: str = field(default="TLSv1.2", metadata=one_of(TLS_VERSIONS, " (BCP 195)"))
    ciphers: str = BCP195_CIPHERS


_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(tls.ciphers)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL if tls.ca_file else (
        ssl.CERT_NONE)  # fmt: skip
    return ctx


def client_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS towards a peer: verify its certificate and host name against ``ca_file`` (the system's CAs when empty) and
    present ``cert_file``/``key_file`` when given (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(tls.ciphers)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx

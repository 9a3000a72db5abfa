"""The one place a server-side TLS context is made, for the DICOM listener and the HTTP port alike: BCP 195 (RFC 9325;
DICOM PS3.15 B.9) minimum version and ciphers from ``TLSConfig``, and mutual TLS when a CA and client certificates
are required."""

from __future__ import annotations

import ssl

from filmgate.config import TLSConfig

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

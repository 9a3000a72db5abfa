"""DICOM TLS with BCP 195's settings and mutual TLS (issue 9, item 7), against the real node: certificates made by
openssl in the test, peers pynetdicom and DCMTK's echoscu."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from filmgate.config import TLSConfig
from filmgate.listener import tls_context
from tests.helpers import DCMTK_ENV, DX_FOR_PRESENTATION, REPO, Gate, make_pki, wait_for

ACSE_TIMEOUT = 6.0


@pytest.fixture(scope="module")
def tls_gate(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("mtls")
    pki = make_pki(root / "pki")
    gate = Gate.create(
        root,
        listener={
            "tls": {
                "enabled": True,
                "cert_file": str(pki["server.crt"]),
                "key_file": str(pki["server.key"]),
                "ca_file": str(pki["ca"]),
                "require_client_cert": True,
            },
            "acse_timeout": ACSE_TIMEOUT,
        },  # fmt: skip
        workers={"processes": 0},
    ).start()
    gate.pki = pki  # type: ignore[attr-defined]
    yield gate
    assert gate.stop() == 0


def _client_context(pki, *, cert: bool = True, ciphers: str | None = None, max_version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(str(pki["client.crt"]), str(pki["client.key"]))
    if ciphers:
        ctx.set_ciphers(ciphers)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _associate(gate, ctx: ssl.SSLContext, contexts=(Verification,)):
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", tls_args=(ctx, None))


def test_a_sender_with_a_certificate_from_the_ca_stores(tls_gate, made_films):
    assoc = _associate(tls_gate, _client_context(tls_gate.pki), contexts=(Verification, DX_FOR_PRESENTATION))
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(made_films[0].path).Status == 0
    assoc.release()
    wait_for(lambda: len(tls_gate.sidecars()) == 1, 60, "the film sent over mutual TLS delivered")


def test_silent_clients_do_not_stall_the_tls_accept_loop(tls_gate):
    """pynetdicom does the TLS handshake in its accept loop, so one client that connects and says nothing stalls every
    other sender; the node does it in the connection's own thread, under the ACSE timeout."""
    t0 = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", tls_gate.dicom_port), timeout=30) for _ in range(5)]
    try:
        assoc = _associate(tls_gate, _client_context(tls_gate.pki))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - t0 < ACSE_TIMEOUT, "answered while the silent clients still hold their handshakes"
        for s in silent:
            s.settimeout(ACSE_TIMEOUT + 10)
            assert s.recv(1) == b""  # closed by the node after the ACSE timeout
        assert time.monotonic() - t0 < ACSE_TIMEOUT + 5
    finally:
        for s in silent:
            s.close()


def test_dcmtk_echoscu_with_its_certificate_is_answered(tls_gate):
    pki = tls_gate.pki
    args = ["+tls", pki["client.key"], pki["client.crt"], "+cf", pki["ca"], "-aec", "FILMGATE"]
    ok = subprocess.run(["echoscu", *map(str, args), "127.0.0.1", str(tls_gate.dicom_port)],
                        capture_output=True, text=True, env=DCMTK_ENV, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    plain = subprocess.run(["echoscu", "-aec", "FILMGATE", "127.0.0.1", str(tls_gate.dicom_port)],
                           capture_output=True, text=True, env=DCMTK_ENV, timeout=60)  # fmt: skip
    assert plain.returncode != 0, "without TLS the node does not talk"


def test_no_certificate_or_one_from_another_ca_cannot_associate(tls_gate, tmp_path):
    before = tls_gate.counter("filmgate_refusals_total", reason="tls-handshake")
    assert not _associate(tls_gate, _client_context(tls_gate.pki, cert=False)).is_established
    rogue = make_pki(tmp_path / "rogue", name="rogue-ca")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_gate.pki["ca"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(rogue["client.crt"]), str(rogue["client.key"]))
    assert not _associate(tls_gate, ctx).is_established
    wait_for(lambda: tls_gate.counter("filmgate_refusals_total", reason="tls-handshake") >= before + 2, 10,
             "both refused handshakes counted")  # fmt: skip


def test_bcp195_ciphers_and_minimum_version(tls_gate):
    """The node takes forward-secret AEAD suites only and nothing below TLS 1.2. A CBC suite that Python's and
    OpenSSL's defaults allow (ECDHE-RSA-AES128-SHA256) is refused; the BCP 195 one is taken."""
    pki = tls_gate.pki
    tls12 = ssl.TLSVersion.TLSv1_2
    gcm = _associate(tls_gate, _client_context(pki, ciphers="ECDHE-RSA-AES256-GCM-SHA384", max_version=tls12))
    assert gcm.is_established
    assert gcm.dul.socket.socket.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
    gcm.release()
    cbc_ctx = _client_context(pki, ciphers="ECDHE-RSA-AES128-SHA256", max_version=tls12)
    assert "ECDHE-RSA-AES128-SHA256" in {c["name"] for c in cbc_ctx.get_ciphers()}, "the client really offers it"
    assert not _associate(tls_gate, cbc_ctx).is_established


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str | None:
    """A real TLS handshake over a socket pair; the version agreed, or None when refused."""
    a, b = socket.socketpair()
    result: dict[str, str | None] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                result["server"] = s.version()
        except (ssl.SSLError, OSError):
            result["server"] = None

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as c:
            version = c.version()
    except (ssl.SSLError, OSError):
        version = None
    finally:
        b.close()
    t.join(10)
    a.close()
    return version if result.get("server") else None


def test_the_minimum_tls_version_is_enforced(tmp_path):
    """min_version TLSv1.3 refuses a TLS 1.2 client; the default (TLSv1.2) takes it: the node's own context."""
    pki = make_pki(tmp_path / "pki")
    base = TLSConfig(enabled=True, cert_file=str(pki["server.crt"]), key_file=str(pki["server.key"]))
    assert TLSConfig().min_version == "TLSv1.2"
    default_ctx = tls_context(base)
    strict_ctx = tls_context(dataclasses.replace(base, min_version="TLSv1.3"))
    assert default_ctx is not None and strict_ctx is not None
    tls12 = _client_context(pki, cert=False, max_version=ssl.TLSVersion.TLSv1_2)
    assert _handshake(default_ctx, tls12) == "TLSv1.2"
    assert _handshake(strict_ctx, _client_context(pki, cert=False, max_version=ssl.TLSVersion.TLSv1_2)) is None
    assert _handshake(strict_ctx, _client_context(pki, cert=False)) == "TLSv1.3"


def test_healthcheck_presents_the_node_certificate_under_mutual_tls(tls_gate):
    hc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "healthcheck", "--config", str(tls_gate.config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert hc.returncode == 0, hc.stdout + hc.stderr

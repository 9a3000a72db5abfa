"""The DICOM listener: C-ECHO, and C-STORE for every storage SOP class, that only *persists*.

pynetdicom writes each incoming dataset, exactly as received, to a temporary file under ``spool/tmp`` while it
arrives (no 10 MB buffers in memory). The C-STORE handler then checks that the header can be parsed (no pixel
decoding on the network thread), fsyncs the file, renames it into ``spool/incoming``, fsyncs the folder, and only then
answers 0x0000. A failure to persist answers 0xA700 (out of resources), and so does a spool below its reserve
(``spool.min_free_bytes``) or a write that fails while the bytes arrive (:mod:`filmgate.receive`); an unparseable
dataset answers 0xC210 (cannot understand). In every case the sender keeps its copy and can retry: nothing
unacknowledged is ours, nothing acknowledged can be lost.

Who may associate, and how many at once, is :mod:`filmgate.admission` (allow-list of calling AE title and host, the
called AE title, association and connection limits); a refused sender gets an A-ASSOCIATE-RJ and a log line saying why.
The health-check AE title may only C-ECHO. PDUs are bounded by ``limits.max_pdu_bytes`` (:mod:`filmgate.patches`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class

from filmgate import metrics, patches
from filmgate.admission import THROTTLED, Admission, GateServer, peer_host
from filmgate.config import ListenerConfig, SenderRule, TLSConfig
from filmgate.dataset_io import read_header
from filmgate.receive import ReceiveFiles
from filmgate.record import Arrival
from filmgate.spool import Spool
from filmgate.tls import server_context

log = logging.getLogger("filmgate.listener")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]  # fmt: skip
# `filmgate healthcheck` calls with this AE title; it is always let in from loopback, whatever the allow-list, and may
# only C-ECHO (a C-STORE from it is refused with 0x0124, not authorised).
HEALTHCHECK_AE = "FILMGATE-HC"


def check_file(path: Path) -> tuple[str, int]:
    """Parse the header of a received file (meta + dataset, pixels not read); returns (SOP Instance UID, dataset
    size in bytes) or raises."""
    ds = read_header(path)  # bounded: large values stay on disk, a Deflated dataset is inflated only this far
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid or not str(ds.get("SOPClassUID", "") or "").strip():
        raise ValueError("no SOP Class/Instance UID in the dataset")
    meta_len = int(ds.file_meta.get("FileMetaInformationGroupLength", 0) or 0)
    return uid, max(0, path.stat().st_size - 132 - 12 - meta_len)


def sender_allowed(rules: tuple[SenderRule, ...], calling_ae: str, host: str) -> bool:
    """True when one rule matches both the calling AE title and the peer's host."""
    calling_ae = calling_ae.strip()
    if calling_ae == HEALTHCHECK_AE and _is_loopback(host):
        return True
    for rule in rules:
        if rule.ae_title != "*" and rule.ae_title.strip() != calling_ae:
            continue
        if not rule.hosts or any(_host_matches(h, host) for h in rule.hosts):
            return True
    return False


def _is_healthcheck(calling_ae: str, host: str) -> bool:
    """`filmgate healthcheck` from this machine: let in past the association limits (it may only C-ECHO)."""
    return calling_ae.strip() == HEALTHCHECK_AE and _is_loopback(host)


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _host_matches(pattern: str, host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return pattern == host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    try:
        return addr in ipaddress.ip_network(pattern, strict=False)
    except ValueError:  # a host name in the rule: resolve it
        try:
            return str(addr) in {i[4][0] for i in socket.getaddrinfo(pattern, None)}
        except OSError:
            return False


def tls_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (None without TLS)."""
    return server_context(tls) if tls.enabled else None


class Listener:
    """The network side of the node; its only job is to get instances durably into the spool."""

    def __init__(
        self,
        cfg: ListenerConfig,
        spool: Spool,
        on_stored: Callable[[], None] | None = None,
        recorder: Any = None,
        *,
        max_pdu: int = patches.DEFAULT_MAX_PDU,
    ) -> None:
        patches.install()  # idempotent; the entry points have done it already
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored
        self.recorder = recorder  # filmgate.records.Recorder: the index row and the audit events
        self.admission = Admission(cfg, sender_allowed, unlimited=_is_healthcheck)
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = max_pdu  # announced to peers; longer PDUs are refused (patches.pdu_limit)
        # Our limits (filmgate.admission) count associations and connections; pynetdicom's own count (every
        # connection) must never refuse before they do.
        ae.maximum_associations = cfg.max_connections + 1
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.network_timeout
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        for uid in cfg.extra_storage_sop_classes:  # private classes: pynetdicom's documented registration
            if uid_to_service_class(uid) is not StorageServiceClass:
                register_uid(uid, "FilmgateStorage_" + uid.replace(".", "_"), StorageServiceClass)
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.ae = ae
        self.server: Any = None
        self._thread: threading.Thread | None = None
        self.receive_files = ReceiveFiles.for_spool(spool)
        self._full = False
        patches.receive_datasets_into(self.receive_files)
        patches.make_reactors_event_driven()
        patches.on_pdu_refused(self._on_pdu_refused)

    def start(self) -> None:
        metrics.declare_store_statuses()
        metrics.declare_refusals()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self.ae.make_server(
            (self.cfg.host, self.cfg.port),
            evt_handlers=handlers,
            ssl_context=tls_context(self.cfg.tls),
            server_class=GateServer,
            listener_cfg=self.cfg,
        )
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="dicom-accept", daemon=True)
        self._thread.start()
        log.info(
            "listening as %s on %s:%d%s (sender allow-list %s)",
            self.cfg.ae_title, self.cfg.host, self.port, " with TLS" if self.cfg.tls.enabled else "",
            "on" if self.cfg.allow_list else "OFF",
        )  # fmt: skip

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.cfg.port

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress may finish."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _acceptors(self) -> list[Any]:
        return [a for a in self.ae.active_associations if a.is_acceptor]

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._acceptors() and time.monotonic() < deadline:
            time.sleep(0.05)
        still = self._acceptors()
        if still:
            log.warning("stopping: aborted %d association(s) still open after %.0f s; what they had not been answered "
                        "for stays with their senders", len(still), timeout)  # fmt: skip
            for assoc in still:
                assoc.abort()  # unacknowledged instances stay with the sender
            return False
        return True

    def space_ok(self) -> bool:
        """False while the spool is below its reserve (readiness follows it)."""
        problem = self.spool.space_problem()
        self._note_space(problem)
        return problem is None

    def _note_space(self, problem: str | None) -> None:
        """One log line when the spool turns full, one when it has space again."""
        if problem is not None and not self._full:
            self._full = True
            log.error(
                "%s: C-STORE is answered 0xA700 and /readyz is 503 until space is freed. Free it: let the node "
                "deliver what waits in spool/incoming and spool/outbox (is a destination down?), move "
                "spool/dead-letter elsewhere, or enlarge the volume. Receiving resumes by itself.", problem,
            )  # fmt: skip
        elif problem is None and self._full:
            self._full = False
            log.warning("the spool has space again; receiving resumed")

    # ------------------------------------------------------------------------------------------ handlers

    def _on_open(self, event: Any) -> None:
        patches.tune_reactor(event.assoc)
        # The A-ASSOCIATE-RQ must arrive within the ACSE timeout, however slowly it drips.
        patches.set_read_deadline(event.assoc, time.monotonic() + self.cfg.acse_timeout)

    def _on_close(self, event: Any) -> None:
        patches.end_unassociated(event.assoc)  # a probe or a refused PDU: its thread must not wait for a request
        removed = self.receive_files.drop_owned_by(event.assoc.dul)
        if removed:
            log.info("removed %d partial dataset file(s) of a connection that closed mid-transfer", removed)

    def _on_requested(self, event: Any) -> None:
        """pynetdicom's documented hook before negotiation: refuse here with an A-ASSOCIATE-RJ, or let it proceed."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title or "").strip()
        called = str(rq.called_ae_title or "").strip()
        host = peer_host(assoc.requestor.address)
        verdict = self.admission.decide(assoc, calling, called, host)
        if verdict is None:
            return
        metrics.REFUSALS.labels(reason=verdict.reason).inc()
        metrics.ASSOCIATIONS.labels(calling_ae=metrics.ae_label(calling), result="rejected").inc()
        THROTTLED.warn(verdict.reason, "refused association from AE %r at %s: %s", calling, host, verdict.message)
        if self.recorder is not None:
            self.recorder.association(False, calling, host, verdict.message)
        assoc.acse.send_reject(*verdict.rj)
        assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out, the thread ends

    def _on_accepted(self, event: Any) -> None:
        patches.set_read_deadline(event.assoc, None)
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.settimeout(self.cfg.network_timeout)  # from now on: silence up to the network timeout
        req = event.assoc.requestor
        ae = metrics.ae_label(req.ae_title)
        metrics.ASSOCIATIONS.labels(calling_ae=ae, result="accepted").inc()
        if self.recorder is not None:
            self.recorder.association(True, req.ae_title.strip(), req.address)

    def _on_rejected(self, event: Any) -> None:
        # Only pynetdicom's own rejections come here (ours are counted where they are made).
        req = event.assoc.requestor
        metrics.ASSOCIATIONS.labels(calling_ae=metrics.ae_label(req.ae_title), result="rejected").inc()
        log.warning("refused association from AE %r at %s", req.ae_title.strip(), req.address)
        if self.recorder is not None:
            self.recorder.association(False, req.ae_title.strip(), req.address, "refused by pynetdicom")

    def _on_pdu_refused(self, assoc: Any, declared: int) -> None:
        metrics.REFUSALS.labels(reason="pdu-too-large").inc()

    def _on_store(self, event: Any) -> int:
        t0 = time.perf_counter()
        calling_ae = event.assoc.requestor.ae_title.strip()
        calling = metrics.ae_label(calling_ae)
        received: Path = event.dataset_path  # written to spool/tmp while it arrived (chunked receive)
        rfile = self.receive_files.take(received)
        if rfile is not None:
            rfile.close()
        if calling_ae == HEALTHCHECK_AE:
            if rfile is not None:
                rfile.discard()
            metrics.STORE_FAILURES.labels(status="0x0124").inc()
            metrics.REFUSALS.labels(reason="healthcheck-store").inc()
            THROTTLED.warn("healthcheck-store", "C-STORE from the health-check AE title %s refused with 0x0124: "
                           "it may only C-ECHO", HEALTHCHECK_AE)  # fmt: skip
            return 0x0124
        if rfile is not None and rfile.failed:
            rfile.discard()
            metrics.STORE_FAILURES.labels(status="0xA700").inc()
            problem = self.spool.space_problem()
            self._note_space(problem)
            if problem is not None:
                THROTTLED.warn("store-reserve", "C-STORE from %s answered 0xA700 (out of resources): the spool is "
                               "below its reserve", calling)  # fmt: skip
            else:  # the disk filled up while this dataset arrived
                THROTTLED.warn("store-write", "C-STORE from %s answered 0xA700 (out of resources): %s; the partial "
                               "file was removed. Free space on the spool's volume, or raise spool.min_free_bytes "
                               "above the size of the largest films so that they are refused before they are written",
                               calling, rfile.error)  # fmt: skip
            return 0xA700
        try:
            uid, size = check_file(received)
        except Exception as exc:
            metrics.STORE_FAILURES.labels(status="0xC210").inc()
            log.warning("C-STORE from %s refused with 0xC210: the dataset cannot be parsed (%s)", calling, exc)
            return 0xC210
        req = event.assoc.requestor
        arrival = Arrival(
            received_at=time.time(), calling_ae=calling_ae, called_ae=str(event.assoc.acceptor.ae_title).strip(),
            peer_address=str(req.address), peer_port=int(req.port or 0), sop_instance_uid=uid,
        )  # fmt: skip
        try:
            path = self.spool.adopt(received, arrival, started=t0)
        except Exception as exc:
            if rfile is not None:
                rfile.discard()
            metrics.STORE_FAILURES.labels(status="0xA700").inc()
            log.error("C-STORE from %s answered 0xA700: could not persist the instance (%s)", calling, exc)
            return 0xA700
        if self.recorder is not None:  # before the acknowledgement: the index knows every instance we answer for
            self.recorder.stored(path.name, uid, calling_ae, arrival.peer_address, arrival.received_at)
        if self._full:
            self._note_space(self.spool.space_problem())
        elapsed = time.perf_counter() - t0
        if self.on_stored is not None:
            self.on_stored()
        metrics.STORE_SECONDS.observe(elapsed)
        metrics.INSTANCES_RECEIVED.labels(calling_ae=calling).inc()
        metrics.BYTES_RECEIVED.labels(calling_ae=calling).inc(size)
        return 0x0000

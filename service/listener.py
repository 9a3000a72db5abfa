"""The DICOM listener: C-ECHO, and C-STORE for every storage SOP class, that only *persists*.

pynetdicom writes each incoming dataset, exactly as received, to a temporary file under ``spool/tmp`` while it
arrives (no 10 MB buffers in memory). The C-STORE handler then checks that the header can be parsed (no pixel
decoding on the network thread), fsyncs the file, renames it into ``spool/incoming``, fsyncs the folder, and only then
answers 0x0000. A failure to persist answers 0xA700 (out of resources), an unparseable dataset 0xC210 (cannot
understand); a failure while the bytes arrive (disk full) aborts the association. In every case the sender keeps
its copy and can retry: nothing unacknowledged is ours, nothing acknowledged can be lost.

Senders are checked against an allow-list at association time (calling AE title and host); a refused sender gets an
A-ASSOCIATE-RJ (calling AE title not recognised) and a log line saying why.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import queue
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

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
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from filmgate import metrics
from filmgate.config import ListenerConfig, SenderRule
from filmgate.dataset_io import read_header
from filmgate.record import Arrival
from filmgate.spool import Spool

log = logging.getLogger("filmgate.listener")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]  # fmt: skip
_REFUSE = ["\x00refused\x00"]
RUN_LOOP_DELAY = 0.0001
# `filmgate healthcheck` calls with this AE title; it is always let in from loopback, whatever the allow-list.
HEALTHCHECK_AE = "FILMGATE-HC"  # an AE title nobody can have: makes pynetdicom send A-ASSOCIATE-RJ


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


def _receive_into(folder: Path) -> None:
    """Have pynetdicom write each incoming dataset to a file in ``folder`` while it arrives (no 10 MB buffers to
    grow and copy); the handler then only fsyncs and renames it into incoming/, on the same file system."""
    import pynetdicom.dimse_messages as dimse_messages
    from pynetdicom import _config

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(tempfile.NamedTemporaryFile, dir=str(folder))  # type: ignore
    AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]
    _event_driven_reactors()


# The longest a reactor waits for nothing in particular (its timers, a kill flag, a release it is not woken for).
REACTOR_IDLE_CAP = 0.02
_ASSOC_REACTOR_SLEEP = 0.001  # the literal in pynetdicom 3.0's Association._run_reactor


def _event_driven_reactors() -> None:
    """Make pynetdicom's two reactor threads per association wait for events instead of polling.

    pynetdicom 3.0 polls: the DUL thread sleeps ``_run_loop_delay`` (0.1 ms here, see :meth:`Listener._on_open`) and
    the Association thread 1 ms whenever nothing happened, so every open association costs the listener CPU while it
    waits (bench/idle_cpu: 5.9 % of a core per idle association; 4 parallel senders pay it 4 times, pynetdicom#917).
    Here the DUL thread waits in ``select`` on its socket and on a wake-up socket that ``send_pdu`` and ``kill_dul``
    write to; the Association thread waits for its two queues (complete DIMSE messages, ACSE primitives such as a
    release request), which are made to set an event when something is put in them. Both still wake at least every
    :data:`REACTOR_IDLE_CAP` for their timers and flags; incoming data, an outgoing primitive, a complete message or
    a release request wake them at once, so latency falls too (bench/idle_cpu after: 0.6 % of a core).
    """
    import select
    import types
    import weakref

    import pynetdicom
    import pynetdicom.association as association
    import pynetdicom.dul as dul

    if getattr(dul.DULServiceProvider, "_filmgate_event_driven", False):
        return
    if not pynetdicom.__version__.startswith("3.0."):
        log.warning("pynetdicom %s: reactors left polling (patched for 3.0.x only)", pynetdicom.__version__)
        return
    wakes: weakref.WeakKeyDictionary[Any, tuple[socket.socket, socket.socket]] = weakref.WeakKeyDictionary()
    wakes_lock = threading.Lock()

    def wake_pair(provider: Any) -> tuple[socket.socket, socket.socket]:
        with wakes_lock:
            pair = wakes.get(provider)
            if pair is None:
                pair = socket.socketpair()
                for s in pair:
                    s.setblocking(False)
                    weakref.finalize(provider, s.close)
                wakes[provider] = pair
            return pair

    def wake(provider: Any) -> None:
        with contextlib.suppress(OSError):  # the pair is full (already woken) or closed (the association is gone)
            wake_pair(provider)[1].send(b"\0")

    send_pdu, kill_dul = dul.DULServiceProvider.send_pdu, dul.DULServiceProvider.kill_dul

    def send_pdu_and_wake(self: Any, primitive: Any) -> None:
        send_pdu(self, primitive)
        wake(self)

    def kill_dul_and_wake(self: Any) -> None:
        kill_dul(self)
        wake(self)

    def dul_sleep(delay: float) -> None:
        provider = threading.current_thread()
        sock = getattr(getattr(provider, "socket", None), "socket", None)
        if not isinstance(provider, dul.DULServiceProvider) or sock is None:
            time.sleep(delay)  # stop_dul's wait in another thread, or no socket yet
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        woken = wake_pair(provider)[0]
        try:
            ready, _, _ = select.select([sock, woken], [], [], REACTOR_IDLE_CAP)
        except (OSError, ValueError):  # the socket was closed under us: the reactor finds out itself
            return
        if woken in ready:
            with contextlib.suppress(OSError):
                while woken.recv(4096):
                    pass

    class WakingQueue(queue.Queue):  # type: ignore[type-arg]
        """A queue that also sets its association's wake-up event when something is put in it."""

        wake: threading.Event

        def _put(self, item: Any) -> None:
            super()._put(item)
            self.wake.set()

    def association_wake(assoc: Any) -> threading.Event | None:
        """The event set when a DIMSE message is complete or the DUL hands up an ACSE primitive (release, abort):
        the two queues the Association reactor reads."""
        wake = getattr(assoc, "_filmgate_wake", None)
        if wake is None:
            queues = (getattr(assoc.dimse, "msg_queue", None), getattr(assoc.dul, "to_user_queue", None))
            if not all(type(q) is queue.Queue for q in queues):
                return None
            wake = threading.Event()
            for q in queues:
                q.wake = wake  # type: ignore[union-attr]
                q.__class__ = WakingQueue  # type: ignore[union-attr]
            assoc._filmgate_wake = wake
        return wake

    def association_sleep(delay: float) -> None:
        assoc = threading.current_thread()
        if delay != _ASSOC_REACTOR_SLEEP or not isinstance(assoc, Association):
            time.sleep(delay)
            return
        wake = association_wake(assoc)
        if wake is None:
            time.sleep(delay)
            return
        if not (assoc.dimse.msg_queue.qsize() or assoc.dul.to_user_queue.qsize()):
            wake.wait(REACTOR_IDLE_CAP)
        wake.clear()  # whatever was put is in a queue, and the reactor's loop reads both next

    def time_with(sleep: Callable[[float], None]) -> types.SimpleNamespace:
        names = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
        return types.SimpleNamespace(**{**names, "sleep": sleep})

    dul.time = time_with(dul_sleep)  # type: ignore[assignment]
    association.time = time_with(association_sleep)  # type: ignore[assignment]
    dul.DULServiceProvider.send_pdu = send_pdu_and_wake  # type: ignore[method-assign]
    dul.DULServiceProvider.kill_dul = kill_dul_and_wake  # type: ignore[method-assign]
    dul.DULServiceProvider._filmgate_event_driven = True  # type: ignore[attr-defined]


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom's ``AssociationSocket.recv`` with the same contract, read straight into one buffer.

    pynetdicom reads in 4 KiB pieces and grows a bytearray: 2,500 system calls and copies for a 10 MB film, 37% of the
    listener's CPU in bench/throughput. Like the original it blocks until ``nr_bytes`` are read and returns what it
    has when the peer closes; socket errors and timeouts propagate the same way.
    """
    sock = cast(socket.socket, self.socket)
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    nr_read = 0
    try:
        while nr_read < nr_bytes:
            got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not got:
                return buf[:nr_read]
            nr_read += got
    finally:
        view.release()
    return buf


class _GateAE(AE):
    """An AE whose calling-AE requirement depends on the peer being negotiated (AE title *and* host)."""

    rules: tuple[SenderRule, ...] = ()
    enforce: bool = True

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not self.enforce or not isinstance(assoc, Association) or not assoc.is_acceptor:
            return []
        if sender_allowed(self.rules, assoc.requestor.ae_title, assoc.requestor.address):
            return []
        return _REFUSE

    @require_calling_aet.setter
    def require_calling_aet(self, values: list[str]) -> None:  # pragma: no cover - not used
        self._require_calling_aet = values


class Listener:
    """The network side of the node; its only job is to get instances durably into the spool."""

    def __init__(
        self, cfg: ListenerConfig, spool: Spool, on_stored: Callable[[], None] | None = None, recorder: Any = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored
        self.recorder = recorder  # filmgate.records.Recorder: the index row and the audit events
        ae = _GateAE(ae_title=cfg.ae_title)
        ae.rules = cfg.allow
        ae.enforce = cfg.allow_list
        ae.maximum_pdu_size = 0
        ae.maximum_associations = cfg.max_associations
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = min(cfg.network_timeout, 30.0)
        ae.dimse_timeout = cfg.network_timeout
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae = ae
        self.server: Any = None
        _receive_into(spool.tmp)

    def start(self) -> None:
        metrics.declare_store_statuses()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self.ae.start_server(
            (self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers, ssl_context=self._ssl_context()
        )
        log.info(
            "listening as %s on %s:%d%s (sender allow-list %s)",
            self.cfg.ae_title, self.cfg.host, self.port, " with TLS" if self.cfg.tls.enabled else "",
            "on" if self.cfg.allow_list else "OFF",
        )  # fmt: skip

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.cfg.port

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.cfg.tls
        if not tls.enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.ca_file:
            ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL if tls.ca_file else (
            ssl.CERT_NONE)  # fmt: skip
        return ctx

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress may finish."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def active(self) -> int:
        return sum(1 for a in self.ae.active_associations if a.is_acceptor)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.active():
            for assoc in self.ae.active_associations:
                assoc.abort()  # unacknowledged instances stay with the sender
            return False
        return True

    # ------------------------------------------------------------------------------------------ handlers

    @staticmethod
    def _on_open(event: Any) -> None:
        # pynetdicom's network reactor sleeps 1 ms whenever it finds no event; a 10 MB film arrives as ~80 PDUs, so
        # that sleep alone cost ~30% of the receive rate (bench/throughput). 0.1 ms keeps idle CPU negligible.
        event.assoc.dul._run_loop_delay = RUN_LOOP_DELAY

    def _on_accepted(self, event: Any) -> None:
        req = event.assoc.requestor
        ae = metrics.ae_label(req.ae_title)
        metrics.ASSOCIATIONS.labels(calling_ae=ae, result="accepted").inc()
        if self.recorder is not None:
            self.recorder.association(True, req.ae_title.strip(), req.address)

    def _on_rejected(self, event: Any) -> None:
        req = event.assoc.requestor
        ae = metrics.ae_label(req.ae_title)
        metrics.ASSOCIATIONS.labels(calling_ae=ae, result="rejected").inc()
        if self.cfg.allow_list and not sender_allowed(self.cfg.allow, req.ae_title, req.address):
            why = "not in the sender allow-list"
            log.warning(
                "refused association from AE %r at %s: not in the sender allow-list (listener.allow)",
                req.ae_title.strip(), req.address,
            )  # fmt: skip
        else:
            why = "too many associations"
            log.warning("refused association from AE %r at %s (too many associations?)", req.ae_title, req.address)
        if self.recorder is not None:
            self.recorder.association(False, req.ae_title.strip(), req.address, why)

    def _on_store(self, event: Any) -> int:
        t0 = time.perf_counter()
        calling_ae = event.assoc.requestor.ae_title.strip()
        calling = metrics.ae_label(calling_ae)
        received: Path = event.dataset_path  # written to spool/tmp while it arrived (chunked receive)
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
            metrics.STORE_FAILURES.labels(status="0xA700").inc()
            log.error("C-STORE from %s answered 0xA700: could not persist the instance (%s)", calling, exc)
            return 0xA700
        if self.recorder is not None:  # before the acknowledgement: the index knows every instance we answer for
            self.recorder.stored(path.name, uid, calling_ae, arrival.peer_address, arrival.received_at)
        elapsed = time.perf_counter() - t0
        if self.on_stored is not None:
            self.on_stored()
        metrics.STORE_SECONDS.observe(elapsed)
        metrics.INSTANCES_RECEIVED.labels(calling_ae=calling).inc()
        metrics.BYTES_RECEIVED.labels(calling_ae=calling).inc(size)
        return 0x0000

"""Who may connect and associate, and how many at once: connections cannot lock the node.

Two stages, both through pynetdicom's documented extension points:

- **Connections** (:class:`GateServer`, the server class given to ``AE.make_server``): a TCP connection beyond
  ``listener.max_connections`` (or ``max_connections_per_host`` from one address) is closed at once. The TLS
  handshake runs in the connection's own thread under the ACSE timeout, never in the accept loop (where one silent
  client would stall every other). Port scans and load-balancer probes cost a short-lived thread, not a slot.
- **Associations** (:meth:`Admission.decide`, called from the ``EVT_REQUESTED`` handler): only a connection that has
  sent an A-ASSOCIATE-RQ counts against ``listener.max_associations`` and ``max_associations_per_host``; the sender
  allow-list and the called AE title are checked there too. A refusal is an A-ASSOCIATE-RJ with the matching reason.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from filmgate import metrics
from filmgate.config import ListenerConfig

log = logging.getLogger("filmgate.listener")

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
RJ_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user: calling AE title not recognised
RJ_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user: called AE title not recognised
RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation): local limit exceeded


def peer_host(address: str) -> str:
    """An address as one host key (IPv4-mapped IPv6 as IPv4, no scope)."""
    host = str(address).split("%")[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class _Throttled:
    """At most one warning per ``interval`` seconds for one kind of refusal (a flood must not flood the log)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            more = self._suppressed.pop(kind, 0)
        log.warning(message + (f" (and {more} more like it since the last such line)" if more else ""), *args)


THROTTLED = _Throttled()


@dataclass(frozen=True)
class Verdict:
    """Why an association is refused (None: admitted)."""

    reason: str  # metric label
    rj: tuple[int, int, int]
    message: str


class Admission:
    """The association-time checks: allow-list, called AE title, association limits (total and per host)."""

    def __init__(self, cfg: ListenerConfig, sender_allowed: Any, unlimited: Any = None) -> None:
        self.cfg = cfg
        self._sender_allowed = sender_allowed
        # unlimited(calling, host): not counted against the limits (the health check: a busy node is not a sick one)
        self._unlimited = unlimited or (lambda calling, host: False)
        called = {t.strip() for t in cfg.called_ae_titles} or {cfg.ae_title.strip()}
        self.any_called = "*" in called
        self.called = called
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()

    def _count(self, host: str) -> tuple[int, int]:
        live = [a for a in self._live if a.is_alive()]
        return len(live), sum(1 for a in live if peer_host(a.requestor.address) == host)

    def decide(self, assoc: Any, calling: str, called: str, host: str) -> Verdict | None:
        """Admit ``assoc`` (counted until its thread ends) or say why not."""
        cfg = self.cfg
        if cfg.allow_list and not self._sender_allowed(cfg.allow, calling, host):
            return Verdict("allow-list", RJ_CALLING_AE,
                           "not in the sender allow-list (listener.allow)")  # fmt: skip
        if not self.any_called and called not in self.called:
            return Verdict("called-ae", RJ_CALLED_AE,
                           f"it called AE title {called!r}; this node answers to {sorted(self.called)} "
                           "(listener.ae_title, listener.called_ae_titles)")  # fmt: skip
        if self._unlimited(calling, host):
            return None
        with self._lock:
            total, mine = self._count(host)
            if total >= cfg.max_associations:
                return Verdict("association-limit", RJ_LIMIT,
                               f"{total} associations are open (listener.max_associations)")  # fmt: skip
            if mine >= cfg.max_associations_per_host:
                return Verdict("host-association-limit", RJ_LIMIT,
                               f"{mine} associations from this host are open "
                               "(listener.max_associations_per_host)")  # fmt: skip
            self._live.add(assoc)
        return None


class GateServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection limits, and the TLS handshake off the accept loop."""

    # The listen backlog (socketserver's default is 5): a burst of connections beyond it waits for SYN retransmits
    # (1 s, 3 s, ...) before the node even sees it, so a port scan would delay every sender.
    request_queue_size = 256

    def __init__(self, *args: Any, listener_cfg: ListenerConfig, **kwargs: Any) -> None:
        self.listener_cfg = listener_cfg
        self._pending = 0
        self._pending_hosts: dict[str, int] = {}
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def shutdown(self) -> None:
        """Stop serving and close the socket (made by ``AE.make_server``, so not in the AE's own server list)."""
        super(AssociationServer, self).shutdown()
        self.server_close()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()  # wrapped for TLS in its own thread (process_request_thread)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        cfg = self.listener_cfg
        host = peer_host(client_address[0])
        with self._count_lock:
            live = [a for a in self.active_associations if a.is_alive()]
            total = len(live) + self._pending
            mine = sum(1 for a in live if peer_host(a.requestor.address) == host) + self._pending_hosts.get(host, 0)
            if total >= cfg.max_connections:
                kind, what = "connection-limit", f"{total} connections are open (listener.max_connections)"
            elif mine >= cfg.max_connections_per_host:
                kind, what = "host-connection-limit", (f"{mine} connections from this host are open "
                                                       "(listener.max_connections_per_host)")  # fmt: skip
            else:
                self._pending += 1
                self._pending_hosts[host] = self._pending_hosts.get(host, 0) + 1
                return True
        metrics.REFUSALS.labels(reason=kind).inc()
        THROTTLED.warn(kind, "closed a connection from %s at once: %s", host, what)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = peer_host(client_address[0])
        try:
            request.settimeout(self.listener_cfg.acse_timeout)
            if self.ssl_context is not None:
                try:
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    metrics.REFUSALS.labels(reason="tls-handshake").inc()
                    THROTTLED.warn("tls-handshake", "TLS handshake with %s failed: %s", host, exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)  # starts the association's own thread
        finally:
            with self._count_lock:
                self._pending -= 1
                left = self._pending_hosts.get(host, 1) - 1
                if left:
                    self._pending_hosts[host] = left
                else:
                    self._pending_hosts.pop(host, None)

"""The HTTP side: ``/metrics`` for Prometheus, ``/healthz`` (the process answers) and ``/readyz`` (accepting
associations: 503 while starting or draining, so a load balancer stops sending before the listener closes), and,
when ``review.enabled``, the review console at ``/`` and its API under ``/api/`` (:mod:`filmgate.review.app`).

The three operational endpoints answer without a login unless ``http.public.<name>`` is false; then they need the
same login as the API (HTTP Basic for Prometheus' ``basic_auth``). ``http.tls`` serves the port over HTTPS with the
same kind of settings as the DICOM listener (certificate, key, optional client certificates).

The port shares the listener's process, so what an HTTP client can cost is bounded (``http.max_connections``,
``http.request_timeout``): a thread per connection, at most that many at once (a further connection gets 503 and is
closed, counted as ``http-connection-limit``), and a request must arrive whole within the timeout however slowly it
drips (the standard library's timeout is per read, so a client sending a header line every few seconds held its
thread and descriptor for ever; enough of them used up the process's descriptors, and the DICOM listener's with
them). A client that goes away mid-answer is logged at debug level, not as a traceback on stderr."""

from __future__ import annotations

import io
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from filmgate import metrics
from filmgate.admission import THROTTLED

log = logging.getLogger("filmgate.http")
MAX_BODY = 1 << 20  # the API takes small JSON and form bodies only
WRITE_TIMEOUT = 30.0  # seconds one send of an answer may wait for a slow reader


class Request:
    """What a handler of the console needs from one HTTP request."""

    def __init__(self, method: str, target: str, headers: Any, body: bytes, client: str, secure: bool) -> None:
        parts = urlsplit(target)
        self.method = method
        self.path = parts.path
        self.query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.headers = headers
        self.body = body
        self.client = client
        self.secure = secure

    def header(self, name: str) -> str:
        return self.headers.get(name, "") or ""


class Response:
    def __init__(self, status: int, body: bytes = b"", ctype: str = "text/plain; charset=utf-8",
                 headers: list[tuple[str, str]] | None = None) -> None:  # fmt: skip
        self.status = status
        self.body = body
        self.ctype = ctype
        self.headers = headers or []


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        render: Callable[[], bytes] | None = None,
        *,
        app: Any = None,
        public: Any = None,
        tls: Any = None,
        max_connections: int = 64,
        request_timeout: float = 10.0,
    ) -> None:
        is_ready = ready
        exposition = render or (lambda: generate_latest(REGISTRY))
        review = app  # filmgate.review.app.ReviewApp, or None
        secure = bool(tls is not None and tls.enabled)

        def is_public(name: str) -> bool:
            return review is None or public is None or bool(getattr(public, name, True))

        class Handler(BaseHTTPRequestHandler):
            server_version = "filmgate"
            sys_version = ""
            timeout = request_timeout  # per read; _DeadlineReader bounds the whole request
            _reader: _DeadlineReader

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # the standard reader, replaced (closing it leaves the socket open)
                self._reader = _DeadlineReader(self.connection)
                self.rfile = io.BufferedReader(self._reader)

            def handle_one_request(self) -> None:
                self._reader.deadline = time.monotonic() + request_timeout  # the idle wait for it included
                super().handle_one_request()

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self._dispatch("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._dispatch("HEAD")

            def do_POST(self) -> None:  # noqa: N802
                self._dispatch("POST")

            def _dispatch(self, method: str) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY:
                    self._send(Response(413, b"request body too large\n"), method)
                    return
                body = self.rfile.read(length) if length else b""
                self.connection.settimeout(WRITE_TIMEOUT)  # the answer may be large and the reader slow
                req = Request(method, self.path, self.headers, body, self.client_address[0], secure)
                ops = {"/metrics": "metrics", "/healthz": "healthz", "/readyz": "readyz"}.get(req.path)
                if ops is not None and method in ("GET", "HEAD"):
                    if not is_public(ops):
                        denied = review.require_login(req)
                        if denied is not None:
                            self._send(denied, method)
                            return
                    self._send(self._ops(ops), method)
                elif review is not None:
                    try:
                        rsp = review.handle(req)
                    except Exception:
                        log.exception("review console: internal error on %s %s", method, req.path)
                        rsp = Response(500, b"internal error\n")
                    self._send(rsp, method)
                else:
                    self._send(Response(404, b"not found\n"), method)

            @staticmethod
            def _ops(name: str) -> Response:
                if name == "metrics":
                    return Response(200, exposition(), CONTENT_TYPE_LATEST)
                if name == "healthz":
                    return Response(200, b"ok\n")
                ok = is_ready()
                return Response(200 if ok else 503, b"ready\n" if ok else b"not ready\n")

            def _send(self, rsp: Response, method: str = "GET") -> None:
                self.send_response(rsp.status)
                self.send_header("Content-Type", rsp.ctype)
                self.send_header("Content-Length", str(len(rsp.body)))
                for k, v in rsp.headers:
                    self.send_header(k, v)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(rsp.body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http: " + fmt, *args)

        self.server = _BoundedServer((host, port), Handler, max_connections)
        if secure:
            # the handshake happens in each request's thread (first read), not in the accepting one
            self.server.socket = _tls_context(tls).wrap_socket(self.server.socket, server_side=True,
                                                               do_handshake_on_connect=False)  # fmt: skip
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _DeadlineReader(io.RawIOBase):
    """The socket as the handler reads it, with a deadline for the request being read: each read waits at most
    until then, and past it the read fails as a timeout (which http.server answers by closing the connection)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within http.request_timeout")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``limit`` at once; the rest are answered 503 by the accepting thread."""

    daemon_threads = True
    request_queue_size = 128  # a burst of scrapes and browsers waits in the backlog instead of retrying its SYN
    _BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
             b"busy\n")  # fmt: skip

    def __init__(self, address: tuple[str, int], handler: Any, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self.limit = limit
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            metrics.REFUSALS.labels(reason="http-connection-limit").inc()
            THROTTLED.warn("http-connection-limit", "HTTP connection from %s closed with 503: %d connections are "
                           "served already (http.max_connections)", client_address[0], self.limit)  # fmt: skip
            try:
                if not isinstance(request, ssl.SSLSocket):  # a TLS client gets no plain-text answer, just the close
                    request.setblocking(False)
                    request.send(self._BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away, reset or timed out: its business, not an error
            log.debug("http: connection from %s ended: %s", client_address[0], exc)
        else:
            log.warning("http: error serving %s: %r", client_address[0], exc, exc_info=log.isEnabledFor(logging.DEBUG))


def _tls_context(tls: Any) -> ssl.SSLContext:
    from filmgate.tls import server_context  # the listener's rules: BCP 195 version and ciphers, mutual TLS

    return server_context(tls)

"""What an HTTP client can cost the node: the metrics and console port shares the listener's process.

Through real sockets against a real node: slow clients that drip a header line now and then (the standard library's
timeout is per read, so each one held a thread and a descriptor of the listener's process for as long as it kept
dripping), more connections than ``http.max_connections``, and clients that hang up before their answer (each left a
traceback on stderr). DICOM keeps working throughout.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from tests.helpers import Gate, film_pixels, make_dicom, storescu, wait_for

LIMIT = 8
REQUEST_TIMEOUT = 2.0
DRIPPERS = 40


def _threads(gate: Gate) -> int:
    assert gate.proc is not None
    return len(list(Path(f"/proc/{gate.proc.pid}/task").iterdir()))


def _fds(gate: Gate) -> int:
    assert gate.proc is not None
    return len(list(Path(f"/proc/{gate.proc.pid}/fd").iterdir()))


def _drip(port: int, results: list, index: int, stop: threading.Event) -> None:
    """A slowloris client: the request line, then a header line every 0.5 s, never the blank line that ends them.
    Records what it got back and how long after connecting the node closed the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    got = b""
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: node\r\n")
        s.settimeout(0.5)
        while not stop.is_set():
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break  # closed by the node
                got += chunk
            except TimeoutError:
                pass
            try:
                s.sendall(b"X-Drip: 1\r\n")
            except OSError:
                break
        results[index] = (got, time.monotonic() - t0, stop.is_set())
    finally:
        s.close()


def test_slow_and_surplus_http_clients_are_bounded_and_dicom_goes_on(tmp_path, val_films):
    gate = Gate.create(tmp_path / "gate", http={"max_connections": LIMIT, "request_timeout": REQUEST_TIMEOUT})
    gate.start()
    baseline, fds = _threads(gate), _fds(gate)
    results: list = [None] * DRIPPERS
    stop = threading.Event()
    clients = [threading.Thread(target=_drip, args=(gate.http_port, results, i, stop)) for i in range(DRIPPERS)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.5)
        assert _threads(gate) <= baseline + LIMIT + 2  # one thread per admitted connection, no more
        film = tmp_path / "film.dcm"
        make_dicom(film_pixels(val_films["adult"][0]), film)
        assert storescu([film], gate.dicom_port) == []  # DICOM is not held up by the HTTP clients
        gate.wait_delivered(1)
        time.sleep(REQUEST_TIMEOUT + 2.0)  # every dripper has been answered 503 or timed out by now
    finally:
        stop.set()
        for t in clients:
            t.join(10)
    assert all(r is not None for r in results)
    busy = [r for r in results if r[0].startswith(b"HTTP/1.1 503")]
    held = [r for r in results if not r[0]]
    assert len(busy) >= DRIPPERS - LIMIT, [r[0][:40] for r in results]
    assert busy and all(b"Retry-After: 1" in r[0] for r in busy)
    # the admitted drippers were closed by the node within the request timeout, however much they kept sending
    assert held and all(not stopped and seconds < REQUEST_TIMEOUT + 1.5 for _, seconds, stopped in held), held
    assert len(busy) + len(held) == DRIPPERS
    assert gate.counter("filmgate_refusals_total", reason="http-connection-limit") == len(busy)
    assert _threads(gate) <= baseline + 2
    assert _fds(gate) <= fds + 2  # every connection's descriptor closed, none left to the garbage collector
    assert gate.stop() == 0


def test_a_client_that_hangs_up_before_its_answer_leaves_no_traceback(tmp_path):
    gate = Gate.create(tmp_path / "gate").start()
    for _ in range(20):  # ask for the metrics and reset the connection at once (SO_LINGER 0: RST, no FIN)
        s = socket.create_connection(("127.0.0.1", gate.http_port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")
        s.close()
    wait_for(lambda: gate.http_get("/healthz")[0] == 200, 10, "the node to answer after the hang-ups")
    time.sleep(0.5)
    assert gate.stop() == 0
    log = gate.log()
    assert "Traceback" not in log and "Exception occurred" not in log, log[-3000:]

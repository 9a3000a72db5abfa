"""The audit trail: one JSON object per line, appended, for everything a site must be able to say afterwards.

Events: ``association-accepted`` / ``association-refused`` (AE title, address), ``stored`` (UID, sender),
``decided`` (outcome, reasons), ``delivered`` / ``dead-letter`` (destination), ``released`` / ``confirmed`` /
``relabelled`` (user), ``login`` / ``login-failed``. Each has ``time``, ``event``, ``user`` where a person acted,
and the UIDs concerned; never a patient name or ID (callers pass UIDs and facts only, and :meth:`AuditLog.event`
drops the patient keys if one slips in).

Every process of the node appends to the same file opened with ``O_APPEND``, one ``write`` per event, so lines from
the listener's process and the workers never interleave. Before each event the path is checked against the open file
(as ``logging.handlers.WatchedFileHandler`` does): once logrotate has moved it away (``create``) or someone removed
it, the next event starts a new file at the path, so events never go on into a rotated file that is compressed and
deleted later. ``copytruncate`` works as well: appends land at the truncated file's end. With ``audit.syslog`` each
event also goes out as an RFC 5424 message (structured data empty, the JSON as the message) over a Unix socket, UDP or
TCP (octet counting, RFC 6587).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from filmgate.config import SyslogConfig

log = logging.getLogger("filmgate.audit")
_PATIENT_KEYS = {"PatientName", "PatientID", "patient_name", "patient_id", "patient"}
_APP = "filmgate"


class AuditLog:
    def __init__(self, path: str | os.PathLike[str], syslog: SyslogConfig | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._opened = self._open()
        self._syslog = _Syslog(syslog) if syslog is not None and syslog.enabled else None
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, cfg: Any) -> AuditLog:
        return cls(cfg.audit_path, cfg.audit.syslog)

    def event(self, event: str, *, user: str | None = None, **facts: Any) -> None:
        """Append one event (never raises: an audit write failing is logged, the node goes on)."""
        now = time.time()
        rec: dict[str, Any] = {"time": _iso(now), "event": event}
        if user is not None or "known_user" in facts:
            rec["user"] = user
        rec.update({k: v for k, v in facts.items() if k not in _PATIENT_KEYS and v is not None})
        line = json.dumps(rec, separators=(",", ":"), default=str)
        try:
            with self._lock:
                os.write(self._current(), (line + "\n").encode())
        except OSError as exc:
            log.error("cannot append to the audit log %s (%s)", self.path, exc)
        if self._syslog is not None:
            self._syslog.send(event, line, now)

    def _open(self) -> tuple[int, tuple[int, int]]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)

    def _current(self) -> int:
        """The descriptor to append to: the open file while the path still names it, else a new file at the path
        (rotated away or removed). One stat per event, under the lock."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._opened:
                return self._fd
        except FileNotFoundError:
            pass
        fd, opened = self._open()
        os.close(self._fd)
        self._fd, self._opened = fd, opened
        log.info("audit log %s was moved or removed (log rotation?): appending to a new file there", self.path)
        return fd

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class _Syslog:
    """RFC 5424 over a Unix datagram socket, UDP or TCP."""

    def __init__(self, cfg: SyslogConfig) -> None:
        self.cfg = cfg
        self.host = socket.gethostname() or "-"
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        addr = self.cfg.address
        if addr.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.connect(addr)
            return s
        host, _, port = addr.rpartition(":")
        kind = socket.SOCK_STREAM if self.cfg.protocol == "tcp" else socket.SOCK_DGRAM
        s = socket.create_connection((host, int(port)), timeout=5) if kind == socket.SOCK_STREAM else socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)  # fmt: skip
        if kind == socket.SOCK_DGRAM:
            s.connect((host, int(port)))
        return s

    def send(self, event: str, line: str, now: float) -> None:
        pri = self.cfg.facility * 8 + 5  # notice
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        msgid = event[:32] or "-"
        msg = f"<{pri}>1 {stamp} {self.host} {_APP} {os.getpid()} {msgid} - {line}".encode()
        with self._lock:
            for _ in range(2):  # one reconnect: the syslog daemon may have restarted
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    if self._sock.type == socket.SOCK_STREAM:
                        self._sock.sendall(f"{len(msg)} ".encode() + msg)
                    else:
                        self._sock.send(msg)
                    return
                except OSError as exc:
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = None
                    err = exc
            log.warning("audit: cannot send to syslog %s (%s)", self.cfg.address, err)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"

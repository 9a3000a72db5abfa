"""Where decided instances go: a registry of destination types (``folder``, ``dicom``), built from the config.

Every destination receives the bytes exactly as they were received (the spooled file, hard-linked when possible) and
either stores them durably or raises, so the worker never reports as delivered what was not. The DICOM destination
first puts the instance in a durable outbox (that is its "delivered" for the worker), then a forwarder thread sends
it with retries and exponential back-off; after the last retry the instance is moved to a dead-letter folder with a
note, never dropped. The retry count of an instance lives in a JSON sidecar beside it in the outbox
(``<name>.retry.json``), so a restart continues the count (and tries at once) instead of starting it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.filereader import read_file_meta_info

from filmgate import metrics
from filmgate.config import DicomDestinationConfig, FolderDestinationConfig
from filmgate.spool import Spool, place, safe_component, write_durably

log = logging.getLogger("filmgate.destinations")
# Warning statuses of a Storage SCP still mean the instance is stored (PS3.4 B.2.3).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Delivery:
    """One decided instance: its spooled file, the values for path layouts, and the sidecar record."""

    path: Path
    fields: Mapping[str, str]
    record: Mapping[str, Any] = field(default_factory=dict)


class Destination(Protocol):
    name: str

    def deliver(self, item: Delivery) -> None: ...
    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...


class FolderDestination:
    """Files under ``path`` by ``layout``, each with a JSON sidecar (no patient name or ID in it)."""

    def __init__(self, cfg: FolderDestinationConfig, spool: Spool) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.root = Path(cfg.path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_resolved = self.root.resolve()

    def target(self, item: Delivery) -> Path:
        values = {k: safe_component(v) for k, v in item.fields.items()}
        rel = self.cfg.layout.format(**values)
        dst = (self.root / rel).resolve()
        if self._root_resolved not in dst.parents:
            raise ValueError(f"layout {self.cfg.layout!r} leads outside {self.root}")
        return dst

    def deliver(self, item: Delivery) -> None:
        metrics.DELIVERY_ATTEMPTS.labels(destination=self.name).inc()
        try:
            t0 = time.perf_counter()
            dst = self.target(item)
            place(item.path, dst, fsync=self.cfg.fsync)
            if self.cfg.sidecar:
                timings = {**item.record.get("timings_ms", {}), "deliver": round((time.perf_counter() - t0) * 1e3, 3)}
                record = {**item.record, "file": dst.name, "delivered_at": _iso(time.time()), "timings_ms": timings}
                sidecar = dst.with_suffix(".json") if dst.suffix == ".dcm" else dst.with_name(dst.name + ".json")
                write_durably(sidecar, (json.dumps(record, indent=1) + "\n").encode(), fsync=self.cfg.fsync)
        except Exception:
            metrics.DELIVERY_FAILURES.labels(destination=self.name).inc()
            raise

    def start(self) -> None:
        pass

    def stop(self, timeout: float) -> None:
        pass


class DicomDestination:
    """Forward by C-STORE to another node; durable outbox, retries with back-off, dead-letter after the last."""

    def __init__(self, cfg: DicomDestinationConfig, spool: Spool) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.outbox = spool.outbox(cfg.name)
        self.dead = Path(cfg.dead_letter) if cfg.dead_letter else spool.dead_letter(cfg.name)
        self.dead.mkdir(parents=True, exist_ok=True)
        self.fsync = spool.fsync
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assoc: Any = None
        self._contexts: set[tuple[str, str]] = set()

    def deliver(self, item: Delivery) -> None:
        place(item.path, self.outbox / item.path.name, fsync=self.fsync)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"forward-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop after the current attempt; what is still in the outbox is sent after the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def pending(self) -> list[Path]:
        return sorted(p for p in self.outbox.iterdir() if p.suffix == ".dcm")

    # ------------------------------------------------------------------------------------------ forwarding

    def _run(self) -> None:
        while not self._stop.is_set():
            files = self.pending()
            if not files:
                self._close()
                self._wake.wait(0.25)  # other worker processes fill the outbox too
                self._wake.clear()
                continue
            for path in files:
                if self._stop.is_set():
                    break
                self._forward(path, files)
        self._close()

    @staticmethod
    def _retry_file(path: Path) -> Path:
        return path.with_name(path.stem + ".retry.json")

    def _attempts_so_far(self, path: Path) -> int:
        """Failed attempts recorded by an earlier run (0 when none, or when the sidecar cannot be read)."""
        try:
            state = json.loads(self._retry_file(path).read_text())
            return max(0, int(state["attempts"]))
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _record_failure(self, path: Path, attempts: int, error: str, delay: float) -> None:
        now = time.time()
        state = {"destination": self.name, "attempts": attempts, "last_error": error, "last_at": _iso(now),
                 "next_at": _iso(now + delay)}  # fmt: skip
        write_durably(self._retry_file(path), (json.dumps(state) + "\n").encode(), fsync=self.fsync)

    def _forget(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._retry_file(path).unlink()

    def _forward(self, path: Path, upcoming: list[Path]) -> None:
        attempt = self._attempts_so_far(path)
        labels = {"destination": self.name}
        while True:
            metrics.DELIVERY_ATTEMPTS.labels(**labels).inc()
            if attempt:
                metrics.DELIVERY_RETRIES.labels(**labels).inc()
            try:
                status = self._send(path, upcoming)
                error = None if status in STORED_STATUSES else f"peer answered status 0x{status:04X}"
            except FileNotFoundError:
                return  # already handled (e.g. a duplicate listing)
            except Exception as exc:  # network errors, refused association, unreadable file
                error = f"{type(exc).__name__}: {exc}"
                self._close()
            if error is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._forget(path)
                return
            metrics.DELIVERY_FAILURES.labels(**labels).inc()
            attempt += 1
            if attempt > self.cfg.retries:
                self._dead_letter(path, error, attempt)
                return
            delay = min(self.cfg.backoff_initial * self.cfg.backoff_factor ** (attempt - 1), self.cfg.backoff_max)
            self._record_failure(path, attempt, error, delay)
            log.warning("destination %s: attempt %d failed (%s); retrying in %.1f s", self.name, attempt, error, delay)
            if self._stop.wait(delay):
                return  # shutting down: the instance stays in the outbox

    def _dead_letter(self, path: Path, error: str, attempts: int) -> None:
        note = {"destination": self.name, "error": error, "attempts": attempts, "at": _iso(time.time())}
        place(path, self.dead / path.name, fsync=self.fsync)
        write_durably(self.dead / (path.stem + ".json"), (json.dumps(note) + "\n").encode(), fsync=self.fsync)
        path.unlink()
        self._forget(path)
        metrics.DEAD_LETTERS.labels(destination=self.name).inc()
        log.error("destination %s: gave up after %d attempts (%s); moved to %s", self.name, attempts, error, self.dead)

    def _send(self, path: Path, upcoming: list[Path]) -> int:
        meta = read_file_meta_info(path)
        key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if self._assoc is None or not self._assoc.is_established or key not in self._contexts:
            self._associate(key, upcoming)
        status = self._assoc.send_c_store(path)
        if not status or "Status" not in status:
            self._close()
            raise ConnectionError("no response to C-STORE (association lost or timed out)")
        return int(status.Status)

    def _associate(self, first: tuple[str, str], upcoming: list[Path]) -> None:
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, no decode/re-encode
        self._close()
        wanted = [first]
        for p in upcoming[:64]:
            with contextlib.suppress(Exception):
                m = read_file_meta_info(p)
                key = (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                if key not in wanted:
                    wanted.append(key)
            if len(wanted) >= 100:
                break
        ae = AE(ae_title=self.cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout
        ae.connection_timeout = min(self.cfg.timeout, 10.0)
        for sop_class, ts in wanted:
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"association with {self.cfg.ae_title}@{self.cfg.host}:{self.cfg.port} failed")
        self._assoc = assoc
        self._contexts = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        if first not in self._contexts:
            raise ConnectionError(f"peer does not accept SOP class {first[0]} with transfer syntax {first[1]}")

    def _close(self) -> None:
        if self._assoc is not None:
            with contextlib.suppress(Exception):
                if self._assoc.is_established:
                    self._assoc.release()
            self._assoc = None
            self._contexts = set()


# The destination registry: config type -> implementation.
DESTINATIONS: dict[type, Callable[[Any, Spool], Destination]] = {
    FolderDestinationConfig: FolderDestination,
    DicomDestinationConfig: DicomDestination,
}


def build(configs: Any, spool: Spool) -> dict[str, Destination]:
    for c in configs:
        metrics.declare_destination(c.name, forwards=isinstance(c, DicomDestinationConfig))
    return {c.name: DESTINATIONS[type(c)](c, spool) for c in configs}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def pending_total(dests: Mapping[str, Destination]) -> int:
    return sum(len(d.pending()) for d in dests.values() if isinstance(d, DicomDestination))


__all__ = ["Delivery", "DicomDestination", "FolderDestination", "build"]

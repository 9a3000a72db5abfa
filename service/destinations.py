"""Where decided instances go: a registry of destination types (``folder``, ``dicom``), built from the config.

Every destination receives the bytes exactly as they were received (the spooled file, hard-linked when possible) and
either stores them durably or raises, so the worker never reports as delivered what was not.

The folder destination never overwrites a different instance: UIDs that sanitising changed keep a hash suffix, files
are linked into place only where nothing is, and a second copy of an SOP Instance UID is kept as ``<name>-copy2.dcm``
(or replaces the first, ``duplicates: replace``); its sidecar says which.

The DICOM destination first puts the instance in a durable outbox (that is its "delivered" for the worker), then a
forwarder thread sends what is due. Each instance waits for its own back-off (exponential, with jitter) while the
others go on, so one failing film never blocks the queue; a peer that is down is probed once per
``backoff_initial`` rather than once per instance, and when it answers again every instance that failed because it
was down is due at once. A permanent refusal (no presentation context accepted for the instance, 0x0122, 0xA9xx)
goes to the dead letter at once with the reason; after ``retries`` temporary failures an instance goes there too,
never dropped. ``filmgate resend`` puts dead letters back into the outbox. The retry count of an instance lives in a
JSON sidecar beside it in the outbox (``<name>.retry.json``), so a restart continues the count (and tries at once).
Forwarding may use TLS (``tls``, the listener's settings) and may decompress to an uncompressed syntax the peer
accepts (``transcode_to``), the only case where the bytes sent are not the bytes received.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.filereader import read_file_meta_info

from filmgate import metrics
from filmgate.config_checks import AE_TITLE, LAYOUT, NOT_EMPTY, PORT, POSITIVE, at_least, one_of
from filmgate.manifest import sha256_file
from filmgate.record import LAYOUT_FIELDS
from filmgate.spool import (
    PIPELINE_DEAD_LETTER,
    Spool,
    distinct_component,
    place,
    place_new,
    safe_component,
    write_durably,
)
from filmgate.tls import TLSConfig, client_context

DUPLICATE_RULES = ("keep", "replace")
TRANSCODE_TARGETS = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit, Implicit VR Little Endian


@dataclass(frozen=True)
class FolderDestinationConfig:
    """Write the received file and a JSON sidecar under ``path`` following ``layout``."""

    name: str
    path: str = field(metadata=NOT_EMPTY)
    layout: str = field(default="{StudyInstanceUID}/{SOPInstanceUID}.dcm", metadata=LAYOUT)
    sidecar: bool = True
    fsync: bool = True
    # A second copy of an instance (same SOP Instance UID, other bytes): "keep" it beside the first as
    # <name>-copy2.dcm, -copy3, ..., or "replace" the first. A different instance is never overwritten; identical
    # bytes are delivered once.
    duplicates: str = field(default="keep", metadata=one_of(list(DUPLICATE_RULES)))


@dataclass(frozen=True)
class DicomDestinationConfig:
    """Forward the received bytes by C-STORE, with retries, exponential back-off and a dead-letter folder."""

    name: str
    ae_title: str = field(metadata=AE_TITLE)
    host: str = field(metadata=NOT_EMPTY)
    port: int = field(metadata=PORT)
    calling_ae: str = field(default="FILMGATE", metadata=AE_TITLE)
    retries: int = field(default=8, metadata=at_least(0))
    backoff_initial: float = field(default=1.0, metadata=POSITIVE)
    backoff_factor: float = field(default=2.0, metadata=at_least(1))
    backoff_max: float = 300.0  # at least backoff_initial (filmgate.config.validate)
    timeout: float = field(default=30.0, metadata=POSITIVE)
    dead_letter: str = ""  # default: <spool>/dead-letter/<name>
    # TLS to the peer, the listener's settings: ca_file verifies the peer (empty: the system's CAs), cert_file and
    # key_file are our client certificate for mutual TLS (optional).
    tls: TLSConfig = field(default_factory=TLSConfig)
    # Uncompressed transfer syntaxes (Explicit/Implicit VR Little Endian) to decompress to when the peer accepts no
    # context for an instance's own syntax; empty: never change the bytes (the instance is dead-lettered instead).
    transcode_to: tuple[str, ...] = field(
        default=(), metadata=one_of(list(TRANSCODE_TARGETS), " (lossless, uncompressed)", each=True)
    )


log = logging.getLogger("filmgate.destinations")
# Warning statuses of a Storage SCP still mean the instance is stored (PS3.4 B.2.3).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def is_permanent(status: int) -> bool:
    """A C-STORE status no retry can change: SOP class not supported (0x0122), data set does not match SOP class
    (0xA9xx)."""
    return status == 0x0122 or 0xA900 <= status <= 0xA9FF


class PermanentRefusal(Exception):
    """The peer will never take this instance as it is (the reason is the message)."""


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


# ---------------------------------------------------------------------------------------------------- folder


class FolderDestination:
    """Files under ``path`` by ``layout``, each with a JSON sidecar (no patient name or ID in it)."""

    def __init__(self, cfg: FolderDestinationConfig, spool: Spool, recorder: Any = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.recorder = recorder
        self.root = Path(cfg.path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_resolved = self.root.resolve()

    def target(self, item: Delivery) -> Path:
        """The file for ``item``: every layout field has a value (``unknown`` when the film did not say), UIDs that
        sanitising changed carry a hash of the original so that distinct UIDs never share a name."""
        values = dict.fromkeys(LAYOUT_FIELDS, "unknown")
        for k, v in item.fields.items():
            values[k] = distinct_component(v) if k.endswith("UID") else safe_component(v)
        rel = self.cfg.layout.format_map(values)
        dst = (self.root / rel).resolve()
        if self._root_resolved not in dst.parents:
            raise ValueError(f"layout {self.cfg.layout!r} leads outside {self.root}")
        return dst

    def deliver(self, item: Delivery) -> None:
        metrics.DELIVERY_ATTEMPTS.labels(destination=self.name).inc()
        try:
            t0 = time.perf_counter()
            dst, duplicate = self._place(item)
            identical = duplicate is not None and duplicate["rule"] == "identical"
            if self.cfg.sidecar and not (identical and _sidecar_of(dst).exists()):
                timings = {**item.record.get("timings_ms", {}), "deliver": round((time.perf_counter() - t0) * 1e3, 3)}
                record = {**item.record, "file": dst.name, "delivered_at": _iso(time.time()), "timings_ms": timings}
                if duplicate is not None and not identical:
                    record["duplicate"] = duplicate
                write_durably(_sidecar_of(dst), (json.dumps(record, indent=1) + "\n").encode(), fsync=self.cfg.fsync)
        except Exception as exc:
            metrics.DELIVERY_FAILURES.labels(destination=self.name).inc()
            if self.recorder is not None:
                self.recorder.delivery(item.path.name, self.name, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        if self.recorder is not None:
            self.recorder.delivery(item.path.name, self.name, "delivered",
                                   sop_instance_uid=item.fields.get("SOPInstanceUID", ""))  # fmt: skip

    def sidecar_of(self, item: Delivery) -> Path:
        """Where the sidecar of ``item`` is (its first copy, by the layout)."""
        return _sidecar_of(self.target(item))

    def _place(self, item: Delivery) -> tuple[Path, dict[str, Any] | None]:
        """Link the instance into place without overwriting anything; returns the file and, when something was
        already there, what the sidecar says about it."""
        first = self.target(item)
        uid = str(item.fields.get("SOPInstanceUID", "") or "")
        digest = ""  # hashed only when a name is taken: the common delivery reads nothing twice
        for n in range(1, 10_000):
            dst = first if n == 1 else first.with_name(f"{_stem(first)}-copy{n}{_suffix(first)}")
            if place_new(item.path, dst, fsync=self.cfg.fsync):
                if n == 1:
                    return dst, None
                log.warning("destination %s: another copy of an instance already there kept as copy %d "
                            "(duplicates: keep)", self.name, n)  # fmt: skip
                return dst, {"rule": "keep", "copy": n, "first": first.name}
            digest = digest or sha256_file(item.path)
            if sha256_file(dst) == digest:  # these very bytes are there already (a re-delivery after a crash, a resend)
                return dst, {"rule": "identical", "file": dst.name}
            if n == 1 and self.cfg.duplicates == "replace" and uid and _sop_instance_uid(dst) == uid:
                old = sha256_file(dst)
                place(item.path, dst, fsync=self.cfg.fsync)
                return dst, {"rule": "replace", "replaced_sha256": old}
        raise OSError(f"destination {self.name}: 10,000 copies of one file name; refusing to add more")

    def start(self) -> None:
        pass

    def stop(self, timeout: float) -> None:
        pass


def _sidecar_of(dst: Path) -> Path:
    return dst.with_suffix(".json") if dst.suffix == ".dcm" else dst.with_name(dst.name + ".json")


def _stem(p: Path) -> str:
    return p.stem if p.suffix == ".dcm" else p.name


def _suffix(p: Path) -> str:
    return ".dcm" if p.suffix == ".dcm" else ""


def _sop_instance_uid(path: Path) -> str:
    from filmgate.dataset_io import read_header

    try:
        return str(read_header(path).get("SOPInstanceUID", "") or "").strip()
    except Exception:
        return ""


# ---------------------------------------------------------------------------------------------------- DICOM


class DicomDestination:
    """Forward by C-STORE to another node; durable outbox, per-instance back-off, dead letter with a note."""

    def __init__(self, cfg: DicomDestinationConfig, spool: Spool, recorder: Any = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.recorder = recorder
        self.outbox = spool.outbox(cfg.name)
        self.dead = Path(cfg.dead_letter) if cfg.dead_letter else spool.dead_letter(cfg.name)
        self.dead.mkdir(parents=True, exist_ok=True)
        self.fsync = spool.fsync
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assoc: Any = None
        self._contexts: set[tuple[str, str]] = set()
        self._due: dict[str, float] = {}  # file name -> monotonic time of its next attempt (absent: now)
        self._peer_down: set[str] = set()  # files whose last attempt failed because the peer did not answer
        self._hold_until = 0.0  # the peer did not answer: probe it again only after this
        self._ssl = client_context(cfg.tls) if cfg.tls.enabled else None

    def deliver(self, item: Delivery) -> None:
        place(item.path, self.outbox / item.path.name, fsync=self.fsync)
        if self.recorder is not None:
            self.recorder.delivery(item.path.name, self.name, "queued")
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
            try:
                self._round()
            except Exception:  # never let the forwarder die: the outbox would silently stop draining
                log.exception("destination %s: forwarding round failed; trying again", self.name)
                self._close()
                self._stop.wait(1.0)
        self._close()

    def _round(self) -> None:
        files = self.pending()
        names = {p.name for p in files}
        for gone in set(self._due) - names:
            self._due.pop(gone, None)
            self._peer_down.discard(gone)
        now = time.monotonic()
        due = [p for p in files if self._due.get(p.name, 0.0) <= now] if now >= self._hold_until else []
        if not due:
            if not files:
                self._close()
            upcoming = [self._due.get(p.name, 0.0) for p in files] + ([self._hold_until] if files else [])
            wait = min([0.25, *[max(0.01, t - now) for t in upcoming if t > now]])
            self._wake.wait(wait)  # other worker processes fill the outbox too
            self._wake.clear()
            return
        for path in due:
            if self._stop.is_set() or time.monotonic() < self._hold_until:
                break
            self._attempt(path, files)

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
        self._due.pop(path.name, None)
        self._peer_down.discard(path.name)
        with contextlib.suppress(FileNotFoundError):
            self._retry_file(path).unlink()

    def backoff(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1``: exponential, capped, with jitter (half fixed, half random), so
        instances that failed together do not come back together."""
        base = min(self.cfg.backoff_initial * self.cfg.backoff_factor ** (attempt - 1), self.cfg.backoff_max)
        return base / 2 + random.uniform(0, base / 2)

    def _attempt(self, path: Path, upcoming: list[Path]) -> None:
        attempt = self._attempts_so_far(path)
        labels = {"destination": self.name}
        metrics.DELIVERY_ATTEMPTS.labels(**labels).inc()
        if attempt:
            metrics.DELIVERY_RETRIES.labels(**labels).inc()
        peer_down = False
        try:
            status = self._send(path, upcoming)
            error = None if status in STORED_STATUSES else f"peer answered status 0x{status:04X}"
            if error and is_permanent(status):
                raise PermanentRefusal(error)
        except FileNotFoundError:
            self._forget(path)
            return  # already handled (e.g. resent by hand, or a duplicate listing)
        except PermanentRefusal as exc:
            metrics.DELIVERY_FAILURES.labels(**labels).inc()
            self._dead_letter(path, str(exc), attempt + 1, permanent=True)
            return
        except Exception as exc:  # network errors, refused or lost association, unreadable file
            error = f"{type(exc).__name__}: {exc}"
            peer_down = isinstance(exc, PeerUnavailable)
            self._close()
        if error is None:
            if self.recorder is not None:  # recorded before the outbox forgets it: a crash between re-sends
                self.recorder.delivery(path.name, self.name, "delivered", attempts=attempt + 1)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._forget(path)
            if self._peer_down:  # the peer answers again: whatever waited only for that is due now
                for name in self._peer_down:
                    self._due.pop(name, None)
                self._peer_down.clear()
            return
        metrics.DELIVERY_FAILURES.labels(**labels).inc()
        attempt += 1
        if self.recorder is not None:
            self.recorder.delivery(path.name, self.name, "queued", error=error, attempts=attempt)
        if attempt > self.cfg.retries:
            self._dead_letter(path, error, attempt)
            return
        delay = self.backoff(attempt)
        self._record_failure(path, attempt, error, delay)
        self._due[path.name] = time.monotonic() + delay
        if peer_down:
            self._peer_down.add(path.name)
            self._hold_until = time.monotonic() + self.backoff(1)
        else:
            self._peer_down.discard(path.name)
        log.warning("destination %s: attempt %d failed (%s); retrying that instance in %.1f s", self.name, attempt,
                    error, delay)  # fmt: skip

    def _dead_letter(self, path: Path, error: str, attempts: int, *, permanent: bool = False) -> None:
        note = {"destination": self.name, "error": error, "attempts": attempts, "permanent": permanent,
                "at": _iso(time.time())}  # fmt: skip
        # The note first: whoever sees a dead letter (an operator, `filmgate resend`) finds why beside it.
        write_durably(self.dead / (path.stem + ".json"), (json.dumps(note) + "\n").encode(), fsync=self.fsync)
        place(path, self.dead / path.name, fsync=self.fsync)
        if self.recorder is not None:
            self.recorder.delivery(path.name, self.name, "dead-letter", error=error, attempts=attempts)
        path.unlink()
        self._forget(path)
        metrics.DEAD_LETTERS.labels(destination=self.name).inc()
        why = "refused permanently" if permanent else f"gave up after {attempts} attempts"
        log.error("destination %s: %s (%s); moved to %s", self.name, why, error, self.dead)

    def _send(self, path: Path, upcoming: list[Path]) -> int:
        meta = read_file_meta_info(path)
        key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        fresh = False
        if self._assoc is None or not self._assoc.is_established or not self._can_send(key):
            self._associate(key, upcoming)
            fresh = True
        if key in self._contexts:
            status = self._assoc.send_c_store(path)  # the received bytes, unchanged
        else:
            target = next((ts for ts in self.cfg.transcode_to if (key[0], ts) in self._contexts), None)
            if target is None:
                assert fresh
                also = f" or {', '.join(self.cfg.transcode_to)}" if self.cfg.transcode_to else ""
                raise PermanentRefusal(f"the peer accepts no presentation context for SOP class {key[0]} with "
                                       f"transfer syntax {key[1]}{also}")  # fmt: skip
            status = self._assoc.send_c_store(transcode(path, target))
            metrics.DELIVERY_TRANSCODED.labels(destination=self.name).inc()
        if not status or "Status" not in status:
            self._close()
            raise ConnectionError("no response to C-STORE (association lost or timed out)")
        return int(status.Status)

    def _can_send(self, key: tuple[str, str]) -> bool:
        return key in self._contexts or any((key[0], ts) in self._contexts for ts in self.cfg.transcode_to)

    def _associate(self, first: tuple[str, str], upcoming: list[Path]) -> None:
        from pynetdicom import AE

        from filmgate import patches

        patches.install()  # idempotent: the file's bytes are sent as they are (STORE_SEND_CHUNKED_DATASET)
        self._close()
        wanted = [first]
        limit = 60 if self.cfg.transcode_to else 120  # at most 128 presentation contexts in one association
        for p in upcoming[:64]:
            with contextlib.suppress(Exception):
                m = read_file_meta_info(p)
                key = (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                if key not in wanted:
                    wanted.append(key)
            if len(wanted) >= limit:
                break
        ae = AE(ae_title=self.cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout
        ae.connection_timeout = min(self.cfg.timeout, 10.0)
        # One context per syntax as received, and apart from it one with the decompression targets: a peer that
        # prefers uncompressed must not make us decompress what it would take as it is.
        for sop_class, ts in wanted:
            ae.add_requested_context(sop_class, [ts])
        for sop_class in dict.fromkeys(s for s, _ in wanted):
            if self.cfg.transcode_to:
                ae.add_requested_context(sop_class, list(self.cfg.transcode_to))
        tls_args = (self._ssl, self.cfg.host) if self._ssl is not None else None
        assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.accepted_contexts:
                return  # the peer answered, and took none of the contexts: nothing to send them with
            raise PeerUnavailable(f"association with {self.cfg.ae_title}@{self.cfg.host}:{self.cfg.port} failed")
        self._assoc = assoc
        self._contexts = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}

    def _close(self) -> None:
        if self._assoc is not None:
            with contextlib.suppress(Exception):
                if self._assoc.is_established:
                    self._assoc.release()
            self._assoc = None
            self._contexts = set()


class PeerUnavailable(ConnectionError):
    """The peer did not take an association (down, unreachable, refusing us): nothing instance-specific."""


def transcode(path: Path, target: str) -> Any:
    """The instance decompressed to ``target`` (Explicit or Implicit VR Little Endian): lossless with respect to
    what was received. Only used when the peer accepts nothing else and ``transcode_to`` allows it."""
    from pydicom import dcmread
    from pydicom.uid import UID

    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)  # the same instance, only its encoding changes
    ds.file_meta.TransferSyntaxUID = UID(target)
    return ds


# ---------------------------------------------------------------------------------------------------- resend


def resend(cfg: Any, paths: list[Path], *, to: str | None = None) -> dict[str, int]:
    """Put dead letters (files, or every ``*.dcm`` of folders) back into their destination's outbox, where the
    running node's forwarder takes them up with a fresh retry count. The destination is ``to``, else the one named
    in each file's note. Returns how many went to each destination; raises ValueError naming a file that has no
    known destination (nothing is moved then)."""
    dicom = {d.name: d for d in cfg.destinations if isinstance(d, DicomDestinationConfig)}
    plan: list[tuple[Path, str]] = []
    for given in paths:
        files = sorted(given.glob("*.dcm")) if given.is_dir() else [given]
        if not given.exists():
            raise ValueError(f"{given}: no such file or folder")
        for f in files:
            name = to
            if name is None:
                try:
                    name = str(json.loads(f.with_suffix(".json").read_text())["destination"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise ValueError(f"{f}: no readable note ({f.with_suffix('.json').name}) naming its "
                                     "destination; say which with --to") from None  # fmt: skip
            if name == PIPELINE_DEAD_LETTER:
                plan.append((f, name))  # one the pipeline gave up on: it goes back to incoming/, judged again
                continue
            if name not in dicom:
                raise ValueError(f"{f}: destination {name!r} is not a DICOM destination of this configuration "
                                 f"({', '.join(sorted(dicom)) or 'none'})")  # fmt: skip
            plan.append((f, name))
    spool = Spool(cfg.spool.path, fsync=cfg.spool.fsync, worker="resend")
    done: dict[str, int] = {}
    for f, name in plan:
        if name == PIPELINE_DEAD_LETTER:
            spool.requeue(f)
        else:
            outbox = spool.outbox(name)
            place(f, outbox / f.name, fsync=spool.fsync)
            with contextlib.suppress(FileNotFoundError):
                (outbox / (f.stem + ".retry.json")).unlink()
            f.unlink()
        with contextlib.suppress(FileNotFoundError):
            f.with_suffix(".json").unlink()
        done[name] = done.get(name, 0) + 1
    with contextlib.suppress(OSError):
        os.rmdir(spool.claimed)  # the resend's own (empty) claimed/ folder
    return done


@dataclass(frozen=True)
class DestinationType:
    """One destination type: the class its configuration is read into (``destinations.<name>`` with ``type:``) and
    the implementation built from it. ``forwards``: it sends on to a peer (the forwarding metrics are declared)."""

    config: type
    factory: Callable[[Any, Spool, Any], Destination]
    forwards: bool = False


# The one registry of destination types: the config parser (filmgate.config) reads ``type:`` through it and
# :func:`build` makes each destination through it. A new type is a config class, an implementation and a line here.
DESTINATION_TYPES: dict[str, DestinationType] = {
    "folder": DestinationType(FolderDestinationConfig, FolderDestination),
    "dicom": DestinationType(DicomDestinationConfig, DicomDestination, forwards=True),
}


def build(configs: Any, spool: Spool, recorder: Any = None) -> dict[str, Destination]:
    """The configured destinations; each reports its state per instance to ``recorder``
    (:class:`filmgate.records.Recorder`) when one is given."""
    by_config = {t.config: t for t in DESTINATION_TYPES.values()}
    for c in configs:
        metrics.declare_destination(c.name, forwards=by_config[type(c)].forwards)
    return {c.name: by_config[type(c)].factory(c, spool, recorder) for c in configs}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def pending_total(dests: Mapping[str, Destination]) -> int:
    return sum(len(d.pending()) for d in dests.values() if isinstance(d, DicomDestination))


__all__ = ["Delivery", "DicomDestination", "FolderDestination", "build", "resend"]

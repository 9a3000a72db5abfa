"""The durable spool: nothing is acknowledged before it is on disk, nothing on disk is forgotten.

Layout under the spool folder::

    tmp/        partial writes (removed at start, and while running once untouched for spool.stale_tmp_seconds)
    incoming/   acknowledged instances waiting for a worker
    claimed/<worker>/  instances a worker is processing (moved back to incoming/ at start, or when that worker dies)
    outbox/<destination>/       instances waiting for a DICOM destination
    dead-letter/<destination>/  instances a DICOM destination gave up on (with a .json saying why)

Every step is a rename inside one file system, which is atomic: an instance is always in exactly one place. Names
are ``<receive time ns><seq>.dcm``, so the same UID received twice gives two files (both processed, the destinations
are idempotent) and sorting by name is arrival order. What the listener knew of an instance (who sent it, from where,
when; :class:`filmgate.record.Arrival`) is written beside it as ``incoming/<name>.json`` before the C-STORE is
acknowledged and stays there, whatever folder the instance is in, until the instance is finished: the worker that
claims the instance reads it once (:meth:`Spool.arrival`). Instances spooled by the previous version
(``<ns><seq>_<calling AE hex>_<UID>.dcm``, no record) are still recovered and judged: their arrival is read from the
name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from filmgate import metrics
from filmgate.record import Arrival

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
SUFFIX = ".dcm"
RECORD_SUFFIX = ".json"  # the arrival record beside an instance in incoming/
ATTEMPTS_SUFFIX = ".attempts"  # how many times the instance was claimed, beside it in incoming/
PIPELINE_DEAD_LETTER = "pipeline"  # dead-letter/<this>: instances the pipeline itself could not deliver


def safe_component(value: object, default: str = "unknown") -> str:
    """A value (a UID, an AE title) made safe as one path component."""
    text = _UNSAFE.sub("_", str(value or "").strip())[:128].strip(".")
    return text or default


def distinct_component(value: object, default: str = "unknown") -> str:
    """A UID made safe as one path component that stays distinct from every other UID: when sanitising changed or
    truncated it (``1.2.3.4/5`` and ``1.2.3.4_5`` both become ``1.2.3.4_5``), a short hash of the original value
    is appended, so two different values never share a file name."""
    raw = str(value or "").strip()
    safe = safe_component(raw, default)
    if raw and safe != raw:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        safe = f"{safe[: 128 - 13]}-{digest}"
    return safe


def place_new(src: Path, dst: Path, *, fsync: bool = True) -> bool:
    """Put a copy of ``src`` at ``dst`` only if nothing is there (atomic, also between processes): a hard link, or a
    durable copy linked into place. False when ``dst`` already exists (nothing is overwritten)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    except OSError:  # another file system, or no hard links there: copy beside it, then link the copy in
        tmp = dst.parent / f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        write_durably(tmp, src.read_bytes(), fsync=fsync)
        try:
            os.link(tmp, dst)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    if fsync:
        fsync_dir(dst.parent)
    return True


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(
    path: Path, data: bytes | Sequence[bytes], *, fsync: bool = True, tmp_dir: Path | None = None
) -> None:
    """Write ``data`` (bytes or chunks) to ``path`` atomically: temporary file, fsync, rename, fsync of the folder."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, bytes | bytearray | memoryview):
                fh.write(data)
            else:
                fh.writelines(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def place(src: Path, dst: Path, *, fsync: bool = True) -> None:
    """Put a copy of ``src`` at ``dst`` durably: a hard link when possible (same bytes, no copy), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        write_durably(dst, src.read_bytes(), fsync=fsync)
        return
    os.replace(tmp, dst)
    if fsync:
        fsync_dir(dst.parent)


class Spool:
    """The spool folders and the atomic moves between them."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        worker: str = "w0",
        min_free_bytes: int = 0,
        min_free_percent: float = 0.0,
        early_writeback: bool = False,
    ) -> None:
        self.root = Path(root)
        self.early_writeback = early_writeback  # read by the listener (filmgate.receive): spool.early_writeback
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        self.claimed_root = self.root / "claimed"
        self.fsync = fsync
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.claimed = self.claimed_root / safe_component(worker)
        self.outbox_root = self.root / "outbox"
        self.dead_root = self.root / "dead-letter"
        for d in (self.tmp, self.incoming, self.claimed, self.outbox_root, self.dead_root):
            d.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        self._lock = threading.Lock()
        self.arrived = threading.Event()

    # ------------------------------------------------------------------------------------------ space

    def free_space(self) -> tuple[int, int]:
        """(bytes free to this process, size of the file system) of the spool's volume."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def reserve(self, total: int) -> int:
        """The bytes kept free: the larger of ``min_free_bytes`` and ``min_free_percent`` of the volume."""
        return max(self.min_free_bytes, int(total * self.min_free_percent / 100))

    def space_problem(self) -> str | None:
        """None while the spool's volume has more than its reserve free, else a sentence saying what is full."""
        try:
            free, total = self.free_space()
        except OSError as exc:
            return f"the spool {self.root} cannot be examined ({exc.strerror})"
        reserve = self.reserve(total)
        metrics.SPOOL_FREE_BYTES.set(free)
        if free > reserve:
            return None
        return (
            f"the spool's volume ({self.root}) is full: {_mb(free)} free of {_mb(total)}, at or below its reserve of "
            f"{_mb(reserve)} (spool.min_free_bytes, spool.min_free_percent)"
        )

    # ------------------------------------------------------------------------------------------ receiving

    def new_name(self) -> str:
        with self._lock:
            self._seq = (self._seq + 1) % 1000
            seq = self._seq
        return f"{time.time_ns():020d}{seq:03d}{SUFFIX}"

    def record_path(self, instance: Path) -> Path:
        """Where the arrival record of ``instance`` (in incoming/ or claimed/) is kept."""
        return self.incoming / (instance.name[: -len(SUFFIX)] + RECORD_SUFFIX)

    def persist(self, data: bytes | Sequence[bytes], arrival: Arrival) -> Path:
        """Durably store one received instance and its arrival record in incoming/; returns its path. Raises OSError
        on failure."""
        path = self.incoming / self.new_name()
        write_durably(self.record_path(path), arrival.to_json(), fsync=self.fsync, tmp_dir=self.tmp)
        write_durably(path, data, fsync=self.fsync, tmp_dir=self.tmp)
        self.arrived.set()
        return path

    def adopt(self, src: Path, arrival: Arrival, *, started: float | None = None) -> Path:
        """Durably move a complete received file (written while it arrived, under tmp/) into incoming/, with its
        arrival record beside it. The bytes are synced first, then the record is written and renamed in, then the
        instance: an instance in incoming/ always has its record, and one fsync of the folder makes both renames
        durable before the caller acknowledges. With ``started`` (a ``perf_counter`` time), the record's
        ``store_seconds`` is the time from then until the bytes were on disk."""
        path = self.incoming / self.new_name()
        record = self.record_path(path)
        if self.fsync:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # data and size; the rename below is made durable by the folder's fsync
            finally:
                os.close(fd)
        if started is not None:
            arrival = dataclasses.replace(arrival, store_seconds=time.perf_counter() - started)
        tmp_record = self.tmp / (record.name + ".part")
        try:
            with open(tmp_record, "wb") as fh:
                fh.write(arrival.to_json())
                if self.fsync:
                    fh.flush()
                    os.fdatasync(fh.fileno())
            os.replace(tmp_record, record)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp_record.unlink()
            raise
        try:
            try:
                os.replace(src, path)
            except OSError:  # another file system: copy durably instead
                write_durably(path, src.read_bytes(), fsync=self.fsync, tmp_dir=self.tmp)
                with contextlib.suppress(OSError):
                    src.unlink()
            if self.fsync:
                fsync_dir(self.incoming)
        except BaseException:
            with contextlib.suppress(OSError):
                record.unlink()
            raise
        self.arrived.set()
        return path

    def arrival(self, instance: Path) -> Arrival:
        """The arrival record of a spooled instance (read once, by the worker that claimed it). An instance of the
        previous version has none: its file name says the same; a file put in by hand gets its modification time."""
        try:
            return Arrival.from_json(self.record_path(instance).read_bytes())
        except (OSError, ValueError, TypeError):
            pass
        legacy = Arrival.from_legacy_name(instance.name)
        if legacy is not None:
            return legacy
        try:
            return Arrival(received_at=instance.stat().st_mtime)
        except OSError:
            return Arrival(received_at=time.time())

    # ------------------------------------------------------------------------------------------ workers

    def recover(self) -> int:
        """At start: drop partial writes and hand claimed instances (the last run died holding them) back."""
        self.sweep_tmp(float("-inf"))  # every partial write, however recent: nothing is receiving yet
        n = 0
        for p in sorted(self.claimed_root.rglob(f"*{SUFFIX}")):
            os.replace(p, self.incoming / p.name)
            n += 1
        if n and self.fsync:
            fsync_dir(self.incoming)
        # Records whose instance is gone: the run died between finishing an instance and removing its record, or
        # between writing a record and its instance (that C-STORE was never acknowledged).
        for suffix in (RECORD_SUFFIX, ATTEMPTS_SUFFIX):
            for record in self.incoming.glob(f"*{suffix}"):
                if not (self.incoming / (record.name[: -len(suffix)] + SUFFIX)).exists():
                    with contextlib.suppress(OSError):
                        record.unlink()
        return n

    def sweep_tmp(self, older_than: float) -> int:
        """Remove files under tmp/ not written to for ``older_than`` seconds: what aborted transfers left (a live
        transfer writes to its file at least every network timeout). Returns how many were removed."""
        limit = time.time() - older_than
        n = 0
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < limit:
                    p.unlink()
                    n += 1
        return n

    def pending(self) -> list[Path]:
        """Incoming instances in arrival order."""
        return sorted(p for p in self.incoming.iterdir() if p.suffix == SUFFIX)

    def claim(self, path: Path) -> Path | None:
        """Take one incoming instance for processing; None when another worker took it first."""
        target = self.claimed / path.name
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        return target

    def release(self, claimed: Path) -> None:
        """Hand a claimed instance back to incoming/ (shutdown, or a delivery that must be tried again)."""
        with contextlib.suppress(FileNotFoundError):
            os.replace(claimed, self.incoming / claimed.name)
            self.arrived.set()

    def release_all(self, worker: str | None = None) -> int:
        """Hand back everything this worker (or ``worker``) holds."""
        folder = self.claimed if worker is None else self.claimed_root / safe_component(worker)
        n = 0
        for p in list(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
            self.release(p)
            n += 1
        return n

    def finish(self, claimed: Path) -> None:
        """The instance was delivered everywhere it had to go: it and its arrival record leave the spool."""
        with contextlib.suppress(FileNotFoundError):
            claimed.unlink()
        for extra in (self.record_path(claimed), self._attempts_path(claimed)):
            with contextlib.suppress(FileNotFoundError):
                extra.unlink()

    def _attempts_path(self, instance: Path) -> Path:
        return self.incoming / (instance.name[: -len(SUFFIX)] + ATTEMPTS_SUFFIX)

    def count_attempt(self, claimed: Path) -> int:
        """Count one more take-up of a claimed instance and return the count (1 the first time). Kept beside the
        instance, so a worker that dies on a film (and the restarts that follow) cannot take it up without end. Not
        fsynced: it must survive the process, not the power."""
        path = self._attempts_path(claimed)
        try:
            n = int(path.read_text() or 0) + 1
        except (OSError, ValueError):
            n = 1
        with contextlib.suppress(OSError):
            write_durably(path, str(n).encode(), fsync=False, tmp_dir=self.tmp)
        return n

    def dead_letter_instance(self, claimed: Path, note: dict[str, object]) -> Path:
        """Move an instance the pipeline gave up on (and its arrival record) to ``dead-letter/pipeline/`` with a JSON
        note; ``filmgate resend`` puts it back into incoming/."""
        import json

        folder = self.dead_letter(PIPELINE_DEAD_LETTER)
        target = folder / claimed.name
        write_durably(target.with_suffix(RECORD_SUFFIX), (json.dumps(note) + "\n").encode(), fsync=self.fsync)
        os.replace(claimed, target)
        with contextlib.suppress(OSError):
            os.replace(self.record_path(claimed), folder / (claimed.name[: -len(SUFFIX)] + ".arrival.json"))
        with contextlib.suppress(FileNotFoundError):
            self._attempts_path(claimed).unlink()
        if self.fsync:
            fsync_dir(folder)
        return target

    def requeue(self, dead: Path) -> Path:
        """Put an instance from ``dead-letter/pipeline/`` (and its arrival record) back into incoming/, to be judged
        again with a fresh attempt count."""
        path = self.incoming / dead.name
        arrival = dead.with_name(dead.name[: -len(SUFFIX)] + ".arrival.json")
        with contextlib.suppress(FileNotFoundError):
            os.replace(arrival, self.record_path(path))
        os.replace(dead, path)
        if self.fsync:
            fsync_dir(self.incoming)
        self.arrived.set()
        return path

    def depth(self) -> dict[str, int]:
        return {
            "incoming": sum(1 for p in self.incoming.iterdir() if p.suffix == SUFFIX),
            "claimed": sum(1 for _ in self.claimed_root.rglob(f"*{SUFFIX}")),
        }

    # ------------------------------------------------------------------------------------------ DICOM outboxes

    def outbox(self, destination: str) -> Path:
        path = self.outbox_root / safe_component(destination)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dead_letter(self, destination: str) -> Path:
        path = self.dead_root / safe_component(destination)
        path.mkdir(parents=True, exist_ok=True)
        return path


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"

"""The durable spool: nothing is acknowledged before it is on disk, nothing on disk is forgotten.

Layout under the spool folder::

    tmp/        partial writes (removed at start, and while running once untouched for spool.stale_tmp_seconds)
    incoming/   acknowledged instances waiting for a worker
    claimed/<worker>/  instances a worker is processing (moved back to incoming/ at start, or when that worker dies)
    outbox/<destination>/       instances waiting for a DICOM destination
    dead-letter/<destination>/  instances a DICOM destination gave up on (with a .json saying why)

Every step is a rename inside one file system, which is atomic: an instance is always in exactly one place. Names
are ``<receive time ns><seq>_<calling AE in hex>_<SOP Instance UID>.dcm``, so the same UID received twice gives two
files (both processed, the destinations are idempotent), sorting by name is arrival order, and who sent it survives a
restart without touching the received bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
SUFFIX = ".dcm"


def safe_component(value: object, default: str = "unknown") -> str:
    """A value (a UID, an AE title) made safe as one path component."""
    text = _UNSAFE.sub("_", str(value or "").strip())[:128].strip(".")
    return text or default


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

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, worker: str = "w0") -> None:
        self.root = Path(root)
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

    # ------------------------------------------------------------------------------------------ receiving

    def new_name(self, sop_instance_uid: str, calling_ae: str = "") -> str:
        with self._lock:
            self._seq = (self._seq + 1) % 1000
            seq = self._seq
        ae = calling_ae.strip().encode("ascii", "replace").hex()
        return f"{time.time_ns():020d}{seq:03d}_{ae}_{safe_component(sop_instance_uid)}{SUFFIX}"

    def persist(self, data: bytes | Sequence[bytes], sop_instance_uid: str, calling_ae: str = "") -> Path:
        """Durably store one received instance in incoming/; returns its path. Raises OSError on failure."""
        path = self.incoming / self.new_name(sop_instance_uid, calling_ae)
        write_durably(path, data, fsync=self.fsync, tmp_dir=self.tmp)
        self.arrived.set()
        return path

    def adopt(self, src: Path, sop_instance_uid: str, calling_ae: str = "") -> Path:
        """Durably move a complete received file (written while it arrived, under tmp/) into incoming/."""
        path = self.incoming / self.new_name(sop_instance_uid, calling_ae)
        if self.fsync:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # data and size; the rename below is made durable by the folder's fsync
            finally:
                os.close(fd)
        try:
            os.replace(src, path)
        except OSError:  # another file system: copy durably instead
            write_durably(path, src.read_bytes(), fsync=self.fsync, tmp_dir=self.tmp)
            with contextlib.suppress(OSError):
                src.unlink()
        if self.fsync:
            fsync_dir(self.incoming)
        self.arrived.set()
        return path

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
        """The instance was delivered everywhere it had to go."""
        with contextlib.suppress(FileNotFoundError):
            claimed.unlink()

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


def received_at(name: str) -> float:
    """The receive time (epoch seconds) encoded in a spool file name."""
    try:
        return int(name[:20]) / 1e9
    except ValueError:
        return time.time()


def calling_ae_of(name: str) -> str:
    """The calling AE title encoded in a spool file name ('' when absent)."""
    parts = name.split("_", 2)
    try:
        return bytes.fromhex(parts[1]).decode("ascii", "replace") if len(parts) == 3 else ""
    except ValueError:
        return ""


def uid_of(name: str) -> str:
    """The (sanitised) SOP Instance UID in a spool file name."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    return stem.split("_", 2)[-1]

"""The files incoming datasets are written to while they arrive, and what a full disk means for them.

pynetdicom writes each incoming C-STORE dataset to a file as its fragments arrive (see :mod:`filmgate.patches`); this
module makes those files. A full spool must be an answer (0xA700, out of resources), not an aborted association and a
partial file left behind, so a :class:`ReceiveFile` never lets a write error escape into pynetdicom: when the spool is
already below its reserve as a dataset starts, no file is created at all; when a write fails while it arrives (the disk
filled up meanwhile), the partial file is removed at once. In both cases the rest of the dataset is read off the
network and dropped (bounded memory: nothing is kept), and the C-STORE handler, which finds the failure with
:meth:`ReceiveFiles.take`, answers 0xA700. The sender keeps its copy and retries; nothing acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filmgate.runtime import libc

log = logging.getLogger("filmgate.receive")

# Written bytes are handed to the disk in steps of this size while a dataset arrives, so the fdatasync before the
# acknowledgement waits for the last step only instead of the whole film (about 8 ms for a 10 MB film here).
WRITEBACK_STEP = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait


def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """libc's ``sync_file_range`` (Linux; Python's os module lacks it), or None where it does not exist."""
    fn = getattr(libc(), "sync_file_range", None)
    if fn is None:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return lambda fd, offset, length: fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_start_writeback = _writeback_starter()


class ReceiveFile:
    """One dataset's file under ``spool/tmp``; the file-like object pynetdicom writes to (``write``, ``file.flush``,
    ``close``, ``name``). Write errors are recorded in :attr:`error`, never raised."""

    def __init__(self, folder: Path, suffix: str, refused: str | None, writeback_step: int = 0) -> None:
        self.error: str | None = refused
        # Start the disk's writeback every ``writeback_step`` bytes (0: never; the fdatasync at the end does it all).
        self._step = writeback_step if _start_writeback is not None else 0
        self.owner = threading.current_thread()  # the connection's reactor thread, to clean up after an abort
        self.file = self
        self._fh: Any = None
        self._written = 0  # bytes handed to the file
        self._kicked = 0  # bytes whose writeback has been started
        if refused is None:
            try:
                fd, name = tempfile.mkstemp(dir=folder, suffix=suffix)
                self._fh = os.fdopen(fd, "wb")
            except OSError as exc:
                self.error = f"cannot create a file in {folder} ({exc.strerror})"
                name = str(folder / f"unwritten{suffix}")
        else:
            name = str(folder / f"refused-{id(self):x}{suffix}")  # never created
        self.name = name

    @property
    def failed(self) -> bool:
        return self.error is not None

    def write(self, data: bytes) -> int:
        if self._fh is not None:
            try:
                self._fh.write(data)
                self._written += len(data)
                if self._step and self._written - self._kicked >= self._step:
                    self._fh.flush()
                    _start_writeback(self._fh.fileno(), self._kicked, self._written - self._kicked)  # type: ignore[misc]
                    self._kicked = self._written
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                self._fh = None
                self._fail(exc)

    def discard(self) -> None:
        """Close and remove the file (an aborted transfer, or a failure)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def _fail(self, exc: OSError) -> None:
        self.error = f"writing {self.name} failed ({exc.strerror or exc})"
        self.discard()


class ReceiveFiles:
    """Makes the :class:`ReceiveFile` of each incoming dataset and keeps it until the C-STORE handler takes it.

    ``space_problem()`` is asked before each dataset: a sentence when the spool is below its reserve, else None.
    ``on_full(sentence)`` is told when a dataset is refused for lack of space (the listener logs and counts).
    """

    def __init__(
        self, folder: Path, space_problem: Callable[[], str | None], *, early_writeback: bool = False
    ) -> None:
        self.folder = folder
        self.writeback_step = WRITEBACK_STEP if early_writeback else 0
        self.space_problem = space_problem
        self._lock = threading.Lock()
        self._open: dict[str, ReceiveFile] = {}

    @classmethod
    def for_spool(cls, spool: Any) -> ReceiveFiles:
        """The files of a :class:`filmgate.spool.Spool`'s ``tmp/``: its free-space check, and the early writeback
        when the spool syncs at all (``spool.fsync`` and ``spool.early_writeback``)."""
        return cls(spool.tmp, spool.space_problem, early_writeback=spool.fsync and spool.early_writeback)

    def __call__(self, suffix: str = ".dcm") -> ReceiveFile:
        f = ReceiveFile(self.folder, suffix, self.space_problem(), self.writeback_step)
        with self._lock:
            self._open[f.name] = f
        return f

    def take(self, path: str | os.PathLike[str]) -> ReceiveFile | None:
        """The file a C-STORE handler got as ``event.dataset_path``, no longer tracked here."""
        with self._lock:
            return self._open.pop(str(path), None)

    def drop_owned_by(self, thread: threading.Thread) -> int:
        """Remove the files of datasets a closed connection did not finish (its handler never ran)."""
        with self._lock:
            mine = [name for name, f in self._open.items() if f.owner is thread]
            files = [self._open.pop(name) for name in mine]
        for f in files:
            f.discard()
        return len(files)

    def __len__(self) -> int:
        return len(self._open)

"""Process setup shared by every entry point (``filmgate serve``, ``inspect``, the worker processes, the training
CLI): logging, pydicom's reading mode and warning filters. One module so that a child process is set up exactly like
its parent and nothing imports the CLI to get it (that made the import cycle cli -> app -> worker -> cli).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
import sys
import threading
import time
import warnings

# Libraries whose log lines hostile input can repeat without end (pynetdicom logs an ERROR for every 6 garbage bytes
# a peer sends after an invalid PDU; pydicom's decoders one per broken frame).
# filmgate.patches is here for its line per refused PDU (a PDU-length bomb per connection; the metric counts each).
NOISY_LIBRARIES = ("pynetdicom", "pydicom", "filmgate.patches")
_NUMBERS = re.compile(r"0x[0-9A-Fa-f]+|\d+")  # pynetdicom formats its messages itself: '0xC4', '6 of 543260520 bytes'


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``. Below DEBUG, pynetdicom and pydicom are kept quiet (they log UIDs and values, and
    warn about every odd element of hostile input) and pydicom reads without validating: the gate judges what was
    sent, it does not reject a film for a value pydicom finds unusual."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level.upper() != "DEBUG":
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, LibraryLogThrottle) for f in handler.filters):
                handler.addFilter(LibraryLogThrottle())
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        import pydicom.config

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        warnings.filterwarnings("ignore", module=r"pynetdicom(\.|$)")


class LibraryLogThrottle(logging.Filter):
    """Lets one line of each kind (logger and message template) from :data:`NOISY_LIBRARIES` through per
    ``interval`` seconds; the next one that passes says how many were held back. A peer that streams garbage must not
    fill the disk with logs (the node's own lines are throttled where they are made)."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(NOISY_LIBRARIES):
            return True
        kind = (record.name, _NUMBERS.sub("#", str(record.msg)))
        now = time.monotonic()
        with self._lock:
            if len(self._last) > 10_000:  # kinds are few, but an exception's text can vary without end
                self._last.clear()
                self._held.clear()
            if now - self._last.get(kind, -1e18) < self.interval:
                self._held[kind] = self._held.get(kind, 0) + 1
                return False
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.interval:g} s)"
        return True


def single_threaded_native() -> None:
    """For a worker process: parallelism comes from the decode threads; OpenCV's own pool only oversubscribes the
    cores."""
    import cv2

    cv2.setNumThreads(1)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library, for the few calls Python's os module lacks (sync_file_range, prctl, mallopt); None where it
    cannot be loaded. Loaded once, shared by every caller."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic threshold: bigger blocks still come from and go to mmap
KEEP_HEAP_TRIM_THRESHOLD = 128 << 20


def keep_heap() -> bool:
    """For the decode child: keep freed film-sized blocks (up to 32 MiB each) in the heap for the next film.

    Each decode allocates and frees a few blocks of a film's size (the codestream, the decoded frame). glibc serves
    such blocks with fresh mmaps, or trims them off the heap once freed, so the next film page-faults the same
    megabytes in again (``bench/decode --child``, the mixed load's four syntaxes at DX size in turn: 2468 faults
    and 16.4 ms per uncompressed film without, none and 10.5 ms with; 10% less decode CPU over the four). With the
    thresholds fixed the child keeps at most ``KEEP_HEAP_TRIM_THRESHOLD`` of free heap; blocks over 32 MiB are
    mapped and unmapped as before. Returns False where the C library has no ``mallopt`` (not glibc)."""
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_HEAP_TRIM_THRESHOLD)
    )

"""Process setup shared by every entry point (``filmgate serve``, ``inspect``, the worker processes, the training
CLI): logging, pydicom's reading mode and warning filters. One module so that a child process is set up exactly like
its parent and nothing imports the CLI to get it (that made the import cycle cli -> app -> worker -> cli).
"""

from __future__ import annotations

import logging
import sys
import warnings


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
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        import pydicom.config

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        warnings.filterwarnings("ignore", module=r"pynetdicom(\.|$)")


def single_threaded_native() -> None:
    """For a worker process: parallelism comes from the decode threads; OpenCV's own pool only oversubscribes the
    cores."""
    import cv2

    cv2.setNumThreads(1)

"""The workers in their own process, so that receiving (Python-heavy, in the listener's process) and decoding and
inference do not take turns on one interpreter lock. The spool is the hand-off: the listener's process persists into
``incoming/``, this process claims by atomic rename, exactly as threads would.

The parent starts it (spawn: a fresh interpreter, safe whatever threads the parent runs) after spool recovery and
before the listener, waits until its detectors are loaded, asks it for metric snapshots on every scrape, and on
shutdown sets ``stop``: the child then finishes or hands back what it holds and exits. The child dies with its parent
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the node never leaves an orphan worker claiming files behind a
restarted node.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

from filmgate import metrics
from filmgate.config import Config
from filmgate.sandbox import die_with_parent

log = logging.getLogger("filmgate.worker")


class WorkerProcess:
    """The parent's handle on the worker process."""

    def __init__(self, cfg: Config, index: int = 0) -> None:
        self.cfg = cfg
        self.index = index
        self.name = f"w{index}"
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._last: metrics.Snapshot = []
        self.proc: Any = None

    def start(self, timeout: float = 300.0) -> None:
        # Fresh IPC objects for every child: a child killed while waiting on an Event or a Queue leaves their locks
        # in a state where the next set()/get() would block forever.
        self.stop_event = self._ctx.Event()
        self.ready_event = self._ctx.Event()
        # The doorbell: one byte per stored instance wakes the child's claimer at once (no data travels: what the
        # listener knew of an instance is in its record in the spool). Never blocks the listener: a full pipe
        # already holds a ring.
        bell_reader, self._bell = self._ctx.Pipe(duplex=False)
        os.set_blocking(self._bell.fileno(), False)
        self._conn, child_conn = self._ctx.Pipe()
        self.proc = self._ctx.Process(
            target=_child_main,
            args=(self.cfg, self.index, self.stop_event, self.ready_event, bell_reader, child_conn, os.getpid()),
            name=f"filmgate-worker-{self.index}",
            daemon=False,
        )
        self.proc.start()
        child_conn.close()
        bell_reader.close()
        deadline = time.monotonic() + timeout
        while not self.ready_event.wait(0.1):
            if not self.proc.is_alive():
                raise RuntimeError(f"the worker process failed to start (exit code {self.proc.exitcode}); see the log")
            if time.monotonic() > deadline:
                raise RuntimeError("the worker process did not get ready in time")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def ring(self) -> None:
        """Tell the worker that an instance arrived in the spool (it would find it at its next poll anyway)."""
        with contextlib.suppress(AttributeError, ValueError, OSError):  # OSError: full (BlockingIOError) or closed
            self._bell.send_bytes(b"\x01")

    def snapshot(self, timeout: float = 2.0) -> metrics.Snapshot:
        """The worker's current metrics (the last ones received when it does not answer in time)."""
        with self._lock:
            if not self.alive():
                return self._last
            try:
                while self._conn.poll():  # a late answer to an earlier request
                    self._last = self._conn.recv()
                self._conn.send("snapshot")
                if self._conn.poll(timeout):
                    self._last = self._conn.recv()
            except (EOFError, OSError):
                pass
            return self._last

    def request_stop(self) -> None:
        if self.proc is not None:
            self.snapshot()
            self.stop_event.set()

    def stop(self, timeout: float) -> bool:
        """Ask the worker to drain and exit; True when it exited in time."""
        if self.proc is None:
            return True
        self.request_stop()
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.error("the worker did not stop within %.0f s; terminating it", timeout)
            self.proc.kill()
            self.proc.join(5)
            return False
        return self.proc.exitcode == 0


def _child_main(cfg: Config, index: int, stop: Any, ready: Any, bell: Any, conn: Any, parent: int) -> None:
    die_with_parent(parent)
    from filmgate import patches

    patches.install()  # a spawned interpreter: the parent's patches are not inherited
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent coordinates the shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal's hang-up reaches the whole group: the parent stops us
    with contextlib.suppress(OSError):
        # Receiving is a serial chain (the sender waits for each response); give it the CPU first. The workers
        # catch up from the durable spool, so a burst costs latency, not acknowledgements.
        os.nice(cfg.workers.nice)
    from filmgate.runtime import setup_logging, single_threaded_native

    setup_logging(cfg.logging.level)
    single_threaded_native()
    from filmgate.assembly import build_pipeline
    from filmgate.spool import Spool

    try:
        spool = Spool(cfg.spool.path, fsync=cfg.spool.fsync, worker=f"w{index}")
        # One process forwards each outbox, or instances would be sent twice.
        pipeline = build_pipeline(cfg, spool, forward=index == 0)
    except Exception:
        log.exception("worker start failed")
        os._exit(3)
    destinations = pipeline.destinations
    pipeline.start()

    def serve_metrics() -> None:
        while True:
            try:
                conn.recv()
                conn.send(metrics.snapshot())
            except (EOFError, OSError):
                return

    def answer_doorbell() -> None:
        while True:
            try:
                bell.recv_bytes()
                while bell.poll():  # many rings, one wake
                    bell.recv_bytes()
            except (EOFError, OSError):
                return
            spool.arrived.set()  # wake the claimer now rather than at its next poll

    threading.Thread(target=serve_metrics, name="metrics", daemon=True).start()
    threading.Thread(target=answer_doorbell, name="doorbell", daemon=True).start()
    ready.set()
    while not stop.wait(0.5):
        pass
    drained = pipeline.stop(cfg.workers.drain_timeout)
    for dest in destinations.values():
        dest.stop(5.0)
    log.info("worker %d stopped (%s)", index, "drained" if drained else "rest handed back")
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)

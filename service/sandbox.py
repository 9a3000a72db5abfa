"""Decoding where a crash or a runaway costs one film, not the node: a supervised pool of decode child processes.

Decoders are native code fed by strangers: a bad RLE film makes pylibjpeg-rle panic (a ``BaseException`` that passes
``except Exception``), a codestream that lies about its size makes a decoder allocate gigabytes, a corrupt stream
can loop or crash the interpreter. :func:`filmgate.judge.decode_film` therefore runs in a child process limited to
``limits.decode_memory_bytes`` of address space (``RLIMIT_AS``), and the parent waits at most
``limits.decode_timeout`` seconds for its answer. A child that dies or does not answer is killed and started again;
its film gets an error (quarantined ``undecodable`` with a note saying what happened) and the next film is decoded by
the fresh child. The children die with their parent (``PR_SET_PDEATHSIG``).

Only paths (or, for callers without a file, the bytes) go to the child and only the decoded grey image (at most the
detectors' 512 px) comes back, so the pipe costs little next to the decode.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

from filmgate import metrics
from filmgate.config import LimitsConfig
from filmgate.runtime import libc

log = logging.getLogger("filmgate.sandbox")
STARTUP_TIMEOUT = 120.0  # seconds for a fresh child to import its libraries (a loaded 2-core machine)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (no orphan keeps working behind a restarted node)."""
    prctl = getattr(libc(), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class DecodeSandbox:
    """``size`` decode children shared by the threads that call :meth:`decode` (a :class:`filmgate.judge.Decoder`)."""

    def __init__(self, limits: LimitsConfig, size: int = 1, log_level: str = "INFO",
                 start_method: str = "spawn") -> None:  # fmt: skip
        """``start_method``: "spawn" (a fresh interpreter: the node's callers run threads, onnxruntime's among them),
        or "fork" for a single-threaded caller that has its imports done and no models loaded yet (the sweep's
        workers): the child then starts in milliseconds instead of importing everything again."""
        self.limits = limits
        ctx = mp.get_context(start_method)
        self._children: list[_Child] = [_Child(ctx, limits, log_level) for _ in range(max(1, size))]
        self._free: queue.Queue[_Child] = queue.Queue()
        for child in self._children:
            child.start()
            self._free.put(child)

    def decode(self, source: Path | bytes, *, suffix: str | None = None) -> Any:
        child = self._free.get()
        try:
            return child.decode(source, suffix)
        finally:
            self._free.put(child)

    def close(self) -> None:
        for child in self._children:
            child.stop()


class _Child:
    def __init__(self, ctx: Any, limits: LimitsConfig, log_level: str) -> None:
        self.ctx, self.limits, self.log_level = ctx, limits, log_level
        self.proc: Any = None
        self.conn: Any = None

    def start(self) -> None:
        self.conn, child_conn = self.ctx.Pipe()
        self.proc = self.ctx.Process(
            target=_child_main, args=(child_conn, self.limits, os.getpid(), self.log_level),
            name="filmgate-decode", daemon=True,
        )  # fmt: skip
        self.proc.start()
        child_conn.close()
        # Wait until its imports are done, so that limits.decode_timeout measures decoding, not starting.
        try:
            ready = self.conn.poll(STARTUP_TIMEOUT) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            raise RuntimeError(f"the decode process did not start within {STARTUP_TIMEOUT:g} s (see the log)")

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        with contextlib.suppress(OSError):
            self.conn.close()

    def _restart(self, cause: str) -> None:
        metrics.DECODE_RESTARTS.labels(cause=cause).inc()
        self.stop()
        self.start()

    def decode(self, source: Path | bytes, suffix: str | None) -> Any:
        from filmgate.judge import failed

        if not self.proc.is_alive():
            self._restart("crash")
        t0 = time.perf_counter()
        try:
            self.conn.send((source, suffix))
            answered = self.conn.poll(self.limits.decode_timeout)
            if answered:
                return self.conn.recv()
            why = f"the decoder did not finish within limits.decode_timeout ({self.limits.decode_timeout:g} s)"
            cause = "timeout"
        except (EOFError, OSError):  # the child died while decoding
            self.proc.join(5)
            code = self.proc.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            why = f"the decoder crashed ({how}; limits.decode_memory_bytes is {self.limits.decode_memory_bytes})"
            cause = "crash"
        log.error("%s; the decode process was restarted and the film is quarantined as undecodable", why)
        self._restart(cause)
        ex = failed(why)
        ex.timings["decode"] = time.perf_counter() - t0
        return ex


def _child_main(conn: Any, limits: LimitsConfig, parent: int, log_level: str) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates the shutdown
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import resource

    from filmgate.runtime import keep_heap, setup_logging, single_threaded_native

    setup_logging(log_level)
    single_threaded_native()
    keep_heap()
    from filmgate.judge import decode_film, failed

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limits.decode_memory_bytes if hard == resource.RLIM_INFINITY else min(hard, limits.decode_memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    conn.send("ready")
    while True:
        try:
            source, suffix = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            ex = decode_film(source, suffix=suffix, limits=limits)
        except BaseException as exc:  # noqa: BLE001 - a decoder panic (pyo3 PanicException) is a bad film, not an exit
            ex = failed(f"{type(exc).__name__}: {exc}")
        try:
            conn.send(ex)
        except BaseException:  # noqa: BLE001 - cannot even answer (memory): die, the parent restarts us
            os._exit(70)

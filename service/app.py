"""The node's life cycle: start every part in order, serve, and shut down gracefully on SIGTERM.

Start: spool recovery (instances claimed by a run that died go back to incoming), the workers (in a child process by
default: detectors, destinations, pipeline), HTTP, and the listener last; only then is the node ready. A worker
process that dies is restarted after its claimed instances are handed back. SIGTERM (or SIGINT, SIGHUP): readiness goes
false, the listening socket closes, associations in progress get a grace period, workers finish what they hold
within ``workers.drain_timeout`` and hand back the rest, forwarders stop after their current attempt, exit 0.
Nothing acknowledged is lost whatever the timing: it is in the spool or at a destination.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from typing import Any

from filmgate import metrics
from filmgate.config import Config
from filmgate.http import HttpServer
from filmgate.listener import Listener
from filmgate.spool import Spool

log = logging.getLogger("filmgate")


class Node:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ready = False
        self._stop = threading.Event()
        self._signal: int | None = None  # the signal that asked for the stop
        self.http: HttpServer | None = None
        self.listener: Listener | None = None
        self.workers: list[Any] = []  # WorkerProcess; empty in thread mode
        self.pipeline: Any = None  # Pipeline in thread mode
        self.destinations: dict = {}
        self.spool: Spool | None = None
        self.studies: Any = None  # StudyWatcher: summaries of stable studies, rejection notes
        self.review: Any = None  # filmgate.review.setup.ReviewSide

    def _set_ready(self, value: bool) -> None:
        self.ready = value
        metrics.READY.set(1 if value else 0)

    def start(self) -> None:
        cfg = self.cfg
        self._set_ready(False)
        self.spool = spool = Spool(
            cfg.spool.path,
            fsync=cfg.spool.fsync,
            min_free_bytes=cfg.spool.min_free_bytes,
            min_free_percent=cfg.spool.min_free_percent,
            early_writeback=cfg.spool.early_writeback,
        )
        recovered = spool.recover()
        if recovered:
            log.info("recovered %d instances claimed by the previous run", recovered)
        from filmgate.review.setup import ReviewSide

        self.review = ReviewSide(cfg, spool)
        self.review.reconcile()  # before any worker moves a file: the index agrees with the spool again
        if cfg.workers.processes:
            from filmgate.worker import WorkerProcess

            self.workers = [WorkerProcess(cfg, i) for i in range(cfg.workers.processes)]
            for worker in self.workers:
                worker.start()

            def ring_workers() -> None:  # wake the workers' claimers now rather than at their next poll
                for worker in self.workers:
                    worker.ring()

            on_stored: Callable[[], None] | None = ring_workers
        else:
            self._start_threads(spool)
            on_stored = None  # the pipeline shares this process's spool, whose adopt() wakes its claimer
        if cfg.http.enabled:
            console = self.review.app(self.destinations)
            self.http = HttpServer(cfg.http.host, cfg.http.port, self._is_ready, self._metrics, app=console,
                                   public=cfg.http.public, tls=cfg.http.tls, max_connections=cfg.http.max_connections,
                                   request_timeout=cfg.http.request_timeout)  # fmt: skip
            self.http.start()
            scheme = "https" if cfg.http.tls.enabled else "http"
            log.info("metrics and health on %s://%s:%d/metrics%s", scheme, cfg.http.host, self.http.port,
                     ", review console at /" if console else "")  # fmt: skip
        if cfg.studies.enabled:
            from filmgate.followup import StudyWatcher, tracker_for

            tracker = tracker_for(cfg, spool)
            assert tracker is not None
            self.studies = StudyWatcher(cfg, spool, tracker, recorder=self.review.recorder)
        self.listener = Listener(cfg.listener, spool, on_stored, self.review.recorder,
                                 max_pdu=cfg.limits.max_pdu_bytes)  # fmt: skip
        self.listener.start()
        self._set_ready(True)
        log.info("ready (config %s)", cfg.source)

    def _is_ready(self) -> bool:
        """Ready: started, not draining, and the spool above its reserve (a full node must not get new senders)."""
        return self.ready and self.listener is not None and self.listener.space_ok()

    def _start_threads(self, spool: Spool) -> None:
        from filmgate.assembly import build_pipeline

        self.pipeline = build_pipeline(self.cfg, spool, forward=True)
        self.destinations = self.pipeline.destinations
        self.pipeline.start()

    def _metrics(self) -> bytes:
        metrics.READY.set(1 if self._is_ready() else 0)
        if self.review is not None:
            self.review.refresh_metrics()
        return metrics.render([w.snapshot() for w in self.workers])

    def request_stop(self, signum: int | None = None, *_: object) -> None:
        """The signal handler (SIGTERM, SIGINT, SIGHUP): only notes the signal; the main thread logs and stops."""
        self._signal = signum
        self._stop.set()

    def wait(self) -> None:
        max_age = self.cfg.spool.stale_tmp_seconds
        next_sweep = time.monotonic() + min(60.0, max_age / 4)
        while not self._stop.wait(0.5):
            for worker in self.workers:
                if not worker.alive():
                    self._restart_worker(worker)
            if self.studies is not None:
                self.studies.tick()
            if time.monotonic() >= next_sweep and self.spool is not None:
                next_sweep = time.monotonic() + min(60.0, max_age / 4)
                removed = self.spool.sweep_tmp(max_age)
                if removed:
                    log.info("removed %d partial file(s) of aborted transfers from the spool's tmp/", removed)
            if self.review is not None:
                self.review.sweep()

    def _restart_worker(self, worker: Any) -> None:
        log.error("the worker process %s died (exit code %s); restarting it", worker.name, worker.proc.exitcode)
        assert self.spool is not None
        self.spool.release_all(worker.name)  # what it held goes back to incoming/
        try:
            worker.start()
        except RuntimeError as exc:
            log.error("%s; retrying in 5 s", exc)
            time.sleep(5)

    def shutdown(self) -> None:
        t0 = time.monotonic()
        if self._signal == signal.SIGHUP:  # a closed terminal, or a "reload" out of habit: there is none
            log.info("SIGHUP: stopping as for SIGTERM; the configuration is read once, at start, so start the node "
                     "again to apply a change")  # fmt: skip
        log.info("stopping: no new associations, draining work in flight")
        self._set_ready(False)
        drain = self.cfg.workers.drain_timeout
        if self.listener:
            self.listener.stop_accepting()
            self.listener.wait_idle(min(drain, 10.0))
        drained = True
        if self.workers:
            for worker in self.workers:
                worker.request_stop()
            for worker in self.workers:
                drained &= worker.stop(max(0.0, drain - (time.monotonic() - t0)) + 10.0)
            if self.spool is not None:
                for worker in self.workers:
                    self.spool.release_all(worker.name)  # only if a worker had to be killed
        if self.pipeline is not None:
            drained = self.pipeline.stop(max(0.0, drain - (time.monotonic() - t0)))
        for dest in self.destinations.values():
            dest.stop(5.0)
        log.info("stopped in %.1f s (%s)", time.monotonic() - t0, "drained" if drained else "rest handed back")
        if self.http:
            self.http.stop()
        for handler in logging.getLogger().handlers:
            handler.flush()


def serve(cfg: Config) -> int:
    node = Node(cfg)
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    # By default SIGHUP killed the node on the spot, undrained. A terminal's hang-up reaches the whole process group:
    # the workers and decode children ignore it themselves; multiprocessing's resource tracker, which only ignores
    # SIGINT and SIGTERM, inherits the ignoring when it is started now, before anything spawns.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    resource_tracker.ensure_running()
    signal.signal(signal.SIGHUP, node.request_stop)
    try:
        node.start()
    except BaseException:
        for worker in node.workers:  # a port in use after the workers started: do not leave them behind
            worker.stop(10.0)
        raise
    node.wait()
    node.shutdown()
    return 0

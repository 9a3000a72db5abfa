"""The node's life cycle: start every part in order, serve, and shut down gracefully on SIGTERM.

Start: spool recovery (instances claimed by a run that died go back to incoming), detectors, destinations,
workers, HTTP, and the listener last; only then is the node ready. SIGTERM (or SIGINT): readiness goes false, the
listening socket closes, associations in progress get a grace period, workers finish what they hold within
``workers.drain_timeout`` and hand back the rest, forwarders stop after their current attempt, exit 0. Nothing
acknowledged is lost whatever the timing: it is in the spool or at a destination.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from service import metrics
from service.config import Config
from service.destinations import build as build_destinations
from service.detectors import DetectorSet
from service.http import HttpServer
from service.listener import Listener
from service.pipeline import Pipeline
from service.spool import Spool

log = logging.getLogger("filmgate")


class Node:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ready = False
        self._stop = threading.Event()
        self.http: HttpServer | None = None
        self.listener: Listener | None = None
        self.pipeline: Pipeline | None = None
        self.destinations: dict = {}

    def _set_ready(self, value: bool) -> None:
        self.ready = value
        metrics.READY.set(1 if value else 0)

    def start(self) -> None:
        cfg = self.cfg
        self._set_ready(False)
        if cfg.http.enabled:
            self.http = HttpServer(cfg.http.host, cfg.http.port, lambda: self.ready)
            self.http.start()
            log.info("metrics and health on http://%s:%d/metrics", cfg.http.host, self.http.port)
        spool = Spool(cfg.spool.path, fsync=cfg.spool.fsync)
        recovered = spool.recover()
        if recovered:
            log.info("recovered %d instances claimed by the previous run", recovered)
        detectors = DetectorSet.load(cfg.detectors)
        self.destinations = build_destinations(cfg.destinations, spool)
        for dest in self.destinations.values():
            dest.start()
        store_times: dict[str, float] = {}
        self.pipeline = Pipeline(cfg, spool, detectors, self.destinations, store_times)
        self.pipeline.start()
        self.listener = Listener(cfg.listener, spool, store_times)
        self.listener.start()
        self._set_ready(True)
        log.info("ready (config %s)", cfg.source)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def shutdown(self) -> None:
        t0 = time.monotonic()
        log.info("stopping: no new associations, draining work in flight")
        self._set_ready(False)
        drain = self.cfg.workers.drain_timeout
        if self.listener:
            self.listener.stop_accepting()
            self.listener.wait_idle(min(drain, 10.0))
        drained = True
        if self.pipeline:
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
    node.start()
    node.wait()
    node.shutdown()
    return 0

"""The one assembly of the node's work: judge, destinations and pipeline over a spool, for thread mode
(``workers.processes: 0``, in the node's process) and for each worker process alike."""

from __future__ import annotations

from filmgate.config import Config
from filmgate.destinations import build as build_destinations
from filmgate.judge import Judge
from filmgate.pipeline import Pipeline
from filmgate.spool import Spool


def build_pipeline(
    cfg: Config, spool: Spool, *, forward: bool, store_times: dict[str, float] | None = None
) -> Pipeline:
    """Load the judge (an error when no detector loads and ``detectors.require``), build the destinations, and
    return the pipeline, not started. ``forward`` starts the DICOM destinations' forwarders: exactly one pipeline of
    a node forwards each outbox, or instances would be sent twice."""
    judge = Judge.load(cfg)
    destinations = build_destinations(cfg.destinations, spool)
    if forward:
        for dest in destinations.values():
            dest.start()
    return Pipeline(cfg, spool, judge, destinations, store_times)

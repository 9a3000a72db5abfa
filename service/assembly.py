"""The one assembly of the node's work: judge, destinations and pipeline over a spool, for thread mode
(``workers.processes: 0``, in the node's process) and for each worker process alike."""

from __future__ import annotations

from filmgate.config import Config
from filmgate.destinations import build as build_destinations
from filmgate.followup import Aftercare, tracker_for
from filmgate.judge import Judge
from filmgate.pipeline import Pipeline
from filmgate.records import Recorder
from filmgate.sandbox import DecodeSandbox
from filmgate.spool import Spool


def build_pipeline(cfg: Config, spool: Spool, *, forward: bool) -> Pipeline:
    """Load the judge (an error when no detector loads and ``detectors.require``), build the destinations, and
    return the pipeline, not started. ``forward`` starts the DICOM destinations' forwarders: exactly one pipeline of
    a node forwards each outbox, or instances would be sent twice."""
    decoder = None
    if cfg.limits.decode_isolation:  # a crash or a runaway in a decoder costs one film, not this process
        decoder = DecodeSandbox(cfg.limits, size=cfg.workers.decode_threads, log_level=cfg.logging.level)
    judge = Judge.load(cfg, decoder=decoder)
    recorder = Recorder.for_config(cfg)
    destinations = build_destinations(cfg.destinations, spool, recorder)
    if forward:
        for dest in destinations.values():
            dest.start()
    aftercare = None
    if cfg.correct.enabled or cfg.studies.enabled:
        aftercare = Aftercare(cfg, spool, judge, tracker_for(cfg, spool))
    return Pipeline(cfg, spool, judge, destinations, aftercare, recorder)

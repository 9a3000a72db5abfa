"""The node's review side, assembled in the node's own process: the recorder the listener uses, the index reconciled
with the spool at start, the console app (with destinations of its own to release to; their forwarders are the
workers'), the review gauges and the retention sweeps."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from filmgate import metrics
from filmgate.config import Config, DicomDestinationConfig
from filmgate.manifest import MANIFEST_NAME, resolve_models_dir
from filmgate.policy import known_reasons
from filmgate.records import Recorder
from filmgate.spool import Spool

log = logging.getLogger("filmgate.review")


def detector_labels(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Each installed detector's classes (a score detector: not-<reason> and <reason>), from the manifests only."""
    out: dict[str, tuple[str, ...]] = {}
    folder = resolve_models_dir(cfg.detectors.models_dir)
    for path in sorted(Path(folder).glob(f"*/{MANIFEST_NAME}")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            m = json.loads(path.read_text())
            if m["name"] in cfg.detectors.disabled:
                continue
            labels = tuple(m.get("labels") or ()) or (f"not-{m['reason']}", m["reason"])
            out[m["name"]] = labels
    return out


def dicom_folders(cfg: Config, spool: Spool) -> list[tuple[str, Path, Path]]:
    return [
        (d.name, spool.outbox(d.name), Path(d.dead_letter) if d.dead_letter else spool.dead_letter(d.name))
        for d in cfg.destinations
        if isinstance(d, DicomDestinationConfig)
    ]


class ReviewSide:
    def __init__(self, cfg: Config, spool: Spool) -> None:
        self.cfg = cfg
        self.spool = spool
        self.recorder = Recorder.for_config(cfg)
        self.index = self.recorder.index
        self.labels = detector_labels(cfg)
        self._reasons = known_reasons(cfg.policy, [f"{r}" for r in _manifest_reasons(cfg)])
        metrics.SHADOW_MODE.set(1 if cfg.policy.mode == "shadow" else 0)
        for route in ("accept", "quarantine"):
            metrics.ROUTED.labels(route=route)
        self._next_sweep = 0.0

    def reconcile(self) -> None:
        if self.index is None:
            return
        fixed = self.index.reconcile(self.spool, dicom_folders(self.cfg, self.spool))
        if any(fixed.values()):
            log.info("decision index reconciled with the spool: %s", fixed)
        self.sweep(force=True)

    def app(self, destinations: dict[str, Any] | None) -> Any:
        """The console (None unless review.enabled). ``destinations``: thread mode's own; else built here."""
        if not self.cfg.review.enabled or self.index is None:
            return None
        from filmgate.destinations import build as build_destinations
        from filmgate.judge import Judge
        from filmgate.review.app import ReviewApp

        dests = destinations if destinations else build_destinations(self.cfg.destinations, self.spool, self.recorder)
        judge = Judge.load(self.cfg, metadata_only=True)  # the judge's decode, for thumbnails made again
        return ReviewApp(self.cfg, self.index, self.recorder, dests, self.labels, examine=judge.examine)

    def refresh_metrics(self) -> None:
        if self.index is None:
            return
        with contextlib.suppress(Exception):
            metrics.set_review_counts(self.index.review_counts(), self._reasons)

    def sweep(self, force: bool = False) -> None:
        """Retention: kept bytes after review.retention_days, index rows after index.retention_days."""
        now = time.time()
        if self.index is None or (not force and now < self._next_sweep):
            return
        self._next_sweep = now + 600.0
        try:
            gone = self.index.expire_kept(now - self.cfg.review.retention_days * 86400)
            for kept in gone:
                with contextlib.suppress(FileNotFoundError):
                    Path(kept).unlink()
            oldest = time.strftime("%Y%m%d", time.gmtime(now - self.cfg.review.retention_days * 86400))
            for day in (self.recorder.kept_root.iterdir() if self.recorder.kept_root.is_dir() else ()):
                if day.name < oldest:  # copies the index lost track of (a failed write) go with their day too
                    for p in day.iterdir():
                        with contextlib.suppress(OSError):
                            p.unlink()
                with contextlib.suppress(OSError):
                    day.rmdir()  # empty day folders only
            pruned = self.index.prune(self.cfg.index.retention_days, now)
            if gone or pruned:
                log.info("retention: %d kept instance(s) removed, %d index row(s) pruned", len(gone), pruned)
        except Exception as exc:
            log.error("retention sweep failed (%s)", exc)


def _manifest_reasons(cfg: Config) -> list[str]:
    folder = resolve_models_dir(cfg.detectors.models_dir)
    out = []
    for path in sorted(Path(folder).glob(f"*/{MANIFEST_NAME}")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            out.append(json.loads(path.read_text())["reason"])
    return out

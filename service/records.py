"""What the node says about each instance, to the decision index and the audit trail, in one place.

Every process of the node makes one :class:`Recorder` from the configuration. The listener calls
:meth:`Recorder.association` and :meth:`Recorder.stored`; the pipeline calls :meth:`Recorder.judged` once per decided
instance (before delivery), destinations call :meth:`Recorder.delivery` for their own state, and the pipeline
:meth:`Recorder.delivered` when every destination of the route has the instance (before the spool lets it go).

A recorder never raises: the spool is the source of truth, a failing index or audit file is logged and counted
(``filmgate_index_errors``), and the index is reconciled with the spool at the next start. Quarantined instances
(routed to quarantine, whatever that route is) keep their received bytes under ``<spool>/state/kept/<day>/`` (a hard
link: no copy) so the review console can release them within ``review.retention_days``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from filmgate import metrics
from filmgate.audit import AuditLog
from filmgate.index import DecisionIndex
from filmgate.spool import place

log = logging.getLogger("filmgate.records")


def thumbnail_png(pixels: np.ndarray | None, size: int) -> bytes | None:
    """The decoded film as the detectors saw it (grey [0, 1], before each model's own resize), long side ``size``,
    as an 8-bit PNG."""
    if pixels is None or pixels.ndim != 2 or not pixels.size:
        return None
    import cv2

    h, w = pixels.shape
    scale = min(1.0, size / max(h, w))
    img: np.ndarray = np.asarray(pixels, dtype=np.float32)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return buf.tobytes() if ok else None


def findings_of(judgement: Any, models: Any = None) -> list[dict[str, Any]]:
    """Every detector's score, class and verdict, with the model's name and version."""
    versions = {}
    for m in models or []:
        if isinstance(m, dict) and "name" in m:
            versions[m["name"]] = m.get("version", "")
    out = []
    for f in getattr(judgement, "findings", ()) or ():
        out.append({**f.to_dict(), "model": f.detector, "version": versions.get(f.detector, "")})
    return out


class Recorder:
    def __init__(self, cfg: Any, index: DecisionIndex | None, audit: AuditLog | None) -> None:
        self.cfg = cfg
        self.index = index
        self.audit = audit
        self.kept_root = Path(cfg.state_dir) / "kept"

    @classmethod
    def for_config(cls, cfg: Any) -> Recorder:
        index = None
        try:
            index = DecisionIndex.for_config(cfg)
        except Exception as exc:  # the node still works without its index; say so loudly
            log.error("cannot open the decision index under %s (%s); running without it", cfg.state_dir, exc)
        return cls(cfg, index, AuditLog.for_config(cfg))

    def _guard(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as exc:
            metrics.INDEX_ERRORS.inc()
            log.error("decision index: cannot record %s (%s); the spool keeps the truth", what, exc)
            return None

    # ------------------------------------------------------------------------------------------ listener

    def association(self, accepted: bool, calling_ae: str, address: str, why: str = "") -> None:
        if self.audit:
            self.audit.event("association-accepted" if accepted else "association-refused",
                             calling_ae=calling_ae, address=address, **({"why": why} if why else {}))  # fmt: skip

    def stored(self, spool_name: str, sop_instance_uid: str, calling_ae: str, address: str, at: float) -> None:
        if self.index:
            self._guard("a stored instance", self.index.record_received, spool_name,
                        sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, peer_address=address,
                        received_at=at)  # fmt: skip
        if self.audit:
            self.audit.event("stored", sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, address=address)

    # ------------------------------------------------------------------------------------------ pipeline

    def keep(self, path: Path, received: float) -> Path | None:
        """Keep the received bytes of a quarantined instance for review (a hard link under state/kept/<day>/); not
        without an index, which is what finds and expires them."""
        if self.index is None:
            return None
        dst = self.kept_root / time.strftime("%Y%m%d", time.gmtime(received)) / path.name
        try:
            place(path, dst, fsync=self.cfg.spool.fsync)
        except OSError as exc:
            log.error("cannot keep a quarantined instance for review (%s)", exc)
            return None
        return dst

    def judged(self, path: Path, judgement: Any, record: dict[str, Any], *, received: float,
               routed: str, kept: Path | None) -> None:  # fmt: skip
        """One decided instance, before delivery: the index row (scores, classes, models, header, thumbnail) and the
        ``decided`` audit event."""
        if self.index:
            full = {
                **record,
                "series_instance_uid": (getattr(judgement, "fields", None) or {}).get("SeriesInstanceUID", ""),
                "findings": findings_of(judgement, record.get("models")),
                "header": dict(getattr(judgement, "header", None) or {}),
                "routed": routed,
                "kept_path": str(kept) if kept else "",
                "error": getattr(judgement, "error", None) or "",
            }
            thumb = None
            if self.cfg.review.enabled:  # the console shows them; otherwise made from the kept bytes when needed
                thumb = self._guard("a thumbnail", thumbnail_png, getattr(judgement, "pixels", None),
                                    self.cfg.review.thumbnail_size)  # fmt: skip
            self._guard("a decision", self.index.record_instance, path.name, full, received_at=received,
                        thumbnail=thumb)  # fmt: skip
        if self.audit:
            shadow: dict[str, Any] = {"shadow": True} if record.get("shadow") else {}
            self.audit.event(
                "decided", sop_instance_uid=record.get("sop_instance_uid", ""),
                study_instance_uid=record.get("study_instance_uid", ""), calling_ae=record.get("calling_ae", ""),
                outcome=record.get("decision", ""), reasons=list(record.get("reasons") or []), routed=routed,
                **shadow,
            )  # fmt: skip

    def delivery(self, spool_name: str, destination: str, state: str, *, sop_instance_uid: str = "",
                 error: str = "", attempts: int = 0) -> None:  # fmt: skip
        """A destination's state for an instance (``delivered``, ``queued``, ``dead-letter``, ``failed``)."""
        if self.index:
            self._guard("a delivery", self.index.record_delivery, spool_name, destination, state, error=error,
                        attempts=attempts)  # fmt: skip
        if self.audit and state in ("delivered", "dead-letter"):
            uid = sop_instance_uid or self._uid(spool_name)
            self.audit.event("delivered" if state == "delivered" else "dead-letter", sop_instance_uid=uid,
                             destination=destination, **({"error": error} if error else {}))  # fmt: skip

    def _uid(self, spool_name: str) -> str:
        """The SOP Instance UID the index holds for a spool file (for the audit line of a forwarded instance)."""
        if self.index is None:
            return ""
        row = self._guard("a lookup", self.index.get_by_name, spool_name)
        return row["sop_instance_uid"] if row else ""

    def delivered(self, spool_name: str) -> None:
        if self.index:
            self._guard("a finished delivery", self.index.record_delivered, spool_name)



"""What a reviewer's decision does to an instance: release, confirm, relabel (index, sidecar, audit, destinations).

Release delivers the *original received bytes* (the copy kept under ``<spool>/state/kept/``) to every destination of
the accept route, through the same destination objects the pipeline uses (a DICOM destination queues it in its
outbox; the node's forwarder sends it, with retries and dead letter). The index and the quarantine sidecar record who
released it and when; the accept sidecar says it was released. Confirm marks a quarantined instance reviewed (it
stays quarantined). Relabel stores the true class per detector; ``GET /api/labels.csv`` exports them for training.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from filmgate import metrics
from filmgate.destinations import Delivery, FolderDestination
from filmgate.spool import write_durably

log = logging.getLogger("filmgate.review")


class Refused(Exception):
    """The action cannot be done on this instance (answered 409 with the message)."""


class Actions:
    def __init__(self, cfg: Any, index: Any, recorder: Any, destinations: dict[str, Any],
                 detector_labels: dict[str, tuple[str, ...]]) -> None:  # fmt: skip
        self.cfg = cfg
        self.index = index
        self.recorder = recorder
        self.destinations = destinations
        self.detector_labels = detector_labels

    def _item(self, iid: int) -> dict[str, Any]:
        item = self.index.get(iid)
        if item is None:
            raise KeyError(iid)
        return item

    def release(self, iid: int, user: str) -> dict[str, Any]:
        item = self._item(iid)
        if item["routed"] != "quarantine":
            why = "shadow mode delivered it to the accept route already" if item["shadow"] else "it was not quarantined"
            raise Refused(f"instance {iid} cannot be released: {why}")
        if item["review_state"] == "released":
            raise Refused(f"instance {iid} was released already (by {item['reviewed_by']} at {item['reviewed_at']})")
        kept = Path(item["kept_path"]) if item["kept_path"] else None
        if kept is None or not kept.is_file():
            raise Refused(f"instance {iid} cannot be released: its received bytes are no longer kept "
                          f"(review.retention_days: {self.cfg.review.retention_days:g})")  # fmt: skip
        now = time.time()
        fields = _fields(item, outcome="accept", reason="released")
        record = {**_record(item), "decision": item["outcome"], "released_by": user, "released_at": _iso(now)}
        for name in self.cfg.routes.accept:
            self.destinations[name].deliver(Delivery(path=kept, fields=fields, record=record))
        self.index.set_review_state(iid, "released", user)
        self._mark_quarantine_sidecars(item, {"released_by": user, "released_at": _iso(now)})
        metrics.REVIEW_ACTIONS.labels(action="release").inc()
        notes = [n["data"]["sop_instance_uid"] for n in item.get("notes_log", []) if n["kind"] == "iocm-rejection"]
        if notes:  # IOCM has no message that takes a rejection back: the archive must restore it (OPERATIONS.md)
            log.warning("a released instance was named by %d IOCM rejection note(s) sent to %s; the archive still "
                        "hides it until it is restored there", len(notes),
                        self.cfg.iocm.destination or "the PACS")  # fmt: skip
        self.recorder.audit.event("released", user=user, sop_instance_uid=item["sop_instance_uid"],
                                  study_instance_uid=item["study_instance_uid"], id=iid,
                                  destinations=list(self.cfg.routes.accept),
                                  rejection_notes=notes or None)  # fmt: skip
        return self._item(iid)

    def confirm(self, iid: int, user: str) -> dict[str, Any]:
        item = self._item(iid)
        if item["outcome"] != "quarantine":
            raise Refused(f"instance {iid} was accepted by the gate; there is no quarantine to confirm")
        if item["review_state"] == "released":
            raise Refused(f"instance {iid} was released already; it cannot be confirmed as quarantined")
        self.index.set_review_state(iid, "confirmed", user)
        self._mark_quarantine_sidecars(item, {"confirmed_by": user, "confirmed_at": _iso(time.time())})
        metrics.REVIEW_ACTIONS.labels(action="confirm").inc()
        self.recorder.audit.event("confirmed", user=user, sop_instance_uid=item["sop_instance_uid"],
                                  study_instance_uid=item["study_instance_uid"], id=iid)  # fmt: skip
        return self._item(iid)

    def relabel(self, iid: int, labels: Any, user: str) -> dict[str, Any]:
        item = self._item(iid)
        if not isinstance(labels, dict) or not labels:
            raise ValueError('expected a JSON object {detector: label}, e.g. {"orientation": "upright"}')
        for det, label in labels.items():
            known = self.detector_labels.get(det)
            if known is None:
                raise ValueError(f"unknown detector {det!r}; known: {sorted(self.detector_labels)}")
            if label not in known:
                raise ValueError(f"{det}: unknown label {label!r}; one of {list(known)}")
        self.index.set_labels(iid, {str(k): str(v) for k, v in labels.items()}, user)
        metrics.REVIEW_ACTIONS.labels(action="relabel").inc()
        self.recorder.audit.event("relabelled", user=user, sop_instance_uid=item["sop_instance_uid"], id=iid,
                                  labels=dict(labels))  # fmt: skip
        return self._item(iid)

    def _mark_quarantine_sidecars(self, item: dict[str, Any], facts: dict[str, str]) -> None:
        """Add who and when to the quarantine folder's sidecar (folder destinations only; DICOM ones have none)."""
        if item["shadow"]:
            return
        fields = _fields(item, outcome=item["outcome"], reason=item["reason"] or "accepted")
        for name in self.cfg.routes.quarantine:
            dest = self.destinations.get(name)
            if not isinstance(dest, FolderDestination) or not dest.cfg.sidecar:
                continue
            try:
                path = dest.sidecar_of(Delivery(path=Path(item["spool_name"]), fields=fields))
                rec = json.loads(path.read_text())
                rec.update(facts)
                write_durably(path, (json.dumps(rec, indent=1) + "\n").encode(), fsync=dest.cfg.fsync)
            except (OSError, ValueError) as exc:
                log.warning("review: cannot update the quarantine sidecar at %s (%s)", name, exc)


def _fields(item: dict[str, Any], *, outcome: str, reason: str) -> dict[str, str]:
    """The layout fields the pipeline used for this instance (see filmgate.pipeline)."""
    received = _epoch(item["received_at"])
    return {
        "StudyInstanceUID": item["study_instance_uid"], "SeriesInstanceUID": item["series_instance_uid"],
        "SOPInstanceUID": item["sop_instance_uid"], "SOPClassUID": item["sop_class_uid"], "Modality": item["modality"],
        "outcome": outcome, "reason": reason, "reasons": "+".join(item["reasons"]) or "accepted",
        "calling_ae": item["calling_ae"], "date": time.strftime("%Y%m%d", time.gmtime(received)),
    }  # fmt: skip


def _record(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "sop_instance_uid": item["sop_instance_uid"], "sop_class_uid": item["sop_class_uid"],
        "study_instance_uid": item["study_instance_uid"], "modality": item["modality"],
        "transfer_syntax": item["transfer_syntax"], "calling_ae": item["calling_ae"], "reasons": item["reasons"],
        "scores": item["scores"], "models": item["models"], "received_at": item["received_at"],
        "decided_at": item["decided_at"],
    }  # fmt: skip


def _epoch(iso: str | None) -> float:
    import datetime as dt

    if not iso:
        return time.time()
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"

"""What the node does around a verdict besides delivering it: corrected derived films, study tracking, IOCM notes.

Two halves, because they run in different places:

* :class:`Aftercare` runs in the worker, right after a film is decided (it needs the judge): it makes the corrected
  derived film when ``correct`` allows (and judges it again), keeps the header of a film a rejection note will
  reference, and notes the instance in the study tracker.
* :class:`StudyWatcher` runs once per node, in the main process: it summarises studies that became stable, writes
  the summaries where configured, counts them, and queues the rejection notes in the DICOM destination's durable
  outbox, whose forwarder sends them with the same retries and dead letter as any instance.

Derived films and notes get UIDs derived from the UIDs they answer (``generate_uid(entropy_srcs=...)``), so that work
redone after a crash makes the same instance again instead of a second one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from filmgate import metrics
from filmgate.config import Config, FolderDestinationConfig
from filmgate.derive import NotCorrectable, correction_for, derived_film, links
from filmgate.iocm import rejection_note
from filmgate.judge import Judge, Judgement
from filmgate.spool import Spool, safe_component, write_durably
from filmgate.studies import NotedInstance, StudyTracker

log = logging.getLogger("filmgate.followup")


def tracker_for(cfg: Config, spool: Spool) -> StudyTracker | None:
    if not cfg.studies.enabled:
        return None
    return StudyTracker(Path(cfg.state_dir) / "studies.sqlite", stable_seconds=cfg.studies.stable_seconds)


@dataclass(frozen=True)
class CorrectedFilm:
    """A derived film on disk (in the spool's state folder until delivered) and the gate's verdict on it."""

    path: Path
    judgement: Judgement
    links: dict[str, dict[str, str]]
    description: str


class Aftercare:
    """The worker's half (one per pipeline)."""

    def __init__(self, cfg: Config, spool: Spool, judge: Judge, tracker: StudyTracker | None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.judge = judge
        self.tracker = tracker
        self.derived_dir = Path(cfg.state_dir) / "derived"
        self.headers_dir = Path(cfg.state_dir) / "headers"
        self.derived_dir.mkdir(parents=True, exist_ok=True)
        self.headers_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ corrected derived films

    def correct(self, path: Path, judgement: Judgement) -> CorrectedFilm | None:
        """The derived film when the decision allows a fix (None otherwise, or when the film's form does not)."""
        if not self.cfg.correct.enabled:
            return None
        fix = correction_for(judgement.decision, self.cfg.correct.reasons, self.cfg.correct.also_when)
        if fix is None:
            return None
        try:
            original = pydicom.dcmread(path)
            original_uid = str(original.SOPInstanceUID)
            derived = derived_film(
                original, fix,
                uid_prefix=None,
                series_uid=generate_uid(entropy_srcs=[str(original.SeriesInstanceUID), "filmgate-corrected-series"]),
            )  # fmt: skip
            derived.SOPInstanceUID = generate_uid(entropy_srcs=[original_uid, "filmgate-corrected"])
            derived.file_meta.MediaStorageSOPInstanceUID = derived.SOPInstanceUID
            buf = io.BytesIO()
            derived.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        except NotCorrectable as exc:
            log.info("a %s film cannot be corrected (%s)", "+".join(fix.reasons), exc)
            metrics.CORRECTED.labels(result="not-correctable").inc()
            return None
        except Exception as exc:  # a film that decoded for the detectors but not at full size: leave it quarantined
            log.warning("correcting a %s film failed (%s: %s)", "+".join(fix.reasons), type(exc).__name__, exc)
            metrics.CORRECTED.labels(result="failed").inc()
            return None
        again = self.judge.judge(data, suffix=".dcm")
        result = "accepted" if again.decision.accepted else "still-quarantined"
        metrics.CORRECTED.labels(result=result).inc()
        target = self.derived_dir / f"{safe_component(str(derived.SOPInstanceUID))}.dcm"
        write_durably(target, data, fsync=self.spool.fsync)
        return CorrectedFilm(path=target, judgement=again, links=links(judgement.fields, derived),
                             description=fix.describe())  # fmt: skip

    def done_with(self, corrected: CorrectedFilm) -> None:
        corrected.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ studies and rejection notes

    def note(self, path: Path, judgement: Judgement, *, derived_from: str | None = None) -> None:
        """Record a decided instance for its study (and keep its header when a rejection note will need it)."""
        if self.tracker is None:
            return
        fields = judgement.fields
        if not fields.get("StudyInstanceUID") or not fields.get("SOPInstanceUID"):
            return
        reasons = tuple(judgement.decision.reasons)
        rejecting = tuple(r for r in reasons if r in self.cfg.iocm.reasons) if self.cfg.iocm.enabled else ()
        header_path = None
        if rejecting and not derived_from:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                target = self.headers_dir / f"{_digest(fields['SOPInstanceUID'])}.dcm"
                buf = io.BytesIO()
                header.save_as(buf, enforce_file_format=False)
                write_durably(target, buf.getvalue(), fsync=self.spool.fsync)
                header_path = str(target)
            except Exception as exc:
                log.warning("cannot keep the header for a rejection note (%s); no note will name this instance", exc)
                rejecting = ()
        self.tracker.note(
            NotedInstance(
                sop_instance_uid=fields["SOPInstanceUID"],
                study_instance_uid=fields["StudyInstanceUID"],
                series_instance_uid=fields.get("SeriesInstanceUID", ""),
                sop_class_uid=fields.get("SOPClassUID", ""),
                outcome=judgement.decision.outcome,
                reasons=reasons,
                derived_from=derived_from,
                header_path=header_path,
                rejection_reasons=rejecting,
            )
        )


class StudyWatcher:
    """The node's half: summaries of stable studies and their rejection notes."""

    def __init__(self, cfg: Config, spool: Spool, tracker: StudyTracker, recorder: Any = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.tracker = tracker
        self.recorder = recorder  # filmgate.records.Recorder: the decision index and the audit trail, when on
        for outcome in ("usable", "unusable"):
            metrics.STUDIES.labels(outcome=outcome)
        if cfg.iocm.enabled:
            metrics.REJECTION_NOTES.labels(destination=cfg.iocm.destination)
        accept = set(cfg.routes.accept)
        self.summary_roots = [
            Path(d.path) for d in cfg.destinations if isinstance(d, FolderDestinationConfig) and d.name in accept
        ]

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Summarise every study that became stable; returns the summaries made."""
        made = []
        for study in self.tracker.due(now=now):
            try:
                summary = self.tracker.summarise(study, now=now)
                if self.cfg.iocm.enabled:
                    note = self._rejection_note(study)
                    if note:
                        summary.setdefault("rejection_notes", []).append(note)
                metrics.STUDIES.labels(outcome="usable" if summary["usable"] else "unusable").inc()
                if self.cfg.studies.summary_file:
                    self._write_summary(study, summary)
                self._record(study, summary)
                made.append(summary)
            except Exception:
                log.exception("summarising a study failed; it is tried again at the next instance of the study")
        return made

    def _record(self, study: str, summary: dict[str, Any]) -> None:
        """The summary, and each rejection note on the instances it names, in the decision index; audit events."""
        index = getattr(self.recorder, "index", None)
        audit = getattr(self.recorder, "audit", None)
        if index is not None:
            index.record_study(study, summary)
            for note in summary.get("rejection_notes", []):
                for uid in note["instances"]:
                    for iid in index.ids_of(uid):
                        index.record_note("iocm-rejection", note, instance_id=iid, study_instance_uid=study)
        if audit is not None:
            audit.event("study-summarised", study_instance_uid=study, instances=summary["instances"],
                        outcomes=summary["outcomes"], usable=summary["usable"])  # fmt: skip
            for note in summary.get("rejection_notes", []):
                audit.event("rejection-note-queued", study_instance_uid=study,
                            note_sop_instance_uid=note["sop_instance_uid"], sop_instance_uids=note["instances"],
                            reasons=note["reasons"], destination=note["destination"])  # fmt: skip

    def _write_summary(self, study: str, summary: dict[str, Any]) -> None:
        rel = self.cfg.studies.summary_layout.format(StudyInstanceUID=safe_component(study))
        data = (json.dumps(summary, indent=1) + "\n").encode()
        for root in self.summary_roots:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_durably(target, data, fsync=self.spool.fsync)

    def _rejection_note(self, study: str) -> dict[str, Any] | None:
        pending = self.tracker.pending_rejections(study)
        if not pending:
            return None
        headers = []
        for _sop, header_path, _reasons in pending:
            headers.append(pydicom.dcmread(header_path))
        reasons = sorted({r for _, _, rs in pending for r in rs})
        uids = sorted(sop for sop, _, _ in pending)
        kos = rejection_note(
            headers,
            description="filmgate: rejected for quality reasons (" + ", ".join(reasons) + ")",
            series_uid=generate_uid(entropy_srcs=[study, "filmgate-rejection-notes"]),
        )
        kos.SOPInstanceUID = generate_uid(entropy_srcs=[study, *uids, "filmgate-rejection-note"])
        kos.file_meta.MediaStorageSOPInstanceUID = kos.SOPInstanceUID
        buf = io.BytesIO()
        kos.save_as(buf, enforce_file_format=True)
        outbox = self.spool.outbox(self.cfg.iocm.destination)
        name = f"note-{_digest(str(kos.SOPInstanceUID))}.dcm"
        write_durably(outbox / name, buf.getvalue(), fsync=self.spool.fsync, tmp_dir=self.spool.tmp)
        note = {
            "sop_instance_uid": str(kos.SOPInstanceUID),
            "destination": self.cfg.iocm.destination,
            "instances": uids,
            "reasons": reasons,
            "queued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.tracker.mark_noted(uids)
        for _sop, header_path, _reasons in pending:
            Path(header_path).unlink(missing_ok=True)
        metrics.REJECTION_NOTES.labels(destination=self.cfg.iocm.destination).inc()
        log.info("rejection note for %d instance(s) of a study queued for %s", len(uids), self.cfg.iocm.destination)
        return note


def _digest(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:32]

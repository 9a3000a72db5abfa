"""``--review``: the sweep's results into the review console's decision index (:mod:`filmgate.index`), so flagged films
are triaged, released and relabelled there like the node's own.

The index is the node's (``index.enabled`` and the spool's state folder of ``--config``: run the sweep with the
node's configuration). Each film is one row keyed ``sweep:<file>`` (``sweep:dicom:<SOP Instance UID>`` from a PACS),
with the calling AE title :data:`SWEEP_AE` so the console can filter the sweep's films from the node's traffic; the
film itself is the kept copy the console releases from (the file swept, or its --sort-into copy for a PACS film).
Loading again (a rerun) updates the rows and keeps what reviewers did (released, confirmed, labels).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from filmgate.config import Config
from filmgate.sweep.store import Store

SWEEP_AE = "FILMGATE-SWEEP"


def _png(jpeg: bytes | None) -> bytes | None:
    if not jpeg:
        return None
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes() if ok else None


def record_of(row: dict[str, Any], models: dict[str, str], out: str) -> dict[str, Any]:
    """The index's record of one result row (the fields the node records from a sidecar)."""
    fields = row.get("_fields") or {}
    notes = [{"sweep": out}] + [{"reason": k, "note": v} for k, v in (fields.get("notes") or {}).items()]
    return {
        "sop_instance_uid": row.get("sop_instance_uid", ""),
        "series_instance_uid": fields.get("series_instance_uid", ""),
        "study_instance_uid": fields.get("study_instance_uid", ""),
        "sop_class_uid": fields.get("sop_class_uid", ""),
        "modality": row.get("modality", ""),
        "transfer_syntax": fields.get("transfer_syntax", ""),
        "calling_ae": SWEEP_AE,
        "decision": row["decision"],
        "reasons": [r for r in row["reasons"].split(";") if r],
        "scores": {f["detector"]: f["score"] for f in row.get("_findings", [])},
        "findings": [{**f, "model": f["detector"], "version": models.get(f["detector"], "")}
                     for f in row.get("_findings", [])],  # fmt: skip
        "models": models,
        "notes": notes,
        "header": {"Modality": row.get("modality", ""), "ViewPosition": row.get("view_position", ""),
                   "BodyPartExamined": row.get("body_part_examined", ""),
                   "PatientAge": row.get("patient_age", "")},  # fmt: skip
        "error": row.get("error", ""),
        "kept_path": row.get("_abspath") or "",
    }


def load_into_review(cfg: Config, store: Store, fingerprint: str, models: dict[str, str], out: str) -> int:
    """Record every current result in the node's decision index; returns how many."""
    try:
        from filmgate.index import DecisionIndex
    except ImportError as exc:  # a build without the review console
        raise RuntimeError("--review: this filmgate has no decision index (filmgate.index)") from exc
    index = DecisionIndex.for_config(cfg)
    if index is None:
        raise RuntimeError("--review: the configuration's index is off (set index.enabled: true, as on the node)")
    n = 0
    now = time.time()
    try:
        for row in store.results(fingerprint, with_thumbs=True):
            kept = bool(row["_abspath"]) and Path(row["_abspath"]).is_file()
            # A film the console can read makes its own thumbnail (its size, through the judge's decode); a PACS film
            # whose bytes were not kept gets the sweep's.
            index.record_instance(f"sweep:{row['_key'] if row['_key'].startswith('dicom:') else row['_abspath']}",
                                  record_of(row, models, out), received_at=now,
                                  thumbnail=None if kept else _png(row.get("_thumb")))  # fmt: skip
            n += 1
    finally:
        index.close()
    return n

"""The sweep's unit of work: a batch of films in, result rows out, through the one judge.

The same function runs in a local worker process and on a Dask worker (``filmgate[cluster]``), so it takes only
picklable values (the frozen :class:`~filmgate.config.Config` and plain :class:`Item` records) and keeps one loaded
:class:`~filmgate.judge.Judge` per process. Films of a batch are examined one by one and concluded together, so the
detectors see the whole batch at once. A row carries a small JPEG thumbnail only where the report needs it (flagged
films, and the sample of accepted films the caller asked for), so memory and the results store stay small.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from filmgate.config import Config
from filmgate.judge import Examined, Judge, Judgement
from filmgate.policy import Metadata

HEADER_COLUMNS = {
    "Modality": "modality",
    "ViewPosition": "view_position",
    "BodyPartExamined": "body_part_examined",
    "PatientAge": "patient_age",
}
THUMB_SIDE = 192  # long side of the report's thumbnails (pixels as the detectors saw them, before their resizing)
THUMB_QUALITY = 80

_JUDGES: dict[str, Judge] = {}
log = logging.getLogger("filmgate.sweep")


@dataclass(frozen=True)
class Item:
    """One film to judge: a file (``abspath``) or bytes received from a PACS (``data``)."""

    key: str  # unique within the sweep (the results' path, or "dicom:<SOP Instance UID>")
    path: str  # the results' path column
    abspath: str | None = None
    data: bytes | None = None
    thumb: bool = False  # keep a thumbnail even if the film is accepted (the report's sample)


@dataclass(frozen=True)
class Row:
    key: str
    values: dict[str, Any]  # column -> value (detector columns named <detector>_score, <detector>_class)
    confidence: dict[str, float]  # reason -> the highest score of a detector raising it (orders the contact sheets)
    thumb: bytes | None


def judge_for(cfg: Config) -> Judge:
    """This process's judge for ``cfg`` (loaded on first use; a worker judges many batches with it).

    It decodes as the node does: with ``limits.decode_isolation`` (the default) in a supervised decode child of this
    worker (:mod:`filmgate.sandbox`: a decoder that crashes, loops past ``limits.decode_timeout`` or allocates past
    ``limits.decode_memory_bytes`` costs its film, quarantined ``undecodable``, not the sweep)."""
    key = repr(cfg)
    judge = _JUDGES.get(key)
    if judge is None:
        for old in [k for k in _JUDGES if not k.startswith("metadata-only:")]:
            del _JUDGES[old]  # one judge with models per process
        decoder = None
        if cfg.limits.decode_isolation and multiprocessing.current_process().daemon:
            # A daemonic process may not start children (Dask's workers are daemonic unless
            # DASK_DISTRIBUTED__WORKER__DAEMON=False): decode here, as without isolation.
            log.warning("limits.decode_isolation: this worker is a daemonic process and cannot start a decode child; "
                        "decoding in the worker itself")  # fmt: skip
        elif cfg.limits.decode_isolation:
            from filmgate.sandbox import DecodeSandbox

            # Forked: this worker is single-threaded and has not loaded its models yet (they come next).
            decoder = DecodeSandbox(cfg.limits, size=1, log_level="WARNING", start_method="fork")
        judge = _JUDGES[key] = Judge.load(cfg, decoder=decoder)
    return judge


def fingerprint(judge: Judge) -> str:
    """What the judgement depends on beyond the film: the detectors' versions and precisions (the int8 and float
    models' scores differ a little), the shared graph a detector is computed in (its int8 scores differ a little
    from the detector's own int8 model's) and the policy (a change re-judges)."""
    models = ",".join(f"{d['name']}={d['version']}/{d['precision']}" + (f"@{d['graph']}" if d.get("graph") else "")
                      for d in judge.detectors.describe())  # fmt: skip
    return f"{models}|{judge.cfg.policy!r}"


def judge_batch(items: Sequence[Item], cfg: Config) -> tuple[str, list[Row]]:
    """Judge ``items`` together; returns the judge's fingerprint and one row per item, in order."""
    judge = judge_for(cfg)
    examined = []
    for item in items:
        if item.data is not None:
            examined.append(judge.examine(item.data, suffix=".dcm"))
        else:
            examined.append(judge.examine(Path(item.abspath or item.path)))
    judgements = judge.conclude(examined)
    return fingerprint(judge), [to_row(item, j) for item, j in zip(items, judgements, strict=True)]


def crashed_row(item: Item, cfg: Config, message: str) -> Row:
    """The row of a film that could not be judged because judging it killed the process: the judge's verdict on an
    undecodable film (no detectors needed, so the driver makes it without loading models)."""
    key = f"metadata-only:{cfg!r}"
    judge = _JUDGES.get(key) or _JUDGES.setdefault(key, Judge.load(cfg, metadata_only=True))
    examined = Examined(metadata=Metadata(is_dicom=False, decode_error=message), error=message)
    return to_row(item, judge.conclude([examined])[0])


def to_row(item: Item, j: Judgement) -> Row:
    d = j.decision
    values: dict[str, Any] = {
        "path": item.path,
        "sop_instance_uid": j.fields.get("SOPInstanceUID", ""),
        "decision": d.outcome,
        "reasons": ";".join(d.reasons),
    }
    confidence: dict[str, float] = {}
    for f in d.findings:  # as the policy judged them (its thresholds)
        values[f"{f.detector}_score"] = round(float(f.score), 6)
        values[f"{f.detector}_class"] = f.predicted or (f.reason if f.flagged else "ok")
        if f.reason in d.reasons:
            confidence[f.reason] = max(confidence.get(f.reason, float("-inf")), float(f.score))
    for tag, column in HEADER_COLUMNS.items():
        values[column] = j.header.get(tag, "")
    values["error"] = j.error or ""
    # Not columns of results.csv: what the review console's index records beside the columns.
    values["_findings"] = [{"detector": f.detector, "reason": f.reason, "score": round(float(f.score), 6),
                            "threshold": f.threshold, "flagged": f.flagged, "predicted": f.predicted}
                           for f in d.findings]  # fmt: skip
    values["_fields"] = {"study_instance_uid": j.fields.get("StudyInstanceUID", ""),
                         "series_instance_uid": j.fields.get("SeriesInstanceUID", ""),
                         "sop_class_uid": j.fields.get("SOPClassUID", ""), "transfer_syntax": j.transfer_syntax,
                         "notes": dict(d.notes)}  # fmt: skip
    want = item.thumb or not d.accepted
    return Row(item.key, values, confidence, thumbnail(j.pixels) if want and j.pixels is not None else None)


def thumbnail(pixels: np.ndarray) -> bytes | None:
    """A small grey JPEG of the decoded film (the report inlines it)."""
    h, w = pixels.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    img: np.ndarray = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if scale < 1:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    return buf.tobytes() if ok else None

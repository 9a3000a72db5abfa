"""The decision: detector findings and DICOM metadata -> accept, or quarantine with reasons. A pure function.

Kept free of I/O and state so it can be tested exhaustively and reasoned about by the people who configure it.
Reason names are stable strings users filter on; a detector contributes its manifest's ``reason`` (so later
detectors plug in through their manifests alone), metadata rules contribute ``modality`` and ``pediatric``, and a
film that cannot be decoded gets ``undecodable``, one the detectors failed on (an onnxruntime error: the film may be
fine) gets ``detector-error``. ``policy.outranks`` drops detector reasons that are moot for the film (a knee film
is ``not-frontal-chest``; whether it is also "flipped" by a chest detector means nothing).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from filmgate.config import DETECTOR_ERROR, MODALITY, PEDIATRIC, RULE_REASONS, UNDECODABLE, PolicyConfig
from filmgate.manifest import Finding

ACCEPT = "accept"
# The reasons the rules raise themselves are named in filmgate.config (RULE_REASONS: the config check needs them and
# config cannot import this module); the detectors' come from their manifests. Every reason a decision can carry is
# these plus the loaded detectors' (see :func:`known_reasons`).
PLAUSIBLE_AGE_YEARS = (0.0, 120.0)  # a header age outside this is treated as missing
QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Metadata:
    """What the rules need to know about a film (None where the film carries no DICOM header, e.g. a PNG)."""

    modality: str | None = None
    patient_age: str | None = None  # DICOM AS, e.g. "007Y"
    birth_date: str | None = None  # DA, YYYYMMDD
    study_date: str | None = None  # DA; falls back to series/acquisition/content date when absent
    decode_error: str | None = None
    is_dicom: bool = True

    @classmethod
    def from_dataset(cls, ds: Any, decode_error: str | None = None) -> Metadata:
        def get(name: str) -> str | None:
            try:
                value = ds.get(name)
            except Exception:
                return None
            text = str(value).strip() if value not in (None, "") else ""
            return text or None

        study = get("StudyDate") or get("SeriesDate") or get("AcquisitionDate") or get("ContentDate")
        return cls(
            modality=(get("Modality") or "").upper() or None,
            patient_age=get("PatientAge"),
            birth_date=get("PatientBirthDate"),
            study_date=study,
            decode_error=decode_error,
        )


@dataclass(frozen=True)
class Decision:
    outcome: str  # accept | quarantine
    reasons: tuple[str, ...]
    scores: Mapping[str, float]
    findings: tuple[Finding, ...] = ()
    age_years: float | None = None
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPT

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.outcome,
            "reasons": list(self.reasons),
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
            "findings": [f.to_dict() for f in self.findings],
            **({"age_years": round(self.age_years, 2)} if self.age_years is not None else {}),
            **({"notes": dict(self.notes)} if self.notes else {}),
        }


def decide(
    findings: Sequence[Finding], metadata: Metadata | None, policy: PolicyConfig, *, detector_error: str | None = None
) -> Decision:
    """Apply thresholds (config overrides manifest) and metadata rules; reasons keep a stable order.

    ``detector_error`` is the error of a detector run that failed on this film: it is quarantined ``detector-error``
    (with the error as a note) rather than judged on the findings it lacks."""
    reasons: list[str] = []
    notes: dict[str, str] = {}
    judged: list[Finding] = []
    # The header's age is the first line for children; the image model (reason "pediatric") only decides when the
    # age is missing or implausible, so an adult whose header says so is never held back by the model's guess.
    age = age_in_years(metadata) if metadata is not None else None
    header_age = policy.pediatric_rule and age is not None and PLAUSIBLE_AGE_YEARS[0] <= age <= PLAUSIBLE_AGE_YEARS[1]
    for f in findings:
        # an age detector is cut where the header's age is (policy.pediatric_age_years), not at its manifest's cut
        default = policy.pediatric_age_years if f.below and f.reason == PEDIATRIC else f.threshold
        threshold = policy.thresholds.get(f.detector, default)
        flagged = f.flags(threshold)
        judged.append(dataclasses.replace(f, threshold=threshold, flagged=flagged))
        if flagged and f.reason == PEDIATRIC and header_age:
            notes[PEDIATRIC] = "image model overruled by the age in the header"
        elif flagged:
            reasons.append(f.reason)
    raised = set(reasons)
    for reason, dropped in policy.outranks.items():
        if reason in raised:
            for other in dropped:
                if other in raised:
                    reasons.remove(other)
                    notes[other] = f"not raised: outranked by {reason} (policy.outranks)"
    if detector_error:
        reasons.append(DETECTOR_ERROR)
        notes["error"] = detector_error
    if metadata is not None:
        if metadata.decode_error:
            reasons.append(UNDECODABLE)
            notes["error"] = metadata.decode_error
        if policy.modality_rule and metadata.is_dicom and metadata.modality not in policy.modalities:
            reasons.append(MODALITY)
        if policy.pediatric_rule and age is not None and age < policy.pediatric_age_years:
            reasons.append(PEDIATRIC)
    ordered = tuple(dict.fromkeys(sorted(reasons, key=lambda r: _reason_rank(r, policy.reason_order))))
    return Decision(
        outcome=QUARANTINE if ordered else ACCEPT,
        reasons=ordered,
        scores={f.detector: f.score for f in judged},
        findings=tuple(judged),
        age_years=age,
        notes=notes,
    )


def known_reasons(policy: PolicyConfig, detector_reasons: Sequence[str]) -> tuple[str, ...]:
    """Every reason a decision can carry under ``policy`` with these detectors, in ``policy.reason_order``."""
    found = {*RULE_REASONS, *detector_reasons}
    return tuple(sorted(found, key=lambda r: _reason_rank(r, policy.reason_order)))


def _reason_rank(reason: str, order: Sequence[str]) -> tuple[int, str]:
    """Position in ``policy.reason_order``; reasons it does not name (a new detector's) come last, by name."""
    return (order.index(reason) if reason in order else len(order), reason)


_AGE_RE = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_age(value: str | None) -> float | None:
    """DICOM Age String (``nnnD|W|M|Y``) -> years; None when absent or malformed."""
    if not value:
        return None
    m = _AGE_RE.match(value.strip().upper())
    if not m:
        return None
    return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]


def parse_date(value: str | None) -> dt.date | None:
    if not value:
        return None
    text = value.strip().replace(".", "")[:8]
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_in_years(metadata: Metadata) -> float | None:
    """Age from PatientAge, else from PatientBirthDate and the study date."""
    age = parse_age(metadata.patient_age)
    if age is not None:
        return age
    born, seen = parse_date(metadata.birth_date), parse_date(metadata.study_date)
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25

"""Every Prometheus metric of the gate, in one place (names and labels are part of the contract).

Labels carry only bounded, non-patient values: calling AE titles, outcomes, reasons, destination and model names,
transfer syntax names and DICOM status codes. Never a UID, a name or an ID.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric

# `_created` series would have to be merged across processes and nobody reads them.
disable_created_metrics()

# Latencies of one film range from milliseconds (store of a small CR) to seconds (a large JPEG 2000 on CPU).
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

INSTANCES_RECEIVED = Counter(
    "filmgate_instances_received", "Instances acknowledged with 0x0000 (durably spooled)", ["calling_ae"]
)
BYTES_RECEIVED = Counter("filmgate_bytes_received", "Bytes of the datasets received", ["calling_ae"])
STORE_FAILURES = Counter("filmgate_store_failures", "C-STORE requests answered with a failure", ["status"])
ASSOCIATIONS = Counter("filmgate_associations", "Association requests by outcome", ["calling_ae", "result"])
REFUSALS = Counter(
    "filmgate_refusals", "Connections, associations, PDUs and requests the listener refused, by reason", ["reason"]
)
SPOOL_FREE_BYTES = Gauge("filmgate_spool_free_bytes", "Free bytes on the spool's volume (at the last check)")
DECISIONS = Counter("filmgate_decisions", "Decisions made", ["outcome", "calling_ae"])
QUARANTINE_REASONS = Counter("filmgate_quarantine_reasons", "Quarantine reasons raised", ["reason", "calling_ae"])
STORE_SECONDS = Histogram("filmgate_store_seconds", "C-STORE handler: check and persist", buckets=_FAST)
DECODE_SECONDS = Histogram("filmgate_decode_seconds", "Read and decode one film", ["transfer_syntax"], buckets=_FAST)
PREPROCESS_SECONDS = Histogram(
    "filmgate_preprocess_seconds", "Preprocess one film for a model", ["model"], buckets=_FAST
)
INFERENCE_SECONDS = Histogram(
    "filmgate_inference_seconds", "Inference per film (batch time / batch size)", ["model"], buckets=_FAST
)
END_TO_END_SECONDS = Histogram("filmgate_end_to_end_seconds", "From received to delivered", buckets=_SLOW)
SPOOL_DEPTH = Gauge("filmgate_spool_depth", "Instances waiting in the spool", ["state"])
DELIVERY_ATTEMPTS = Counter("filmgate_delivery_attempts", "Delivery attempts", ["destination"])
DELIVERY_RETRIES = Counter("filmgate_delivery_retries", "Delivery attempts that were retries", ["destination"])
DELIVERY_FAILURES = Counter("filmgate_delivery_failures", "Failed delivery attempts", ["destination"])
DELIVERY_TRANSCODED = Counter(
    "filmgate_delivery_transcoded", "Instances decompressed for a peer that accepts nothing else", ["destination"]
)
DEAD_LETTERS = Counter("filmgate_dead_letters", "Instances moved to the dead-letter folder", ["destination"])
DECODE_RESTARTS = Counter(
    "filmgate_decode_restarts",
    "Decode child processes killed and started again (cause: crash, timeout); each cost one film",
    ["cause"],
)
STAGE_RESTARTS = Counter(
    "filmgate_stage_restarts",
    "Pipeline stage threads the watchdog started again (cause: died, stalled with work waiting)",
    ["stage", "cause"],
)
MODEL_INFO = Gauge("filmgate_model_info", "Loaded detectors (value 1)", ["model", "version", "provider"])
STUDIES = Counter(
    "filmgate_studies", "Study summaries made (usable: at least one film of the study accepted)", ["outcome"]
)
CORRECTED = Counter(
    "filmgate_corrected", "Corrected derived films by result (accepted: passed the gate again)", ["result"]
)
REJECTION_NOTES = Counter("filmgate_rejection_notes", "IOCM rejection notes queued for sending", ["destination"])
READY = Gauge("filmgate_ready", "1 while accepting associations, 0 while starting or draining")

_AE_LABELS: set[str] = set()
_MAX_AE_LABELS = 200


def ae_label(title: object) -> str:
    """A calling AE title as a label value: printable, trimmed, and bounded in number (``other`` beyond 200)."""
    text = "".join(c for c in str(title or "").strip() if c.isprintable())[:16] or "unknown"
    if text not in _AE_LABELS:
        if len(_AE_LABELS) >= _MAX_AE_LABELS:
            return "other"
        _AE_LABELS.add(text)
    return text


# ------------------------------------------------------------------------------------------------- zero samples
# A labelled counter has no series until its first event, so a rate by reason or a "dead letters > 0" alert sees "no
# data" rather than 0. Known label values are declared up front (0) instead: statuses at start, destinations when
# built, and each sender's decisions and reasons on its first instance.

STORE_FAILURE_STATUSES = ("0xA700", "0xC210", "0x0124")
REFUSAL_REASONS = (
    "allow-list", "called-ae", "association-limit", "host-association-limit", "connection-limit",
    "host-connection-limit", "tls-handshake", "pdu-too-large", "healthcheck-store",
)  # fmt: skip
_DECLARED_SENDERS: set[str] = set()


def declare_store_statuses() -> None:
    for status in STORE_FAILURE_STATUSES:
        STORE_FAILURES.labels(status=status)


def declare_refusals() -> None:
    for reason in REFUSAL_REASONS:
        REFUSALS.labels(reason=reason)


def declare_destination(name: str, forwards: bool) -> None:
    """Zero samples for a configured destination (retries and dead letters only exist for forwarding ones)."""
    forwarding = (DELIVERY_RETRIES, DEAD_LETTERS, DELIVERY_TRANSCODED) if forwards else ()
    for counter in (DELIVERY_ATTEMPTS, DELIVERY_FAILURES, *forwarding):
        counter.labels(destination=name)


def declare_sender(calling_ae: str, reasons: Iterable[str]) -> None:
    """Zero samples for a sender's two outcomes and every reason the gate can raise, once per sender."""
    if calling_ae in _DECLARED_SENDERS:
        return
    _DECLARED_SENDERS.add(calling_ae)
    for outcome in ("accept", "quarantine"):
        DECISIONS.labels(outcome=outcome, calling_ae=calling_ae)
    for reason in reasons:
        QUARANTINE_REASONS.labels(reason=reason, calling_ae=calling_ae)


# ------------------------------------------------------------------------------------------------- across processes
# The workers run in a child process (the GIL would otherwise make receiving and decoding take turns). The child
# sends :func:`snapshot` of its filmgate_* series on request; the parent serves :func:`render`, which adds them to
# its own. Each series is written by one process only, so summing by name and labels is exact.

Snapshot = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]


def snapshot() -> Snapshot:
    """This process's filmgate_* metric families as plain, picklable data."""
    out = []
    for fam in REGISTRY.collect():
        if fam.name.startswith("filmgate_"):
            samples = [(s.name, dict(s.labels), s.value) for s in fam.samples]
            out.append((fam.name, fam.type, fam.documentation, samples))
    return out


def _combine(snapshots: list[Snapshot]) -> Snapshot:
    """Several workers' snapshots as one: counters and histograms add up, gauges take the largest value (every
    worker reports the same spool depth and model info)."""
    fams: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for snap in snapshots:
        for name, typ, doc, samples in snap:
            _, _, acc = fams.setdefault(name, (typ, doc, {}))
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                if typ == "gauge":
                    acc[key] = max(acc.get(key, value), value)
                else:
                    acc[key] = acc.get(key, 0.0) + value
    return [
        (name, typ, doc, [(sname, dict(labels), v) for (sname, labels), v in acc.items()])
        for name, (typ, doc, acc) in fams.items()
    ]


class _Merged:
    def __init__(self, extra: Snapshot) -> None:
        self.extra = {name: (typ, doc, samples) for name, typ, doc, samples in extra}

    def collect(self) -> Any:
        seen = set()
        for fam in REGISTRY.collect():
            if fam.name in self.extra:
                seen.add(fam.name)
                typ, doc, samples = self.extra[fam.name]
                totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
                for s in fam.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    totals[key] = totals.get(key, 0.0) + s.value
                for name, labels, value in samples:
                    key = (name, tuple(sorted(labels.items())))
                    totals[key] = totals.get(key, 0.0) + value
                merged = Metric(fam.name, fam.documentation, fam.type)
                for (name, label_items), value in totals.items():
                    merged.add_sample(name, dict(label_items), value)
                yield merged
            else:
                yield fam
        for name, (typ, doc, samples) in self.extra.items():
            if name not in seen:
                fam = Metric(name, doc, typ)
                for sname, labels, value in samples:
                    fam.add_sample(sname, labels, value)
                yield fam


def render(workers: list[Snapshot] | None = None) -> bytes:
    """The exposition text of this process, plus the worker processes' snapshots."""
    return generate_latest(_Merged(_combine(workers or [])))  # type: ignore[arg-type]

# ------------------------------------------------------------------------------------------------- review workflow
# The decision index, the review console and shadow mode. The review gauges are read from the index at each scrape
# (the parent process owns them), so they are right after a restart; the counters count this run's actions.

INDEX_ERRORS = Counter("filmgate_index_errors", "Decision index writes that failed (the spool keeps the truth)")
REVIEW_PENDING = Gauge("filmgate_review_pending", "Quarantined instances awaiting review, by first reason", ["reason"])
REVIEWED = Gauge("filmgate_reviewed", "Instances reviewed, by outcome (released, confirmed) and reason",
                 ["state", "reason"])  # fmt: skip
REVIEW_ACTIONS = Counter("filmgate_review_actions", "Review actions taken in the console or API", ["action"])
ROUTED = Counter("filmgate_routed", "Instances routed, by route (differs from decisions in shadow mode)", ["route"])
SHADOW_MODE = Gauge("filmgate_shadow_mode", "1 when policy.mode is shadow (every film routed to accept)")
SHADOW_WOULD_QUARANTINE = Counter(
    "filmgate_shadow_would_quarantine", "Instances shadow mode routed to accept that enforcement would quarantine",
    ["reason"],
)  # fmt: skip
LOGINS = Counter("filmgate_logins", "Console and API logins, by method (form, basic) and result", ["method", "result"])
HTTP_SECONDS = Histogram("filmgate_http_seconds", "Console and API requests", ["route"], buckets=_FAST)


def set_review_counts(counts: dict[tuple[str, str], int], reasons: Iterable[str]) -> None:
    """The review gauges from :meth:`filmgate.index.DecisionIndex.review_counts` (known reasons at 0)."""
    for reason in reasons:
        REVIEW_PENDING.labels(reason=reason).set(0)
        for state in ("released", "confirmed"):
            REVIEWED.labels(state=state, reason=reason).set(0)
    for (state, reason), n in counts.items():
        if state == "pending":
            REVIEW_PENDING.labels(reason=reason).set(n)
        elif state in ("released", "confirmed"):
            REVIEWED.labels(state=state, reason=reason).set(n)


def declare_review() -> None:
    for action in ("release", "confirm", "relabel"):
        REVIEW_ACTIONS.labels(action=action)
    for method in ("form", "basic"):
        for result in ("ok", "failed", "throttled"):
            LOGINS.labels(method=method, result=result)

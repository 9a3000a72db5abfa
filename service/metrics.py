"""Every Prometheus metric of the gate, in one place (names and labels are part of the contract).

Labels carry only bounded, non-patient values: calling AE titles, outcomes, reasons, destination and model names,
transfer syntax names and DICOM status codes. Never a UID, a name or an ID.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latencies of one film range from milliseconds (store of a small CR) to seconds (a large JPEG 2000 on CPU).
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

INSTANCES_RECEIVED = Counter(
    "filmgate_instances_received", "Instances acknowledged with 0x0000 (durably spooled)", ["calling_ae"]
)
BYTES_RECEIVED = Counter("filmgate_bytes_received", "Bytes of the datasets received", ["calling_ae"])
STORE_FAILURES = Counter("filmgate_store_failures", "C-STORE requests answered with a failure", ["status"])
ASSOCIATIONS = Counter("filmgate_associations", "Association requests by outcome", ["calling_ae", "result"])
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
DEAD_LETTERS = Counter("filmgate_dead_letters", "Instances moved to the dead-letter folder", ["destination"])
MODEL_INFO = Gauge("filmgate_model_info", "Loaded detectors (value 1)", ["model", "version", "provider"])
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

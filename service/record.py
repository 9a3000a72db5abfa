"""What the node knows of one instance, kept in one record each (no side channels).

* :class:`Arrival`: what the listener knew of an instance (calling and called AE title, peer address, when it arrived,
  how long storing it took). The listener writes it beside the instance in the spool (``<name>.json``, atomically,
  before the C-STORE is acknowledged); the worker that claims the instance reads it once.
* :class:`InstanceRecord`: the arrival and the judgement together, built once in the delivery stage. Both what the
  destinations need come from it: :meth:`InstanceRecord.layout_fields` (the ``{name}`` values of a folder layout,
  :data:`LAYOUT_FIELDS` are their names) and :meth:`InstanceRecord.sidecar` (the JSON beside a delivered file).

This module imports nothing of the gate, so the config (which checks layouts against :data:`LAYOUT_FIELDS`) can
import it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from filmgate.policy import Decision

# The previous version's spool names carried the arrival: <receive ns (20)><seq (3)>_<calling AE hex>_<UID>.dcm.
_LEGACY_NAME = re.compile(r"^(\d{20})\d{3}_([0-9a-f]*)_(.+)\.dcm$")


@dataclass(frozen=True)
class Arrival:
    """What the listener knew of one received instance (no patient data: AE titles, an address, times, the UID)."""

    received_at: float  # epoch seconds: the C-STORE request had fully arrived
    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""
    peer_port: int = 0
    sop_instance_uid: str = ""  # as the listener's header check read it
    store_seconds: float | None = None  # header check and writing the bytes durably (the C-STORE handler's work)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Arrival:
        raw = json.loads(data)
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}  # a newer version's extra keys: ignored
        return cls(**known)

    @classmethod
    def from_legacy_name(cls, name: str) -> Arrival | None:
        """The arrival of an instance spooled by the previous version, read from its file name (None when ``name``
        is not in that form)."""
        m = _LEGACY_NAME.match(name)
        if not m:
            return None
        try:
            ae = bytes.fromhex(m.group(2)).decode("ascii", "replace")
        except ValueError:
            ae = ""
        return cls(received_at=int(m.group(1)) / 1e9, calling_ae=ae, sop_instance_uid=m.group(3))


def iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass(frozen=True)
class InstanceRecord:
    """One decided instance: its arrival, its identity as its header states it, and the gate's decision."""

    arrival: Arrival
    calling_ae: str  # the metric-safe label of the sender (``unknown`` when nobody said)
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax: str
    decision: Decision
    models: Sequence[Mapping[str, str]]
    decided_at: float
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per step; "batch" is a count

    @property
    def reason(self) -> str:
        return self.decision.reasons[0] if self.decision.reasons else "accepted"

    def layout_fields(self) -> dict[str, str]:
        """The values a folder layout may name (``{reason}/{StudyInstanceUID}/...``), every one of
        :data:`LAYOUT_FIELDS`."""
        return {name: get(self) for name, get in LAYOUT.items()}

    def sidecar(self) -> dict[str, Any]:
        """The JSON record beside a delivered file (no patient name or ID)."""
        timings = {**({"store": self.arrival.store_seconds} if self.arrival.store_seconds is not None else {}),
                   **self.timings}  # fmt: skip
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "transfer_syntax": self.transfer_syntax,
            "calling_ae": self.calling_ae,
            "called_ae": self.arrival.called_ae,
            "peer_address": self.arrival.peer_address,
            **self.decision.to_dict(),
            "models": list(self.models),
            "received_at": iso(self.arrival.received_at),
            "decided_at": iso(self.decided_at),
            "timings_ms": {k: round(v * 1000, 3) if k != "batch" else v for k, v in timings.items()},
        }


# The layout fields, by name: how each is read from the record. The config checks layouts against these names.
LAYOUT: dict[str, Callable[[InstanceRecord], str]] = {
    "outcome": lambda r: r.decision.outcome,
    "reason": lambda r: r.reason,
    "reasons": lambda r: "+".join(r.decision.reasons) or "accepted",
    "calling_ae": lambda r: r.calling_ae,
    "date": lambda r: time.strftime("%Y%m%d", time.gmtime(r.arrival.received_at)),
    "Modality": lambda r: r.modality,
    "StudyInstanceUID": lambda r: r.study_instance_uid,
    "SeriesInstanceUID": lambda r: r.series_instance_uid,
    "SOPInstanceUID": lambda r: r.sop_instance_uid,
    "SOPClassUID": lambda r: r.sop_class_uid,
}
LAYOUT_FIELDS = tuple(LAYOUT)

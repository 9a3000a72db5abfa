"""Study summaries: the gate judges instances one by one, but a PACS and a research pipeline think in studies.

Every decided instance is noted in a small SQLite database (WAL mode, ``<spool>/state/studies.sqlite``) that all
worker processes write to. When a study has received no instance for ``studies.stable_seconds`` (as Orthanc's
StableAge), the node's main process summarises it once: counts per outcome and reason, the accepted instances, and
``usable`` (at least one film of the study was accepted, i.e. a clean frontal chest film, a corrected derived film
included). An instance that arrives after the summary makes the study unstable again and it is summarised anew.

The database holds UIDs, outcomes and reasons only: no patient name or ID. For rejection notes (IOCM) the headers of
the rejected instances are kept as header-only DICOM files beside it, until the note is made.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reasons TEXT NOT NULL,          -- JSON list
    derived_from TEXT,              -- SOP Instance UID of the original, for corrected derived films
    header_path TEXT,               -- header-only copy kept for a rejection note
    rejection_reasons TEXT,         -- JSON list of the reasons that call for a note ([] = none)
    noted INTEGER NOT NULL DEFAULT 0,  -- 1 once a rejection note referenced it
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    summarised_at REAL              -- NULL while the study is not stable or changed since
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (summarised_at, last_seen);
"""


@dataclass(frozen=True)
class NotedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    outcome: str
    reasons: tuple[str, ...]
    derived_from: str | None = None
    header_path: str | None = None
    rejection_reasons: tuple[str, ...] = ()


class StudyTracker:
    """The studies of this node (one database shared by the node's processes; each opens its own connection)."""

    def __init__(self, path: str | Path, *, stable_seconds: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stable_seconds = stable_seconds
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # one connection per thread (and so per process)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ------------------------------------------------------------------ writers (worker processes)

    def note(self, inst: NotedInstance, *, now: float | None = None) -> None:
        """Record a decided instance (a second copy of the same SOP Instance UID replaces the first) and make its
        study unstable again."""
        now = time.time() if now is None else now
        if not inst.study_instance_uid:
            return  # a film without a study (undecodable header, a PNG) belongs to no study summary
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                (inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid, inst.sop_class_uid,
                 inst.outcome, json.dumps(list(inst.reasons)), inst.derived_from, inst.header_path,
                 json.dumps(list(inst.rejection_reasons)), now),
            )  # fmt: skip
            db.execute(
                "INSERT INTO studies (study_instance_uid, last_seen) VALUES (?, ?) ON CONFLICT(study_instance_uid) "
                "DO UPDATE SET last_seen = max(last_seen, excluded.last_seen), summarised_at = NULL",
                (inst.study_instance_uid, now),
            )

    # ------------------------------------------------------------------ the main process

    def due(self, *, now: float | None = None) -> list[str]:
        """Studies that became stable and have no summary since their last instance."""
        now = time.time() if now is None else now
        rows = self._connection().execute(  # a read: no write lock (the node asks every half second)
            "SELECT study_instance_uid FROM studies WHERE summarised_at IS NULL AND last_seen <= ? ORDER BY last_seen",
            (now - self.stable_seconds,),
        ).fetchall()
        return [r[0] for r in rows]

    def summarise(self, study_uid: str, *, now: float | None = None) -> dict[str, Any]:
        """The summary of one study (marks it summarised; the decision index and the JSON files keep it)."""
        now = time.time() if now is None else now
        with self._db() as db:
            rows = db.execute(
                "SELECT sop_instance_uid, series_instance_uid, sop_class_uid, outcome, reasons, derived_from, "
                "received_at FROM instances WHERE study_instance_uid = ? ORDER BY received_at",
                (study_uid,),
            ).fetchall()
            outcomes: dict[str, int] = {}
            reasons: dict[str, int] = {}
            accepted, derived = [], []
            for sop, _series, _cls, outcome, reason_json, derived_from, _at in rows:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                for r in json.loads(reason_json):
                    reasons[r] = reasons.get(r, 0) + 1
                if outcome == "accept":
                    accepted.append(sop)
                if derived_from:
                    derived.append({"sop_instance_uid": sop, "derived_from": derived_from, "outcome": outcome})
            originals = [r for r in rows if not r[5]]
            summary = {
                "study_instance_uid": study_uid,
                "instances": len(originals),
                "derived": derived,
                "outcomes": dict(sorted(outcomes.items())),
                "reasons": dict(sorted(reasons.items())),
                "accepted": accepted,
                "usable": bool(accepted),
                "no_frontal_chest_accepted": not accepted,
                "first_received": _iso(min((r[6] for r in rows), default=now)),
                "last_received": _iso(max((r[6] for r in rows), default=now)),
                "summarised_at": _iso(now),
            }
            db.execute("UPDATE studies SET summarised_at = ? WHERE study_instance_uid = ?", (now, study_uid))
        return summary

    def pending_rejections(self, study_uid: str) -> list[tuple[str, str, tuple[str, ...]]]:
        """(SOP Instance UID, header file, reasons) of the study's rejected instances no note has referenced yet."""
        rows = self._connection().execute(
            "SELECT sop_instance_uid, header_path, rejection_reasons FROM instances WHERE study_instance_uid = ? "
            "AND noted = 0 AND header_path IS NOT NULL AND rejection_reasons != '[]' ORDER BY received_at",
            (study_uid,),
        ).fetchall()
        return [(sop, path, tuple(json.loads(rs))) for sop, path, rs in rows]

    def mark_noted(self, sop_uids: Sequence[str]) -> None:
        """A rejection note names these instances: no later note names them again, and their headers may go."""
        with self._db() as db:
            db.executemany(
                "UPDATE instances SET noted = 1, header_path = NULL WHERE sop_instance_uid = ?",
                [(s,) for s in sop_uids],
            )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"

"""The decision index: one row per instance the node received, what the gate decided and where it went.

An embedded SQLite database in WAL mode at ``<spool>/state/index.sqlite``. Every process of the node (the listener's,
each worker) opens its own connection; SQLite's write lock makes them take turns (one writer at a time, short
``BEGIN IMMEDIATE`` transactions, a long busy timeout), readers never wait. The spool stays the source of truth:
writes happen *before* the spool step they describe (an instance is recorded delivered before it leaves
``claimed/``), an index failure never stops a film, and at start :meth:`DecisionIndex.reconcile` makes the index
agree with what the spool, the outboxes and the dead-letter folders hold, so a ``kill -9`` at any moment leaves
nothing the index does not know about.

Rows are keyed by the spool file name (unique per reception; the same SOP Instance UID sent twice gives two rows).
The API other parts use: :meth:`record_received` (listener), :meth:`record_instance` and :meth:`record_delivery`
(pipeline, destinations), :meth:`set_review_state` and :meth:`set_labels` (console), :meth:`record_note` (anything
said about an instance or a study later, e.g. an IOCM rejection note sent) and :meth:`record_study` (study
summaries). No patient name or ID is stored: the console reads them from the kept bytes when it may show them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("filmgate.index")

SCHEMA_VERSION = 2
REVIEW_STATES = ("none", "pending", "released", "confirmed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    spool_name TEXT NOT NULL UNIQUE,
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    study_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    transfer_syntax TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    peer_address TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    decided_at REAL,
    delivered_at REAL,
    state TEXT NOT NULL DEFAULT 'received',        -- received | decided | delivered | unknown
    outcome TEXT,                                   -- the gate's decision: accept | quarantine
    routed TEXT,                                    -- the route taken (accept in shadow mode whatever the decision)
    shadow INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',                -- first reason ('' when accepted)
    reasons TEXT NOT NULL DEFAULT '[]',
    scores TEXT NOT NULL DEFAULT '{}',
    findings TEXT NOT NULL DEFAULT '[]',            -- [{detector, score, predicted, flagged, model, version}]
    models TEXT NOT NULL DEFAULT '{}',
    notes TEXT NOT NULL DEFAULT '[]',
    header TEXT NOT NULL DEFAULT '{}',              -- Modality, ViewPosition, BodyPartExamined, PatientAge as sent
    error TEXT NOT NULL DEFAULT '',
    kept_path TEXT NOT NULL DEFAULT '',             -- the received bytes kept for review ('' when not kept)
    review_state TEXT NOT NULL DEFAULT 'none',      -- none | pending | released | confirmed
    reviewed_by TEXT NOT NULL DEFAULT '',
    reviewed_at REAL
);
CREATE INDEX IF NOT EXISTS instances_received ON instances (received_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS instances_outcome ON instances (outcome, received_at DESC);
CREATE INDEX IF NOT EXISTS instances_review ON instances (review_state, reason);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_instance_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS instance_reasons (      -- every reason of an instance, for fast filtering by reason
    reason TEXT NOT NULL,
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    PRIMARY KEY (reason, instance_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instance_reasons_instance ON instance_reasons (instance_id);
CREATE TABLE IF NOT EXISTS deliveries (
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,                            -- delivered | queued | dead-letter | failed
    at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (instance_id, destination)
);
CREATE TABLE IF NOT EXISTS labels (
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    detector TEXT NOT NULL,
    label TEXT NOT NULL,
    user TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (instance_id, detector)
);
CREATE TABLE IF NOT EXISTS thumbnails (
    instance_id INTEGER PRIMARY KEY REFERENCES instances(id) ON DELETE CASCADE,
    png BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY,
    instance_id INTEGER REFERENCES instances(id) ON DELETE CASCADE,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    user TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_instance ON notes (instance_id);
CREATE INDEX IF NOT EXISTS notes_study ON notes (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    summary TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_JSON_COLUMNS = ("reasons", "scores", "findings", "models", "notes", "header")


@dataclass(frozen=True)
class Query:
    """A filter over the index (what the console's grid and ``GET /api/instances`` ask)."""

    outcome: str = ""  # accept | quarantine (the gate's decision, also in shadow mode)
    reason: str = ""  # any of the instance's reasons
    calling_ae: str = ""
    since: float | None = None  # received at or after (epoch seconds)
    until: float | None = None
    review_state: str = ""
    detector: str = ""  # with min_score / max_score: that detector's score
    min_score: float | None = None
    max_score: float | None = None
    study_instance_uid: str = ""
    limit: int = 50
    offset: int = 0


class DecisionIndex:
    """One connection to the index, safe to share between the threads of one process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 60000")
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process (the WAL is in the OS's hands); an OS crash may
        # lose the last commits, which reconcile() puts back from the spool.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._write() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is not None and int(row["value"]) < 2:  # version 1 had no reason table: fill it once
                db.execute("INSERT OR IGNORE INTO instance_reasons (reason, instance_id)"
                           " SELECT j.value, i.id FROM instances i, json_each(i.reasons) j")  # fmt: skip
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    @classmethod
    def for_config(cls, cfg: Any) -> DecisionIndex | None:
        """The node's index (None when ``index.enabled`` is false)."""
        if not cfg.index.enabled:
            return None
        return cls(Path(cfg.state_dir) / "index.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------------------------------ writes

    def record_received(self, spool_name: str, *, sop_instance_uid: str = "", calling_ae: str = "",
                        peer_address: str = "", received_at: float | None = None) -> None:  # fmt: skip
        """The listener persisted an instance (before it answers the C-STORE)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO instances (spool_name, sop_instance_uid, calling_ae, peer_address, received_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(spool_name) DO UPDATE SET peer_address = excluded.peer_address",
                (spool_name, sop_instance_uid, calling_ae, peer_address, received_at or time.time()),
            )

    def record_instance(self, spool_name: str, record: Mapping[str, Any], *, received_at: float,
                        thumbnail: bytes | None = None) -> int:  # fmt: skip
        """The gate decided on an instance (``record``: the sidecar's fields plus ``routed``, ``shadow``,
        ``kept_path``, ``header``); returns its id. Called again for the same spool file it updates the row."""
        reasons = list(record.get("reasons") or [])
        outcome = record.get("decision") or record.get("outcome") or ""
        routed = record.get("routed") or outcome
        values = {
            "sop_instance_uid": record.get("sop_instance_uid", ""),
            "series_instance_uid": record.get("series_instance_uid", ""),
            "study_instance_uid": record.get("study_instance_uid", ""),
            "sop_class_uid": record.get("sop_class_uid", ""),
            "modality": record.get("modality", ""),
            "transfer_syntax": record.get("transfer_syntax", ""),
            "calling_ae": record.get("calling_ae", ""),
            "decided_at": time.time(),
            "state": "decided",
            "outcome": outcome,
            "routed": routed,
            "shadow": 1 if record.get("shadow") else 0,
            "reason": reasons[0] if reasons else "",
            "reasons": json.dumps(reasons),
            "scores": json.dumps(record.get("scores") or {}),
            "findings": json.dumps(record.get("findings") or []),
            "models": json.dumps(record.get("models") or {}),
            "notes": json.dumps(record.get("notes") or []),
            "header": json.dumps(record.get("header") or {}),
            "error": record.get("error") or "",
            "kept_path": record.get("kept_path") or "",
            "review_state": "pending" if outcome == "quarantine" else "none",
        }
        cols = ", ".join(values)
        updates = ", ".join(f"{k} = excluded.{k}" for k in values if k not in ("review_state",))
        with self._write() as db:
            row = db.execute(
                f"INSERT INTO instances (spool_name, received_at, {cols}) VALUES (?, ?, {', '.join('?' * len(values))})"
                f" ON CONFLICT(spool_name) DO UPDATE SET {updates},"
                " review_state = CASE WHEN instances.review_state IN ('released', 'confirmed')"
                " THEN instances.review_state ELSE excluded.review_state END RETURNING id",
                (spool_name, received_at, *values.values()),
            ).fetchone()
            iid = int(row["id"])
            db.execute("DELETE FROM instance_reasons WHERE instance_id = ?", (iid,))
            db.executemany("INSERT OR IGNORE INTO instance_reasons (reason, instance_id) VALUES (?, ?)",
                           [(r, iid) for r in reasons])  # fmt: skip
            if thumbnail:
                db.execute("INSERT OR REPLACE INTO thumbnails (instance_id, png) VALUES (?, ?)", (iid, thumbnail))
        return iid

    def record_delivery(self, spool_name: str | None, destination: str, state: str, *, instance_id: int | None = None,
                        error: str = "", attempts: int = 0) -> None:  # fmt: skip
        """A destination's state for an instance: ``delivered`` (stored at a folder, or acknowledged by a DICOM
        peer), ``queued`` (in a DICOM destination's outbox), ``dead-letter``, ``failed``."""
        now = time.time()
        with self._write() as db:
            iid = instance_id if instance_id is not None else self._id_of(db, spool_name or "")
            if iid is None:
                return
            db.execute(
                "INSERT INTO deliveries (instance_id, destination, state, at, attempts, error) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(instance_id, destination) DO UPDATE SET state = excluded.state, at = excluded.at,"
                " attempts = MAX(deliveries.attempts, excluded.attempts), error = excluded.error",
                (iid, destination, state, now, attempts, error),
            )

    def record_delivered(self, spool_name: str) -> None:
        """Every destination of the instance's route has it (written before the spool lets it go)."""
        with self._write() as db:
            db.execute("UPDATE instances SET state = 'delivered', delivered_at = ? WHERE spool_name = ?",
                       (time.time(), spool_name))  # fmt: skip

    def set_review_state(self, instance_id: int, state: str, user: str) -> None:
        if state not in REVIEW_STATES:
            raise ValueError(f"review state must be one of {REVIEW_STATES}")
        with self._write() as db:
            db.execute("UPDATE instances SET review_state = ?, reviewed_by = ?, reviewed_at = ? WHERE id = ?",
                       (state, user, time.time(), instance_id))  # fmt: skip

    def set_labels(self, instance_id: int, labels: Mapping[str, str], user: str) -> None:
        now = time.time()
        with self._write() as db:
            for detector, label in labels.items():
                db.execute(
                    "INSERT INTO labels (instance_id, detector, label, user, at) VALUES (?,?,?,?,?)"
                    " ON CONFLICT(instance_id, detector) DO UPDATE SET label = excluded.label, user = excluded.user,"
                    " at = excluded.at",
                    (instance_id, detector, label, user, now),
                )
            db.execute("UPDATE instances SET reviewed_by = ?, reviewed_at = ? WHERE id = ?", (user, now, instance_id))

    def record_note(self, kind: str, data: Mapping[str, Any], *, instance_id: int | None = None,
                    study_instance_uid: str = "", user: str = "") -> None:  # fmt: skip
        """Something said about an instance or a study after the decision (e.g. kind ``iocm-rejection``)."""
        with self._write() as db:
            db.execute("INSERT INTO notes (instance_id, study_instance_uid, kind, data, user, at) VALUES (?,?,?,?,?,?)",
                       (instance_id, study_instance_uid, kind, json.dumps(dict(data)), user, time.time()))  # fmt: skip

    def record_study(self, study_instance_uid: str, summary: Mapping[str, Any]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO studies (study_instance_uid, summary, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(study_instance_uid) DO UPDATE SET summary = excluded.summary,"
                " updated_at = excluded.updated_at",
                (study_instance_uid, json.dumps(dict(summary)), time.time()),
            )

    @staticmethod
    def _id_of(db: sqlite3.Connection, spool_name: str) -> int | None:
        row = db.execute("SELECT id FROM instances WHERE spool_name = ?", (spool_name,)).fetchone()
        return int(row["id"]) if row else None

    # ------------------------------------------------------------------------------------------ reads

    def query(self, q: Query) -> tuple[list[dict[str, Any]], int]:
        """Instances matching ``q``, newest first, and how many match in all."""
        where, args = [], []
        for col in ("outcome", "calling_ae", "review_state", "study_instance_uid"):
            value = getattr(q, col)
            if value:
                where.append(f"{col} = ?")
                args.append(value)
        if q.reason:
            where.append("id IN (SELECT instance_id FROM instance_reasons WHERE reason = ?)")
            args.append(q.reason)
        if q.since is not None:
            where.append("received_at >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("received_at < ?")
            args.append(q.until)
        if q.detector and (q.min_score is not None or q.max_score is not None):
            path = '$."' + q.detector.replace('"', "") + '"'
            if q.min_score is not None:
                where.append("json_extract(scores, ?) >= ?")
                args += [path, q.min_score]
            if q.max_score is not None:
                where.append("json_extract(scores, ?) <= ?")
                args += [path, q.max_score]
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        total = int(self._read(f"SELECT COUNT(*) AS n FROM instances {clause}", args)[0]["n"])
        rows = self._read(
            f"SELECT * FROM instances {clause} ORDER BY received_at DESC, id DESC LIMIT ? OFFSET ?",
            [*args, max(0, min(q.limit, 1000)), max(0, q.offset)],
        )
        return [self._item(r) for r in rows], total

    def get(self, instance_id: int) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM instances WHERE id = ?", (instance_id,))
        if not rows:
            return None
        item = self._item(rows[0])
        item["deliveries"] = [
            {"destination": r["destination"], "state": r["state"], "at": _iso(r["at"]), "attempts": r["attempts"],
             "error": r["error"]}  # fmt: skip
            for r in self._read("SELECT * FROM deliveries WHERE instance_id = ? ORDER BY destination", (instance_id,))
        ]
        item["notes_log"] = [
            {"kind": r["kind"], "data": json.loads(r["data"]), "user": r["user"], "at": _iso(r["at"])}
            for r in self._read("SELECT * FROM notes WHERE instance_id = ? ORDER BY id", (instance_id,))
        ]
        return item

    def ids_of(self, sop_instance_uid: str) -> list[int]:
        """Index rows of an SOP Instance UID (a second copy received makes a second row)."""
        return [int(r["id"]) for r in self._read("SELECT id FROM instances WHERE sop_instance_uid = ? ORDER BY id",
                                                 (sop_instance_uid,))]  # fmt: skip

    def get_by_name(self, spool_name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT id FROM instances WHERE spool_name = ?", (spool_name,))
        return self.get(int(rows[0]["id"])) if rows else None

    def thumbnail(self, instance_id: int) -> bytes | None:
        rows = self._read("SELECT png FROM thumbnails WHERE instance_id = ?", (instance_id,))
        return bytes(rows[0]["png"]) if rows else None

    def store_thumbnail(self, instance_id: int, png: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO thumbnails (instance_id, png) VALUES (?, ?)", (instance_id, png))

    def labels(self) -> list[dict[str, Any]]:
        """Every relabelled film: the training package's extra labelled source."""
        rows = self._read(
            "SELECT l.detector, l.label, l.user, l.at, i.id, i.sop_instance_uid, i.kept_path FROM labels l"
            " JOIN instances i ON i.id = l.instance_id ORDER BY l.at, i.id, l.detector"
        )
        keys = ("id", "kept_path", "sop_instance_uid", "detector", "label", "user", "at")
        out = []
        for r in rows:
            d = {k: r[k] for k in keys}
            out.append({**d, "file": d.pop("kept_path"), "labelled_at": _iso(d.pop("at"))})
        return out

    def review_counts(self) -> dict[tuple[str, str], int]:
        """(review state, first reason) -> instances, for the review gauges."""
        rows = self._read("SELECT review_state, reason, COUNT(*) AS n FROM instances WHERE review_state != 'none'"
                          " GROUP BY review_state, reason")  # fmt: skip
        return {(r["review_state"], r["reason"] or "none"): int(r["n"]) for r in rows}

    def count(self, where: str = "", args: Sequence[Any] = ()) -> int:
        return int(self._read(f"SELECT COUNT(*) AS n FROM instances {where}", args)[0]["n"])

    def spool_names(self, where: str = "", args: Sequence[Any] = ()) -> list[str]:
        return [r["spool_name"] for r in self._read(f"SELECT spool_name FROM instances {where}", args)]

    def studies(self, limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Studies, most recently received first: instances per outcome, quarantine reasons, awaiting review, the
        first and last arrival, and the study summary when one was recorded (:meth:`record_study`)."""
        total = int(self._read("SELECT COUNT(DISTINCT study_instance_uid) AS n FROM instances"
                               " WHERE study_instance_uid != ''")[0]["n"])  # fmt: skip
        rows = self._read(
            "SELECT i.study_instance_uid AS uid, COUNT(*) AS n, SUM(i.outcome = 'accept') AS accepted,"
            " SUM(i.outcome = 'quarantine') AS quarantined, SUM(i.review_state = 'pending') AS pending,"
            " MIN(i.received_at) AS first, MAX(i.received_at) AS last, s.summary AS summary"
            " FROM instances i LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid"
            " WHERE i.study_instance_uid != '' GROUP BY i.study_instance_uid ORDER BY last DESC LIMIT ? OFFSET ?",
            (max(1, min(limit, 1000)), max(0, offset)),
        )
        out = []
        for r in rows:
            reasons = self._read(
                "SELECT x.reason AS reason, COUNT(*) AS n FROM instances i JOIN instance_reasons x"
                " ON x.instance_id = i.id WHERE i.study_instance_uid = ? GROUP BY x.reason ORDER BY n DESC",
                (r["uid"],),
            )  # fmt: skip
            out.append({
                "study_instance_uid": r["uid"], "instances": r["n"], "accepted": r["accepted"] or 0,
                "quarantined": r["quarantined"] or 0, "pending": r["pending"] or 0,
                "reasons": {x["reason"]: x["n"] for x in reasons}, "first_received_at": _iso(r["first"]),
                "last_received_at": _iso(r["last"]), "summary": json.loads(r["summary"]) if r["summary"] else None,
            })  # fmt: skip
        return out, total

    def senders(self) -> list[str]:
        return [r["calling_ae"] for r in self._read("SELECT DISTINCT calling_ae FROM instances ORDER BY 1")]

    def reasons(self) -> list[str]:
        return [r["reason"] for r in self._read("SELECT DISTINCT reason FROM instance_reasons ORDER BY 1")]

    @staticmethod
    def _item(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for col in _JSON_COLUMNS:
            d[col] = json.loads(d[col] or "null")
        for col in ("received_at", "decided_at", "delivered_at", "reviewed_at"):
            d[col] = _iso(d[col]) if d[col] is not None else None
        d["shadow"] = bool(d["shadow"])
        d["kept"] = bool(d["kept_path"]) and Path(d["kept_path"]).is_file()
        return d

    def labels_of(self, instance_id: int) -> dict[str, dict[str, str | None]]:
        rows = self._read("SELECT * FROM labels WHERE instance_id = ?", (instance_id,))
        return {r["detector"]: {"label": r["label"], "user": r["user"], "at": _iso(r["at"])} for r in rows}

    # ------------------------------------------------------------------------------------------ maintenance

    def reconcile(self, spool: Any, dicom_destinations: Iterable[tuple[str, Path, Path]] = ()) -> dict[str, int]:
        """Make the index agree with the spool after a start (the spool is the truth).

        ``dicom_destinations``: (name, outbox folder, dead-letter folder) of each DICOM destination. Returns counts
        of what was fixed (for the log)."""
        from filmgate.spool import SUFFIX

        fixed = {"added": 0, "lost": 0, "queued": 0, "sent": 0, "dead": 0}
        files = {p.name: p for p in [*spool.pending(), *spool.claimed_root.rglob(f"*{SUFFIX}")]}
        in_spool = set(files)
        known = set(self.spool_names())
        missing = {name: spool.arrival(files[name]) for name in sorted(in_spool - known)}  # what the listener knew
        with self._write() as db:
            for name, a in missing.items():
                db.execute(
                    "INSERT INTO instances (spool_name, sop_instance_uid, calling_ae, peer_address, received_at)"
                    " VALUES (?,?,?,?,?)", (name, a.sop_instance_uid, a.calling_ae, a.peer_address, a.received_at),
                )  # fmt: skip
                fixed["added"] += 1
            # rows the spool no longer holds but that never were recorded delivered: an index write that failed
            for r in db.execute("SELECT id, spool_name FROM instances WHERE state IN ('received', 'decided')"):
                if not _is_spool_name(r["spool_name"]):
                    continue  # a row another part recorded with its own key (e.g. ``sweep:<file>``): not the spool's
                if r["spool_name"] not in in_spool:
                    db.execute("UPDATE instances SET state = 'unknown' WHERE id = ?", (r["id"],))
                    fixed["lost"] += 1
            for dest, outbox, dead in dicom_destinations:
                waiting = {p.name for p in outbox.glob(f"*{SUFFIX}")} if outbox.is_dir() else set()
                given_up = {p.name for p in dead.glob(f"*{SUFFIX}")} if dead.is_dir() else set()
                rows = db.execute(
                    "SELECT d.instance_id, i.spool_name FROM deliveries d JOIN instances i ON i.id = d.instance_id"
                    " WHERE d.destination = ? AND d.state = 'queued'", (dest,),
                ).fetchall()  # fmt: skip
                queued = {r["spool_name"]: r["instance_id"] for r in rows}
                for name, iid in queued.items():
                    if name in waiting:
                        continue
                    state = "dead-letter" if name in given_up else "delivered"
                    db.execute("UPDATE deliveries SET state = ?, at = ? WHERE instance_id = ? AND destination = ?",
                               (state, time.time(), iid, dest))  # fmt: skip
                    fixed["dead" if state == "dead-letter" else "sent"] += 1
                for name in waiting - set(queued):
                    iid = self._id_of(db, name)
                    if iid is not None:
                        db.execute("INSERT OR REPLACE INTO deliveries (instance_id, destination, state, at)"
                                   " VALUES (?, ?, 'queued', ?)", (iid, dest, time.time()))  # fmt: skip
                        fixed["queued"] += 1
        return fixed

    def prune(self, retention_days: float, now: float | None = None) -> int:
        """Remove rows older than ``retention_days`` (0 keeps everything); returns how many."""
        if retention_days <= 0:
            return 0
        limit = (now or time.time()) - retention_days * 86400
        with self._write() as db:
            n = db.execute("DELETE FROM instances WHERE received_at < ? AND state != 'received'", (limit,)).rowcount
        return int(n)

    def expire_kept(self, older_than: float) -> list[str]:
        """Forget kept copies received before ``older_than``; returns their paths (the caller deletes the files)."""
        with self._write() as db:
            rows = db.execute("SELECT id, kept_path FROM instances WHERE kept_path != '' AND received_at < ?",
                              (older_than,)).fetchall()  # fmt: skip
            db.executemany("UPDATE instances SET kept_path = '' WHERE id = ?", [(r["id"],) for r in rows])
        return [r["kept_path"] for r in rows]


def _is_spool_name(name: str) -> bool:
    """A key made by the spool (``<ns><seq>.dcm``, or the previous version's form), not another part's own key."""
    return name.endswith(".dcm") and ":" not in name and "/" not in name


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"

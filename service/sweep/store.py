"""The sweep's state in its output folder: one SQLite file (``sweep.sqlite``, WAL mode, one writer: the driver).

It holds the files found by this run (``files``) and every result so far (``results``), each result with the size
and modification time of the file it was made from and the judge's fingerprint (detector versions and policy). A rerun
enumerates again and judges only films without a current result: those not judged yet (an interrupted run), changed
since, or judged by other detectors or another policy. Results are committed per batch, so Ctrl-C or kill -9 loses at
most the batches in flight. Files that disappeared from the sources leave the outputs (their rows stay in the file
until they come back or the folder is removed).
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from filmgate.sweep.sources import Candidate
from filmgate.sweep.work import Row

FILM_KINDS = ("dicom", "png", "jpeg", "remote")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    key TEXT PRIMARY KEY, path TEXT NOT NULL, abspath TEXT, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    kind TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', run INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS files_path ON files (path);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, fingerprint TEXT NOT NULL,
    decision TEXT NOT NULL, reasons TEXT NOT NULL, row TEXT NOT NULL, confidence TEXT NOT NULL, thumb BLOB);
"""


class Store:
    FILE = "sweep.sqlite"

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # One sweep per folder at a time: a second one would interleave runs and outputs.
        self._lock: IO[str] | None = open(out_dir / "sweep.lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RuntimeError(
                f"{out_dir} is in use by another filmgate sweep (wait for it, or use another --out)") from None
        self.path = out_dir / self.FILE
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.run = int(self.get("run", "0") or 0) + 1
        self.set("run", str(self.run))

    @classmethod
    def reader(cls, path: Path) -> Store:
        """A second, read-only connection to a sweep's state file (for a thread of the driver; no lock, no run)."""
        self = cls.__new__(cls)
        self.path = path
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        self._lock = None
        return self

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()

    # ------------------------------------------------------------------ meta

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else default

    def set(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                        (key, value))  # fmt: skip

    # ------------------------------------------------------------------ files of this run

    def add_files(self, cands: Iterable[Candidate], chunk: int = 2000) -> int:
        """Record every file found (streamed, committed in chunks); returns how many."""
        n = 0
        buf: list[tuple[Any, ...]] = []
        sql = ("INSERT INTO files (key, path, abspath, size, mtime_ns, kind, reason, run) VALUES (?,?,?,?,?,?,?,?) "
               "ON CONFLICT(key) DO UPDATE SET path=excluded.path, abspath=excluded.abspath, size=excluded.size, "
               "mtime_ns=excluded.mtime_ns, kind=excluded.kind, reason=excluded.reason, run=excluded.run")
        for c in cands:
            path = f"{c.source}/{c.path}" if c.source else c.path
            buf.append((path, path, c.abspath, c.size, c.mtime_ns, c.kind, c.reason, self.run))
            n += 1
            if len(buf) >= chunk:
                self._insert(sql, buf)
                buf = []
        self._insert(sql, buf)
        self.forget_unseen()
        return n

    def forget_unseen(self) -> None:
        """Files (or PACS instances) not found by this run leave the outputs."""
        self.db.execute("DELETE FROM files WHERE run != ?", (self.run,))

    def count_series(self, study: str, series: str) -> int:
        """PACS instances found in one series (their results paths are study/series/instance)."""
        prefix = f"{study}/{series}/"
        return self.db.execute("SELECT count(*) FROM files WHERE kind = 'remote' AND substr(path, 1, ?) = ?",
                               (len(prefix), prefix)).fetchone()[0]  # fmt: skip

    def add_remote(self, key: str, path: str) -> None:
        self.db.execute(
            "INSERT INTO files (key, path, abspath, size, mtime_ns, kind, reason, run) VALUES (?,?,NULL,0,0,'remote',"
            "'',?) ON CONFLICT(key) DO UPDATE SET path=excluded.path, run=excluded.run", (key, path, self.run)
        )  # fmt: skip

    def _insert(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.db.execute("BEGIN")
            self.db.executemany(sql, rows)
            self.db.execute("COMMIT")

    def counts(self, fingerprint: str) -> tuple[int, int]:
        """(films found, films with a current result)."""
        films = self.db.execute(
            f"SELECT count(*) FROM files WHERE kind IN {FILM_KINDS}").fetchone()[0]  # fmt: skip
        done = self.db.execute(self._current_sql("count(*)"), (fingerprint,)).fetchone()[0]
        return films, done

    def pending(self, fingerprint: str, chunk: int = 1000) -> Iterator[tuple[str, str, str | None]]:
        """(key, path, abspath) of every film without a current result, in the order found (read in chunks, so the
        writer can commit between them)."""
        last = 0
        sql = (
            f"SELECT f.rowid, f.key, f.path, f.abspath FROM files f LEFT JOIN results r ON r.key = f.key "
            f"WHERE f.kind IN {FILM_KINDS} AND f.rowid > ? AND (r.key IS NULL OR r.size != f.size OR "
            "r.mtime_ns != f.mtime_ns OR r.fingerprint != ?) ORDER BY f.rowid LIMIT ?"
        )
        while True:
            rows = self.db.execute(sql, (last, fingerprint, chunk)).fetchall()
            if not rows:
                return
            for rowid, key, path, abspath in rows:
                last = rowid
                yield key, path, abspath

    def is_pending(self, key: str, fingerprint: str) -> bool:
        """Whether ``key`` is a film found by this run that has no current result."""
        found = self.db.execute(f"SELECT 1 FROM files WHERE key = ? AND kind IN {FILM_KINDS}", (key,)).fetchone()
        current = self.db.execute(self._current_sql("1") + " AND f.key = ?", (fingerprint, key)).fetchone()
        return found is not None and current is None

    # ------------------------------------------------------------------ results

    def put(self, rows: Iterable[Row], fingerprint: str) -> None:
        """Store one batch's rows in one transaction (size and mtime of the file as enumerated)."""
        self.db.execute("BEGIN")
        for r in rows:
            f = self.db.execute("SELECT size, mtime_ns FROM files WHERE key = ?", (r.key,)).fetchone() or (0, 0)
            self.db.execute(
                "INSERT OR REPLACE INTO results (key, size, mtime_ns, fingerprint, decision, reasons, row, confidence,"
                " thumb) VALUES (?,?,?,?,?,?,?,?,?)",
                (r.key, f[0], f[1], fingerprint, r.values["decision"], r.values["reasons"], json.dumps(r.values),
                 json.dumps(r.confidence), r.thumb),
            )  # fmt: skip
        self.db.execute("COMMIT")

    def _current_sql(self, what: str) -> str:
        return (
            f"SELECT {what} FROM files f JOIN results r ON r.key = f.key WHERE f.kind IN {FILM_KINDS} AND "
            "r.size = f.size AND r.mtime_ns = f.mtime_ns AND r.fingerprint = ?"
        )

    def results(self, fingerprint: str, *, with_thumbs: bool = False) -> Iterator[dict[str, Any]]:
        """Every current result, in the order the files were found: the row's values plus ``_key``, ``_abspath``,
        ``_confidence``, ``_has_thumb`` (and ``_thumb``)."""
        cols = "f.key, f.abspath, r.row, r.confidence, r.thumb IS NOT NULL" + (", r.thumb" if with_thumbs else "")
        cur = self.db.execute(self._current_sql(cols) + " ORDER BY f.rowid", (fingerprint,))
        for rec in cur:
            values = json.loads(rec[2])
            values.update(_key=rec[0], _abspath=rec[1], _confidence=json.loads(rec[3]), _has_thumb=bool(rec[4]))
            if with_thumbs:
                values["_thumb"] = rec[5]
            yield values

    def score_range(self, fingerprint: str, detector: str) -> tuple[float, float]:
        """(min, max) of a detector's scores over the current results ((0, 1) when none)."""
        path = '$."' + detector.replace('"', "") + '_score"'
        lo, hi = self.db.execute(
            self._current_sql("min(json_extract(r.row, ?1)), max(json_extract(r.row, ?1))").replace("= ?", "= ?2"),
            (path, fingerprint),
        ).fetchone()
        return (0.0, 1.0) if lo is None else (float(lo), float(hi))

    def decision_of(self, path: str, fingerprint: str) -> tuple[str, str] | None:
        """(decision, reasons) of the current result for the film at results path ``path``."""
        row = self.db.execute(self._current_sql("r.decision, r.reasons") + " AND f.path = ?", (fingerprint, path))
        found = row.fetchone()
        return (found[0], found[1]) if found else None

    def set_abspath(self, key: str, abspath: str) -> None:
        self.db.execute("UPDATE files SET abspath = ? WHERE key = ?", (abspath, key))

    def thumb(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT thumb FROM results WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def skipped(self) -> Iterator[tuple[str, str]]:
        yield from self.db.execute(
            f"SELECT path, reason FROM files WHERE kind NOT IN {FILM_KINDS} ORDER BY rowid")  # fmt: skip

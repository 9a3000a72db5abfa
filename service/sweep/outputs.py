"""The sweep's tables: ``results.csv`` (and ``results.parquet`` when pyarrow is installed), ``skipped.csv`` and
``summary.json``, written from the results store in one streaming pass (memory does not grow with the dataset).

Columns of results.csv, in order: ``path`` (relative to its source; prefixed by the source's folder name when several
sources were given), ``sop_instance_uid`` (DICOM only), ``decision``, ``reasons`` (joined by ``;``), then for each
detector ``<name>_score`` and ``<name>_class``, then ``modality``, ``view_position``, ``body_part_examined``,
``patient_age`` as stored in the header, and ``error`` (why an undecodable film could not be read).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from filmgate.sweep.store import Store

HEAD = ("path", "sop_instance_uid", "decision", "reasons")
TAIL = ("modality", "view_position", "body_part_examined", "patient_age", "error")
PARQUET_CHUNK = 10_000


def columns(detectors: Sequence[str]) -> list[str]:
    return [*HEAD, *(c for d in detectors for c in (f"{d}_score", f"{d}_class")), *TAIL]


def top_folder(path: str) -> str:
    return path.split("/", 1)[0] if "/" in path else "."


def write_tables(store: Store, fingerprint: str, detectors: Sequence[str], out: Path,
                 run: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Write results.csv, results.parquet (if pyarrow), skipped.csv and summary.json; returns the summary."""
    cols = columns(detectors)
    by_decision: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    folders: dict[str, Counter[str]] = defaultdict(Counter)
    parquet = _ParquetWriter(out / "results.parquet", cols, detectors)
    n = 0
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in store.results(fingerprint):
            writer.writerow(row)
            parquet.add(row)
            n += 1
            by_decision[row["decision"]] += 1
            folder = folders[top_folder(row["path"])]
            folder["films"] += 1
            folder[row["decision"]] += 1
            for reason in filter(None, row["reasons"].split(";")):
                by_reason[reason] += 1
                folder[f"reason:{reason}"] += 1
    os.replace(tmp, out / "results.csv")
    parquet.close()
    skipped: Counter[str] = Counter()
    with open(out / "skipped.csv.tmp", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        for path, reason in store.skipped():
            w.writerow([path, reason])
            skipped[reason] += 1
    os.replace(out / "skipped.csv.tmp", out / "skipped.csv")
    summary = {
        "films": n,
        "complete": bool(run.get("complete")),
        "by_decision": dict(sorted(by_decision.items())),
        "by_reason": dict(by_reason.most_common()),
        "by_folder": {
            name: {
                "films": c["films"],
                "accept": c["accept"],
                "quarantine": c["quarantine"],
                "by_reason": {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("reason:")},
            }
            for name, c in sorted(folders.items())
        },
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped.most_common()),
        "detectors": list(detectors),
        "parquet": parquet.enabled,
        "run": run,
    }
    _write_json(out / "summary.json", summary)
    return summary


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _ParquetWriter:
    """results.parquet in row groups of PARQUET_CHUNK rows; disabled (and any stale file removed) without pyarrow."""

    def __init__(self, path: Path, cols: Sequence[str], detectors: Iterable[str]) -> None:
        self.path, self.cols = path, list(cols)
        self.buf: list[dict[str, Any]] = []
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            self.enabled = False
            path.unlink(missing_ok=True)
            return
        self.enabled = True
        floats = {f"{d}_score" for d in detectors}
        self.pa = pa
        self.schema = pa.schema([(c, pa.float64() if c in floats else pa.string()) for c in self.cols])
        self.tmp = path.with_suffix(".parquet.tmp")
        self.writer = pq.ParquetWriter(self.tmp, self.schema)

    def add(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.buf.append(row)
            if len(self.buf) >= PARQUET_CHUNK:
                self._flush()

    def _flush(self) -> None:
        if self.buf:
            arrays = {c: [r.get(c) for r in self.buf] for c in self.cols}  # None where a film has no such value
            self.writer.write_table(self.pa.Table.from_pydict(arrays, schema=self.schema))
            self.buf = []

    def close(self) -> None:
        if self.enabled:
            self._flush()
            self.writer.close()
            os.replace(self.tmp, self.path)

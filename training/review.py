"""Corrections from the review console as an extra labelled source (``data.review`` in a training config).

A site's reviewers relabel quarantined films in the node's console ("not rotated", "lateral", "adult"); the node
exports them as ``GET /api/labels.csv`` (columns ``file``, ``sop_instance_uid``, ``detector``, ``label``, ``user``,
``labelled_at``; ``file`` is where the node keeps the received bytes). This module turns the rows that concern the
task being trained into training rows, so the site fine-tunes the detector on its own corrected films. The CSV is read
from a file, or fetched from the node when ``labels`` is an ``http(s)://`` address (HTTP Basic credentials from
``$FILMGATE_REVIEW_AUTH`` = ``user:password``).

Which labels make a usable row depends on the task: a labelled task (``view``, ``pediatric``) takes any of its labels;
a task whose classes are made by transforming good films (``orientation``, ``inversion``, ``flip``, and the
``atypical`` score) only learns from films whose true class is the untransformed one ("upright", "normal",
"typical"): such a film is a correct frontal chest film of the site. Other rows are counted and left out. Rows are
always ``train`` films (never val); calibration still holds some out by patient hash as for every source.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import os
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from filmgate_training.datasets import LabelledFilm

log = logging.getLogger(__name__)
AUTH_ENV = "FILMGATE_REVIEW_AUTH"
COLUMNS = ("file", "sop_instance_uid", "detector", "label")


def read_labels(where: str, timeout: float = 60.0) -> list[dict[str, str]]:
    """The rows of a console labels CSV (a path, or the node's ``/api/labels.csv`` address)."""
    if where.startswith(("http://", "https://")):
        req = urllib.request.Request(where)
        auth = os.environ.get(AUTH_ENV, "")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - an address the config names
            text = rsp.read().decode("utf-8")
    else:
        text = Path(where).expanduser().read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"data.review: {where} is not a console labels CSV (no column {', '.join(missing)})")
    return list(reader)


def _row(task: object, label: str, path: Path, source: str, licence: str) -> LabelledFilm | None:
    from filmgate_training.tasks import LabelledTask

    base = LabelledFilm(
        path=path, source=source, kind="frontal-chest", view="", body_part="", modality="", age=None,
        pediatric="", patient="", split="train", licence=licence, resized_from="",
    )  # fmt: skip
    labels = tuple(getattr(task, "labels", ()) or ())
    if isinstance(task, LabelledTask):
        if label not in labels:
            return None
        for candidate in (replace(base, kind=label), replace(base, pediatric={"child": "yes", "adult": "no"}.get(
                label, ""))):  # fmt: skip
            idx = task.label_of(candidate)
            if idx is not None and labels[idx] == label:
                return candidate
        return None
    # the untransformed class, by the task's name for it or the console's for a score detector (not-<reason>)
    identity = {labels[0] if labels else "typical", f"not-{getattr(task, 'reason', '')}"}
    return base if label in identity else None


def review_rows(sources: Sequence[object], task: object) -> list[LabelledFilm]:
    """Training rows for ``task`` from every configured console export (``DataConfig.review``)."""
    out: list[LabelledFilm] = []
    name = getattr(task, "name", "")
    for src in sources:
        rows = read_labels(src.labels)  # type: ignore[attr-defined]
        used = unusable = gone = 0
        for r in rows:
            if r.get("detector") != name:
                continue
            path = Path(r.get("file") or "")
            if not r.get("file") or not path.is_file():
                gone += 1  # the node no longer keeps the bytes (review.retention_days)
                continue
            row = _row(task, (r.get("label") or "").strip(), path, src.source, src.licence)  # type: ignore[attr-defined]
            if row is None:
                unusable += 1
                continue
            out.append(row)
            used += 1
        log.info("data.review %s: %d films for %s, %d labels not usable by this task, %d films no longer kept",
                 src.labels, used, name, unusable, gone)  # type: ignore[attr-defined]  # fmt: skip
    return out


def check_not_worse(shipped: Path, metrics: dict) -> None:
    """Refuse to replace the detector in ``shipped`` (a models/<task>/ folder) by a site fine-tune that is worse on
    val: pooled accuracy and the worst source's accuracy must not drop (the same val films, by count)."""
    import json

    manifest = shipped / "manifest.json"
    if not manifest.is_file():
        return
    old = json.loads(manifest.read_text()).get("metrics") or {}
    if not old:
        return
    if old.get("val_films") != metrics.get("val_films"):
        raise RuntimeError(
            f"{shipped}: the shipped model was measured on {old.get('val_films')} val films, this one on "
            f"{metrics.get('val_films')}; evaluate on the same val films before shipping a site fine-tune"
        )
    worse = []
    if metrics["accuracy"] < old.get("accuracy", 0.0):
        worse.append(f"val accuracy {metrics['accuracy']:.5f} < {old['accuracy']:.5f}")
    new_worst, old_worst = metrics.get("worst_source") or {}, old.get("worst_source") or {}
    if new_worst.get("accuracy", 1.0) < old_worst.get("accuracy", 0.0):
        worse.append(f"worst source {new_worst} < {old_worst}")
    if worse:
        raise RuntimeError(f"not shipped: the site fine-tune is worse on val than {shipped} ({'; '.join(worse)})")

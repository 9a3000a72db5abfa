"""``report.html``: one self-contained page a person checks the sweep with, as Oakden-Rayner checked his.

It holds the counts (by decision, reason and top-level folder), a histogram of every detector's scores with its
threshold, a **contact sheet per reason** (the flagged films as the detectors saw them, most confident first, each
linked to its file), a sample of accepted films, and the undecodable and skipped files. Thumbnails are inlined (JPEG
data URIs), so the page can be mailed or archived alone; links are relative to the output folder, so they open the
films from a browser on the machine that holds them. Built from the results store in one streaming pass: each contact
sheet keeps its ``limit`` most confident films (the rest are in results.csv, and the page says how many).
"""

from __future__ import annotations

import base64
import heapq
import html
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filmgate.sweep.store import Store

BINS = 20
CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .7em;border:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px}
figure{margin:0;background:#111;color:#eee;padding:4px;border-radius:4px}
figure img{width:100%;height:160px;object-fit:contain;display:block;background:#000}
figcaption{font-size:11px;overflow-wrap:anywhere}figcaption a{color:#9cf}
.hists{display:flex;flex-wrap:wrap;gap:16px}.hist{background:#fff;border:1px solid #ddd;padding:6px}
.note{color:#666}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(abspath: str | None, out: Path) -> str | None:
    if not abspath:
        return None
    try:
        return os.path.relpath(abspath, out).replace(os.sep, "/")
    except ValueError:  # another drive (Windows)
        return Path(abspath).as_uri()


class _Collect:
    """What the page needs, gathered in one pass with bounded memory."""

    def __init__(self, ranges: dict[str, tuple[float, float]], limit: int, sample: int) -> None:
        self.limit, self.sample = limit, sample
        self.ranges = ranges  # detector -> (low, high) of its histogram
        self.hist: dict[str, list[int]] = {name: [0] * BINS for name in ranges}
        self.sheets: dict[str, list[tuple[float, int, str, str, str | None, str]]] = {}  # min-heaps: most confident
        self.flagged: dict[str, int] = {}
        self.accepted: list[tuple[int, str, str, str | None]] = []  # max-heap by -crc: a stable pseudo-random sample
        self.errors: list[tuple[str, str]] = []
        self.errors_total = 0
        self.n = 0

    def add(self, row: dict[str, Any]) -> None:
        self.n += 1
        for name, counts in self.hist.items():
            v = row.get(f"{name}_score")
            if isinstance(v, int | float):
                lo, hi = self.ranges[name]
                counts[min(BINS - 1, max(0, int((v - lo) / (hi - lo) * BINS)))] += 1
        key, path, href = row["_key"], row["path"], row["_abspath"]
        if row["error"]:
            self.errors_total += 1
            if len(self.errors) < self.limit:
                self.errors.append((path, row["error"]))
        if row["decision"] == "accept":
            if row["_has_thumb"]:
                sample = (-zlib.crc32(key.encode()), key, path, href)
                if len(self.accepted) < self.sample:
                    heapq.heappush(self.accepted, sample)
                elif sample > self.accepted[0]:
                    heapq.heapreplace(self.accepted, sample)
            return
        for reason in filter(None, row["reasons"].split(";")):
            self.flagged[reason] = self.flagged.get(reason, 0) + 1
            conf = row["_confidence"].get(reason, 0.0)
            heap = self.sheets.setdefault(reason, [])
            item = (conf, -self.n, key, path, href, row["reasons"])  # ties: earlier films first
            if len(heap) < self.limit:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)


def _histogram(name: str, counts: list[int], lo: float, hi: float, threshold: float | None) -> str:
    total = sum(counts)
    if not total:
        return ""
    width = (hi - lo) / BINS
    top = max(counts)
    w, h, pad = 300, 120, 18
    bar = w / BINS
    parts = [f'<svg width="{w}" height="{h + 2 * pad}" role="img" aria-label="{_esc(name)} scores">']
    for i, c in enumerate(counts):
        bh = 0 if c == 0 else max(1.0, (h - 4) * (c / top) ** 0.5)  # square-root scale: the rare tail stays visible
        parts.append(f'<rect x="{i * bar:.1f}" y="{pad + h - bh:.1f}" width="{bar - 1:.1f}" height="{bh:.1f}" '
                     f'fill="#4a7"><title>{lo + i * width:.2f}-{lo + (i + 1) * width:.2f}: {c}</title></rect>')
    if threshold is not None and lo <= threshold <= hi:
        x = (threshold - lo) / (hi - lo) * w
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad}" y2="{pad + h}" stroke="#c33" stroke-width="2"/>')
        parts.append(f'<text x="{min(x + 3, w - 90):.1f}" y="{pad - 4}" font-size="11" fill="#c33">'
                     f'threshold {threshold:.2f}</text>')  # fmt: skip
    parts.append(f'<text x="0" y="{h + 2 * pad - 3}" font-size="11">{lo:.2f}</text>'
                 f'<text x="{w - 30}" y="{h + 2 * pad - 3}" font-size="11">{hi:.2f}</text></svg>')  # fmt: skip
    return f'<div class="hist"><b>{_esc(name)}</b> ({total} films; square-root scale)<br>{"".join(parts)}</div>'


def _figure(store: Store, out: Path, key: str, path: str, abspath: str | None, caption: str) -> str:
    thumb = store.thumb(key)
    img = (f'<img loading="lazy" alt="{_esc(path)}" src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}">'
           if thumb else '<div class="note">no picture</div>')  # fmt: skip
    href = _href(abspath, out)
    name = f'<a href="{_esc(href)}">{_esc(path)}</a>' if href else _esc(path)
    if href:
        img = f'<a href="{_esc(href)}">{img}</a>'
    return f'<figure data-key="{_esc(key)}">{img}<figcaption>{name}<br>{_esc(caption)}</figcaption></figure>'


def _table(rows: list[tuple[Any, ...]], head: Sequence[str]) -> str:
    cells = "".join("<tr>" + "".join(f'<td class="n">{_esc(c)}</td>' if isinstance(c, int) else f"<td>{_esc(c)}</td>"
                                     for c in r) + "</tr>" for r in rows)  # fmt: skip
    return "<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def write_report(store: Store, fingerprint: str, detectors: Sequence[dict[str, Any]], summary: dict[str, Any],
                 out: Path, *, limit: int = 500, sample: int = 48) -> Path:  # fmt: skip
    """Write ``out/report.html`` (at most ``limit`` films per contact sheet, ``sample`` accepted films)."""
    ranges = {}
    for d in detectors:
        lo, hi = store.score_range(fingerprint, d["name"])
        ranges[d["name"]] = (min(0.0, lo), max(1.0, hi, d.get("threshold") or 0.0))
    col = _Collect(ranges, limit, sample)
    for row in store.results(fingerprint):
        col.add(row)
    thresholds = {d["name"]: d.get("threshold") for d in detectors}
    reason_detector = {d["reason"]: d["name"] for d in detectors}
    body = [f"<h1>filmgate sweep: {summary['films']} films</h1>"]
    run = summary.get("run", {})
    if not summary.get("complete"):
        body.append('<p class="note"><b>Incomplete:</b> the sweep was interrupted; run it again to finish.</p>')
    body.append(f'<p class="note">Sources: {_esc(", ".join(run.get("sources", [])))}. Detectors: '
                f'{_esc(", ".join(d["name"] for d in detectors) or "none")}.</p>')  # fmt: skip
    body.append("<h2>Counts</h2>")
    dec = summary["by_decision"]
    body.append(_table([("films judged", summary["films"]), ("accepted", dec.get("accept", 0)),
                        ("quarantined", dec.get("quarantine", 0)), ("undecodable", col.errors_total),
                        ("skipped (not films)", summary["skipped"])], ("", "count")))  # fmt: skip
    if summary["by_reason"]:
        body.append(_table(list(summary["by_reason"].items()), ("reason", "films")))
    if len(summary["by_folder"]) > 1:
        body.append(_table([(k, v["films"], v["accept"], v["quarantine"]) for k, v in summary["by_folder"].items()],
                           ("top-level folder", "films", "accepted", "quarantined")))  # fmt: skip
    body.append('<h2>Scores</h2><div class="hists">')
    body.extend(_histogram(name, counts, *ranges[name], thresholds.get(name)) for name, counts in col.hist.items())
    body.append("</div>")
    order = sorted(col.sheets, key=lambda r: -col.flagged[r])  # as the counts table: most films first
    nav = " · ".join(f'<a href="#reason-{_esc(r)}">{_esc(r)} ({col.flagged[r]})</a>' for r in order)
    body.append(f"<h2>Flagged films</h2><p>{nav or 'none'}</p>")
    for reason in order:
        heap = col.sheets[reason]
        det = reason_detector.get(reason)
        ranked = sorted(heap, reverse=True)
        shown = len(ranked)
        more = col.flagged[reason] - shown
        ranking = f"most confident first ({_esc(det)} score)" if det else "in the order found"
        body.append(f'<h3 id="reason-{_esc(reason)}">{_esc(reason)}: {col.flagged[reason]} films, {ranking}'
                    + (f"; the {more} least confident are in results.csv" if more > 0 else "") + "</h3>")
        figs = []
        for conf, _, key, path, abspath, reasons in ranked:
            caption = f"{det} {conf:.3f}" if det else reason
            others = [r for r in reasons.split(";") if r and r != reason]
            if others:
                caption += f" (also {', '.join(others)})"
            figs.append(_figure(store, out, key, path, abspath, caption))
        body.append(f'<div class="sheet" data-reason="{_esc(reason)}">{"".join(figs)}</div>')
    body.append(f"<h2>A sample of accepted films ({len(col.accepted)} of {dec.get('accept', 0)})</h2>")
    sample_figs = [_figure(store, out, key, path, abspath, "accepted")
                   for _, key, path, abspath in sorted(col.accepted, reverse=True)]  # fmt: skip
    body.append(f'<div class="sheet" data-reason="accept">{"".join(sample_figs)}</div>')
    if col.errors:
        body.append(f"<h2>Undecodable ({col.errors_total})</h2>" + _table(col.errors, ("path", "error")))
    skipped = [(p, r) for _, (p, r) in zip(range(limit), store.skipped(), strict=False)]
    if skipped:
        body.append(f"<h2>Skipped ({summary['skipped']}; all in skipped.csv)</h2>" + _table(skipped, ("path", "why")))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>filmgate sweep</title>'
            f'<style>{CSS}</style></head><body>{"".join(body)}</body></html>\n')  # fmt: skip
    report = out / "report.html"
    tmp = report.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, report)
    return report


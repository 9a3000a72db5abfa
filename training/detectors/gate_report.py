"""The gate report: the whole ``val`` split decided as the gate would decide it.

``python -m filmgate_training.detectors.gate_report [--out runs/gate-report] [--models models]`` judges every val film
with the gate's own judge (:class:`filmgate.judge.Judge`: the shipped detectors, the gate's decode and preprocessing,
:func:`filmgate.policy.decide` under the default policy). The films are PNG/JPEG
without a DICOM header, so the metadata rules (modality, age) do not apply: this is the image models' own work, the
hardest case for the pediatric rule (no age in the header).

Expected: accept exactly the frontal chest films of adults (or of unknown age); quarantine laterals, other
radiographs and non-radiographs (``not-frontal-chest``) and children's films (``pediatric``). The report counts
outcomes and reasons by expected kind and by source, lists every wrong decision, and draws two contact sheets
(wrongly accepted, wrongly quarantined). The sheets show real films from ../shared/data: they stay in the
git-ignored run folder; only the Markdown/JSON summary may be committed (``--docs`` copies it to docs/).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from filmgate.decode import decode_file
from filmgate.judge import Judge
from filmgate_training.config import REPO_ROOT
from filmgate_training.datasets import LabelledFilm, data_root, labels
from filmgate_training.gate_judge import gate_judge


def expected(film: LabelledFilm) -> tuple[str, str]:
    """(expected outcome, expected category) of a val film."""
    if film.kind != "frontal-chest":
        return "quarantine", film.kind
    if film.pediatric == "yes":
        return "quarantine", "frontal-chest, child"
    return "accept", "frontal-chest, adult or age unknown"


def decide_all(films: Sequence[LabelledFilm], judge: Judge, batch: int = 32) -> list[dict[str, Any]]:
    """Every film judged as the gate judges it (in batches of ``batch``), one row each, in order."""
    by_path = {f.path: f for f in films}
    return [_row(by_path[path], j.decision) for path, j in judge.judge_many([f.path for f in films], batch=batch)]


def made_wrong(films: Sequence[LabelledFilm], judge: Judge) -> dict[str, Any]:
    """Wrong films made from the adult val frontal films (:mod:`filmgate_training.detectors.corrupt`:
    collimated, zoomed,
    washed out, dark, nearly blank, screenshots), each decided by the whole gate: how many it keeps out, and why."""
    from filmgate_training.detectors.corrupt import CORRUPTIONS

    pixels = [decode_file(f.path).pixels for f in films]
    out: dict[str, Any] = {}
    for name, make in CORRUPTIONS.items():
        decisions = [j.decision for j in judge.conclude([judge.examine_pixels(make(px)) for px in pixels])]
        out[name] = {
            "films": len(decisions),
            "quarantined": sum(not d.accepted for d in decisions),
            "reasons": dict(collections.Counter(r for d in decisions for r in d.reasons).most_common()),
        }
    return out


def _row(film: LabelledFilm, decision: Any) -> dict[str, Any]:
    outcome, category = expected(film)
    predicted = {f.detector: f.predicted for f in decision.findings if f.predicted is not None}
    return {
        "film": film.rel,
        "source": film.source,
        "category": category,
        "expected": outcome,
        "decision": decision.outcome,
        "reasons": list(decision.reasons),
        "scores": {k: round(v, 4) for k, v in decision.scores.items()},
        "view_class": predicted.get("view"),
        "right": decision.outcome == outcome,
    }


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_category: dict[str, Any] = {}
    for cat in sorted({r["category"] for r in rows}):
        rs = [r for r in rows if r["category"] == cat]
        reasons = collections.Counter(x for r in rs for x in r["reasons"])
        by_category[cat] = {
            "films": len(rs),
            "expected": rs[0]["expected"],
            "accepted": sum(r["decision"] == "accept" for r in rs),
            "quarantined": sum(r["decision"] == "quarantine" for r in rs),
            "right": sum(r["right"] for r in rs),
            "reasons": dict(reasons.most_common()),
        }
    by_source: dict[str, Any] = {}
    for src in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == src]
        by_source[src] = {
            "films": len(rs),
            "right": sum(r["right"] for r in rs),
            "wrongly_accepted": sum(r["decision"] == "accept" and not r["right"] for r in rs),
            "wrongly_quarantined": sum(r["decision"] == "quarantine" and not r["right"] for r in rs),
            "reasons": dict(collections.Counter(x for r in rs for x in r["reasons"]).most_common()),
        }
    reasons = collections.Counter(x for r in rows for x in r["reasons"])
    return {
        "films": len(rows),
        "right": sum(r["right"] for r in rows),
        "by_category": by_category,
        "by_source": by_source,
        "reasons": dict(reasons.most_common()),
        "wrongly_accepted": [r for r in rows if r["decision"] == "accept" and not r["right"]],
        "wrongly_quarantined": [r for r in rows if r["decision"] == "quarantine" and not r["right"]],
    }


def contact_sheet(rows: Sequence[dict[str, Any]], path: Path, tile: int = 160, columns: int = 8) -> None:
    """A grid of films with their source and the gate's reasons (for people; never committed)."""
    if not rows:
        return
    tiles = []
    for r in rows[:96]:
        px = decode_file(data_root() / r["film"]).pixels
        h, w = px.shape
        s = tile / max(h, w)
        small = cv2.resize(px, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((tile + 28, tile), np.uint8)
        y0, x0 = (tile - small.shape[0]) // 2, (tile - small.shape[1]) // 2
        canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = (small * 255).astype(np.uint8)
        label = ",".join(r["reasons"]) or "accepted"
        cv2.putText(canvas, r["source"][:22], (2, tile + 11), cv2.FONT_HERSHEY_PLAIN, 0.8, 255, 1)
        cv2.putText(canvas, label[:24], (2, tile + 24), cv2.FONT_HERSHEY_PLAIN, 0.8, 200, 1)
        tiles.append(canvas)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + columns]) for i in range(0, len(tiles), columns)])
    cv2.imwrite(str(path), grid)


def _counts(counts: dict[str, int]) -> str:
    """``{"rotated": 3, "flipped": 1}`` -> ``rotated 3, flipped 1`` (a table cell)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    pct = lambda a, b: f"{100 * a / b:.2f}%" if b else "n/a"  # noqa: E731
    lines = [
        "# Gate report: the val split decided as the gate decides",
        "",
        f"Created {meta['created']} by `python -m filmgate_training.detectors.gate_report`. Detectors: "
        + ", ".join(f"`{d['name']}` {d['version']}" + (f" ({d['precision']})" if "precision" in d else "")
                    for d in meta["detectors"])  # fmt: skip
        + ". Default policy; films are PNG/JPEG without a DICOM header, so only the image detectors decide (no "
        "modality or age rule).",
        "",
        f"**{summary['right']}/{summary['films']} decisions right ({pct(summary['right'], summary['films'])}).** "
        "Right = accepted for adult (or unknown-age) frontal chest films, quarantined for everything else.",
        "",
        "## By kind",
        "",
        "| kind | films | expected | accepted | quarantined | right | reasons |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cat, m in summary["by_category"].items():
        reasons = _counts(m["reasons"])
        lines.append(
            f"| {cat} | {m['films']} | {m['expected']} | {m['accepted']} | {m['quarantined']} | "
            f"{m['right']} ({pct(m['right'], m['films'])}) | {reasons} |"
        )
    lines += [
        "",
        "## By source",
        "",
        "| source | films | right | wrongly accepted | wrongly quarantined | reasons |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for src, m in summary["by_source"].items():
        reasons = _counts(m["reasons"])
        lines.append(
            f"| {src} | {m['films']} | {m['right']} ({pct(m['right'], m['films'])}) | {m['wrongly_accepted']} | "
            f"{m['wrongly_quarantined']} | {reasons} |"
        )
    wq = summary["wrongly_quarantined"]
    only_ped = sum(r["reasons"] == ["pediatric"] for r in wq)
    adult = summary["by_category"].get("frontal-chest, adult or age unknown", {"films": 0, "accepted": 0})
    lines += [
        "",
        "## Reading this",
        "",
        f"- Good films lost: {adult['films'] - adult['accepted']} of {adult['films']} adult (or unknown-age) frontal "
        f"films quarantined. {only_ped} of them only for `pediatric`: with an age in the DICOM header the gate "
        "uses the age instead of the image model (service/policy.py), so these would be accepted; films without "
        "an age in labels.csv (vqa-rad, openi) may really be children.",
        "- On films that are `not-frontal-chest` the default policy drops the chest-only reasons (`flipped`, "
        "`pediatric`, `atypical`; `policy.outranks`). `rotated` and `inverted` stay listed (detectors trained on chest "
        "films also fire on a knee): there `not-frontal-chest` is the reason that matters.",
    ]
    if meta.get("made_wrong"):
        lines += [
            "",
            "## Wrong films made from the adult frontal films, through the whole gate",
            "",
            "Each adult (or unknown-age) val frontal film made wrong as in `training/detectors/corrupt.py` and decided "
            "by the gate: what a single detector misses (atypical alone catches zoomed crops ~64%) another catches.",
            "",
            "| made | films | kept out | reasons |",
            "| --- | --- | --- | --- |",
        ]
        for name, m in meta["made_wrong"].items():
            lines.append(f"| {name} | {m['films']} | {m['quarantined']} ({pct(m['quarantined'], m['films'])}) | "
                         f"{_counts(m['reasons'])} |")  # fmt: skip
    lines += _loso_lines()
    lines += _non_radiograph_lines()
    lines += ["", "## Reasons over all films", ""]
    lines += [f"- `{k}`: {v}" for k, v in summary["reasons"].items()]
    for title, key in (("Wrongly accepted", "wrongly_accepted"), ("Wrongly quarantined", "wrongly_quarantined")):
        rows = summary[key]
        lines += ["", f"## {title} ({len(rows)})", ""]
        lines.append(f"Contact sheet: `{key.replace('_', '-')}.png` in the run folder (real films: not committed).")
        lines.append("")
        if rows:
            lines += [
                "| film | source | kind | reasons | view class | scores |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for r in rows[:150]:
                scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
                lines.append(
                    f"| {r['film']} | {r['source']} | {r['category']} | {', '.join(r['reasons']) or '-'} | "
                    f"{r['view_class']} | {scores} |"
                )
            if len(rows) > 150:
                lines.append(f"| ... {len(rows) - 150} more in report.json | | | | | |")
    return "\n".join(lines) + "\n"


def _loso_lines() -> list[str]:
    """Per detector, the leave-one-source-out rows (training/reports/loso, ``python -m filmgate_training loso``):
    val above comes from the hospitals the detectors trained on; these are hospitals each never saw."""
    from filmgate_training.loso import REPORTS, markdown, pooled_val

    lines = ["", "## Hospitals the detectors never saw (leave-one-source-out)", ""]
    found = sorted(REPORTS.glob("*.json")) if REPORTS.is_dir() else []
    if not found:
        return lines + ["No leave-one-source-out report yet (`python -m filmgate_training loso`)."]
    for path in found:
        report = json.loads(path.read_text())
        lines += ["", *markdown(report, pooled_val(report["detector"])).replace("## Leave", "### Leave", 1).split("\n")]
    return lines


def _non_radiograph_lines() -> list[str]:
    """Every non-radiograph film of both splits through the gate (training/reports/non-radiographs.md): val above
    has only 75 of them."""
    from filmgate_training.detectors.non_radiographs import section

    return section()


def run(out: Path, models: Path, docs: Path | None = None) -> dict[str, Any]:
    judge = gate_judge(models)
    films = [f for f in labels() if f.split == "val"]
    rows = decide_all(films, judge)
    summary = summarise(rows)
    adults = [f for f in films if expected(f)[0] == "accept"]
    meta = {
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "detectors": judge.detectors.describe(),
        "made_wrong": made_wrong(adults, judge),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "summary": summary, "films": rows}, indent=1) + "\n")
    (out / "report.md").write_text(markdown(summary, meta))
    contact_sheet(summary["wrongly_accepted"], out / "wrongly-accepted.png")
    contact_sheet(summary["wrongly_quarantined"], out / "wrongly-quarantined.png")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "report.md", docs / "gate-report.md")
        (docs / "gate-report.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m filmgate_training.detectors.gate_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "gate-report"), help="git-ignored run folder")
    parser.add_argument("--models", default=str(REPO_ROOT / "models"))
    parser.add_argument("--docs", action="store_true", help="also copy the Markdown/JSON summary to docs/")
    parser.add_argument("--sections-only", action="store_true",
                        help="judge nothing: rewrite docs/gate-report.md from docs/gate-report.json with the current "
                             "leave-one-source-out and non-radiograph reports")  # fmt: skip
    args = parser.parse_args(argv)
    if args.sections_only:
        saved = json.loads((REPO_ROOT / "docs" / "gate-report.json").read_text())
        (REPO_ROOT / "docs" / "gate-report.md").write_text(markdown(saved["summary"], saved["meta"]))
        print(f"docs/gate-report.md rewritten: decisions of {saved['meta']['created']}, sections from training/reports")
        return 0
    summary = run(Path(args.out), Path(args.models), REPO_ROOT / "docs" if args.docs else None)
    print(f"{summary['right']}/{summary['films']} right; report in {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

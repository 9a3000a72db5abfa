"""Non-radiographs kept out: every CT, MR, ultrasound and nuclear-medicine image in the data, through the whole gate.

``python -m filmgate_training.detectors.non_radiographs`` judges every ``not-radiograph`` film of labels.csv (both
splits) and every DICOM file of a modality that is not a radiograph (CT, MR, US, NM, PT) with the gate's one judge
(:class:`filmgate.judge.Judge`: the shipped detectors, the gate's decode, the default policy, CPU, as
``filmgate inspect`` judges them) and counts the films the gate would *accept* (issue 10 item 4: at least 99.5% kept
out). Reports go to ``training/reports/non-radiographs.{json,md}``; the gate report shows the Markdown, and ``--card``
writes it into the view detector's model card (between markers, replaced on each run).

Which figures say something about films the gate has not seen: the view detector trained on the ``train`` split of
most of these sources (its manifest's ``training_data``); those rows are marked *trained on* and measure only that it
learnt them. The ``val`` rows come from the same hospitals. The sources it never trained on (*unseen*) and the
leave-one-source-out folds (``training/reports/loso/view.md``: the view network retrained without the source) are the
honest figures for a new hospital.

The plain image files carry no header, so the detectors alone decide them. DICOM files are judged twice: as stored
(the ``modality`` rule decides first: CT, MR, ... are not in ``policy.modalities``) and as their pixels alone (what a
PNG or JPEG copy of them would get). CT and MR reformats that look like a film (thick-slab coronal reconstructions, a
CT localiser) are quarantined by design (docs/ARCHITECTURE.md, "What a radiograph is"): they get their own rows.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filmgate.decode import decode_file
from filmgate.judge import Judge
from filmgate.manifest import load_manifest
from filmgate_training.card import put_section
from filmgate_training.config import REPO_ROOT
from filmgate_training.datasets import LabelledFilm, labels
from filmgate_training.gate_judge import gate_judge
from filmgate_training.metrics import wilson_interval

REPORT = REPO_ROOT / "training" / "reports" / "non-radiographs"
CARD_BEGIN = "<!-- non-radiographs:begin (python -m filmgate_training.detectors.non_radiographs --card) -->"
CARD_END = "<!-- non-radiographs:end -->"
NOT_RADIOGRAPH_MODALITIES = ("CT", "MR", "US", "NM", "PT")
GOAL = 0.995  # kept out


def films() -> tuple[list[LabelledFilm], list[LabelledFilm]]:
    """(plain image files labelled ``not-radiograph``, DICOM files of a modality that is not a radiograph)."""
    rows = labels()
    plain = sorted((f for f in rows if f.kind == "not-radiograph"), key=lambda f: str(f.path))
    dicom = sorted((f for f in rows if f.kind == "dicom" and f.modality in NOT_RADIOGRAPH_MODALITIES),
                   key=lambda f: str(f.path))  # fmt: skip
    return plain, dicom


# The CT images here that look like a projection film, found on contact sheets of every not-radiograph film and named
# by hand (labels.csv has no column for it); ct-msk's coronal thick-slab reformats are found by their file names.
LOOK_ALIKES = {
    "images/radiopaedia-trauma/radiopaedia_delayed-traumatic-diaphragm-rupture.jpg": "CT coronal reformat of the chest",
    "images/radiopaedia-trauma/radiopaedia_diaphragmatic-hernia-traumatic.jpg": "CT coronal reformat of the chest",
    "images/radiopaedia-trauma/radiopaedia_coracoid-process-fracture-4.jpg": "CT 3D rendering of shoulder and ribs",
    "dicom/fo-dicom__GH342.dcm": "CT localiser (scout) of the abdomen",
}


def look_alike(film: LabelledFilm) -> str | None:
    """Which radiograph-like CT image a film is, if any (a coronal reformat, a rendering, a localiser)."""
    if film.rel in LOOK_ALIKES:
        return LOOK_ALIKES[film.rel]
    if film.source == "ct-msk" and "_coronal_" in film.path.name:
        return "CT coronal thick-slab reformat (spine, hip, shoulder)"
    return None


def trained_sources(models: Path) -> set[str]:
    """The sources the shipped view detector trained on (its manifest's training data)."""
    return {row["source"] for row in load_manifest(models / "view").training_data}


def judge_films(judge: Judge, plain: Sequence[LabelledFilm], dicom: Sequence[LabelledFilm]) -> list[dict[str, Any]]:
    """One row per judgement: each plain file once, each DICOM file as stored and as its pixels without a header."""
    rows = [_row(f, j, "image file") for f, (_, j) in zip(plain, judge.judge_many([f.path for f in plain], batch=32),
                                                          strict=True)]  # fmt: skip
    for film, (_, j) in zip(dicom, judge.judge_many([f.path for f in dicom], batch=8), strict=True):
        rows.append(_row(film, j, "DICOM as stored"))
    pixels_only = judge.conclude([judge.examine_pixels(decode_file(f.path).pixels) for f in dicom])
    rows += [_row(f, j, "DICOM pixels, no header") for f, j in zip(dicom, pixels_only, strict=True)]
    return rows


def _row(film: LabelledFilm, judgement: Any, how: str) -> dict[str, Any]:
    d = judgement.decision
    predicted = {f.detector: f.predicted for f in d.findings if f.predicted is not None}
    return {"film": film.rel, "source": film.source, "split": film.split, "modality": film.modality.split(" ")[0],
            "how": how, "look_alike": look_alike(film), "decision": d.outcome, "reasons": list(d.reasons),
            "view_score": round(d.scores.get("view", float("nan")), 4), "view_class": predicted.get("view")}


def _count(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n, accepted = len(rows), sum(r["decision"] == "accept" for r in rows)
    lo, hi = wilson_interval(n - accepted, n)
    return {"films": n, "accepted": accepted, "kept_out": n - accepted, "rate": (n - accepted) / n if n else None,
            "ci95": [lo, hi], "reasons": dict(collections.Counter(x for r in rows for x in r["reasons"]).most_common())}


def summarise(rows: Sequence[dict[str, Any]], trained: set[str]) -> dict[str, Any]:
    """Counts per (source, split, seen by view), per look-alike kind, and the totals the goal is judged on."""
    def seen(r: dict[str, Any]) -> str:
        if r["source"] not in trained:
            return "unseen"
        return "trained on" if r["split"] == "train" else "val (same hospital)"

    image_rows = [r for r in rows if r["how"] == "image file"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in image_rows:
        groups[(r["source"], seen(r))].append(r)
    looks: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        if r["look_alike"]:
            looks[(r["look_alike"], r["how"] if r["how"] != "image file" else seen(r))].append(r)
    dicom = [r for r in rows if r["how"] != "image file"]
    return {
        "by_source": [{"source": s, "seen": w} | _count(rs) for (s, w), rs in sorted(groups.items())],
        "look_alike": [{"what": k, "seen": w} | _count(rs) for (k, w), rs in sorted(looks.items())],
        "dicom": [{"film": r["film"], "modality": r["modality"], "how": r["how"], "decision": r["decision"],
                   "reasons": r["reasons"], "view_class": r["view_class"]} for r in dicom],  # fmt: skip
        "totals": {
            "every image file": _count(image_rows),
            "image files view never trained on (val and unseen sources)": _count(
                [r for r in image_rows if seen(r) != "trained on"]),
            "image files of unseen sources": _count([r for r in image_rows if seen(r) == "unseen"]),
            "DICOM files as stored": _count([r for r in dicom if r["how"] == "DICOM as stored"]),
            "DICOM files, pixels only": _count([r for r in dicom if r["how"] == "DICOM pixels, no header"]),
        },
        "accepted": [r for r in rows if r["decision"] == "accept"],
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _cell(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['kept_out']}/{m['films']} ({_pct(m['rate'])}; 95% CI {_pct(lo)}-{_pct(hi)})"


def markdown(report: dict[str, Any]) -> str:
    s, meta = report["summary"], report["meta"]
    lines = [
        "## Non-radiographs kept out (both splits, the whole gate)",
        "",
        f"Made {meta['created']} by `python -m filmgate_training.detectors.non_radiographs`: every `not-radiograph` "
        f"film of labels.csv and every DICOM file of modality {', '.join(NOT_RADIOGRAPH_MODALITIES)}, judged by the "
        "gate's one judge (shipped detectors, default policy, CPU): "
        + ", ".join(f"`{d['name']}` {d['version']}" for d in meta["detectors"])
        + f". Goal: at least {GOAL:.1%} kept out. *trained on*: the train split of a source the view detector trained "
        "on (not a measurement of new films); *val*: the same hospitals; *unseen*: a source it never trained on. "
        "The leave-one-source-out rows of `view` (the network retrained without the source) are the honest figures "
        "for a new hospital. Kept out with 95% Wilson intervals.",
        "",
        "| films | kept out |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {_cell(m)} |" for k, m in s["totals"].items()]
    lines += ["", "| source | films are | kept out | reasons (every reason raised) |", "| --- | --- | --- | --- |"]
    lines += [f"| {m['source']} | {m['seen']} | {_cell(m)} | {_reasons(m)} |" for m in s["by_source"]]
    lines += ["", "Reformats that look like a film (quarantined by design: docs/ARCHITECTURE.md, \"What a radiograph "
              "is\"):", "", "| what | films are | kept out | reasons (every reason raised) |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {m['what']} | {m['seen']} | {_cell(m)} | {_reasons(m)} |" for m in s["look_alike"]]
    lines += ["", "DICOM files:", "", "| file | modality | judged | decision | reasons | view class |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {r['film']} | {r['modality']} | {r['how']} | {r['decision']} | {', '.join(r['reasons'])} | "
              f"{r['view_class']} |" for r in s["dicom"]]  # fmt: skip
    folds = report.get("loso", [])
    lines += ["", "The view detector alone on hospitals it never saw (its `not-radiograph` films; `unseen`: the "
              "shipped model, `fold`: retrained without the source; training/reports/loso/view.md):", ""]  # fmt: skip
    if folds:
        lines += ["| held-out source | mode | model | not-radiograph films kept out |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['source']} | {r['mode']} | {r['model']} | {_loso_cell(r['not-radiograph'])} |" for r in folds]
        one: dict[str, dict[str, Any]] = {}  # per held-out source its longest fold, else the shipped model's row
        for r in sorted(folds, key=lambda r: (r["mode"] == "fold", _steps(r))):
            one[r["source"]] = r
        k = sum(r["not-radiograph"]["flagged"] for r in one.values())
        n = sum(r["not-radiograph"]["examples"] for r in one.values())
        lo, hi = wilson_interval(k, n)
        lines += ["", f"Pooled over the {len(one)} held-out sources (one row each: the longest fold, else the shipped "
                  "model where it never saw the source): the view detector "
                  f"alone keeps out {k}/{n} ({_pct(k / n)}; 95% CI {_pct(lo)}-{_pct(hi)}) against the goal of "
                  f"{GOAL:.1%}; the other detectors (`atypical` above all) were not refitted without the source, so "
                  "the whole gate's figure for a new hospital is not measured here."]  # fmt: skip
    else:
        lines += ["none yet (`python -m filmgate_training loso --config view --sources vqa-rad,ct-msk`)."]
    accepted = s["accepted"]
    lines += ["", f"Accepted by the gate ({len(accepted)}): "
              + ("; ".join(f"`{r['film']}` ({r['how']}, view {r['view_class']} {r['view_score']})" for r in accepted)
                 or "none") + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _loso_cell(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['flagged']}/{m['examples']} ({_pct(m['rate'])}; 95% CI {_pct(lo)}-{_pct(hi)})"


def _steps(row: dict[str, Any]) -> int:
    m = re.search(r"fold: (\d+) steps", row["model"])
    return int(m.group(1)) if m else 0


def loso_rows() -> list[dict[str, Any]]:
    """The view detector's leave-one-source-out rows that have non-radiographs (training/reports/loso/view.json)."""
    from filmgate_training.loso import report_path

    path = report_path("view")
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    return [{"source": r["source"], "mode": r["mode"], "model": r["model"], "not-radiograph": r["classes"][
        "not-radiograph"]} for r in rows if "not-radiograph" in r["classes"]]  # fmt: skip


def _reasons(m: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in m["reasons"].items())


def run(models: Path, out: Path = REPORT) -> dict[str, Any]:
    judge = gate_judge(models)
    plain, dicom = films()
    rows = judge_films(judge, plain, dicom)
    meta = {"created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "detectors": judge.detectors.describe(), "view_trained_on": sorted(trained_sources(models))}  # fmt: skip
    report = {"meta": meta, "summary": summarise(rows, trained_sources(models)), "loso": loso_rows()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")  # counts and the accepted films only
    out.with_suffix(".md").write_text(markdown(report))
    return report


def section() -> list[str]:
    """The report's Markdown for the gate report, or a line saying how to make it."""
    path = REPORT.with_suffix(".md")
    if not path.is_file():
        return ["", "No non-radiograph report yet (`python -m filmgate_training.detectors.non_radiographs`)."]
    return ["", *path.read_text().rstrip("\n").splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m filmgate_training.detectors.non_radiographs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", default=str(REPO_ROOT / "models"))
    parser.add_argument("--card", action="store_true", help="write the section into the view model card")
    args = parser.parse_args(argv)
    report = run(Path(args.models))
    if args.card:
        put_section(Path(args.models) / "view" / "MODEL_CARD.md", CARD_BEGIN, CARD_END, markdown(report).rstrip("\n"))
    for k, m in report["summary"]["totals"].items():
        print(f"{k}: kept out {_cell(m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

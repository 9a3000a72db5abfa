"""Leave-one-source-out (LOSO): does a detector hold on a hospital it never saw?

``val`` comes from the same hospitals as ``train``, so it flatters. Here each held-out source is a hospital the
model never trained on, and every film of it (``train`` and ``val`` split alike: the model saw none) is evaluated:

- **folds** (``python -m filmgate_training loso --config view --sources tbx11k,spine --set train.steps=300``): for
  each source, the config is trained again with that source left out of training *and* calibration
  (``data.exclude_sources``; run folder ``<run_dir>/loso/<source>``, ``<source>-<N>steps`` for a fold of another
  length than the config's), its threshold chosen on its own held-out train films, and it is scored on the source;
  fewer steps than the shipped run are allowed (the report records them; :func:`agreement` compares with the shipped
  model on sources it never saw either);
- **unseen** (``--unseen``): the *shipped* model on every source absent from its manifest's training data (sources
  added to ../shared/data after it was trained): the full model, at its shipped threshold, with no refitting.

Each row gives, per class of film, how many were flagged with a 95% Wilson interval: for negatives (clean films) that
is the false-flag rate, for positives (made or labelled faults) the recall. The pooled val figures of the shipped
model stand beside them. Reports go to ``training/reports/loso/<task>.{json,md}``; ``--card`` also writes the
section into ``models/<task>/MODEL_CARD.md`` and the headline into the manifest (the model file is unchanged).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.manifest import load_manifest, write_manifest
from filmgate_training.card import put_section
from filmgate_training.config import REPO_ROOT, Config, config_from_dict
from filmgate_training.data import _without_exclusions
from filmgate_training.datasets import LabelledFilm
from filmgate_training.evaluate import Runner, _jsonable, calibrate, infer, onnx_runner, torch_runner
from filmgate_training.films import all_rows
from filmgate_training.metrics import wilson_interval
from filmgate_training.recalibrate import MIN_FILMS
from filmgate_training.tasks import Task, get_task

REPORTS = REPO_ROOT / "training" / "reports" / "loso"
CARD_BEGIN, CARD_END = "<!-- loso:begin (python -m filmgate_training loso --card) -->", "<!-- loso:end -->"


def held_out_films(config: Config, task: Task, source: str) -> list[LabelledFilm]:
    """Every film of ``source`` the task evaluates (both splits: a model that never saw the source saw none)."""
    task = task.for_held_out()
    rows = [r for r in all_rows(config.data.folders) if r.source == source]
    films = task.films(rows, "train") + task.films(rows, "val")
    if task.val_kinds is not None:
        films = [f for f in films if f.kind in task.val_kinds]
    keep = dataclasses.replace(config, data=dataclasses.replace(config.data, exclude_sources=()))
    return sorted(_without_exclusions(keep, films), key=lambda f: str(f.path))


def eligible_sources(config: Config, task: Task, min_films: int = MIN_FILMS) -> list[str]:
    counts = collections.Counter(f.source for f in held_out_films_all(config, task))
    return sorted(s for s, n in counts.items() if n >= min_films)


def held_out_films_all(config: Config, task: Task) -> list[LabelledFilm]:
    sources = sorted({r.source for r in all_rows(config.data.folders)})
    return [f for s in sources for f in held_out_films(config, task, s)]


def fold_config(config: Config, source: str, overrides: dict[str, Any] | None = None) -> Config:
    """The config with ``source`` left out of training and calibration, run in ``<run_dir>/loso/<source>``."""
    d = config.to_dict()
    for dotted, value in (overrides or {}).items():
        node = d
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    # the source is left out whatever the overrides say (they may leave out more, e.g. a second copy of a hospital)
    d["data"]["exclude_sources"] = sorted({*(d["data"].get("exclude_sources") or ()), source})
    # a fold of another length has its own folder, so that short and full folds of a source are both kept (and a
    # rerun of either resumes instead of training again)
    steps = d["train"]["steps"]
    folder = source if steps == config.train.steps else f"{source}-{steps}steps"
    d["run_dir"] = str(Path(config.run_path) / "loso" / folder)
    return config_from_dict(d)


def summarise(task: Task, res: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Per class of example (label name): examples, flagged, rate and its 95% Wilson interval."""
    scores = task.scores(res["outputs"])
    flagged = scores >= threshold
    out: dict[str, Any] = {"films": int(len(set(res["rel"].tolist()))), "classes": {}}
    for i, name in enumerate(task.labels):
        m = res["label"] == i
        if not m.any():
            continue
        k, n = int(flagged[m].sum()), int(m.sum())
        lo, hi = wilson_interval(k, n)
        role = "caught" if task.is_positive(i) else "reported" if name in task.ignored_labels else "false flags"
        out["classes"][name] = {"role": role, "examples": n, "flagged": k, "rate": k / n, "ci95": [lo, hi]}
    neg = np.array([not task.is_positive(int(y)) for y in res["label"]], dtype=bool)
    pos = ~neg
    neg &= np.array([task.labels[int(y)] not in task.ignored_labels for y in res["label"]], dtype=bool)
    if neg.any():
        k, n = int(flagged[neg].sum()), int(neg.sum())
        out["false_flags"] = {"examples": n, "flagged": k, "rate": k / n, "ci95": list(wilson_interval(k, n))}
    if pos.any():
        k, n = int(flagged[pos].sum()), int(pos.sum())
        out["caught"] = {"examples": n, "flagged": k, "rate": k / n, "ci95": list(wilson_interval(k, n))}
    return out


def score_source(
    config: Config, task: Task, runner: Runner, threshold: float, source: str, limit: int | None = None
) -> dict[str, Any]:
    films = held_out_films(config, task, source)
    if limit is not None and len(films) > limit:
        films = films[:: max(1, len(films) // limit)][:limit]
    task = task.for_held_out()
    res = infer(films, task, config.preprocessing, runner)
    clean = np.array([not task.is_positive(int(y)) for y in res["label"]], dtype=bool)
    out = summarise(task, res, threshold) | {"source": source, "threshold": threshold}
    if task.kind == "age":  # where the estimates lie, per class (years): a miss by 1 year is not a miss by 30
        years = -task.scores(res["outputs"])
        out["years_p10_p50_p90"] = {name: [round(float(v), 1) for v in np.percentile(years[res["label"] == i],
                                                                                     [10, 50, 90])]
                                    for i, name in enumerate(task.labels) if (res["label"] == i).any()}  # fmt: skip
    return out | {"_clean_scores": task.scores(res["outputs"])[clean].tolist()}  # for recalibration, not the report


# ------------------------------------------------------------------------------------------------ the two modes


def unseen(config: Config, limit: int | None = None, min_films: int = MIN_FILMS) -> list[dict[str, Any]]:
    """The shipped model on every source its manifest's training data does not name."""
    task = get_task(config.task)
    folder = config.models_path / task.name
    manifest = load_manifest(folder)
    trained = {row["source"] for row in manifest.training_data}
    config = dataclasses.replace(config, preprocessing=manifest.preprocessing)  # as the gate feeds it
    runner = onnx_runner(folder / manifest.file, config.train.threads)
    rows = []
    for source in eligible_sources(config, task, min_films):
        if source in trained:
            continue
        t0 = time.perf_counter()
        row = score_source(config, task, runner, manifest.threshold, source, limit)
        row.pop("_clean_scores")
        rows.append(row | {"mode": "unseen", "model": f"shipped {manifest.version}", "version": manifest.version,
                           "seconds": _since(t0)})  # fmt: skip
    return rows


def fold(config: Config, source: str, overrides: dict[str, Any] | None = None,
         limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Train without ``source`` (resuming a finished fold costs nothing), calibrate, score the source."""
    task = get_task(config.task)
    fc = fold_config(config, source, overrides)
    t0 = time.perf_counter()
    if task.kind == "score":
        runner, threshold, model = _score_fold(fc)
    else:
        from filmgate_training.train import fit, load_trained

        fit(fc)
        net, blob = load_trained(fc.run_path)
        runner = torch_runner(task.serving_model(net, fc.model.mirror_swap), fc.train.threads)
        threshold, _, _, _ = calibrate(fc, task, runner)
        model = f"fold: {blob['steps']} steps" + (f" from {fc.train.init_from}" if fc.train.init_from else "")
        model += ", margin threshold" if fc.evaluate.threshold_rule == "margin" else ""
    row = score_source(fc, task, runner, threshold, source, limit)
    row |= {"mode": "fold", "model": f"{fc.version} {model}", "version": fc.version, "seconds": _since(t0),
            "steps": fc.train.steps}  # fmt: skip
    fc.run_path.mkdir(parents=True, exist_ok=True)
    clean = row.pop("_clean_scores")
    (fc.run_path / "scores.json").write_text(json.dumps({"source": source, "threshold": threshold, "clean": clean}))
    (fc.run_path / "loso.json").write_text(json.dumps(_jsonable(row), indent=2) + "\n")
    return row


def _score_fold(fc: Config) -> tuple[Runner, float, str]:
    """A score detector's fold (``atypical``): its task's own ``fit_fold`` hook, e.g. a refit without the source."""
    net, threshold, how = get_task(fc.task).fit_fold(fc)
    return torch_runner(net, fc.train.threads), threshold, f"fold: {how}"


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)


# ------------------------------------------------------------------------------------------------ report


def report_path(task_name: str) -> Path:
    return REPORTS / f"{task_name}.json"


def merge(task_name: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Add rows to the task's report (a row replaces the one of the same source, mode and model)."""
    path = report_path(task_name)
    old: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"detector": task_name, "rows": []}
    key: Callable[[dict[str, Any]], tuple[str, str, str]] = lambda r: (r["source"], r["mode"], r["model"])  # noqa: E731
    new = {key(r) for r in rows}
    merged = [r for r in old["rows"] if key(r) not in new] + [_jsonable(dict(r)) for r in rows]
    report = {"detector": task_name, "updated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "rows": sorted(merged, key=lambda r: (r["source"], r["mode"], r["model"]))}  # fmt: skip
    REPORTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / f"{task_name}.md").write_text(markdown(report, pooled_val(task_name)))
    return report


def pooled_val(task_name: str, models: Path | None = None) -> dict[str, Any] | None:
    """The shipped model's pooled val figures (from its evaluation.json), to stand beside the LOSO rows."""
    path = (models or REPO_ROOT / "models") / task_name / "evaluation.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    if "by_kind" in ev.get("val", {}):  # the atypical report
        m = ev["val"]["by_kind"]["frontal-chest"]
        return {"films": m["films"], "false_flags": m["flagged"], "of": m["films"], "recall": None}
    p = ev["val"]["pooled"]
    return {"films": p["films"], "false_flags": p["flagged_unaltered"], "of": p["unaltered"], "recall": p["recall"]}


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _cell(m: dict[str, Any] | None) -> str:
    if not m:
        return "n/a"
    lo, hi = m["ci95"]
    return f"{m['flagged']}/{m['examples']} ({_pct(m['rate'])}; 95% CI {_pct(lo)}-{_pct(hi)})"


def markdown(report: dict[str, Any], val: dict[str, Any] | None) -> str:
    name = report["detector"]
    lines = [
        f"## Leave-one-source-out: `{name}`",
        "",
        "Each row is a hospital the model never trained on (both splits of it scored). *unseen*: the shipped model "
        "on a source added after it was trained; *fold*: retrained without the source (steps as shown) and "
        "thresholded on its own held-out train films. Rates with 95% Wilson intervals.",
        "",
    ]
    if val is not None:
        vr = val["false_flags"] / max(1, val["of"])
        rec = "" if val["recall"] is None else f", recall {_pct(val['recall'])}"
        lines += [f"Pooled val (shipped model, same hospitals as train): false flags {val['false_flags']}/"
                  f"{val['of']} ({_pct(vr)}){rec}.", ""]  # fmt: skip
    lines += ["| held-out source | mode | model | films | false flags (clean films) | caught (faults) |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['source']} | {r['mode']} | {r['model']} | {r['films']} | {_cell(r.get('false_flags'))} "
                     f"| {_cell(r.get('caught'))} |")  # fmt: skip
    lines += short_vs_full_markdown(short_vs_full(report))
    per_class = [r for r in report["rows"] if len(r["classes"]) > 2 or any(
        c["role"] == "caught" for c in r["classes"].values())]  # fmt: skip
    if per_class:
        lines += ["", "Per class of film:", "", "| held-out source | mode | class | flagged |"]
        lines += ["| --- | --- | --- | --- |"]
        for r in per_class:
            for c, m in r["classes"].items():
                lines.append(f"| {r['source']} | {r['mode']} | {c} ({m['role']}) | {_cell(m)} |")
    return "\n".join(lines) + "\n"


def _steps(row: dict[str, Any]) -> int | None:
    if "steps" in row:
        return int(row["steps"])
    m = re.search(r"fold: (\d+) steps", row["model"])
    return int(m.group(1)) if m else None


def short_vs_full(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Folds of one recipe on one source at fewer steps and at the most steps (the full run): do they agree?

    They agree when either rate lies inside the other's 95% Wilson interval (0/202 against 1/202 agrees: the short
    fold's interval holds the full one's rate); compared per class of film (false flags of clean films, and each
    class of fault) and pooled where that is not one class. This is the evidence the issue asks for before short
    folds stand in for full-length ones."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in report["rows"]:
        if r["mode"] == "fold" and _steps(r) is not None:
            groups[(r["source"], re.sub(r"fold: \d+ steps", "fold: N steps", r["model"]))].append(r)
    out = []
    for (source, _), rows in sorted(groups.items()):
        full = max(rows, key=lambda r: _steps(r) or 0)
        for short in sorted(rows, key=lambda r: _steps(r) or 0):
            if short is full:
                continue
            figures = {}
            for name in [*full["classes"], "false_flags", "caught"]:
                a = short["classes"].get(name) if name in full["classes"] else short.get(name)
                b = full["classes"].get(name) if name in full["classes"] else full.get(name)
                same = name not in full["classes"] and b and [c for c in full["classes"].values() if (
                    c["examples"], c["flagged"]) == (b["examples"], b["flagged"])]  # the one class of that role
                if a and b and not same:
                    role = full["classes"][name]["role"] if name in full["classes"] else ""
                    figures[name + (f" ({role})" if role else "")] = {"short": a, "full": b, "agree": bool(
                        b["ci95"][0] <= a["rate"] <= b["ci95"][1] or a["ci95"][0] <= b["rate"] <= a["ci95"][1])}
            out.append({"source": source, "short": short["model"], "full": full["model"], "short_steps": _steps(short),
                        "full_steps": _steps(full), "figures": figures,
                        "agree": all(f["agree"] for f in figures.values())})  # fmt: skip
    return out


def short_vs_full_markdown(pairs: Sequence[dict[str, Any]]) -> list[str]:
    if not pairs:
        return []
    lines = ["", "Short folds against full-length folds (the same recipe and source; they agree when either rate lies "
             "inside the other's 95% interval):", "",
             "| held-out source | figure | short fold | full-length fold | agree |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in pairs:
        for name, f in p["figures"].items():
            label = {"false_flags": "false flags (all clean films)", "caught": "caught (all faults)"}.get(name, name)
            lines.append(f"| {p['source']} | {label} | {p['short_steps']} steps: {_cell(f['short'])} | "
                         f"{p['full_steps']} steps: {_cell(f['full'])} | {'yes' if f['agree'] else '**no**'} |")
    verdict = "; ".join(f"{p['source']} {p['short_steps']} vs {p['full_steps']} steps: "
                        f"{'agree' if p['agree'] else 'do not agree'}" for p in pairs)  # fmt: skip
    return lines + ["", f"Verdict: {verdict}."]


def agreement(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Sources with both a fold row and an unseen (full shipped model) row: do the short folds predict the full one?"""
    by: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    for r in report["rows"]:
        by[r["source"]][r["mode"]] = r
    out = []
    for s, modes in sorted(by.items()):
        if {"fold", "unseen"} <= set(modes):
            f, u = modes["fold"], modes["unseen"]
            out.append({"source": s, "fold": f.get("false_flags"), "full": u.get("false_flags"),
                        "fold_caught": f.get("caught"), "full_caught": u.get("caught")})  # fmt: skip
    return out


def write_card_section(task_name: str, models: Path | None = None) -> None:
    """The LOSO table into the model card (between markers, replaced on each run) and its rows into the manifest."""
    folder = (models or REPO_ROOT / "models") / task_name
    report = json.loads(report_path(task_name).read_text())
    section = markdown(report, pooled_val(task_name, models)).replace("## Leave", "## Leave", 1)
    card = folder / "MODEL_CARD.md"
    put_section(card, CARD_BEGIN, CARD_END, section)
    manifest = load_manifest(folder)
    # the manifest holds this version's rows only (the card also shows earlier versions' rows, for comparison)
    rows = {f"{r['source']} ({r['mode']})": {"model": r["model"], "films": r["films"]} | {
        k: {"flagged": r[k]["flagged"], "of": r[k]["examples"], "rate": r[k]["rate"], "ci95": r[k]["ci95"]}
        for k in ("false_flags", "caught") if k in r} for r in report["rows"]
        if r.get("version", manifest.version) == manifest.version}  # fmt: skip
    write_manifest(folder, dataclasses.replace(manifest, metrics=dict(manifest.metrics) | {"loso": rows}))
    load_manifest(folder)

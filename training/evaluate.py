"""Evaluate a trained detector exactly as the gate would see films, choose its threshold, write the report.

1. Threshold: the task's films of the *train* split that were held out of training (patient-grouped, see
   :func:`filmgate_training.tasks.in_holdout`) are scored as they came; the threshold is the smallest one (at least
   ``evaluate.min_threshold``) that flags at most ``evaluate.target_fpr`` of them; with ``evaluate.threshold_rule:
   margin`` (labelled tasks) it moves to the middle of the gap up to the lowest held-out positive
   (:func:`filmgate_training.metrics.margin_threshold`). ``val`` is never used to choose it.
2. ``val``: every film in every variant (for orientation: as it came and turned 90/180/270) through
   ``decode_file`` -> variant -> ``preprocess`` -> model. Pooled, per source, the source-averaged mean and the worst
   source: AUC, accuracy, precision, recall, confusion matrix, and the false-positive rate on unaltered films.
3. Checks: real films with a known outcome (the MONOCHROME1 DICOM cases) must come out as stated.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.decode import DecodeError, decode_file
from filmgate.preprocess import preprocess
from filmgate_training.config import AugmentConfig, Config
from filmgate_training.data import EvalItem, Specs, eval_items, split_train, val_films
from filmgate_training.datasets import LabelledFilm, data_root, select
from filmgate_training.films import film_id
from filmgate_training.metrics import choose_threshold, margin_threshold, summarise
from filmgate_training.tasks import Task, get_task

Runner = Callable[[np.ndarray], np.ndarray]
MIN_SOURCE_FILMS = 5  # sources with fewer val films are reported but not ranked as "worst"


def torch_runner(model: Any, threads: int = 2, batch: int = 128) -> Runner:
    import torch

    torch.set_num_threads(threads)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)

    return run


def onnx_runner(path: Path, threads: int = 2) -> Runner:
    """Raw outputs of an exported model on CPU, through the gate's one session factory."""
    from filmgate.detectors import onnx_session

    session = onnx_session(path, provider="cpu", intra_op_threads=threads)

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["output"], {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def infer(
    films: Sequence[LabelledFilm],
    task: Task,
    spec: Specs,
    runner: Runner,
    chunk: int = 256,
    augment: AugmentConfig | None = None,
) -> dict[str, Any]:
    """Outputs for every variant of every film; arrays aligned by example."""
    rel, source, variant, label, outputs, errors = [], [], [], [], [], []
    pending: list[EvalItem] = []

    def flush() -> None:
        if pending:
            outputs.append(runner(np.stack([p.input for p in pending])))
            pending.clear()

    for item in eval_items(films, task, spec, augment=augment, seed=12345):
        if isinstance(item, tuple):
            errors.append({"film": film_id(item[0]), "error": item[1]})
            continue
        rel.append(film_id(item.film))
        source.append(item.film.source)
        variant.append(item.variant)
        label.append(item.label)
        pending.append(item)
        if len(pending) >= chunk:
            flush()
    flush()
    out = np.concatenate(outputs) if outputs else np.zeros((0, task.num_outputs), np.float32)
    return {
        "rel": np.array(rel, dtype=object),
        "source": np.array(source, dtype=object),
        "variant": np.array(variant, dtype=object),
        "label": np.array(label, dtype=np.int64),
        "outputs": out,
        "errors": errors,
    }


def _group_metrics(task: Task, res: dict[str, Any], mask: np.ndarray, threshold: float) -> dict[str, Any]:
    outputs = res["outputs"][mask]
    labels = res["label"][mask]
    scores = task.scores(outputs)
    positive = np.array([task.is_positive(int(y)) for y in labels], dtype=bool)
    predicted = outputs.argmax(1) if task.kind == "classifier" else None
    m = summarise(labels, predicted, scores, positive, threshold, len(task.labels))
    m["films"] = int(len(set(res["rel"][mask])))
    by_variant = {}
    for v in dict.fromkeys(res["variant"][mask]):
        vm = res["variant"][mask] == v
        by_variant[v] = {"examples": int(vm.sum()), "flagged": float((scores[vm] >= threshold).mean())}
        if predicted is not None:
            by_variant[v]["accuracy"] = float((predicted[vm] == labels[vm]).mean())
    m["by_variant"] = by_variant
    return m


def check_films(config: Config, task: Task, runner: Runner, threshold: float) -> list[dict[str, Any]]:
    """The configured real films with a known outcome, through decode -> preprocess -> model."""
    results = []
    for check in config.evaluate.checks:
        path = data_root() / check.path
        entry: dict[str, Any] = {"path": check.path, "expected_flagged": check.flagged, "why": check.why}
        try:
            x = preprocess(decode_file(path).pixels, config.preprocessing)[None]
        except (DecodeError, OSError) as exc:
            entry.update(ok=False, error=str(exc))
            results.append(entry)
            continue
        out = runner(x)
        score = float(task.scores(out)[0])
        entry.update(score=score, flagged=score >= threshold, ok=(score >= threshold) == check.flagged)
        if task.kind == "classifier":
            entry["predicted"] = task.labels[int(out[0].argmax())]
        results.append(entry)
    return results


def dicom_survey(config: Config, task: Task, runner: Runner, threshold: float) -> list[dict[str, Any]]:
    """What the detector says about every real DICOM file (for the report; most are not chest films)."""
    out: list[dict[str, Any]] = []
    for film in select(kind="dicom"):
        try:
            x = preprocess(decode_file(film.path).pixels, config.preprocessing)[None]
        except DecodeError as exc:
            out.append({"path": film_id(film), "error": str(exc)[:120]})
            continue
        o = runner(x)
        score = float(task.scores(o)[0])
        entry = {
            "path": film_id(film),
            "body_part": film.body_part,
            "score": round(score, 6),
            "flagged": score >= threshold,
        }
        if task.kind == "classifier":
            entry["predicted"] = task.labels[int(o[0].argmax())]
        out.append(entry)
    return out


def _rule_text(config: Config, rule: str, negatives: int, positives: int) -> str:
    ev = config.evaluate
    if rule == "fixed":
        return "fixed by the task (not calibrated): the policy's cut, policy.pediatric_age_years"
    fpr = (f"smallest threshold >= {ev.min_threshold} flagging at most {ev.target_fpr:.2%} of {negatives} "
           "unaltered held-out train films")  # fmt: skip
    if rule == "margin":
        return (f"middle (log-odds) between that edge ({fpr}) and the lowest score of the {positives} held-out "
                "positive films")  # fmt: skip
    return fpr + (" (margin rule fell back: the held-out classes overlap)" if ev.threshold_rule == "margin" else "")


def calibrate(config: Config, task: Task, runner: Runner) -> tuple[float, str, dict[str, Any], np.ndarray]:
    """The threshold from the held-out train films (never val): (threshold, rule used, their outputs, negatives)."""
    _, calib = split_train(config, task)
    cal = infer(calib, task, config.preprocessing, runner)
    cal_scores = task.scores(cal["outputs"])
    cal_neg = np.array([not task.is_positive(int(y)) for y in cal["label"]], dtype=bool)
    ev = config.evaluate
    rule = "fpr"
    if task.fixed_threshold is not None:  # the task's own cut (the age model: the policy's), nothing calibrated
        return task.fixed_threshold, "fixed", cal, cal_neg
    if ev.threshold_rule == "margin":
        threshold, rule = margin_threshold(cal_scores[cal_neg], cal_scores[~cal_neg], ev.target_fpr, ev.min_threshold)
    else:
        threshold = choose_threshold(cal_scores[cal_neg], ev.target_fpr, ev.min_threshold)
    return threshold, rule, cal, cal_neg


def evaluate(config: Config, runner: Runner, model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate the threshold, measure ``val``, run the checks; returns the report (see :func:`write_report`).
    A task with its own evaluation (:meth:`Task.evaluation`, e.g. ``atypical``) gives its threshold and figures;
    the survey of the real DICOM files and the common keys are the same for every detector."""
    task = get_task(config.task)
    own = task.evaluation(config, runner)
    if own is not None:
        return {
            "detector": task.name,
            "version": config.version,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **own,
            "dicom": dicom_survey(config, task, runner, own["threshold"]),
            "model": model_info or {},
        }
    t0 = time.perf_counter()
    threshold, rule, cal, cal_neg = calibrate(config, task, runner)
    calibration = _group_metrics(task, cal, np.ones(len(cal["label"]), bool), threshold)

    films = val_films(config, task)
    res = infer(films, task, config.preprocessing, runner)
    everything = np.ones(len(res["label"]), bool)
    pooled = _group_metrics(task, res, everything, threshold)
    per_source = {
        s: _group_metrics(task, res, res["source"] == s, threshold) for s in sorted(set(res["source"].tolist()))
    }
    ranked = {s: m for s, m in per_source.items() if m["films"] >= MIN_SOURCE_FILMS} or per_source
    keys = ("accuracy", "auc", "detection_accuracy", "recall", "fpr_unaltered")
    known = {k: [m[k] for m in ranked.values() if m[k] is not None] for k in keys}
    macro = {k: float(np.mean(v)) if v else None for k, v in known.items()}  # None: no source has both classes
    worst = {
        "accuracy": min(ranked, key=lambda s: ranked[s]["accuracy"]),
        "auc": min(ranked, key=lambda s: ranked[s]["auc"] if ranked[s]["auc"] is not None else 1.0),
        "fpr_unaltered": max(ranked, key=lambda s: ranked[s]["fpr_unaltered"] or 0.0),
        "recall": min(ranked, key=lambda s: ranked[s]["recall"] if ranked[s]["recall"] is not None else 1.0),
    }
    worst_values = {k: {"source": s, "value": ranked[s][k]} for k, s in worst.items()}

    aug = infer(films, task, config.preprocessing, runner, augment=config.augment)
    aug_all = np.ones(len(aug["label"]), bool)
    augmented = {
        "pooled": _group_metrics(task, aug, aug_all, threshold),
        "per_source": {
            s: _group_metrics(task, aug, aug["source"] == s, threshold) for s in sorted(set(aug["source"].tolist()))
        },
    }

    scores = task.scores(res["outputs"])
    predicted = res["outputs"].argmax(1) if task.kind == "classifier" else None
    positive = np.array([task.is_positive(int(y)) for y in res["label"]], dtype=bool)
    wrong = np.flatnonzero(
        ((scores >= threshold) != positive) | ((predicted != res["label"]) if predicted is not None else False)
    )
    mistakes = [
        {
            "film": res["rel"][i],
            "source": res["source"][i],
            "variant": res["variant"][i],
            "score": round(float(scores[i]), 6),
            **({"predicted": task.labels[int(predicted[i])]} if predicted is not None else {}),
        }
        for i in wrong[:100]
    ]
    checks = check_films(config, task, runner, threshold)
    report = {
        "detector": task.name,
        "version": config.version,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": list(task.labels),
        "positive_labels": list(task.positive_labels),
        "threshold": threshold,
        "threshold_rule": _rule_text(config, rule, int(cal_neg.sum()), int((~cal_neg).sum())),
        "calibration": calibration,
        "val": {"pooled": pooled, "source_mean": macro, "worst_source": worst_values, "per_source": per_source},
        "val_films": int(len(set(res["rel"].tolist()))),
        "val_augmented": augmented,
        "val_errors": res["errors"],
        "mistakes": mistakes,
        "checks": checks,
        "checks_ok": all(c.get("ok") for c in checks),
        "dicom": dicom_survey(config, task, runner, threshold),
        "evaluate_seconds": round(time.perf_counter() - t0, 1),
        "model": model_info or {},
    }
    return report


# ------------------------------------------------------------------------------------------------ writing


def _pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: float | None, digits: int = 5) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    val = report["val"]
    p = val["pooled"]
    lines = [
        f"# Evaluation: `{report['detector']}` {report['version']}",
        "",
        f"Created {report['created']}. Threshold **{report['threshold']:.6g}** ({report['threshold_rule']}).",
        f"Val films: {report['val_films']} (each in every variant: {', '.join(report['labels'])}).",
        "",
        "## Pooled val",
        "",
        "| accuracy | AUC | detection accuracy | precision | recall | unaltered flagged (FPR) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {_pct(p['accuracy'])} | {_num(p['auc'])} | {_pct(p['detection_accuracy'])} | {_pct(p['precision'])} | "
        f"{_pct(p['recall'])} | {_pct(p['fpr_unaltered'])} ({p['flagged_unaltered']}/{p['unaltered']}) |",
        "",
        "Source mean (sources with at least "
        f"{MIN_SOURCE_FILMS} val films): accuracy {_pct(val['source_mean']['accuracy'])}, "
        f"AUC {_num(val['source_mean']['auc'])}, FPR {_pct(val['source_mean']['fpr_unaltered'])}.",
        "",
        "Worst source: "
        + "; ".join(
            f"{k} {v['source']} ({_num(v['value']) if k == 'auc' else _pct(v['value'])})"
            for k, v in val["worst_source"].items()
        ),
        "",
        "## Per source",
        "",
        "| source | films | accuracy | AUC | precision | recall | unaltered flagged |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, m in val["per_source"].items():
        lines.append(
            f"| {s} | {m['films']} | {_pct(m['accuracy'])} | {_num(m['auc'])} | {_pct(m['precision'])} | "
            f"{_pct(m['recall'])} | {_pct(m['fpr_unaltered'])} ({m['flagged_unaltered']}/{m['unaltered']}) |"
        )
    lines += ["", "## By variant (pooled)", "", "| variant | examples | accuracy | flagged |"]
    lines += ["| --- | --- | --- | --- |"]
    for v, m in p["by_variant"].items():
        lines.append(f"| {v} | {m['examples']} | {_pct(m.get('accuracy'))} | {_pct(m['flagged'])} |")
    if "confusion" in p:
        labels = report["labels"]
        lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
        lines.append("| | " + " | ".join(labels) + " |")
        lines.append("| --- " * (len(labels) + 1) + "|")
        for name, row in zip(labels, p["confusion"], strict=True):
            lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    a = report.get("val_augmented")
    if a:
        lines += [
            "",
            "## Val with realism augmentations (harder; fixed seed)",
            "",
            "The same val films with the training augmentations applied once (tilt, crop, aspect, borders, "
            "collimation, text, window, gamma, noise...): a stress test, not the headline figure.",
            "",
            "| source | films | accuracy | AUC | recall | unaltered flagged |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s, m in [("pooled", a["pooled"]), *a["per_source"].items()]:
            lines.append(
                f"| {s} | {m['films']} | {_pct(m['accuracy'])} | {_num(m['auc'])} | {_pct(m['recall'])} | "
                f"{_pct(m['fpr_unaltered'])} ({m['flagged_unaltered']}/{m['unaltered']}) |"
            )
    c = report["calibration"]
    lines += [
        "",
        "## Calibration films (held-out train patients)",
        "",
        f"{c['films']} films: accuracy {_pct(c['accuracy'])}, AUC {_num(c['auc'])}, unaltered flagged "
        f"{_pct(c['fpr_unaltered'])} ({c['flagged_unaltered']}/{c['unaltered']}).",
        "",
        "## Real films with a known outcome",
        "",
        "| film | expected | score | flagged | ok |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ch in report["checks"]:
        lines.append(
            f"| {ch['path']} ({ch['why']}) | {'flagged' if ch['expected_flagged'] else 'not flagged'} | "
            f"{_num(ch.get('score'), 6)} | {ch.get('flagged')} | {'yes' if ch.get('ok') else '**NO**'} |"
        )
    lines += ["", "## All real DICOM files (most are not chest films; for information)", ""]
    lines += ["| file | body part | predicted | score |", "| --- | --- | --- | --- |"]
    for d in report["dicom"]:
        lines.append(
            f"| {d['path']} | {d.get('body_part', '')} | {d.get('predicted', d.get('error', ''))} | "
            f"{_num(d.get('score'), 4)} |"
        )
    lines += ["", f"## Val mistakes ({len(report['mistakes'])} shown, at most 100)", ""]
    if report["mistakes"]:
        lines += ["| film | source | variant | predicted | score |", "| --- | --- | --- | --- | --- |"]
        for m in report["mistakes"]:
            lines.append(
                f"| {m['film']} | {m['source']} | {m['variant']} | {m.get('predicted', '')} | {m['score']:.4f} |"
            )
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_report(report: dict[str, Any], folder: Path, stem: str = "evaluation") -> tuple[Path, Path]:
    """The one writer of every detector's ``evaluation.{json,md}``: the Markdown is the task's own
    (:meth:`Task.report_markdown`, e.g. ``atypical``) or the framework's."""
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / f"{stem}.json"
    md = folder / f"{stem}.md"
    js.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    own = get_task(report["detector"]).report_markdown(report) if "detector" in report else None
    md.write_text(own if own is not None else report_markdown(report))
    return js, md


def counts_by_source(films: Sequence[LabelledFilm]) -> dict[str, int]:
    return dict(sorted(collections.Counter(f.source for f in films).items()))

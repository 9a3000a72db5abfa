"""Evaluation beyond the framework's report, for the questions a site asks of each detector.

- ``view``: recall per kind with an exact 95% lower bound (only 11 real lateral val films exist, so the bound says
  how much that number can prove), recall on realistic variants of the val laterals (mirrored, tilted, cropped,
  re-windowed: a robustness figure, not an independent sample), predicted class per kind, and mirrored frontal films
  (must stay frontal: the view model must not care about flips).
- ``pediatric``: the shortcut checks: adult val films turned into 224 px square JPEG copies (what ``kermany`` is)
  and 160 px copies must stay adult; children's full-resolution films as 224 px copies must stay children; films
  without an age are reported for information.
- ``flip``: mirrored and unaltered films per source at the shipped threshold (the main report has them too), and the
  real frontal DICOM films.

All through the exported ONNX file and the gate's decode + preprocess. Writes ``extra.{json,md}`` next to the
evaluation report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.decode import DecodeError, decode_file
from filmgate.preprocess import PreprocessSpec, preprocess
from filmgate.typed_config import ConfigError
from filmgate_training.augment import display_augment, film_augment
from filmgate_training.config import AugmentConfig, Config
from filmgate_training.data import val_films
from filmgate_training.datasets import LabelledFilm, labels
from filmgate_training.detectors.degrade import square_stretch
from filmgate_training.evaluate import Runner
from filmgate_training.tasks import Task, get_task


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float | None:
    """Exact (Clopper-Pearson) one-sided lower confidence bound of a proportion k/n."""
    if n == 0:
        return None
    if k == 0:
        return 0.0
    alpha = 1.0 - confidence

    def tail(p: float) -> float:  # P(X >= k | n, p), summed in log space (n can be large)
        if p >= 1.0:
            return 1.0
        logs = [
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
            for i in range(k, n + 1)
        ]
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    lo, hi = 0.0, k / n
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def _pixels(films: Sequence[LabelledFilm]) -> list[tuple[LabelledFilm, np.ndarray]]:
    out = []
    for f in films:
        try:
            out.append((f, decode_file(f.path).pixels))
        except DecodeError:
            continue
    return out


def _score(task: Task, runner: Runner, spec: PreprocessSpec, images: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    if not images:
        return np.zeros(0), np.zeros(0, dtype=int)
    x = np.stack([preprocess(im, spec) for im in images])
    out = np.concatenate([runner(x[i : i + 128]) for i in range(0, len(x), 128)])
    return task.scores(out), out.argmax(1)


def _rate(flags: np.ndarray) -> dict[str, Any]:
    k, n = int(np.sum(flags)), int(len(flags))
    return {"n": n, "flagged": k, "rate": k / n if n else None, "lower95": lower_bound(k, n)}


def view_extra(config: Config, runner: Runner, threshold: float) -> dict[str, Any]:
    task = get_task("view")
    spec = config.preprocessing
    val = [f for f in labels() if f.split == "val"]
    out: dict[str, Any] = {"by_kind": {}, "predicted_by_kind": {}}
    for kind in task.labels:
        films = _pixels([f for f in val if f.kind == kind])
        s, pred = _score(task, runner, spec, [p for _, p in films])
        out["by_kind"][kind] = _rate(s >= threshold)
        out["predicted_by_kind"][kind] = {
            name: int((pred == i).sum()) for i, name in enumerate(task.labels) if (pred == i).any()
        }
        if kind == "frontal-chest":
            mirrored, _ = _score(task, runner, spec, [np.ascontiguousarray(p[:, ::-1]) for _, p in films])
            out["frontal_mirrored"] = _rate(mirrored >= threshold)
            per_source: dict[str, Any] = {}
            for src in sorted({f.source for f, _ in films}):
                m = np.array([f.source == src for f, _ in films])
                per_source[src] = _rate((s >= threshold)[m])
            out["frontal_per_source"] = per_source
        else:
            missed = [(f.rel, float(v)) for (f, _), v in zip(films, s, strict=True) if v < threshold]
            out.setdefault("missed", {})[kind] = missed
    laterals = _pixels([f for f in val if f.kind == "lateral-chest"])
    rng = np.random.default_rng(2024)
    aug = AugmentConfig()
    variants = []
    for _, px in laterals:
        for _ in range(20):
            im = px[:, ::-1] if rng.random() < 0.5 else px
            variants.append(display_augment(film_augment(np.ascontiguousarray(im), rng, aug), rng, aug))
    s, _ = _score(task, runner, spec, variants)
    out["lateral_variants"] = _rate(s >= threshold) | {"films": len(laterals), "variants_per_film": 20}
    return out


def pediatric_extra(config: Config, runner: Runner, threshold: float) -> dict[str, Any]:
    task = get_task("pediatric")
    spec = config.preprocessing
    val = [f for f in labels() if f.split == "val" and f.kind == "frontal-chest"]
    adults = _pixels([f for f in val if (label := task.label_of(f)) is not None and task.labels[label] == "adult"])
    fullres_children = _pixels([f for f in val if f.source == "kermany-fullres"])
    unknown = _pixels([f for f in val if task.label_of(f) is None])
    out: dict[str, Any] = {}
    checks: list[tuple[str, Sequence[tuple[LabelledFilm, np.ndarray]], Callable[[np.ndarray], np.ndarray]]] = [
        ("adult films as they came", adults, lambda p: p),
        ("adult films as 224 px square JPEG copies (like kermany)", adults, lambda p: square_stretch(p, 224)),
        ("adult films as 160 px square JPEG copies", adults, lambda p: square_stretch(p, 160)),
        ("kermany-fullres children as they came", fullres_children, lambda p: p),
        ("kermany-fullres children as 224 px square JPEG copies", fullres_children, lambda p: square_stretch(p, 224)),
        ("films without a known age (vqa-rad, openi, radiopaedia...)", unknown, lambda p: p),
    ]
    for name, films, fn in checks:
        s, _ = _score(task, runner, spec, [fn(p) for _, p in films])
        entry = _rate(s >= threshold)
        entry["per_source"] = {
            src: _rate((s >= threshold)[np.array([f.source == src for f, _ in films])])
            for src in sorted({f.source for f, _ in films})
        }
        out[name] = entry
    return {"checks": out, "spine_by_age": _spine_by_age(task, runner, spec, threshold)}


SPINE_AGE_BANDS = ((0, 12), (12, 16), (16, 18), (18, 20), (20, 200))


def _spine_by_age(task: Task, runner: Runner, spec: PreprocessSpec, threshold: float) -> list[dict[str, Any]]:
    """The ``spine`` val films (not chest films: outside the gate's use of this model) by age band, called child."""
    films = _pixels([f for f in labels() if f.split == "val" and f.source == "spine" and f.age is not None])
    if not films:
        return []
    s, _ = _score(task, runner, spec, [p for _, p in films])
    ages = np.array([float(f.age) for f, _ in films])  # type: ignore[arg-type]
    rows = []
    for lo, hi in SPINE_AGE_BANDS:
        m = (ages >= lo) & (ages < hi)
        if m.any():
            right = (s[m] >= threshold) == (ages[m] < 18)
            rows.append({"ages": f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+", "films": int(m.sum()),
                         "called_child": int((s[m] >= threshold).sum()), "right": int(right.sum())})  # fmt: skip
    return rows


def flip_extra(config: Config, runner: Runner, threshold: float) -> dict[str, Any]:
    task = get_task("flip")
    spec = config.preprocessing
    films = _pixels(val_films(config, task))  # data.exclude applies, as in evaluation.md
    s0, _ = _score(task, runner, spec, [p for _, p in films])
    s1, _ = _score(task, runner, spec, [np.ascontiguousarray(p[:, ::-1]) for _, p in films])
    per_source = {}
    for src in sorted({f.source for f, _ in films}):
        m = np.array([f.source == src for f, _ in films])
        acc = (int((s0[m] < threshold).sum()) + int((s1[m] >= threshold).sum())) / (2 * int(m.sum()))
        per_source[src] = {
            "films": int(m.sum()),
            "accuracy": acc,
            "unaltered_flagged": _rate((s0 >= threshold)[m]),
            "mirrored_caught": _rate((s1 >= threshold)[m]),
        }
    return {"per_source": per_source}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def view_markdown(extra: Mapping[str, Any]) -> list[str]:
    lines = [
        "Films kept out (flagged `not-frontal-chest`) per kind on val, with the exact one-sided 95% lower bound "
        "of the rate (what the sample can prove):",
        "",
        "| kind | films | flagged | rate | 95% lower bound | predicted as |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, m in extra["by_kind"].items():
        lines.append(
            f"| {kind} | {m['n']} | {m['flagged']} | {_pct(m['rate'])} | {_pct(m['lower95'])} | "
            f"{extra['predicted_by_kind'][kind]} |"
        )
    lv = extra["lateral_variants"]
    fm = extra["frontal_mirrored"]
    lines += [
        "",
        f"Realistic variants of the {lv['films']} real val lateral films ({lv['variants_per_film']} each: "
        f"mirrored, tilted, cropped, re-windowed, markers, noise): {lv['flagged']}/{lv['n']} kept out "
        f"({_pct(lv['rate'])}). This measures robustness, not an independent sample.",
        "",
        f"Val frontal films mirrored left-right: {fm['flagged']}/{fm['n']} flagged ({_pct(fm['rate'])}): the view "
        "model leaves flips to the flip detector.",
        "",
        "Frontal chest films flagged, per source:",
        "",
        "| source | films | flagged | rate |",
        "| --- | --- | --- | --- |",
    ]
    for s, m in extra["frontal_per_source"].items():
        lines.append(f"| {s} | {m['n']} | {m['flagged']} | {_pct(m['rate'])} |")
    lines += ["", "Films not kept out:", ""]
    missed_all = [(kind, rel, score) for kind, m in extra.get("missed", {}).items() for rel, score in m[:40]]
    lines += [f"- {kind}: `{rel}` (score {score:.4f})" for kind, rel, score in missed_all] or ["None."]
    return lines


def pediatric_markdown(extra: Mapping[str, Any]) -> list[str]:
    lines = [
        "Shortcut checks: is the model calling films children for their resolution or hospital?",
        "",
        "| films | n | called child | rate | per source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in extra["checks"].items():
        ps = ", ".join(f"{s} {v['flagged']}/{v['n']}" for s, v in m["per_source"].items())
        lines.append(f"| {name} | {m['n']} | {m['flagged']} | {_pct(m['rate'])} | {ps} |")
    lines += [
        "",
        "The `spine` val films (thoraco-lumbar films of the scoliosis set, children and young adults; trained on "
        "only to break the hospital shortcut) by age. They are outside the gate's use of this model: the gate "
        "drops the image model's `pediatric` on films that are `not-frontal-chest` (`policy.outranks`), so a "
        "spine film is quarantined as not-frontal-chest, and as pediatric only by the age in its header.",
        "",
        "| ages | films | called child | right |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['ages']} | {r['films']} | {r['called_child']} | {r['right']} |" for r in extra["spine_by_age"]]
    return lines


def flip_markdown(extra: Mapping[str, Any]) -> list[str]:
    lines = [
        "Per source at the shipped threshold (val frontal films, each as it came and mirrored):",
        "",
        "| source | films | accuracy | unaltered flagged | mirrored caught |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s, m in extra["per_source"].items():
        u, c = m["unaltered_flagged"], m["mirrored_caught"]
        lines.append(
            f"| {s} | {m['films']} | {_pct(m['accuracy'])} | {u['flagged']}/{u['n']} ({_pct(u['rate'])}) | "
            f"{c['flagged']}/{c['n']} ({_pct(c['rate'])}) |"
        )
    return lines


def markdown(task: Task, extra: Mapping[str, Any]) -> str:
    """``extra.md``: a title and the task's own body (:meth:`Task.extra_markdown`)."""
    return f"# Further evaluation: `{task.name}`\n\n" + task.extra_markdown(extra)


def run_extra(config: Config, runner: Runner, threshold: float, folder: Path) -> dict[str, Any]:
    """The task's extra evaluation (:meth:`Task.extra_evaluation`) written to ``folder``/extra.{json,md}."""
    task = get_task(config.task)
    extra = task.extra_evaluation(config, runner, threshold)
    if extra is None:
        raise ConfigError(f"task: {task.name} has no extra evaluation (Task.extra_evaluation); `finish` is for the "
                          "detectors that define one")  # fmt: skip
    (folder / "extra.json").write_text(json.dumps(extra, indent=2) + "\n")
    (folder / "extra.md").write_text(markdown(task, extra))
    return extra

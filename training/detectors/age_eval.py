"""The age model's own evaluation (``finish --config pediatric-age``): how far its years are from the recorded ones.

- **Mean absolute error per age band** on every val film with a recorded age (frontal and lateral chest films of
  ChestX-ray14 and CheXpert, the spine set's children and adults), next to the published anchors: an age model on
  ChestX-ray14 reports a mean absolute error of 3.7 years in adults; pediatric age models report about 6 months.
- **The children's hospital** (its films carry no age, only the documented 1-5 years): the estimate's median and
  spread, how many fall under the cut and how far outside 1-5 the estimates lie.
- **The shortcut checks**, as for the classifier: adult val films as 224 px and 160 px square JPEG copies (what the
  children's hospital's copy looks like) must not become younger than the cut; the children's full-resolution films
  as 224 px copies must stay under it.

All through the exported ONNX file (which outputs years) and the gate's decode + preprocess, at the policy's cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from filmgate_training.config import Config
from filmgate_training.datasets import LabelledFilm, labels
from filmgate_training.detectors.degrade import square_stretch
from filmgate_training.detectors.extra_eval import _pct, _pixels, _rate
from filmgate_training.evaluate import Runner
from filmgate_training.tasks import Task

AGE_BANDS = ((0, 10), (10, 18), (18, 40), (40, 60), (60, 200))
ANCHORS = {"adult": "3.7 years (an age model on ChestX-ray14)", "child": "about 6 months (pediatric age models)"}


def _years(runner: Runner, config: Config, images: Sequence[np.ndarray]) -> np.ndarray:
    from filmgate.preprocess import preprocess

    if not images:
        return np.zeros(0)
    x = np.stack([preprocess(im, config.preprocessing) for im in images])
    out = np.concatenate([runner(x[i : i + 128]) for i in range(0, len(x), 128)])
    return np.asarray(out, dtype=np.float64).reshape(len(out), -1)[:, 0]


def _band(lo: int, hi: int) -> str:
    return f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+"


def mae_by_band(films: Sequence[LabelledFilm], est: np.ndarray, cut: float) -> list[dict[str, Any]]:
    ages = np.array([float(f.age) for f in films])  # type: ignore[arg-type]
    rows = []
    for lo, hi in AGE_BANDS:
        m = (ages >= lo) & (ages < hi)
        if not m.any():
            continue
        err = np.abs(est[m] - ages[m])
        kinds = sorted({f"{f.source} {f.kind}" for f, k in zip(films, m, strict=True) if k})
        rows.append({"band": _band(lo, hi), "films": int(m.sum()), "mae": float(err.mean()),
                     "median_error": float(np.median(est[m] - ages[m])), "under_cut": _rate(est[m] < cut),
                     "films_from": kinds})  # fmt: skip
    return rows


def age_extra(config: Config, task: Task, runner: Runner) -> dict[str, Any]:
    cut = -float(task.fixed_threshold if task.fixed_threshold is not None else -10.0)
    val = [f for f in labels() if f.split == "val" and task.label_of(f) is not None]
    aged = _pixels([f for f in val if f.age is not None])
    est = _years(runner, config, [p for _, p in aged])
    films = [f for f, _ in aged]
    chest = [i for i, f in enumerate(films) if f.kind in ("frontal-chest", "lateral-chest")]
    out: dict[str, Any] = {
        "cut_years": cut,
        "anchors": ANCHORS,
        "mae_by_band": mae_by_band(films, est, cut),
        "mae_by_band_chest": mae_by_band([films[i] for i in chest], est[chest], cut),
    }
    kids = _pixels([f for f in val if f.source in ("kermany", "kermany-fullres")])
    k_est = _years(runner, config, [p for _, p in kids])
    outside = np.maximum(0.0, 1.0 - k_est) + np.maximum(0.0, k_est - 6.0)
    out["documented_children"] = {
        "films": len(kids), "documented": "1-5 years (Kermany et al. 2018)",
        "median": float(np.median(k_est)) if len(k_est) else None,
        "p10_p90": [float(v) for v in np.percentile(k_est, [10, 90])] if len(k_est) else None,
        "mean_years_outside_1_to_6": float(outside.mean()) if len(k_est) else None,
        "under_cut": _rate(k_est < cut),
    }  # fmt: skip
    frontal = [f for f in val if f.kind == "frontal-chest"]
    adults = _pixels([f for f in frontal if task.labels[int(task.label_of(f))] == "adult"])  # type: ignore[arg-type]
    fullres = _pixels([f for f in frontal if f.source == "kermany-fullres"])
    checks: list[tuple[str, Sequence[tuple[LabelledFilm, np.ndarray]], Callable[[np.ndarray], np.ndarray]]] = [
        ("adult films as they came", adults, lambda p: p),
        ("adult films as 224 px square JPEG copies (like kermany)", adults, lambda p: square_stretch(p, 224)),
        ("adult films as 160 px square JPEG copies", adults, lambda p: square_stretch(p, 160)),
        ("kermany-fullres children as they came", fullres, lambda p: p),
        ("kermany-fullres children as 224 px square JPEG copies", fullres, lambda p: square_stretch(p, 224)),
    ]
    out["checks"] = {}
    for name, group, fn in checks:
        years = _years(runner, config, [fn(p) for _, p in group])
        entry = _rate(years < cut) | {"median_years": float(np.median(years)) if len(years) else None}
        entry["per_source"] = {src: _rate((years < cut)[np.array([f.source == src for f, _ in group])])
                               for src in sorted({f.source for f, _ in group})}  # fmt: skip
        out["checks"][name] = entry
    return out


def age_markdown(extra: Mapping[str, Any]) -> list[str]:
    cut = extra["cut_years"]
    lines = [
        f"Mean absolute error (years) per age band, val films with a recorded age; *under {cut:g}* is how many "
        "the gate would flag at the policy's cut. Anchors: adults "
        f"{extra['anchors']['adult']}; children {extra['anchors']['child']}.",
        "",
        "| ages | films | MAE (years) | median error | under the cut | films from |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in extra["mae_by_band"]:
        u = r["under_cut"]
        lines.append(f"| {r['band']} | {r['films']} | {r['mae']:.1f} | {r['median_error']:+.1f} | {u['flagged']}/"
                     f"{u['n']} ({_pct(u['rate'])}) | {', '.join(r['films_from'])} |")  # fmt: skip
    lines += ["", "Chest films only (frontal and lateral):", "", "| ages | films | MAE (years) | median error |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {r['band']} | {r['films']} | {r['mae']:.1f} | {r['median_error']:+.1f} |"
              for r in extra["mae_by_band_chest"]]  # fmt: skip
    d = extra["documented_children"]
    u = d["under_cut"]
    if d["films"]:
        lines += ["", f"The children's hospital's val films (no recorded age; documented {d['documented']}): "
                  f"{d['films']} films, median estimate {d['median']:.1f} years (10th-90th percentile "
                  f"{d['p10_p90'][0]:.1f}-{d['p10_p90'][1]:.1f}), mean distance outside 1-6 years "
                  f"{d['mean_years_outside_1_to_6']:.2f}; under the cut {u['flagged']}/{u['n']} ({_pct(u['rate'])})."]
    lines += ["", "Shortcut checks (under the cut = called a child):", "",
              "| films | n | under the cut | rate | median years | per source |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, m in extra["checks"].items():
        ps = ", ".join(f"{s} {v['flagged']}/{v['n']}" for s, v in m["per_source"].items())
        med = "n/a" if m["median_years"] is None else f"{m['median_years']:.1f}"
        lines.append(f"| {name} | {m['n']} | {m['flagged']} | {_pct(m['rate'])} | {med} | {ps} |")
    return lines

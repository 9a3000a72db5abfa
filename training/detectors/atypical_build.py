"""Fitting and evaluating the ``atypical`` score: the work behind its task's hooks (:mod:`.atypical`).

``python -m filmgate_training all --config atypical`` runs the same steps as every detector
(:mod:`filmgate_training.steps`); this module is what differs:

1. fit (:func:`fit`): load the *shipped* ``view`` network (``models/view/model.onnx`` rebuilt in torch); embed the
   train split's frontal chest films that were not held out (decoded and preprocessed exactly as the gate does,
   ``unit`` input; each as it came and auto-windowed) and fit a source-balanced Gaussian
   (:func:`filmgate_training.detectors.atypical_net.fit_gaussian`); threshold = the source-balanced quantile of the
   held-out train frontal films that flags ``evaluate.target_fpr`` of them (val never chooses it), times the
   leave-one-source-out recalibration factor when ``evaluate.loso_target_fpr`` is set; ``model.pt`` and
   ``build.json`` in the run folder;
2. export and parity: the framework's (:func:`filmgate_training.export.export`);
3. evaluate (:func:`evaluation`) with that very ONNX file on the whole val split: frontal films flagged per source,
   other kinds caught, synthetic wrong films (:mod:`filmgate_training.detectors.corrupt`) caught, the most atypical
   val films (the real DICOM files are the framework's survey);
4. ship: the framework's one manifest and install, with :meth:`AtypicalTask.manifest_metrics` and the card from
   its templates (:func:`filmgate_training.detectors.cards.score_card`).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filmgate.decode import DecodeError, auto_window, decode_file
from filmgate.manifest import load_manifest
from filmgate.preprocess import PreprocessSpec, preprocess
from filmgate_training.config import Config, config_from_dict, load_config
from filmgate_training.data import cap, split_train
from filmgate_training.datasets import REPO_ROOT, LabelledFilm, labels
from filmgate_training.detectors.atypical_net import Atypicality, ViewAndAtypical, fit_gaussian
from filmgate_training.detectors.corrupt import CORRUPTIONS
from filmgate_training.evaluate import Runner
from filmgate_training.model import filmnet_from_onnx
from filmgate_training.tasks import get_task
from filmgate_training.train import load_trained

SHRINK = 0.1  # the covariance is shrunk this far towards the identity (fit_gaussian)

Transform = Callable[[np.ndarray], np.ndarray]


def inputs(films: Sequence[LabelledFilm], spec: PreprocessSpec, transform: Transform | None = None) -> np.ndarray:
    """Films through the serving path (decode -> optional transform -> preprocess), (N, 1, S, S)."""
    out = []
    for film in films:
        try:
            px = decode_file(film.path).pixels
        except DecodeError:
            continue
        out.append(preprocess(transform(px) if transform else px, spec))
    return np.stack(out) if out else np.zeros((0, 1, spec.size, spec.size), np.float32)


def auto_windowed(pixels: np.ndarray) -> np.ndarray:
    """The film as the gate shows a DICOM file that carries no window: stretched 0.5th-99.5th percentile."""
    lo, hi = auto_window(pixels)
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def both_ways(films: Sequence[LabelledFilm], spec: PreprocessSpec) -> tuple[np.ndarray, list[LabelledFilm]]:
    """Each film as it came (PNG/JPEG) and auto-windowed (as a window-less DICOM of it decodes): the typical
    distribution must include both, or every DICOM made from a plain film would look atypical."""
    a, b = inputs(films, spec), inputs(films, spec, auto_windowed)
    return np.concatenate([a, b]), list(films) + list(films)


_EMBEDDED: dict[tuple[str, str, str], np.ndarray] = {}  # (backbone, spec, film) -> (2, D): as it came, auto-windowed


def embedded_both_ways(
    probe: Atypicality, backbone: dict[str, Any], films: Sequence[LabelledFilm], spec: PreprocessSpec
) -> tuple[np.ndarray, list[LabelledFilm]]:
    """:func:`both_ways` films through :meth:`Atypicality.embed`, each film embedded once per process (the
    leave-one-source-out folds refit on the same films again and again); undecodable films are left out (rows
    stay aligned with the films returned)."""
    key = (str(backbone.get("sha256") or backbone.get("from")), json.dumps(spec.to_dict(), sort_keys=True))
    todo = [f for f in films if (*key, str(f.path)) not in _EMBEDDED]
    for i in range(0, len(todo), 256):
        chunk, kept, xs = todo[i : i + 256], [], []
        for film in chunk:
            try:
                px = decode_file(film.path).pixels
            except DecodeError:
                continue
            kept.append(film)
            xs += [preprocess(px, spec), preprocess(auto_windowed(px), spec)]
        if kept:
            emb = _embed(probe, np.stack(xs))
            for j, film in enumerate(kept):
                _EMBEDDED[(*key, str(film.path))] = emb[2 * j : 2 * j + 2]
    have = [f for f in films if (*key, str(f.path)) in _EMBEDDED]
    if not have:
        return np.zeros((0, 0), np.float32), []
    both = np.stack([_EMBEDDED[(*key, str(f.path))] for f in have])  # (N, 2, D)
    return np.concatenate([both[:, 0], both[:, 1]]), list(have) + list(have)


def _embed(net: Atypicality, x: np.ndarray, batch: int = 128) -> np.ndarray:
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(net.embed(torch.from_numpy(x[i : i + batch])).numpy())
    return np.concatenate(outs)


def source_weights(films: Sequence[LabelledFilm], balance: float) -> np.ndarray:
    counts = collections.Counter(f.source for f in films)
    w = np.array([counts[f.source] ** balance / counts[f.source] for f in films], dtype=np.float64)
    return w / w.sum()


def weighted_gaussian(emb: np.ndarray, weights: np.ndarray, shrink: float = SHRINK) -> tuple[np.ndarray, ...]:
    """:func:`fit_gaussian` with per-film weights (by resampling rows in proportion: simple and exact enough)."""
    rng = np.random.default_rng(0)
    idx = rng.choice(len(emb), size=max(4 * len(emb), 20000), p=weights)
    return fit_gaussian(emb[idx], shrink)


def weighted_quantile_threshold(scores: np.ndarray, weights: np.ndarray, target: float) -> float:
    """Smallest threshold whose weighted share of ``scores`` at or above it is at most ``target``."""
    order = np.argsort(scores)[::-1]
    s, w = scores[order], weights[order] / weights.sum()
    above = np.cumsum(w)
    k = int(np.searchsorted(above, target, side="right"))  # the k highest may be flagged
    if k >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[k], np.inf))


def shipped_backbone_config(config: Config, task_name: str) -> Config:
    """The config of the backbone run that is *shipped* (``models/<task>/manifest.json`` records it), so that the
    atypical score is built on the very network the gate runs as ``view``; ``training/configs/<task>.yaml`` when
    nothing is shipped yet."""
    try:
        shipped = load_manifest(config.models_path / task_name).extra["config"]
        return config_from_dict(shipped)
    except (OSError, ValueError, KeyError):
        return load_config(task_name)


def load_backbone(config: Config, task_name: str, backbone_run: Path | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The backbone network and what the report records of it: by default the *shipped* ``models/<task>/model.onnx``
    rebuilt in torch (:func:`filmgate_training.model.filmnet_from_onnx`), so the score sits on the very network the
    gate runs and needs no run folder; ``backbone_run`` uses a run's ``model.pt`` instead (before shipping it)."""
    if backbone_run is not None:
        net, blob = load_trained(backbone_run)
        run_cfg = json.loads((backbone_run / "config.json").read_text())
        return net, {"from": _repo_relative(backbone_run / "model.pt"), "task": blob["task"],
                     "version": str(run_cfg.get("version", "")), "parameters": blob["parameters"]}  # fmt: skip
    folder = config.models_path / task_name
    manifest = load_manifest(folder)  # checks the sha256
    widths = tuple(manifest.extra.get("config", {}).get("model", {}).get("widths", (16, 32, 64, 128, 192)))
    net = filmnet_from_onnx(str(folder / manifest.file), widths)
    return net, {"from": _repo_relative(folder / manifest.file), "task": task_name, "version": manifest.version,
                 "sha256": manifest.sha256, "parameters": int(sum(p.numel() for p in net.parameters()))}  # fmt: skip


def fit_score(config: Config, backbone_run: Path | None = None) -> tuple[Atypicality, float, str]:
    """The fitted score network and its threshold; what :func:`build` exports, and what a leave-one-source-out fold
    (:mod:`filmgate_training.loso`, ``data.exclude_sources``) scores with. Returns (net, threshold, backbone)."""
    net, threshold, parts = _fit(config, backbone_run)
    return net, threshold, f"view {parts['backbone']['version']}"


def _fit(config: Config, backbone_run: Path | None) -> tuple[Atypicality, float, dict[str, Any]]:
    torch.set_num_threads(config.train.threads)
    task = get_task(config.task)
    backbone_task = getattr(task, "backbone_task", "view")
    backbone_cfg = shipped_backbone_config(config, backbone_task)
    view, backbone = load_backbone(config, backbone_task, backbone_run)
    spec = config.preprocessing
    frac = config.data.calibration_fraction
    fit_films, cal_films = split_train(config, task)  # as every detector: held-out patients, left-out sources
    if backbone_cfg.data.calibration_fraction != frac:
        raise ValueError("data.calibration_fraction must equal the view run's, so calibration films were never seen")
    probe = Atypicality(view, np.zeros(1), np.ones(1), np.eye(1), np.eye(1))
    emb, fit_rows = embedded_both_ways(probe, backbone, fit_films, spec)
    mean, scale, w_content, w_display = weighted_gaussian(emb, source_weights(fit_rows, config.data.source_balance))
    net = Atypicality(view, mean, scale, w_content, w_display).eval()
    emb_cal, cal_rows = embedded_both_ways(probe, backbone, cal_films, spec)
    cal_w = source_weights(cal_rows, config.data.source_balance)
    target = config.evaluate.target_fpr
    with torch.inference_mode():
        dc, dd = (t.numpy()[:, 0] for t in net.distances_of(torch.from_numpy(emb_cal)))
    net.unit_content = weighted_quantile_threshold(dc, cal_w, target)
    net.unit_display = weighted_quantile_threshold(dd, cal_w, target)
    cal_scores = np.maximum(dc / net.unit_content, dd / net.unit_display)
    threshold = weighted_quantile_threshold(cal_scores, cal_w, target)
    parts = {"view": view, "backbone": backbone, "fit_films": fit_films, "cal_films": cal_films,
             "cal_scores": cal_scores, "embedding_dims": int(emb.shape[1])}  # fmt: skip
    return net, threshold, parts


def fit(config: Config, backbone_run: Path | None = None) -> Path:
    """Fit the score and its threshold; the run folder gets ``model.pt`` (what :func:`load_run` reads) and
    ``build.json`` (how it was fitted: films, units, threshold rule, the synthetic films of the held-out train films).
    With ``evaluate.loso_target_fpr`` the threshold is raised by the folds' recalibration factor, and the held-out
    hospitals at the recalibrated threshold go into the leave-one-source-out report."""
    run = config.run_path
    run.mkdir(parents=True, exist_ok=True)
    spec = config.preprocessing
    t0 = time.perf_counter()
    net, threshold, parts = _fit(config, backbone_run)
    view, backbone, fit_films, cal_films = parts["view"], parts["backbone"], parts["fit_films"], parts["cal_films"]
    cal_scores = parts["cal_scores"]
    recalibration = None
    if config.evaluate.loso_target_fpr is not None:
        from filmgate_training.loso import merge
        from filmgate_training.recalibrate import recalibrated_rows, recalibration_factor

        recalibration = recalibration_factor(config, config.evaluate.loso_target_fpr)
        threshold *= recalibration["factor"]
        merge(config.task, recalibrated_rows(config, config.evaluate.loso_target_fpr))
    # what the build may look at to judge a design: synthetic wrong films made from held-out *train* adult films
    cal_adults = [f for f in cal_films if f.pediatric != "yes"]
    cal_synthetic = {}
    with torch.inference_mode():
        for name, fn in CORRUPTIONS.items():
            s = net(torch.from_numpy(inputs(cal_adults, spec, fn))).numpy()[:, 0]
            cal_synthetic[name] = {"films": len(s), "caught": int((s >= threshold).sum()),
                                   "rate": float((s >= threshold).mean())}  # fmt: skip
    # the rebuilt z-score input vs the gate's own z-score, on real val films (a check of the graph, chooses nothing)
    val_frontal = [f for f in get_task(config.task).films(labels(), "val")][::40][: config.evaluate.parity_films]
    x = inputs(val_frontal, spec)
    xz = inputs(val_frontal, PreprocessSpec(spec.size, spec.resize, "zscore"))
    with torch.inference_mode():
        ref = view.embed(torch.from_numpy(xz)).numpy()
        mine = net.embed(torch.from_numpy(x)).numpy()[:, 128 : 128 + ref.shape[1]]
    zdiff = float(np.abs(ref - mine).max() / (np.abs(ref).max() + 1e-9))
    print(f"rebuilt z-score vs gate z-score, relative max |diff| of features = {zdiff:.3g}")
    info = {
        "threshold": threshold,
        "threshold_rule": (
            f"source-balanced {1 - config.evaluate.target_fpr:.1%} quantile of {len(cal_films)} held-out train "
            "frontal films, each as it came and auto-windowed (never trained on by view, never used to fit the "
            "Gaussian)"
            + (
                f", times {recalibration['factor']:.4f}: the factor that brings the clean films of the hospitals each "
                f"leave-one-source-out fold never saw to {recalibration['target']:.2%} false flags on average over "
                f"{len(recalibration['sources'])} held-out sources (from {recalibration['mean_rate_at_1']:.2%})"
                if recalibration
                else ""
            )
        ),
        "calibration_flagged": float((cal_scores >= threshold).mean()),
        "calibration_synthetic": cal_synthetic,
        "loso_recalibration": recalibration,
        "fit_films": dict(sorted(collections.Counter(f.source for f in fit_films).items())),
        "calibration_films": dict(sorted(collections.Counter(f.source for f in cal_films).items())),
        "embedding_dims": parts["embedding_dims"],
        "unit_content": net.unit_content,
        "unit_display": net.unit_display,
        "zscore_rebuild_rel_diff": zdiff,
        "backbone": backbone,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    blob = {"task": config.task, "model": net, "parameters": int(sum(p.numel() for p in net.parameters())),
            "build": info}  # fmt: skip
    torch.save(blob, run / "model.pt")
    (run / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return run / "model.pt"


def shared_graph(models_path: Path) -> tuple[torch.nn.Module, dict[str, PreprocessSpec]]:
    """``view`` and ``atypical`` in one graph (:class:`ViewAndAtypical`), from the shipped models alone: the view
    network rebuilt from models/view/model.onnx, atypical's Gaussian from the initializers of models/atypical/
    model.onnx and its units from the build record in its evaluation.json. Refused when atypical was built on
    another view model than the one shipped (rebuild atypical first)."""
    import onnx
    from onnx import numpy_helper

    view_m, atyp_m = load_manifest(models_path / "view"), load_manifest(models_path / "atypical")
    build = json.loads((models_path / "atypical" / "evaluation.json").read_text())["build"]
    if build["backbone"].get("sha256") != view_m.sha256:
        raise RuntimeError("atypical was built on another view model than models/view: rebuild atypical first "
                           "(python -m filmgate_training all --config atypical)")  # fmt: skip
    widths = tuple(view_m.extra.get("config", {}).get("model", {}).get("widths", (16, 32, 64, 128, 192)))
    view = filmnet_from_onnx(str(models_path / "view" / view_m.file), widths)
    init = {i.name: numpy_helper.to_array(i).copy() for i in onnx.load(str(models_path / "atypical" / atyp_m.file)
                                                                        ).graph.initializer}  # fmt: skip
    net = Atypicality(view, init["mean"], init["scale"], init["whiten_content"], init["whiten_display"],
                      build["unit_content"], build["unit_display"])  # fmt: skip
    return ViewAndAtypical(net, view.head).eval(), {"image": view_m.preprocessing, "unit": atyp_m.preprocessing}


def load_run(config: Config) -> tuple[Atypicality, dict[str, Any]]:
    """The fitted score network of the run (``model.pt`` written by :func:`fit`) and its metadata."""
    path = config.run_path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fitted score; run `python -m filmgate_training all --config atypical`")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob.get("model"), Atypicality):
        raise FileNotFoundError(f"{path}: not a fitted atypical score (a training run's model.pt?)")
    return blob["model"].eval(), blob


def evaluation(config: Config, runner: Runner, sheet_dir: Path | None = None) -> dict[str, Any]:
    """The whole val split through the exported ONNX file (``runner``), at the threshold :func:`fit` chose: films
    flagged per kind and per source, synthetic wrong films caught, the most atypical val frontal films; ``build``
    is the fit's record with the export's parity (``parity.json``)."""
    run = config.run_path
    info = json.loads((run / "build.json").read_text())
    exported = json.loads((run / "parity.json").read_text())
    info |= {"parity_max_abs_diff": exported["max_abs_diff"], "sha256": exported["sha256"]}
    score = runner
    spec = config.preprocessing
    threshold = info["threshold"]
    val = [f for f in labels() if f.split == "val"]
    by_kind: dict[str, Any] = {}
    frontal_per_source: dict[str, Any] = {}
    ranked: list[tuple[float, str, str, str]] = []
    for kind in ("frontal-chest", "lateral-chest", "other-radiograph", "not-radiograph"):
        films = cap([f for f in val if f.kind == kind], config.data.max_val_films)  # a cap only for smoke runs
        x = inputs(films, spec)
        s = score(x)[:, 0] if len(x) else np.zeros(0)
        by_kind[kind] = {
            "films": len(s),
            "flagged": int((s >= threshold).sum()),
            "rate": float((s >= threshold).mean()),
        }
        if kind == "frontal-chest":
            for src in sorted({f.source for f in films}):
                m = np.array([f.source == src for f in films])
                frontal_per_source[src] = {
                    "films": int(m.sum()),
                    "flagged": int((s[m] >= threshold).sum()),
                    "rate": float((s[m] >= threshold).mean()),
                    "median_score": float(np.median(s[m])),
                }
        ranked += [(float(v), f.rel, f.source, kind) for v, f in zip(s, films, strict=True)]
    ranked.sort(reverse=True)
    # synthetic wrong films, made from val adult frontal films (every 3rd, for time)
    adults = cap([f for f in val if f.kind == "frontal-chest" and f.pediatric != "yes"][::3], config.data.max_val_films)
    synthetic = {}
    for name, fn in CORRUPTIONS.items():
        s = score(inputs(adults, spec, fn))[:, 0]
        synthetic[name] = {
            "films": len(s),
            "caught": int((s >= threshold).sum()),
            "rate": float((s >= threshold).mean()),
        }
    frontal_top = [r for r in ranked if r[3] == "frontal-chest"][:15]
    if sheet_dir is not None:
        _contact_sheets(sheet_dir, spec, adults[:6], [r[1] for r in frontal_top[:12]])
    return {
        "threshold": threshold,
        "threshold_rule": info["threshold_rule"],
        "val": {"by_kind": by_kind, "frontal_per_source": frontal_per_source},
        "synthetic": synthetic,
        "most_atypical_frontal": [{"film": r[1], "source": r[2], "score": round(r[0], 4)} for r in frontal_top],
        "build": info,
    }


def manifest_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's figures (what the gate's ``--version`` and the tests read): flag rates by kind and source."""
    return {
        "val_frontal_flagged": report["val"]["by_kind"]["frontal-chest"]["rate"],
        "val_by_kind": {k: v["rate"] for k, v in report["val"]["by_kind"].items()},
        "val_frontal_per_source": {k: v["rate"] for k, v in report["val"]["frontal_per_source"].items()},
        "synthetic_caught": {k: v["rate"] for k, v in report["synthetic"].items()},
        "evaluation": "evaluation.md",
    }


def _contact_sheets(folder: Path, spec: PreprocessSpec, adults: Sequence[LabelledFilm], top: Sequence[str]) -> None:
    """Images for people (git-ignored run folder): synthetic examples and the most atypical val frontal films."""
    import cv2

    from filmgate_training.datasets import data_root

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for film in adults:
        px = decode_file(film.path).pixels
        tiles = [preprocess(px, PreprocessSpec(96, spec.resize, "unit"))[0]]
        tiles += [preprocess(fn(px), PreprocessSpec(96, spec.resize, "unit"))[0] for fn in CORRUPTIONS.values()]
        rows.append(np.hstack(tiles))
    cv2.imwrite(str(folder / "atypical-synthetic.png"), (np.vstack(rows) * 255).astype(np.uint8))
    tiles = [
        preprocess(decode_file(data_root() / rel).pixels, PreprocessSpec(96, spec.resize, "unit"))[0] for rel in top
    ]
    if tiles:
        cv2.imwrite(str(folder / "atypical-top-val-frontal.png"), (np.hstack(tiles) * 255).astype(np.uint8))


def report_markdown(r: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    lines = [
        f"# Evaluation: `atypical` {r['version']}",
        "",
        f"Created {r['created']}. Threshold **{r['threshold']:.4f}** ({r['threshold_rule']}).",
        "Score: the larger of two Mahalanobis distances (per dimension) to the train frontal chest films, each in "
        "units of its calibration quantile: content (view features at two depths) and display (5 grey-level "
        "statistics). Every number below is from the exported ONNX file on val films.",
        "",
        "## Val films flagged, by kind",
        "",
        "| kind | films | flagged | rate |",
        "| --- | --- | --- | --- |",
    ]
    for k, m in r["val"]["by_kind"].items():
        lines.append(f"| {k} | {m['films']} | {m['flagged']} | {pct(m['rate'])} |")
    lines += [
        "",
        "## Val frontal chest films flagged, per source",
        "",
        "| source | films | flagged | rate | median score |",
    ]
    lines.append("| --- | --- | --- | --- | --- |")
    for s, m in r["val"]["frontal_per_source"].items():
        lines.append(f"| {s} | {m['films']} | {m['flagged']} | {pct(m['rate'])} | {m['median_score']:.3f} |")
    lines += [
        "",
        "## What it catches: synthetic wrong films made from val adult frontal films",
        "",
        "(see `training/detectors/corrupt.py`; contact sheet in the run folder, not committed)",
        "",
        "| made | films | caught | rate |",
        "| --- | --- | --- | --- |",
    ]
    for k, m in r["synthetic"].items():
        lines.append(f"| {k} | {m['films']} | {m['caught']} | {pct(m['rate'])} |")
    lines += ["", "## Real DICOM files", "", "| file | body part | score | flagged |", "| --- | --- | --- | --- |"]
    for d in r["dicom"]:
        lines.append(
            f"| {d['path']} | {d.get('body_part', '')} | {d.get('score', d.get('error'))} | {d.get('flagged')} |"
        )
    lines += [
        "",
        "## The most atypical val frontal chest films",
        "",
        "| film | source | score |",
        "| --- | --- | --- |",
    ]
    for m in r["most_atypical_frontal"]:
        lines.append(f"| {m['film']} | {m['source']} | {m['score']:.3f} |")
    b = r["build"]
    lines += [
        "",
        "## Build",
        "",
        f"Fitted on {sum(b['fit_films'].values())} train frontal films {b['fit_films']}; calibrated on "
        f"{sum(b['calibration_films'].values())} held-out train frontal films (flagged there: "
        f"{pct(b['calibration_flagged'])}). Embedding {b['embedding_dims']} dimensions. ONNX parity max |diff| "
        f"{b['parity_max_abs_diff']:.3g}; rebuilt z-score vs the gate's z-score (relative feature diff) "
        f"{b['zscore_rebuild_rel_diff']:.3g}.",
    ]
    return "\n".join(lines) + "\n"


def _repo_relative(path: Path) -> str:
    """A path as recorded in reports: relative to the checkout when inside it (no machine paths in the repo)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)

"""Recalibrating a score detector on leave-one-source-out folds (``evaluate.loso_target_fpr``).

A fold (:func:`filmgate_training.loso.fold`) writes the clean held-out films' scores and its own threshold to
``<run_dir>/loso/<source>/scores.json``. How much higher a hospital the model never saw scores, over the threshold
its own held-out train films chose, is what the full model's threshold must allow for. No val film is involved.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from filmgate_training.config import Config
from filmgate_training.metrics import wilson_interval

MIN_FILMS = 20  # a source with fewer films of the task is not a fold (its interval would say nothing)


def fold_ratios(config: Config, min_films: int = MIN_FILMS) -> dict[str, np.ndarray]:
    """Per held-out source: its clean films' scores over its fold's threshold."""
    ratios: dict[str, np.ndarray] = {}
    for path in sorted((config.run_path / "loso").glob("*/scores.json")):
        d = json.loads(path.read_text())
        if len(d["clean"]) >= min_films:
            ratios[d["source"]] = np.asarray(d["clean"], dtype=np.float64) / float(d["threshold"])
    if not ratios:
        raise FileNotFoundError(f"{config.run_path / 'loso'}: no fold scores; run `loso --sources all` first")
    return ratios


def recalibration_factor(config: Config, target: float, min_films: int = MIN_FILMS) -> dict[str, Any]:
    """The factor on a fold's own threshold that brings the clean films of the hospitals it never saw to ``target``
    false flags, averaged over held-out sources (each source counts once, however many films it has).

    Each fold's threshold was chosen on its own held-out train films (the rule the full build uses); the clean
    held-out films' scores over that threshold say how much higher a hospital the model never saw scores. The full
    model's threshold times this factor is the leave-one-source-out recalibration (``evaluate.loso_target_fpr``).
    Needs ``scores.json`` of folds (``python -m filmgate_training loso --sources all``); val plays no part.
    """
    ratios = fold_ratios(config, min_films)

    factor = _factor(ratios, target)
    per_source = {s: float((r >= factor).mean()) for s, r in ratios.items()}
    # the factor was chosen on these very folds; the honest figure for a hospital is with the factor chosen on the
    # *other* folds (nested leave-one-source-out)
    nested = {s: float((r >= _factor({k: v for k, v in ratios.items() if k != s}, target)).mean())
              for s, r in ratios.items()}  # fmt: skip
    return {"factor": factor, "target": target, "sources": sorted(ratios), "mean_rate_at_1": _mean_rate(ratios, 1.0),
            "mean_rate": _mean_rate(ratios, factor), "per_source": per_source, "nested_per_source": nested,
            "nested_mean_rate": float(np.mean(list(nested.values())))}  # fmt: skip


def recalibrated_rows(config: Config, target: float, min_films: int = MIN_FILMS) -> list[dict[str, Any]]:
    """Report rows for a recalibrated score detector: each held-out source at its fold's threshold times the factor
    chosen on the *other* folds (nested), so the figure is one the hospital itself did not help choose."""
    ratios = fold_ratios(config, min_films)
    rows = []
    for s, r in sorted(ratios.items()):
        m = _factor({k: v for k, v in ratios.items() if k != s}, target)
        k, n = int((r >= m).sum()), len(r)
        ff = {"examples": n, "flagged": k, "rate": k / n, "ci95": list(wilson_interval(k, n))}
        rows.append({"source": s, "mode": "fold", "model": f"{config.version} fold: recalibrated (factor {m:.3f} "
                     "from the other folds)", "version": config.version, "films": n, "false_flags": ff,
                     "classes": {"typical": ff | {"role": "false flags"}}})  # fmt: skip
    return rows


def _mean_rate(ratios: dict[str, np.ndarray], m: float) -> float:
    return float(np.mean([(r >= m).mean() for r in ratios.values()]))


def _factor(ratios: dict[str, np.ndarray], target: float) -> float:
    """The smallest factor >= 1 at which the source-averaged rate of ``ratios >= factor`` is at most ``target``."""
    candidates = np.unique(np.concatenate([[1.0], *ratios.values()]))
    candidates = np.nextafter(candidates[candidates >= 1.0], np.inf)
    return next((float(m) for m in np.concatenate([[1.0], candidates]) if _mean_rate(ratios, m) <= target), 1.0)
